"""``autoalign evaluate``: accuracy of a checkpoint on a data set's split (see
:mod:`models.evaluate`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from autoalign.app.cli import add_settings_argument
from autoalign.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="per-mode accuracy of a checkpoint on a simulated data set")
    add_settings_argument(p)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--seed", type=int, default=0, help="seed of the camera noise")
    p.add_argument("--limit", type=int, default=None, help="first N samples only")
    p.add_argument("--resimulate", type=int, default=200,
                   help="samples re-simulated for the correlation check (0: skip)")
    p.add_argument("--no-noise", action="store_true", help="noise-free inputs")
    p.add_argument("--force", action="store_true", help="use a checkpoint made for other optics")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--plots", default=None, help="folder for scatter.png and errors.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoalign.models.evaluate import evaluate, plot_error_hist, plot_scatter, to_json

    settings = load_settings(args.settings) if args.settings else None
    r = evaluate(args.checkpoint, args.data, args.split, settings, force=args.force, seed=args.seed,
                 limit=args.limit, resimulate=args.resimulate, noise=not args.no_noise)
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plot_scatter(r, Path(args.plots) / "scatter.png")
        plot_error_hist(r, Path(args.plots) / "errors.png")
    if args.json:
        print(to_json(r))
        return 0
    print(f"{r['arch']} on {r['data']} [{r['split']}], {r['samples']} samples, "
          f"{'noisy' if r['noise'] else 'noise-free'} inputs")
    print(f"  {'output':10s}{'RMSE (rad)':>12s}{'R^2':>8s}")
    for name, m in r["per_mode"].items():
        print(f"  {name:10s}{m['rmse']:12.4f}{m['r2']:8.3f}")
    s = r["sample_rms_error"]
    print(f"  mean RMSE {r['rmse_mean']:.4f}, worst mode {r['rmse_max']:.4f} rad (target <= 0.05: "
          f"{'met' if r['meets_target'] else 'missed'})")
    print(f"  per-sample residual RMS: median {s['median']:.4f}, p95 {s['p95']:.4f}, max {s['max']:.4f} rad")
    for b in r["sample_rms_error_by_true_rms"]:
        if b["samples"]:
            print(f"    true RMS {b['true_rms'][0]:.2f}-{b['true_rms'][1]:.2f}: {b['samples']:6d} samples, "
                  f"median {b['median']:.4f}, p95 {b['p95']:.4f} rad")
    if "correlation" in r:
        c = r["correlation"]
        print(f"  correlation input vs re-simulated ({c['samples']} samples): predicted median "
              f"{c['predicted']['median']:.4f} (p5 {c['predicted']['p5']:.4f}); true coefficients median "
              f"{c['true']['median']:.4f} (p5 {c['true']['p5']:.4f})")
    return 0
