#!/usr/bin/env bash
# Install (if needed) and run the main job: the simulated dry run of the alignment.
# With a screen: the GUI on the simulated microscope with the shipped model.
# Without one (ssh, CI): the same alignment headless, with a printed table and PNG report in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -n "${DISPLAY:-}${WAYLAND_DISPLAY:-}" ] && [ -z "${AUTOALIGN_HEADLESS:-}" ]; then
  exec .venv/bin/autoalign gui --sim "$@"
fi
.venv/bin/autoalign report --out out/donuts.png
exec .venv/bin/autoalign align --backend sim --trials 5 --iterations 5 --report out/ "$@"
