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
    p.add_argument("--data", default=None, help="data set (not needed with --robustness)")
    p.add_argument("--robustness", action="store_true",
                   help="robustness table: fresh samples with each randomised factor at the edge of its range")
    p.add_argument("--count", type=int, default=500, help="samples per robustness row")
    p.add_argument("--cache-dir", default=None,
                   help="keep/reuse the robustness samples here (compare checkpoints on the same samples)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--seed", type=int, default=0, help="seed of the camera noise")
    p.add_argument("--limit", type=int, default=None, help="first N samples only")
    p.add_argument("--resimulate", type=int, default=200,
                   help="samples re-simulated for the correlation check (0: skip)")
    p.add_argument("--no-noise", action="store_true", help="noise-free inputs")
    p.add_argument("--max-true-rms", type=float, default=None,
                   help="only samples whose true aberration RMS is at most this (rad)")
    p.add_argument("--force", action="store_true", help="use a checkpoint made for other optics")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--plots", default=None, help="folder for scatter.png and errors.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoalign.models.evaluate import evaluate, plot_error_hist, plot_scatter, to_json

    settings = load_settings(args.settings) if args.settings else None
    if args.robustness:
        import json

        from autoalign.models.evaluate import robustness, robustness_table, verdict_text

        rb = robustness(args.checkpoint, settings, count=args.count, seed=args.seed if args.seed else 7,
                        force=args.force, cache_dir=args.cache_dir)
        if args.json:
            print(json.dumps(rb, indent=2))
            return 0
        print(robustness_table(rb))
        bad = [f"{row['factor']}={row['value']}" for row in rb["rows"] if row["verdict"]["all_met"] is False]
        judged = all(row["verdict"]["judged"] for row in rb["rows"])
        print("targets (mean <= 0.05 rad, worst <= 0.08 rad, offset <= 0.01): "
              + (verdict_text(None) if not judged else ("met in every row" if not bad else
                                                        f"missed in {len(bad)} row(s): {', '.join(bad)}")))
        return 0
    if not args.data:
        print("autoalign evaluate: --data is required (or --robustness)")
        return 2
    r = evaluate(args.checkpoint, args.data, args.split, settings, force=args.force, seed=args.seed,
                 limit=args.limit, resimulate=args.resimulate, noise=not args.no_noise,
                 max_true_rms=args.max_true_rms)
    if args.plots:
        Path(args.plots).mkdir(parents=True, exist_ok=True)
        plot_scatter(r, Path(args.plots) / "scatter.png")
        plot_error_hist(r, Path(args.plots) / "errors.png")
    if args.json:
        print(to_json(r))
        return 0
    print(f"{r['arch']} on {r['data']} [{r['split']}], {r['samples']} samples, "
          f"{'noisy' if r['noise'] else 'noise-free'} inputs"
          + (f", true RMS <= {r['max_true_rms']} rad" if r["max_true_rms"] is not None else ""))
    print(f"  {'output':10s}{'RMSE (rad)':>12s}{'R^2':>8s}")
    for name, m in r["per_mode"].items():
        print(f"  {name:10s}{m['rmse']:12.4f}{m['r2']:8.3f}")
    s = r["sample_rms_error"]
    from autoalign.models.evaluate import verdict_text

    v = r["verdict"]
    print(f"  mean RMSE {r['rmse_mean']:.4f} rad (target <= 0.05: {verdict_text(v['rmse_mean'])}), worst mode "
          f"{r['rmse_max']:.4f} rad (target <= 0.08: {verdict_text(v['rmse_max'])})")
    if r["offset_rmse"] is not None:
        print(f"  mask offset RMSE {r['offset_rmse']:.4f} pupil radii (target <= 0.01: {verdict_text(v['offset'])})")
    if r["outputs_not_in_data"]:
        print(f"  (outputs not in the data, not evaluated: {', '.join(r['outputs_not_in_data'])})")
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
