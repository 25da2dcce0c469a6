"""Packaging and test-policy checks that need no build: the CI skip policy (tests/conftest.py),
every third-party import declared (scripts/check_imports.py), every repository package listed in
pyproject.toml under the one `autoalign` namespace. The wheel itself is built, installed outside
the repository and run by scripts/check_wheel.sh (CI)."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest_plugins = ["pytester"]

INNER_TESTS = """
import pytest

def test_missing_module():
    pytest.importorskip("a_module_that_does_not_exist_42")

def test_skipped_on_purpose():
    pytest.skip("only meaningful on real hardware")

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    assert True
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_dependency_fails_in_ci_and_skips_locally(pytester, monkeypatch, ci):
    pytester.makeconftest((ROOT / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_inner=INNER_TESTS)
    pytester.makepyfile(test_module_level="import pytest\npytest.importorskip('another_missing_module_42')\n"
                                          "def test_never():\n    pass\n")
    monkeypatch.setenv("CI", ci)
    # (a collection error stops a session; carry on here to see every outcome at once)
    result = pytester.runpytest("-p", "no:cacheprovider", "--continue-on-collection-errors")
    outcomes = result.parseoutcomes()
    if ci:
        # the in-test importorskip fails; the module-level one fails at collection (an error)
        assert outcomes.get("failed") == 1 and outcomes.get("errors", outcomes.get("error")) == 1, outcomes
        assert outcomes.get("skipped") == 1      # the deliberate skip stays a skip
        result.stdout.fnmatch_lines(["*missing dependency, which fails in CI*"])
    else:
        assert outcomes.get("skipped") == 3 and "failed" not in outcomes, outcomes
    assert outcomes.get("passed") == 1 and outcomes.get("xfailed") == 1


def test_every_third_party_import_is_declared():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_imports.py")], capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "pillow" in run.stdout and "mmpycorex" in run.stdout


def test_every_package_folder_is_listed_under_the_autoalign_namespace():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(tool["packages"]), tool["package-dir"]
    assert all(p == "autoalign" or p.startswith("autoalign.") for p in listed)
    found = set()
    for pkg, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([pkg, *init.parent.relative_to(ROOT / folder).parts]))
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert (ROOT / "autoalign" / "settings.yaml").is_file()
    assert (ROOT / "models" / "weights" / "default.pt").is_file()
    assert "settings.yaml" in tool["package-data"]["autoalign"]


def test_the_installed_namespace_resolves_to_the_repository_folders():
    import autoalign.app.cli
    import autoalign.models.predictor
    import autoalign.simulation.zernike

    assert Path(autoalign.app.cli.__file__).resolve() == ROOT / "app" / "cli.py"
    assert Path(autoalign.models.predictor.__file__).resolve() == ROOT / "models" / "predictor.py"
    assert Path(autoalign.simulation.zernike.__file__).resolve() == ROOT / "simulation" / "zernike.py"
