"""``autoalign gui``: the alignment application window."""
from __future__ import annotations

import argparse
import sys

from autoalign.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    from autoalign.app.cli import add_settings_argument, gain_float, non_negative_int, positive_float

    p = subparsers.add_parser(
        "gui",
        help="alignment application (live ortho-sections, SLM phase, auto-align, calibration)",
        description="Open the alignment window. With --sim (or when settings.hardware.backend is "
        "'simulated') it drives the simulated microscope with the shipped model. With "
        "--screenshot it runs headless: --auto-align N iterations, saves a PNG of the window "
        "and exits.",
    )
    add_settings_argument(p)
    p.add_argument("--sim", action="store_true",
                   help="use the simulated microscope and SLM whatever the settings say")
    p.add_argument("--screenshot", metavar="PNG", default=None,
                   help="save a PNG of the window after the auto-align iterations, then exit")
    p.add_argument("--auto-align", type=non_negative_int, default=0, metavar="N",
                   help="with --screenshot: auto-align iterations to run first, >= 0 (default 0)")
    p.add_argument("--gain", type=gain_float, default=None,
                   help="with --screenshot: loop gain in (0, 1] (default: settings.loop.gain)")
    p.add_argument("--corrector", choices=("model", "refined", "modal"), default=None,
                   help="corrector to start with: refined (CNN + model-based fit), model (the CNN alone) or the "
                   "classical model-free modal baseline (2N+1 stacks per iteration); default: loop.corrector")
    p.add_argument("--timeout", type=positive_float, default=300.0,
                   help="with --screenshot: give up after this many seconds, > 0 (default 300)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoalign.app.gui import run_app, simulated_settings

    from autoalign.app.cli import cli_path

    if args.screenshot:
        from autoalign.files import check_writable

        args.screenshot = cli_path(args.screenshot)
        check_writable(args.screenshot, "screenshot")
    settings = load_settings(args.settings)
    if args.sim:
        settings = simulated_settings(settings)
    if args.auto_align and not args.screenshot:
        print("autoalign gui: --auto-align is used with --screenshot (ignored)", file=sys.stderr)
    return run_app(settings, screenshot=args.screenshot, auto_align=max(0, int(args.auto_align)),
                   gain=args.gain, timeout_s=args.timeout, corrector=args.corrector or settings.loop.corrector)
