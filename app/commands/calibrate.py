"""autoalign calibrate: the poke calibration (tip/tilt/defocus -> focus shift, saved as YAML) and/or
the convention self-check (each mode +- on the SLM, read back by the model).

The poke calibration is saved next to the settings file (poke_calibration.yaml), or in the user data
folder when the settings are the packaged defaults; align and the GUI then use it automatically while
the optics match. Exit status 3 when the self-check fails."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from autoalign.app.cli import add_settings_argument


def register(subparsers: Any) -> None:
    from autoalign.app.cli import positive_float, positive_int

    p = subparsers.add_parser("calibrate", help="poke calibration and convention self-check", description=__doc__)
    add_settings_argument(p)
    p.add_argument("what", choices=["poke", "selfcheck", "both", "instrument", "camera"], nargs="?", default="both",
                   help="what to run (default both: poke and selfcheck); instrument: fit the instrument's optics to "
                   "the bead stacks FILE... (see 'Instrument calibration' below)")
    p.add_argument("files", nargs="*", metavar="FILE", help="bead z-stacks for 'calibrate instrument'")
    p.add_argument("--backend", choices=["sim", "micromanager"], default=None,
                   help="sim: the simulated microscope; micromanager: real devices (default: the settings' "
                   "hardware.backend)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="model checkpoint (default model.checkpoint; relative to the current folder)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="poke calibration file to write (default: poke_calibration.yaml next to the settings "
                   "file, or in the user data folder for the packaged defaults)")
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it is not a poke calibration file")
    p.add_argument("--amplitude", type=positive_float, default=None, metavar="RAD",
                   help="poke / self-check amplitude, rad, > 0 (default 1.0 for the poke, 0.5 for the self-check)")
    p.add_argument("--stage-step", type=positive_float, default=0.2, metavar="UM",
                   help="stage poke to learn the stage signs, um, > 0 (default 0.2)")
    p.add_argument("--no-stage-poke", action="store_true", help="do not poke the stage (no stage signs)")
    p.add_argument("--modes", type=positive_int, nargs="*", default=None, metavar="NOLL",
                   help="self-check modes, Noll indices >= 1 (default: the model's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    from autoalign.app.commands.analyse import add_optics_arguments
    from autoalign.app.commands.calibrate_instrument import add_arguments

    inst = p.add_argument_group("instrument calibration ('calibrate instrument FILE...'; --out: the instrument file, "
                                "default ./instrument.yaml)")
    add_arguments(inst)
    add_optics_arguments(p)
    p.set_defaults(func=run)


class _DropTable(logging.Filter):
    """Drops the self-check table from the log (the command prints it itself)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("convention self-check (")


def run(args: argparse.Namespace) -> int:
    if args.what == "camera":
        from autoalign.app.commands.calibrate_camera import run_camera

        return run_camera(args)
    if args.what == "instrument":
        from autoalign.app.commands.calibrate_instrument import run_instrument

        return run_instrument(args)
    if args.files:
        from autoalign.files import UserError

        raise UserError(f"calibrate {args.what}: takes no files (did you mean 'calibrate instrument {args.files[0]}'?)")
    from autoalign.app.estimators import make_estimator
    from autoalign.app.cli import cli_path, device_settings
    from autoalign.app.loop import AlignmentLoop
    from autoalign.files import OverwriteRefused, check_writable
    from autoalign.hardware.factory import open_devices

    s = device_settings(args)
    out = None
    if args.what in ("poke", "both"):
        from autoalign.calibration.poke import PokeCalibration, default_calibration_path

        out = cli_path(args.out) if args.out else str(default_calibration_path(s))
        from pathlib import Path

        if Path(out).exists() and not args.force and not PokeCalibration.is_calibration_file(out):
            raise OverwriteRefused(f"{out}: exists and is not a poke calibration file; choose another --out "
                                   "or pass --force")
        check_writable(out, "poke calibration")
    result: dict[str, Any] = {}
    ok = True
    with open_devices(s) as dev:
        loop = AlignmentLoop(dev, s, make_estimator("model", s))
        loop.zero_slm()
        if args.what in ("poke", "both"):
            from autoalign.calibration.poke import run_poke_calibration

            cal = run_poke_calibration(loop, args.amplitude or 1.0,
                                       stage_step_um=None if args.no_stage_poke else args.stage_step)
            cal.save(out)
            result["poke"] = cal.to_dict()
            result["poke"]["file"] = out
            result["poke"]["scale_vs_optics"] = cal.scale_vs_optics(s).tolist()
            check = cal.pixel_size_check(s)
            result["poke"]["pixel_size_check"] = check
            if not args.json:
                print(f"poke calibration written to {out}; scale vs optics (x, y, z) = "
                      + ", ".join(f"{v:.3f}" for v in cal.scale_vs_optics(s)))
                if cal.stage_scale is not None:
                    print("stage move seen on the camera: x {:.3f}, y {:.3f} x the move".format(*cal.stage_scale)
                          + (f"; {check}" if check else " (camera.pixel_size_um agrees within 1 %)"))
        if args.what in ("selfcheck", "both"):
            from autoalign.calibration.selfcheck import run_self_check

            # the table is printed below; keep the loop's log copy of it off the terminal (printed once)
            table_filter = _DropTable()
            logging.getLogger("autoalign.loop").addFilter(table_filter)
            try:
                rep = run_self_check(loop, args.modes, args.amplitude or 0.5)
            finally:
                logging.getLogger("autoalign.loop").removeFilter(table_filter)
            ok = rep.ok
            result["selfcheck"] = rep.to_dict()
            if not args.json:
                print(rep.summary())
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    if not ok:
        print("autoalign calibrate: the convention self-check FAILED (see the table); check slm.flip_x/flip_y "
              "and the pupil centre", file=sys.stderr)
    return 0 if ok else 3
