"""Build-time only (setuptools' build_py, named in pyproject.toml): ship the one `pipeline.toml`.

The file stays at the top of the repo; this copies it into the built `cache_format` package,
so a wheel carries it as package data and the repo holds no second copy that could drift.
A checkout (editable install) reads the top-level file in place. Never imported at run time.
"""

import shutil
from pathlib import Path

from setuptools.command.build_py import build_py


class BuildPyWithConfig(build_py):
    def run(self):
        super().run()
        if not self.dry_run:
            target = Path(self.build_lib) / "cache_format" / "pipeline.toml"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(__file__).resolve().parents[1] / "pipeline.toml", target)
