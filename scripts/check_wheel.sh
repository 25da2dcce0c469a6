#!/usr/bin/env bash
# Build the wheel, check its contents, install it into a fresh virtual environment OUTSIDE the
# repository and run the installed command there from an empty working directory:
#   autoalign --help
#   autoalign align --backend sim --trials 1 --iterations 1
# torch is installed into the fresh venv as the pinned CPU wheel (from the local wheel folder /
# pip cache, fast); every other dependency comes from the wheel's own metadata, so a dependency
# missing from pyproject.toml fails here. Usage: bash scripts/check_wheel.sh  (KEEP=1 keeps the temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/autoalign-wheel.XXXXXX")
[ "${KEEP:-0}" = 1 ] || trap 'rm -rf "$TMP"' EXIT
t0=$SECONDS

echo "== build the wheel (isolated build, from $REPO)"
"$PY" -m pip wheel -q --no-deps -w "$TMP/dist" . 2>&1 | grep -v '^WARNING: Location' || true
WHEEL=$(ls "$TMP"/dist/autoalign-*.whl)
echo "   $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) kB, $((SECONDS - t0)) s)"

echo "== check the wheel's contents"
"$PY" - "$WHEEL" <<'PY'
import sys, tomllib, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
packages = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["packages"]
problems = []
for pkg in packages:
    init = pkg.replace(".", "/") + "/__init__.py"
    if pkg != "autoalign.models.weights" and init not in names:
        problems.append(f"missing package {pkg} ({init})")
# every folder of the repository holding an __init__.py must be a declared package
import pathlib
roots = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
for pkg, folder in roots.items():
    for init in pathlib.Path(folder).rglob("__init__.py"):
        sub = ".".join([pkg, *init.parent.relative_to(folder).parts])
        if sub not in packages:
            problems.append(f"{init.parent} holds a package that pyproject.toml does not list ({sub})")
for required in ("autoalign/settings.yaml", "autoalign/models/weights/default.pt",
                 "autoalign/app/cli.py", "autoalign/app/commands/align.py", "autoalign/app/gui/__init__.py"):
    if required not in names:
        problems.append(f"missing file {required}")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    problems.append("no LICENSE in the wheel's metadata")
top = {n.split("/")[0] for n in names}
extra = sorted(t for t in top if t != "autoalign" and not t.startswith("autoalign-"))
if extra:
    problems.append(f"top-level names other than autoalign: {extra}")
if any("__pycache__" in n or n.endswith(".pyc") for n in names):
    problems.append("compiled files in the wheel")
if problems:
    sys.exit("wheel check FAILED:\n  " + "\n  ".join(problems))
print(f"   {len(names)} files; packages: {', '.join(packages)}; settings.yaml and weights present; "
      f"top level: {sorted(top)}")
PY

echo "== fresh venv outside the repository: $TMP/venv"
t1=$SECONDS
"$PY" -m venv "$TMP/venv"
V="$TMP/venv/bin"
"$V/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
"$V/python" -m pip install -q "$WHEEL" 2>&1 | grep -v '^WARNING: Location' || true
"$V/python" -m pip check
echo "   installed ($((SECONDS - t1)) s)"

echo "== run the installed command from an empty directory"
mkdir "$TMP/cwd"
cd "$TMP/cwd"
export QT_QPA_PLATFORM=offscreen MPLBACKEND=Agg
"$V/python" - "$REPO" <<'PY'
import sys, autoalign, autoalign.app.cli, autoalign.models.weights
from pathlib import Path
repo = Path(sys.argv[1]).resolve()
for mod in (autoalign, autoalign.app.cli):
    f = Path(mod.__file__).resolve()
    if repo in f.parents:
        sys.exit(f"{mod.__name__} imported from the repository ({f}), not from the installed wheel")
import importlib.util
for name in ("app", "models", "hardware", "simulation", "calibration"):
    if importlib.util.find_spec(name) is not None:
        sys.exit(f"a top-level module '{name}' is importable in the fresh venv")
print(f"   imports from {Path(autoalign.__file__).parent}")
PY
"$V/autoalign" --help >/dev/null
echo "   autoalign --help: ok"
"$V/autoalign" align --backend sim --trials 1 --iterations 1 > align.out 2>&1 || { cat align.out; exit 1; }
tail -n 4 align.out | sed 's/^/   /'
[ -z "$(ls -A . | grep -v '^align.out$')" ] || echo "   note: align wrote $(ls -A | tr '\n' ' ')"
echo "== wheel check passed in $((SECONDS - t0)) s"
