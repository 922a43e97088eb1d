"""`verify` and the CLI on a damaged log (cache_format/verify.py)."""

from __future__ import annotations

import os


def test_verify_and_the_cli_refuse_a_damaged_log_without_a_traceback(make_cache, tmp_path):
    import subprocess
    import sys

    url, _ = make_cache(segments=(10,))
    rec = os.path.join(url, "commits", "0000000001.json")
    raw = open(rec, "rb").read()
    open(rec, "wb").write(raw[:20] + b"\xfe" + raw[21:])
    p = subprocess.run([sys.executable, "-m", "cache_format", "verify", url], capture_output=True, text=True)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "0000000001.json" in lines[0]
    assert "Traceback" not in p.stderr
