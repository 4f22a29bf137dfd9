"""The package's shape: sub-packages by concern, no import cycles, the engine never imports Streamlit.

The import graph is read from the source (every `import` statement, including ones inside
functions), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "oodcore"
UI_PACKAGE = "oodcore.explorer"  # the only place Streamlit and Altair may be imported inside oodcore
SUBPACKAGES = {
    "data",
    "models",
    "extraction",
    "store",
    "detectors",
    "evaluation",
    "training",
    "cli",
    "explorer",
    "share",
}
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """Every module an import statement in `path` names (`from a import b` names a.b when that is a module, else a)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import (use absolute oodcore.* imports)"
            for alias in node.names:  # `from pkg import module` names the module; `from mod import name`, mod
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


def graph() -> dict[str, set[str]]:
    """Edges between the package's modules: module -> the oodcore modules it imports."""
    return {name: {m for m in imported(path) if m in MODULES and m != name} for name, path in MODULES.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    edges = graph()
    assert sum(map(len, edges.values())) > 50  # the reader found the package's imports
    assert cycles(edges) == []


def test_the_engine_never_imports_streamlit_or_the_explorer():
    offenders = []
    for name, path in MODULES.items():
        if name == UI_PACKAGE or name.startswith(UI_PACKAGE + "."):
            continue
        for mod in imported(path):
            top = mod.split(".")[0]
            if top in ("streamlit", "altair") or mod == UI_PACKAGE or mod.startswith(UI_PACKAGE + "."):
                offenders.append(f"{name} imports {mod}")
    assert offenders == []
    # and the explorer does import Streamlit (the check above would otherwise prove nothing)
    assert any("streamlit" in imported(p) for n, p in MODULES.items() if n.startswith(UI_PACKAGE))


def test_subpackages_by_concern_each_with_a_docstring():
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert found == SUBPACKAGES
    top_modules = {p.name for p in PACKAGE.glob("*.py")}
    assert top_modules == {"__init__.py", "__main__.py"}
    for sub in sorted(SUBPACKAGES):
        doc = ast.get_docstring(ast.parse((PACKAGE / sub / "__init__.py").read_text()))
        assert doc and len(doc.splitlines()[0]) > 20, (
            f"oodcore.{sub} needs a one-line docstring saying what belongs there"
        )


def test_no_module_is_too_long():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


@pytest.mark.parametrize("folder", ["oodcore", "pages", "app.py", "tests"])
def test_no_sys_path_or_pythonpath_manipulation(folder):
    paths = [ROOT / folder] if folder.endswith(".py") else sorted((ROOT / folder).rglob("*.py"))
    bad = re.compile(r"sys\.path\.(insert|append)|PYTHONPATH|os\.chdir|parents\[1\] */ *\"app\.py\"")
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in paths
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if bad.search(line) and p.name != "test_architecture.py"
    ]
    assert hits == []


def test_pages_are_thin_views():
    """Pages hold layout and widgets: no numpy science beyond formatting, and they import no torch."""
    for page in sorted((ROOT / "pages").glob("*.py")):
        mods = imported(page)
        assert not {m for m in mods if m.split(".")[0] in ("torch", "timm", "torchvision", "sklearn")} or page.name in (
            "score_image.py",  # runs the network on an upload, lazily
        ), page.name
