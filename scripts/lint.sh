#!/usr/bin/env bash
# Lint and type-check: ruff (rules and per-file baseline in pyproject.toml) and mypy on the
# installed namespace `autoalign`. mypy cannot follow setuptools' package-dir mapping, so it runs
# on a temporary tree of symbolic links (autoalign/app -> app, ...) built from [tool.setuptools.
# package-dir]; the reported paths are mapped back to the repository's. Exit status 1 on any finding.
# --mypy-only: skip ruff (the pre-commit hook runs ruff on the changed files itself).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
if ! "$PY" -c "import ruff, mypy" >/dev/null 2>&1; then
  # the [lint] extra of pyproject.toml, without reinstalling the package
  "$PY" -m pip install -q "ruff>=0.6" "mypy>=1.10" 2>&1 | grep -v '^WARNING: Location' || true
fi
status=0
if [ "${1:-}" != "--mypy-only" ]; then
  echo "== ruff check"
  "$PY" -m ruff check --no-cache --output-format concise . || status=1
fi

echo "== mypy -p autoalign"
TREE=$(mktemp -d "${TMPDIR:-/tmp}/autoalign-mypy.XXXXXX")
trap 'rm -rf "$TREE"' EXIT
SED=$("$PY" - "$TREE" <<'PY'
import sys, tomllib
from pathlib import Path
tree, root = Path(sys.argv[1]), Path.cwd()
dirs = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
base = tree / "autoalign"
base.mkdir()
for f in (root / dirs["autoalign"]).iterdir():
    (base / f.name).symlink_to(f)
sed = []
for pkg, folder in dirs.items():
    if pkg != "autoalign":
        link = tree / Path(*pkg.split("."))
        link.symlink_to(root / folder, target_is_directory=True)
        sed.append(f"s#^{'/'.join(pkg.split('.'))}/#{folder}/#")
print(";".join(sed))
PY
)
( cd "$TREE" && MYPYPATH="$TREE" "$OLDPWD/$PY" -m mypy --config-file "$OLDPWD/pyproject.toml" \
    --cache-dir "$OLDPWD/.mypy_cache" -p autoalign ) > "$TREE/mypy.out" 2>&1 || status=1
sed -e "$SED" "$TREE/mypy.out"
exit $status
