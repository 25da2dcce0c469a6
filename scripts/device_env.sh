# Sourced by the scripts run on a lent GPU machine (gpu_session.sh, gpu_checks.sh), from the repo root:
# make the package importable there. The machine has torch, h5py, scipy, yaml, tqdm, matplotlib and
# no network: when autoalign is not importable, the wheels in .device/ (built here with
# `pip wheel --no-deps -w .device .`, plus any peer's wheels) are installed into /tmp/site.
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1  # the repo's own autoalign/ folder must not shadow the package
if ! "$PY" -c "import autoalign.app.cli" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/*.whl || exit 3
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
