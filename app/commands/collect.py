"""autoalign collect: the bead walk. Each round (zero the SLM, optional random aberration, acquire,
centre, acquire, predict, apply) is appended to an HDF5 file and flushed; the file stays readable if
the process is killed, and a later run appends to it.

Appending is allowed only to a bead-walk file of this format recorded with the same settings where
they change what the data mean: optics, camera, stack, SLM (its backend and monitor aside), model,
dataset.modes, simulation (its seed aside) and hardware.backend; the refusal names the keys that
differ. Other keys (loop.*, refine.*, stage.*, the Micro-Manager connection) may differ. A run that
appends draws new random states (aberrations, and on the simulated microscope its hidden state and
noise) from --seed and the rounds already in the file, so it never repeats the first run. A lock
file (FILE.lock) keeps a second writer out. Ctrl-C or a device failure ends the walk keeping every
finished round (exit status 130 or 1)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from autoalign.app.cli import add_settings_argument


def register(subparsers: Any) -> None:
    from autoalign.app.cli import non_negative_float, non_negative_int, positive_int

    p = subparsers.add_parser("collect", help="bead-walk data collection to HDF5", description=__doc__)
    add_settings_argument(p)
    p.add_argument("--out", required=True, metavar="FILE",
                   help="HDF5 file; created, or appended when it is a bead-walk file with the same settings")
    p.add_argument("--backend", choices=["sim", "micromanager"], default=None,
                   help="sim: the simulated microscope; micromanager: real devices (default: the settings' "
                   "hardware.backend)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="model checkpoint (default model.checkpoint; relative to the current folder)")
    p.add_argument("--rounds", type=positive_int, default=None, metavar="N",
                   help="rounds, >= 1 (default: until the bead walks off)")
    p.add_argument("--random-aberration", type=non_negative_float, default=0.0, metavar="RAD",
                   help="fresh random aberration RMS per round, rad, >= 0 (default 0)")
    p.add_argument("--no-model", action="store_true", help="record without predictions")
    p.add_argument("--seed", type=non_negative_int, default=None, help="random seed, >= 0")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoalign.app.collect import BeadWalk, check_collection_file
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.app.cli import cli_path, device_settings
    from autoalign.files import check_writable
    from autoalign.hardware.factory import open_devices

    out = cli_path(args.out)
    s = device_settings(args)
    n = s.camera.roi_px
    existing = check_collection_file(out, s, (s.stack.planes, n, n))  # before any device is opened
    check_writable(out, "bead-walk file")
    if s.hardware.backend != "micromanager" and (args.seed is not None or existing):
        # the simulated microscope's hidden state and noise: from --seed, advanced past the rounds
        # already in the file (a continuation must not repeat the first run's stacks)
        s = s.replace(**{"simulation.seed": continuation_seed(
            s.simulation.seed if args.seed is None else args.seed, existing)})
    if existing:
        print(f"autoalign collect: appending to {out} ({existing} round(s) in it; the settings that change "
              "what the data mean are the same)", file=sys.stderr)
    with open_devices(s) as dev:
        loop = AlignmentLoop(dev, s, make_estimator("model", s))
        walk = BeadWalk(loop, out, rounds=args.rounds, random_aberration_rms=args.random_aberration,
                        seed=args.seed, apply_model=not args.no_model)
        if args.no_model:
            walk.apply_model = None
        walk.progress = True
        n_written = walk.run()
    message = (f"{n_written} round(s) appended to {out} ({existing + n_written} in the file now): "
               f"{walk.stop_reason}")
    if walk.interrupted:
        print(f"autoalign collect: {message}; every finished round is kept", file=sys.stderr)
        return 130
    if walk.stop_reason.startswith("device failure"):
        print(f"autoalign collect: {message}; every finished round is kept", file=sys.stderr)
        return 1
    print(message)
    return 0 if n_written else 1


def continuation_seed(seed: int, rounds_in_file: int) -> int:
    """``seed`` for a new file; for a file that already holds rounds, a seed derived from both
    (never the seed of the run that wrote them, nor of another seed's first run)."""
    if not rounds_in_file:
        return int(seed)
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(rounds_in_file)]).generate_state(1)[0] & 0x7FFFFFFF)
