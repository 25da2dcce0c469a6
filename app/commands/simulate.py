"""``autoalign simulate``: write a synthetic training data set (HDF5) of ortho-sections with
random aberrations, in the loop's frame (see :mod:`simulation.dataset`).

Scale-out: ``--shard i/N`` writes shard i of N (any process, any machine sharing the folder);
``--combine N`` joins the N shards into ``--out`` without copying (HDF5 virtual data sets);
``--shard torchrun`` takes i/N from torchrun's RANK/WORLD_SIZE, waits for all ranks (gloo
barrier) and combines on rank 0 (``torchrun --nproc_per_node 2 $(which autoalign) simulate
--shard torchrun ...``)."""
from __future__ import annotations

import argparse
import sys

from autoalign.app.cli import add_settings_argument
from autoalign.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="write a synthetic training data set (HDF5)")
    add_settings_argument(p)
    p.add_argument("--count", type=int, default=None, help="number of samples (all splits)")
    p.add_argument("--out", required=True, help="output file (.h5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same file)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    p.add_argument("--bake-noise", action="store_true",
                   help="store noisy photon images instead of adding noise at load time")
    p.add_argument("--shard", default=None,
                   help="write only shard i/N (e.g. 0/4) next to --out; 'torchrun': i/N from RANK/WORLD_SIZE, "
                        "then rank 0 combines")
    p.add_argument("--combine", type=int, default=None, metavar="N",
                   help="join the N shards of --out into --out (virtual data sets, no copy)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from autoalign.simulation.dataset import (
        combine_shards, dataset_info, parse_shard, write_dataset, write_shard,
    )

    def report(out: object) -> int:
        info = dataset_info(out)  # type: ignore[arg-type]
        print(f"wrote {out}: {info['count']} samples {info['splits']}, modes {info['modes']}"
              f"{' + mask offset' if info['has_offset'] else ''}, {info['n_px']} px sections, "
              f"{info['generation_s']:.1f} s")
        return 0

    try:
        if args.combine is not None:
            return report(combine_shards(args.out, args.combine, force=args.force))
        settings = load_settings(args.settings)
        if args.count is None or args.count < 1:
            print("autoalign simulate: --count must be at least 1", file=sys.stderr)
            return 2
        if args.shard is None:
            return report(write_dataset(settings, args.count, args.out, seed=args.seed, workers=args.workers,
                                        bake_noise=args.bake_noise, progress=not args.quiet, force=args.force))
        if args.shard == "torchrun":
            import torch.distributed as dist

            i, n = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
            if n > 1:
                dist.init_process_group("gloo")
        else:
            i, n = parse_shard(args.shard)
        path = write_shard(settings, args.count, args.out, i, n, seed=args.seed, workers=args.workers or 1,
                           bake_noise=args.bake_noise, progress=not args.quiet, force=args.force)
        print(f"wrote shard {i}/{n}: {path}")
        if args.shard == "torchrun":
            if n > 1:
                dist.barrier()
            if i == 0:
                report(combine_shards(args.out, n, force=args.force))
            if n > 1:
                dist.destroy_process_group()
        return 0
    except (FileExistsError, ValueError) as exc:  # DatasetError is a ValueError
        print(f"autoalign simulate: {exc}", file=sys.stderr)
        return 2
