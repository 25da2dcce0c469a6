"""``autoalign align``: the closed loop, headless. With ``--backend sim``, ``--trials T`` trials
each with a fresh random hidden aberration (seed ``S + t``; RMS uniform in ``--aberration-rms``
A:B, default the settings' ``simulation.aberration_rms_rad``); prints a per-iteration table
(median and 95th percentile of the true residual RMS, the TRUE null depth of the beam and the
MEASURED null depth with the bead), writes JSON and PNG plots.

Row k is the state after k corrections. ``true null`` is centre over peak of the beam's own focal
intensity (simulated microscope's truth, noise-free, no bead); ``measured null`` is what the
camera sees with the bead, whose floor (perfect correction, noise-free) is printed. The iteration
wall time excludes the truth metrics (what a dry run on the simulated microscope costs)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from autoalign.app.cli import add_settings_argument
from autoalign.settings import load_settings

log = logging.getLogger("autoalign.align")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("align", help="run the closed alignment loop (headless)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_argument(p)
    p.add_argument("--backend", choices=["sim", "micromanager"], default="sim")
    p.add_argument("--iterations", type=int, default=None, help="iterations per trial (default loop.max_iterations)")
    p.add_argument("--trials", type=int, default=1, help="simulated trials, each a fresh hidden aberration")
    p.add_argument("--seed", type=int, default=None, help="first trial's seed (default simulation.seed)")
    p.add_argument("--gain", type=float, default=None)
    p.add_argument("--corrector", choices=["model", "modal"], default="model")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default model.checkpoint)")
    p.add_argument("--calibration", default=None, help="poke calibration YAML (default: optics formulas)")
    p.add_argument("--aberration-rms", default=None, metavar="A[:B]",
                   help="hidden aberration RMS, rad (sim); A:B draws each trial's uniformly in [A, B]")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of the table")
    p.add_argument("--report", default=None, metavar="DIR", help="write summary.json and PNG plots here")
    # --- hidden errors of simulated trials and the loop's own stop rules (app/trials.py, H7) ---
    from autoalign.app.trials import add_trial_arguments

    add_trial_arguments(p)
    p.add_argument("--fixed-iterations", action="store_true",
                   help="sim: the legacy table (exactly --iterations corrections, no stop rules, no hidden errors)")
    # --- end of the trial flags ---
    p.set_defaults(func=run)


def _settings_for(args: argparse.Namespace, trial: int) -> Any:
    from autoalign.app.cli import device_settings

    if args.backend == "micromanager":
        return device_settings(args)
    base = device_settings(args)
    over: dict[str, Any] = {"simulation.seed": (base.simulation.seed if args.seed is None else args.seed) + trial}
    if args.aberration_rms is not None:
        over["simulation.aberration_rms_rad"] = trial_rms(args.aberration_rms, over["simulation.seed"])
    return base.replace(**over)


def trial_rms(spec: str | float, seed: int) -> float:
    """``"A"`` -> A; ``"A:B"`` -> uniform in [A, B] drawn from ``seed`` (reproducible per trial)."""
    text = str(spec)
    if ":" not in text:
        return float(text)
    lo, hi = (float(v) for v in text.split(":", 1))
    return float(np.random.default_rng([int(seed), 7919]).uniform(lo, hi))


def run_trial(settings: Any, iterations: int, corrector: str = "model", gain: float | None = None,
              predictor: Any = None, calibration: Any = None, devices: Any = None,
              acquire_stack: Any = None) -> dict[str, Any]:
    """One trial: zero the SLM, ``iterations`` corrections, one final stack. Row k of the result is
    the state after k corrections (true residual; null depth and correlation of its stack)."""
    from contextlib import nullcontext

    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop

    if devices is None:
        from autoalign.hardware.factory import open_devices

        ctx = open_devices(settings)
    else:
        ctx = nullcontext(devices)
    with ctx as dev:
        loop = AlignmentLoop(dev, settings, make_estimator(corrector, settings, predictor),
                             calibration=calibration, acquire_stack=acquire_stack, truth_metrics=False)
        loop.zero_slm()

        def truth() -> dict[str, Any]:
            return {"true_residual_rms": loop.true_residual_rms(), "true_null_depth": loop.true_null_depth()}

        rows: list[dict[str, Any]] = [{"iteration": 0, "stacks": 0, **truth()}]
        times = []
        decisions = []
        for k in range(iterations):
            t0 = time.perf_counter()
            r = loop.correct_once(gain, iteration=k)  # a dry-run iteration: no truth metrics inside
            times.append(time.perf_counter() - t0)
            decisions.append(r.decision)
            rows[k].update(null_depth=r.metrics.get("null_depth"), correlation_ideal=r.metrics.get("correlation_ideal"),
                           predicted_residual_rms=r.metrics.get("predicted_residual_rms"))
            rows.append({"iteration": k + 1, "stacks": loop.stacks_acquired, **truth()})
        final = loop.acquire()  # the measured metrics of the last state (not counted as a stack)
        fm = loop.metrics(final)
        rows[-1].update(null_depth=fm.get("null_depth"), correlation_ideal=fm.get("correlation_ideal"))
        return {"rows": rows, "decisions": decisions, "iteration_s": times,
                "stacks": loop.stacks_acquired - 1, "ideal_null_depth": loop.ideal_null_depth(),
                "stop": loop.stop_reason}


def _q(values: list[Any], q: float) -> float:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    return float(np.percentile(v, q)) if v.size else float("nan")


def summarise(trials: list[dict[str, Any]]) -> list[dict[str, float]]:
    n_rows = min(len(t["rows"]) for t in trials)
    table = []
    for k in range(n_rows):
        col = lambda key: [t["rows"][k].get(key) for t in trials]  # noqa: E731
        table.append({
            "iteration": k,
            "residual_median": _q(col("true_residual_rms"), 50), "residual_p95": _q(col("true_residual_rms"), 95),
            "true_null_depth_median": _q(col("true_null_depth"), 50),
            "true_null_depth_p95": _q(col("true_null_depth"), 95),
            "null_depth_median": _q(col("null_depth"), 50), "null_depth_p95": _q(col("null_depth"), 95),
            "correlation_median": _q(col("correlation_ideal"), 50),
            "stacks_median": _q(col("stacks"), 50),
        })
    return table


def format_table(table: list[dict[str, float]]) -> str:
    lines = [f"{'iter':>4} {'stacks':>6} {'residual median':>16} {'residual p95':>13} "
             f"{'true null med':>14} {'true null p95':>14} {'meas. null med':>15} {'meas. null p95':>15} "
             f"{'corr median':>12}"]
    for r in table:
        lines.append(f"{r['iteration']:>4} {r['stacks_median']:>6.0f} {r['residual_median']:>16.4f} "
                     f"{r['residual_p95']:>13.4f} {r['true_null_depth_median']:>14.4f} "
                     f"{r['true_null_depth_p95']:>14.4f} {r['null_depth_median']:>15.4f} "
                     f"{r['null_depth_p95']:>15.4f} {r['correlation_median']:>12.4f}")
    return "\n".join(lines)


def write_plots(table: list[dict[str, float]], trials: list[dict[str, Any]], out: Path, title: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    its = [r["iteration"] for r in table]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for t in trials:
        axes[0].plot(its, [row.get("true_residual_rms") or np.nan for row in t["rows"][: len(its)]],
                     color="0.8", lw=0.8)
        axes[1].plot(its, [row.get("true_null_depth") or np.nan for row in t["rows"][: len(its)]],
                     color="0.8", lw=0.8)
    axes[0].plot(its, [r["residual_median"] for r in table], "o-", label="median")
    axes[0].plot(its, [r["residual_p95"] for r in table], "s--", label="95th percentile")
    axes[0].axhline(0.05, color="g", lw=0.8, ls=":", label="target median 0.05")
    axes[0].axhline(0.15, color="r", lw=0.8, ls=":", label="target p95 0.15")
    axes[0].set(xlabel="iteration", ylabel="true residual RMS (rad)", yscale="log", title=title)
    axes[1].plot(its, [r["true_null_depth_median"] for r in table], "o-", color="C0", label="true (beam), median")
    axes[1].plot(its, [r["true_null_depth_p95"] for r in table], "s--", color="C0", label="true (beam), p95")
    axes[1].plot(its, [r["null_depth_median"] for r in table], "o-", color="C1", label="measured (bead), median")
    axes[1].plot(its, [r["null_depth_p95"] for r in table], "s--", color="C1", label="measured (bead), p95")
    floor = trials[0].get("ideal_null_depth")
    if floor:
        axes[1].axhline(floor, color="k", lw=0.8, ls=":", label=f"measured floor (bead, no noise) {floor:.3f}")
    axes[1].axhline(0.01, color="r", lw=0.8, ls=":", label="target 0.01")
    axes[1].set(xlabel="iteration", ylabel="null depth (centre / peak)", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "align.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [str(path)]


def run(args: argparse.Namespace) -> int:
    if args.backend == "sim" and not getattr(args, "fixed_iterations", False):
        from autoalign.app.trials import run_from_args  # the loop's own run(), hidden errors, honest truth

        return run_from_args(args)
    base = load_settings(args.settings)
    iterations = args.iterations or base.loop.max_iterations
    calibration = None
    if args.calibration:
        from autoalign.calibration.poke import PokeCalibration

        calibration = PokeCalibration.load(args.calibration, settings=base)
    trials_n = args.trials if args.backend == "sim" else 1
    predictor = None
    trials = []
    t_start = time.perf_counter()
    for t in range(trials_n):
        settings = _settings_for(args, t)
        if predictor is None and args.corrector == "model":
            from autoalign.models.predictor import Predictor

            try:
                predictor = Predictor.load(settings=settings)
            except (OSError, ValueError) as exc:  # CheckpointError is a ValueError
                print(f"autoalign align: cannot load the model: {exc}", file=sys.stderr)
                return 2
        try:
            trials.append(run_trial(settings, iterations, args.corrector, args.gain, predictor, calibration))
        except Exception as exc:  # noqa: BLE001 - report which trial failed, keep the others
            log.error("trial %d failed: %s", t, exc)
            if args.backend != "sim":
                raise
        if not args.json:
            print(f"trial {t + 1}/{trials_n}: residual {trials[-1]['rows'][0]['true_residual_rms']!s:.6} -> "
                  f"{trials[-1]['rows'][-1]['true_residual_rms']!s:.6} rad", file=sys.stderr)
    if not trials:
        return 1
    table = summarise(trials)
    iter_s = [s for t in trials for s in t["iteration_s"]]
    summary = {
        "backend": args.backend, "corrector": args.corrector, "trials": len(trials), "iterations": iterations,
        "seed": args.seed, "aberration_rms": args.aberration_rms, "table": table,
        "ideal_null_depth": trials[0]["ideal_null_depth"], "measured_null_floor": trials[0]["ideal_null_depth"],
        "hidden_rms": [t["rows"][0]["true_residual_rms"] for t in trials],
        "iteration_s_median": float(np.median(iter_s)) if iter_s else None,
        "iteration_s_p95": float(np.percentile(iter_s, 95)) if iter_s else None,
        "stacks_per_trial_median": float(np.median([t["stacks"] for t in trials])),
        "wall_s": time.perf_counter() - t_start, "per_trial": trials,
    }
    if args.report:
        out = Path(args.report)
        summary["plots"] = write_plots(table, trials, out, f"{args.corrector}, {len(trials)} trials")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_trial"}, indent=1, default=float))
    else:
        print(format_table(table))
        print(f"dry-run iteration wall time median {summary['iteration_s_median']:.3f} s; measured null "
              f"depth floor with this bead (perfect correction, no noise) {summary['ideal_null_depth']:.4f}")
    return 0
