"""``autoalign train``: train a network on an ``autoalign simulate`` data set (see
:mod:`models.train`)."""
from __future__ import annotations

import argparse
import json

from autoalign.app.cli import add_settings_argument
from autoalign.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    from autoalign.models.networks import available_networks

    p = sub.add_parser("train", help="train the aberration network on a simulated data set")
    add_settings_argument(p)
    p.add_argument("--data", required=True, help="data set written by 'autoalign simulate'")
    p.add_argument("--out", required=True, help="output folder (best.pt, last.pt, log.csv, tb/)")
    p.add_argument("--arch", default=None, choices=available_networks(),
                   help="architecture (default: model.architecture, or the checkpoint's)")
    p.add_argument("--epochs", type=int, default=0,
                   help="total epochs (default: 15, or the resumed run's own total)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine",
                   help="learning-rate schedule (cosine: decay to lr/50 over the run)")
    p.add_argument("--resume", default=None, help="continue a run from its checkpoint (model + optimizer)")
    p.add_argument("--warm-start", default=None, help="start from another checkpoint's weights")
    p.add_argument("--stop-after", type=int, default=None, metavar="EPOCH",
                   help="stop after this epoch (the schedule still spans --epochs; continue with --resume)")
    p.add_argument("--offset", dest="predict_offset", action="store_true", default=None,
                   help="train the mask-offset head too (default: model.predict_offset)")
    p.add_argument("--no-offset", dest="predict_offset", action="store_false",
                   help="modes only, even if model.predict_offset is true")
    p.add_argument("--offset-weight", type=float, default=None,
                   help="loss weight of the mask-offset outputs (default 25 = (0.05 rad / 0.01)^2)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="wall-clock budget: the cosine schedule ends and the run stops when it is spent "
                        "(one process only; not bit-exactly resumable)")
    p.add_argument("--data-on-device", action="store_true",
                   help="hold the training split and draw its noise on the GPU (CUDA only; ignored on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=None, help="use only the first N training samples")
    p.add_argument("--export", default=None, help="also write the best model, without optimizer "
                   "state, to this path (e.g. models/weights/default.pt)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from autoalign.models.train import plot_history, train

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings(args.settings)
    summary = train(args.data, args.out, settings, arch=args.arch, epochs=args.epochs, batch=args.batch,
                    lr=args.lr, resume=args.resume, warm_start=args.warm_start, seed=args.seed,
                    device=args.device, schedule=args.schedule, limit=args.limit,
                    progress=not args.quiet, tensorboard=not args.no_tensorboard, export=args.export,
                    stop_after=args.stop_after, predict_offset=args.predict_offset,
                    max_minutes=args.max_minutes, data_on_device=args.data_on_device,
                    **({} if args.offset_weight is None else {"offset_weight": args.offset_weight}))
    if summary.get("rank", 0) != 0:  # torchrun: rank 0 reports
        return 0
    try:
        plot_history(f"{args.out}/log.csv", f"{args.out}/training_curve.png")
    except Exception as exc:  # noqa: BLE001 - a plot never fails a run
        print(f"(no training curve: {exc})")
    if args.json:
        summary.pop("history", None)
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['arch']} ({summary['parameters']} parameters): best epoch {summary['best_epoch']}, "
              f"val loss {summary['best_val_loss']:.4f}, mean val RMSE {summary['best_val_rmse_mean']:.4f} rad, "
              f"{summary['seconds'] / 60:.1f} min; checkpoints in {summary['out_dir']}")
    return 0
