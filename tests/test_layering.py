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
# splicing only: the SAE, loading a published one, and reading the run directory that lists them
HARVEST_MAY_USE_FROM_TRAIN = ("train.sae", "train.published", "train.outdir")
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
                    bad.append(f"{path.relative_to(ROOT)} imports {mod} (only {', '.join(HARVEST_MAY_USE_FROM_TRAIN)})")
    assert not bad, "\n".join(bad)


def test_harvest_imports_train_only_by_submodule():
    for path in sources("harvest"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "train":
                names = {a.name for a in node.names}
                assert names <= {m.split(".")[1] for m in HARVEST_MAY_USE_FROM_TRAIN}, (
                    f"{path}: from train import {names}"
                )


def test_vllm_entry_point_is_never_imported():
    """It runs in a separate environment; importing it here would drag vLLM into ours."""
    entry = VLLM_ENTRY.stem
    for package in FORBIDDEN:
        for path in sources(package):
            if path.relative_to(ROOT) == VLLM_ENTRY:
                continue
            assert not any(m.endswith(entry) for m in imported_modules(path)), path
    assert not any(m.split(".")[0] in ("harvest", "train", "cache_format") for m in imported_modules(ROOT / VLLM_ENTRY))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports, lazy imports included, resolved to module files
    (`from pkg import name` is the module pkg.name when it is one, else pkg itself)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph`, as the list of modules around it, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circles():
    """Within and across the packages: a module never imports, through any chain, itself."""
    paths = [p for package in FORBIDDEN for p in sources(package) if p.relative_to(ROOT) != VLLM_ENTRY]
    known = {module_name(p) for p in paths}
    graph = {module_name(p): project_imports(p, known) for p in paths}
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


# -- private names stay in their module --------------------------------------------------------

SCANNED = ("cache_format", "harvest", "train", "tests", "bench")


def test_no_module_imports_a_private_name_from_another():
    """`from x import _name` couples a module to another's internals: make the name public where
    it is part of a contract, or keep the caller in the same module."""
    bad = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom):
                    names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                    bad += [f"{path.relative_to(ROOT)}: from {node.module or '.'} import {n}" for n in names]
    assert not bad, "\n".join(bad)


NOT_PROJECT_OBJECTS = {"os"}  # `os._exit` is the standard library's public way out


def test_tests_read_no_private_attribute_of_a_project_object():
    """Tests go through public interfaces: `obj._x` (obj not the test's own `self`) couples a test
    to a layout of the code that a refactor may change without changing behaviour."""
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", *NOT_PROJECT_OBJECTS):
                continue
            bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "\n".join(bad)


# -- tests and benchmarks stay apart --------------------------------------------------------------

TEST_HELPERS = ("support", "conftest", "planted_data", "analysis_data", "hub_standin")


def _names_dir(path: Path, name: str) -> bool:
    """Whether code in `path` (docstrings aside) names the directory `name`: "name" or "name/...",
    a string constant, as in `ROOT / "name"` or `sys.path.insert(0, "name")`."""
    return any(
        isinstance(n, ast.Constant) and isinstance(n.value, str) and (n.value == name or n.value.startswith(f"{name}/"))
        for n in ast.walk(ast.parse(path.read_text(), filename=str(path)))
    )


def test_bench_and_tests_do_not_import_each_other():
    """A benchmark that imports test helpers measures what the tests happen to build; a test that
    runs a benchmark fails when a measurement is tuned. Each side has what it needs."""
    bad = []
    for path in sorted((ROOT / "bench").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        uses = {m.split(".")[0] for m in imported_modules(path)} & set(TEST_HELPERS)
        if uses or _names_dir(path, "tests"):
            bad.append(f"{rel} imports the tests' helpers ({', '.join(sorted(uses)) or 'tests/ on sys.path'})")
    for path in sorted((ROOT / "tests").rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if path == Path(__file__).resolve():
            continue  # this guard names both to scan them
        if _names_dir(path, "bench") or "bench" in {m.split(".")[0] for m in imported_modules(path)}:
            bad.append(f"{rel} uses bench/")
    assert not bad, "\n".join(bad)


def test_no_module_is_over_800_lines():
    """One concept per module, whatever its size, but a module past 800 lines holds more than one."""
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for package in FORBIDDEN
        for p in sources(package)
        if (n := len(p.read_text().splitlines())) > 800
    ]
    assert not long, "\n".join(long)


MAX_MODULES = 65  # the three packages together, __init__ and __main__ included


def test_the_packages_hold_at_most_65_modules():
    """Modules by concept, not by size: a newcomer finds each concept in one file. Counts the
    actual tree (every .py file of cache_format, harvest and train)."""
    counts = {package: len(sources(package)) for package in sorted(FORBIDDEN)}
    assert sum(counts.values()) <= MAX_MODULES, f"{sum(counts.values())} modules > {MAX_MODULES}: {counts}"
