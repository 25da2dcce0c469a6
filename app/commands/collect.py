"""``autoalign collect``: the bead walk. Each round (zero the SLM, optional random aberration,
acquire, centre, acquire, predict, apply) is appended to an HDF5 file and flushed; the file stays
readable if the process is killed and a later run appends to it."""
from __future__ import annotations

import argparse
from typing import Any

from autoalign.app.cli import add_settings_argument


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("collect", help="bead-walk data collection to HDF5", description=__doc__)
    add_settings_argument(p)
    p.add_argument("--out", required=True, help="HDF5 file (appended when it exists)")
    p.add_argument("--backend", choices=["sim", "micromanager"], default="sim")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default model.checkpoint)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: until the bead walks off)")
    p.add_argument("--random-aberration", type=float, default=0.0, help="fresh random aberration RMS per round, rad")
    p.add_argument("--no-model", action="store_true", help="record without predictions")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoalign.app.collect import BeadWalk
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.app.cli import device_settings
    from autoalign.hardware.factory import open_devices

    seeded = args.seed is not None and args.backend == "sim"
    s = device_settings(args, **({"simulation.seed": args.seed} if seeded else {}))
    with open_devices(s) as dev:
        loop = AlignmentLoop(dev, s, make_estimator("model", s))
        walk = BeadWalk(loop, args.out, rounds=args.rounds, random_aberration_rms=args.random_aberration,
                        seed=args.seed, apply_model=not args.no_model)
        if args.no_model:
            walk.apply_model = None
        n = walk.run()
    print(f"{n} round(s) appended to {args.out}: {walk.stop_reason}")
    return 0 if n else 1
