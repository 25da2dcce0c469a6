"""``autoalign simulate``: write a synthetic training data set (HDF5) of ortho-sections with
random aberrations, in the loop's frame (see :mod:`simulation.dataset`)."""
from __future__ import annotations

import argparse
import sys

from autoalign.app.cli import add_settings_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write a synthetic training data set (HDF5)")
    add_settings_argument(p)
    p.add_argument("--count", type=int, required=True, help="number of samples (all splits)")
    p.add_argument("--out", required=True, help="output file (.h5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--bake-noise", action="store_true",
                   help="store noisy photon images instead of adding noise at load time")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoalign.settings import load_settings
    from autoalign.simulation.dataset import dataset_info, write_dataset

    settings = load_settings(args.settings)
    if args.count < 1:
        print("autoalign simulate: --count must be at least 1", file=sys.stderr)
        return 2
    try:
        out = write_dataset(settings, args.count, args.out, seed=args.seed, workers=args.workers,
                            bake_noise=args.bake_noise, progress=not args.quiet, force=args.force)
    except FileExistsError as exc:
        print(f"autoalign simulate: {exc}", file=sys.stderr)
        return 2
    info = dataset_info(out)
    print(f"wrote {out}: {info['count']} samples {info['splits']}, modes {info['modes']}"
          f"{' + mask offset' if info['has_offset'] else ''}, {info['n_px']} px sections, "
          f"{info['generation_s']:.1f} s")
    return 0
