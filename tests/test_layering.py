"""The package arrows: harvest → cache_format ← train, and harvest → train's SAE module only.

Checked statically on every import statement, so that a lazy import inside a function cannot
hide a wrong-way arrow (the runtime guard for `import train` lives in the train tests).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FORBIDDEN = {
    "cache_format": ("transformers", "vllm", "harvest", "train"),
    "train": ("transformers", "vllm", "harvest"),
    "harvest": ("vllm",),  # vLLM runs in its own environment, as a subprocess
}
HARVEST_MAY_USE_FROM_TRAIN = ("train.sae", "train.published")
# Run as a script by the vLLM environment's own interpreter; never imported by harvest.
VLLM_ENTRY = Path("harvest/vllm_generate.py")


def imported_modules(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(ROOT).parts[0]
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: stays inside its own package
                names.append(package)
            elif node.module:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_wrong_way_imports(package):
    bad = []
    for path in sources(package):
        if path.relative_to(ROOT) == VLLM_ENTRY:
            continue
        for mod in imported_modules(path):
            top = mod.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
            if package == "harvest" and top == "train":
                if not mod.startswith(HARVEST_MAY_USE_FROM_TRAIN) and mod != "train":
                    bad.append(f"{path.relative_to(ROOT)} imports {mod} (only train.sae/train.published)")
    assert not bad, "\n".join(bad)


def test_harvest_imports_train_only_by_submodule():
    for path in sources("harvest"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "train":
                names = {a.name for a in node.names}
                assert names <= {"sae", "published"}, f"{path}: from train import {names}"


def test_vllm_entry_point_is_never_imported():
    """It runs in a separate environment; importing it here would drag vLLM into ours."""
    entry = VLLM_ENTRY.stem
    for package in FORBIDDEN:
        for path in sources(package):
            if path.relative_to(ROOT) == VLLM_ENTRY:
                continue
            assert not any(m.endswith(entry) for m in imported_modules(path)), path
    assert not any(m.split(".")[0] in ("harvest", "train", "cache_format")
                   for m in imported_modules(ROOT / VLLM_ENTRY))
