"""List every third-party module the package imports and check each against the distributions
declared in pyproject.toml ([project.dependencies] and, for optional imports, the extras).

Run from the repository root: ``python scripts/check_imports.py``. Exit status 1 names each
module imported by the package whose distribution is not declared. Imports inside tests/ and
benchmarks/ are checked against the test extra and the dependencies together."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ["autoalign", "app", "calibration", "hardware", "models", "simulation"]
OTHER_DIRS = ["tests", "benchmarks", "scripts"]
LOCAL = {"autoalign", "tests", "benchmarks"} | set(PACKAGE_DIRS)
# import name -> distribution name, where the two differ and the distribution is not installed here
KNOWN = {"yaml": "pyyaml", "PIL": "pillow", "PyQt5": "pyqt5", "slmpy": "slmpy (from source)"}
# package modules imported lazily, with a clear error when missing: the extra that declares them,
# or None for one installed by hand (slmpy from source; psf_generator, the peer that
# benchmarks/peer_psf_generator.py compares against, never a dependency)
OPTIONAL = {"mm_test_adapters": "test", "slmpy": None, "onnxruntime": "onnx", "psf_generator": None}


def imports(paths: list[Path]) -> dict[str, set[str]]:
    """Top-level module name -> files importing it (absolute imports only)."""
    found: dict[str, set[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def distribution(module: str) -> str:
    dists = metadata.packages_distributions().get(module)
    if dists:
        return dists[0].lower().replace("_", "-")
    return KNOWN.get(module, module).lower()


def requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", r.strip(), maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = requirement_names(project["dependencies"])
    extras = {k: requirement_names(v) for k, v in project.get("optional-dependencies", {}).items()}
    std = set(sys.stdlib_module_names) | {"__future__"}
    status = 0
    for label, dirs, allowed in (
        ("package", PACKAGE_DIRS, deps),
        ("tests/benchmarks/scripts", OTHER_DIRS, deps | set().union(*extras.values())),
    ):
        files = [p for d in dirs for p in sorted((ROOT / d).rglob("*.py"))]
        print(f"{label}: third-party imports")
        for module, where in sorted(imports(files).items()):
            if module in std or module in LOCAL:
                continue
            dist = distribution(module)
            ok = dist in allowed
            note = "declared" if ok else "NOT DECLARED"
            if not ok and module in OPTIONAL:
                extra = OPTIONAL[module]
                ok = extra is None or dist in extras.get(extra, set())
                note = (f"optional, extra [{extra}]" if extra else "optional, installed by hand") \
                    if ok else f"NOT DECLARED in extra [{extra}]"
            print(f"  {module:<16} -> {dist:<22} {note}")
            if not ok:
                status = 1
                print(f"      imported in: {', '.join(sorted(where))}")
    return status


if __name__ == "__main__":
    sys.exit(main())
