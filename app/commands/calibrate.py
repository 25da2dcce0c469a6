"""``autoalign calibrate``: the poke calibration (tip/tilt/defocus -> focus shift, saved as YAML)
and/or the convention self-check (each mode +- on the SLM, read back by the model)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from autoalign.app.cli import add_settings_argument


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("calibrate", help="poke calibration and convention self-check", description=__doc__)
    add_settings_argument(p)
    p.add_argument("what", choices=["poke", "selfcheck", "both"], nargs="?", default="both")
    p.add_argument("--backend", choices=["sim", "micromanager"], default="sim")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default model.checkpoint)")
    p.add_argument("--out", default="poke_calibration.yaml", help="poke calibration file to write")
    p.add_argument("--amplitude", type=float, default=None, help="poke / self-check amplitude, rad")
    p.add_argument("--stage-step", type=float, default=0.2, help="stage poke, um (0: skip)")
    p.add_argument("--modes", type=int, nargs="*", default=None, help="self-check modes (default: the model's)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.app.cli import device_settings
    from autoalign.hardware.factory import open_devices

    s = device_settings(args)
    result: dict[str, Any] = {}
    ok = True
    with open_devices(s) as dev:
        loop = AlignmentLoop(dev, s, make_estimator("model", s))
        loop.zero_slm()
        if args.what in ("poke", "both"):
            from autoalign.calibration.poke import run_poke_calibration

            cal = run_poke_calibration(loop, args.amplitude or 1.0, stage_step_um=args.stage_step or None)
            cal.save(args.out)
            result["poke"] = cal.to_dict()
            result["poke"]["scale_vs_optics"] = cal.scale_vs_optics(s).tolist()
            if not args.json:
                print(f"poke calibration written to {args.out}; scale vs optics (x, y, z) = "
                      + ", ".join(f"{v:.3f}" for v in cal.scale_vs_optics(s)))
        if args.what in ("selfcheck", "both"):
            from autoalign.calibration.selfcheck import run_self_check

            rep = run_self_check(loop, args.modes, args.amplitude or 0.5)
            ok = rep.ok
            result["selfcheck"] = rep.to_dict()
            if not args.json:
                print(rep.summary())
    if args.json:
        print(json.dumps(result, indent=1, default=float))
    return 0 if ok else 3
