"""Every import points down (docs/architecture.md): walks the import graph of the project's files
with ``ast`` (top-level, function-local and ``TYPE_CHECKING`` imports alike; relative imports
resolved) and fails on

* a module outside ``app/`` importing ``autoalign.app``;
* an import cycle between files;
* a non-namespaced import of a project folder (``import app``, ``from models import ...``).

The walker is a plain function of a repository root, so the second half of this file runs it on
small deliberately broken trees to show that each rule can fail.
"""
from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: cycles being removed on another branch: each pair's edges are ignored by the cycle check only
KNOWN_CYCLES: set[frozenset[str]] = set()


@dataclass
class ImportGraph:
    modules: dict[str, Path] = field(default_factory=dict)          # module name -> file
    edges: dict[str, set[str]] = field(default_factory=dict)        # module -> project modules it imports
    bare: list[str] = field(default_factory=list)                   # "file:line: import app" findings


def package_dirs(root: Path) -> dict[str, str]:
    """``[tool.setuptools.package-dir]`` of ``root/pyproject.toml``: package name -> folder."""
    with open(root / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["setuptools"]["package-dir"])


def import_graph(root: Path, extra_dirs: tuple[str, ...] = ()) -> ImportGraph:
    """The project's import graph. Folders of ``package-dir`` are the project; files under
    ``extra_dirs`` (tests, benchmarks) are only checked for non-namespaced imports."""
    mapping = package_dirs(root)
    graph = ImportGraph()
    folders = {folder.split("/")[0] for folder in mapping.values()}
    for package, folder in mapping.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            graph.modules[".".join([package, *parts])] = path
    files = [(name, path, path.name == "__init__.py") for name, path in graph.modules.items()]
    for d in extra_dirs:
        for path in sorted((root / d).rglob("*.py")) if (root / d).is_dir() else []:
            files.append((None, path, path.name == "__init__.py"))
    for name, path, is_package in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    _note(graph, path, node, alias.name, folders)
                    targets.add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolved against this module's package
                    if name is None:
                        continue
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = package[: len(package) - (node.level - 1)]
                    base_name = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                    _note(graph, path, node, base_name, folders)
                for alias in node.names:  # `from pkg import module` imports the module
                    sub = f"{base_name}.{alias.name}"
                    targets.add(sub if sub in graph.modules else base_name)
        if name is not None:
            graph.edges[name] = {t for t in targets if t in graph.modules and t != name}
    return graph


def _note(graph: ImportGraph, path: Path, node: ast.AST, module: str, folders: set[str]) -> None:
    top = module.split(".")[0]
    if top in folders and top != "autoalign":
        graph.bare.append(f"{path}:{node.lineno}: imports {module!r} (use 'autoalign.{module}')")


def upward_imports(graph: ImportGraph, top: str = "autoalign.app") -> list[str]:
    """Modules outside ``top`` that import something inside it."""
    inside = lambda m: m == top or m.startswith(top + ".")  # noqa: E731
    return sorted(f"{m} imports {t}" for m, ts in graph.edges.items() if not inside(m)
                  for t in ts if inside(t))


def cycles(graph: ImportGraph, known: set[frozenset[str]] = frozenset()) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring ``known`` pairs."""
    edges = {m: {t for t in ts if frozenset({m, t}) not in known} for m, ts in graph.edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


# ---------------------------------------------------------------------------- the project
@pytest.fixture(scope="module")
def project() -> ImportGraph:
    return import_graph(ROOT, extra_dirs=("tests", "benchmarks", "scripts"))


def test_the_walker_sees_the_project(project):
    assert len(project.modules) > 40
    # a known downward edge, and a function-local one
    assert "autoalign.calibration.measurement" in project.edges["autoalign.app.loop"]
    assert "autoalign.models.estimator" in project.edges["autoalign.app.estimators"]


def test_nothing_below_app_imports_app(project):
    assert upward_imports(project) == []


def test_no_import_cycle_between_files(project):
    assert cycles(project, KNOWN_CYCLES) == []


def test_every_project_import_is_namespaced(project):
    assert project.bare == []


# ---------------------------------------------------------------------------- the rules can fail
def _tree(root: Path, files: dict[str, str]) -> Path:
    (root / "pyproject.toml").write_text(
        '[tool.setuptools.package-dir]\n"autoalign" = "autoalign"\n"autoalign.app" = "app"\n'
        '"autoalign.models" = "models"\n')
    for rel, text in {"autoalign/__init__.py": "", "app/__init__.py": "", "models/__init__.py": "",
                      **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_walker_flags_an_upward_import_inside_a_function(tmp_path):
    root = _tree(tmp_path, {"app/loop.py": "X = 1\n",
                            "models/net.py": "def f():\n    from autoalign.app.loop import X\n    return X\n"})
    assert upward_imports(import_graph(root)) == ["autoalign.models.net imports autoalign.app.loop"]


def test_walker_flags_a_cycle_through_relative_and_package_imports(tmp_path):
    root = _tree(tmp_path, {"models/a.py": "from . import b\n",
                            "models/b.py": "def g():\n    from autoalign.models import a\n",
                            "models/c.py": "from .a import b\n"})
    graph = import_graph(root)
    assert cycles(graph) == [["autoalign.models.a", "autoalign.models.b"]]
    assert cycles(graph, {frozenset({"autoalign.models.a", "autoalign.models.b"})}) == []


def test_walker_flags_non_namespaced_imports(tmp_path):
    root = _tree(tmp_path, {"models/a.py": "import app.loop\nfrom models import b\nimport numpy\n",
                            "models/b.py": ""})
    bare = import_graph(root).bare
    assert len(bare) == 2 and "'app.loop'" in bare[0] and "'models'" in bare[1]
