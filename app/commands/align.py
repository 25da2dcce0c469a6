"""``autoalign align``: the closed loop, headless.

--backend sim (the simulated microscope): --trials T trials, each with a fresh random hidden
aberration (seed S + t; RMS uniform in --aberration-rms A:B, default the settings'
simulation.aberration_rms_rad) and the hidden errors asked for, run with the loop's own stop
rules; prints a per-iteration table (median and 95th percentile of the true residual RMS, the TRUE
null depth of the beam and the MEASURED null depth with the bead) and each trial's stop reason.
--fixed-iterations: the legacy table (exactly --iterations corrections, no stop rules).

--backend micromanager (real devices): one run; prints per iteration what the camera measured
(null depth, correlation with the ideal donut) and the loop's decision. A real instrument has no
true residual, so none is printed. --demo-micromanager is a WIRING DEMO, not an alignment:
Micro-Manager's demo camera images no bead, so every stack is refused by design.

Output: the table on stdout, or with --json the JSON summary instead. Files are written only with
--report DIR: summary.json there, and the PNG plots (align.png) with --fixed-iterations or
--backend micromanager.

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
    from autoalign.app.cli import gain_float, non_negative_int, positive_int

    p = subparsers.add_parser("align", help="run the closed alignment loop (headless)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_settings_argument(p)
    p.add_argument("--backend", choices=["sim", "micromanager"], default=None,
                   help="sim: the simulated microscope; micromanager: the devices of the settings' "
                   "hardware section (default: the settings' hardware.backend)")
    p.add_argument("--demo-micromanager", action="store_true",
                   help="wiring demo: Micro-Manager's demo camera and stages (mm-test-adapters) with the "
                   "simulated SLM (the packaged demo_micromanager.yaml); not an alignment")
    p.add_argument("--iterations", type=positive_int, default=None, metavar="N",
                   help="iterations per trial, >= 1 (default loop.max_iterations)")
    p.add_argument("--trials", type=positive_int, default=1, metavar="T",
                   help="simulated trials, each a fresh hidden aberration, >= 1 (default 1)")
    p.add_argument("--seed", type=non_negative_int, default=None, help="first trial's seed, >= 0 (default simulation.seed)")
    p.add_argument("--gain", type=gain_float, default=None,
                   help="fraction of each correction applied, in (0, 1] (default loop.gain)")
    p.add_argument("--corrector", choices=["model", "refined", "modal"], default=None,
                   help="refined: the CNN then a model-based fit of the stack (uncertainties, validity, named faults "
                   "such as polarisation or SLM stroke; ~1 s per iteration); model: the CNN alone (ms); "
                   "modal: the model-free baseline (default: the settings' loop.corrector, refined)")
    p.add_argument("--checkpoint", default=None, metavar="FILE",
                   help="model checkpoint (default model.checkpoint; relative to the current folder)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="poke calibration YAML (default: the one 'autoalign calibrate' wrote for these "
                   "settings when its optics match, else the optics formulas)")
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore any saved poke calibration; use the optics formulas")
    p.add_argument("--aberration-rms", default=None, metavar="A[:B]", type=_rms_spec,
                   help="hidden aberration RMS, rad, >= 0 (sim); A:B draws each trial's uniformly in [A, B]")
    p.add_argument("--json", action="store_true", help="print the JSON summary instead of the table (no file)")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write summary.json here, and the PNG plots (align.png) with --fixed-iterations or "
                   "--backend micromanager; without it nothing is written")
    p.add_argument("--force", action="store_true",
                   help="replace report files in DIR that this command did not write")
    # --- hidden errors of simulated trials and the loop's own stop rules (app/trials.py) ---
    from autoalign.app.trials import add_trial_arguments

    add_trial_arguments(p)
    p.add_argument("--fixed-iterations", action="store_true",
                   help="sim: the legacy table (exactly --iterations corrections, no stop rules, no hidden errors)")
    p.set_defaults(func=run)


def _rms_spec(text: str) -> str:
    """argparse type for --aberration-rms: ``A`` or ``A:B`` with 0 <= A <= B, finite."""
    try:
        parts = [float(v) for v in text.split(":", 1)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A or A:B (radians, 0 <= A <= B), got {text!r}") from None
    if any(not np.isfinite(v) or v < 0 for v in parts) or (len(parts) == 2 and parts[0] > parts[1]):
        raise argparse.ArgumentTypeError(f"expected A or A:B (radians, 0 <= A <= B), got {text!r}")
    return text


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


def _pct(value: Any) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{100 * value:.2f} %"


def _first_refusal(trial: dict[str, Any]) -> str:
    refused = [str(d) for d in trial.get("decisions", []) if str(d).startswith("refused")]
    return refused[0].removeprefix("refused: ").split(";")[0] if refused else "no decision"


def format_measured(trial: dict[str, Any]) -> str:
    """One run on real devices: per row what the camera measured and the loop's decision (a real
    instrument has no true residual); "-" where nothing was measured (a refused stack)."""
    decisions = list(trial.get("decisions", []))
    lines = [f"{'iter':>4} {'measured null':>14} {'corr. ideal':>12}  decision"]
    for k, row in enumerate(trial["rows"]):
        corr = row.get("correlation_ideal")
        corr_text = "-" if corr is None or not np.isfinite(corr) else f"{corr:.3f}"
        decision = decisions[k] if k < len(decisions) else "(the state on the SLM at the end)"
        lines.append(f"{k:>4} {_pct(row.get('null_depth')):>14} {corr_text:>12}  {decision}")
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
    from autoalign.files import atomic_writer

    with atomic_writer(path, "wb") as fh:
        fig.savefig(fh, format="png", dpi=120, metadata={"Software": "autoalign align"})
    plt.close(fig)
    return [str(path)]


from autoalign.app.trials import REPORT_KIND  # noqa: E402 - one definition, shared with the trials


def _prepare_report(report: str | None, force: bool) -> Path | None:
    """Check the report folder before any work: writable, and holding no summary.json / align.png
    that another program (or a person) wrote, unless ``force``."""
    if not report:
        return None
    from autoalign.files import OverwriteRefused, check_writable, png_software

    out = Path(report).absolute()
    if out.exists() and not out.is_dir():
        raise OverwriteRefused(f"{out}: --report expects a folder, this is a file")
    check_writable(out, "report", folder=True)
    summary, png = out / "summary.json", out / "align.png"
    if not force:
        ours = False
        if summary.exists():
            try:
                data = json.loads(summary.read_text(encoding="utf-8"))
                # this version writes "kind"; earlier versions are recognised by their keys
                ours = data.get("kind") == REPORT_KIND or {"table", "per_trial", "corrector"} <= set(data)
            except (OSError, ValueError, AttributeError, TypeError):
                ours = False
            if not ours:
                raise OverwriteRefused(f"{summary}: exists and is not an autoalign align report; choose "
                                       "another --report folder or pass --force")
        software = png_software(png) or ""
        if png.exists() and not (software.startswith("autoalign") or (ours and software.startswith("Matplotlib"))):
            raise OverwriteRefused(f"{png}: exists and was not written by autoalign; choose another "
                                   "--report folder or pass --force")
    return out


def default_calibration(settings: Any, explicit: str | None = None, disabled: bool = False) -> Any:
    """The poke calibration ``align`` uses (see :func:`calibration.poke.load_matching_calibration`);
    says which on stderr."""
    from autoalign.calibration.poke import load_matching_calibration

    cal, message = load_matching_calibration(settings, explicit, disabled)
    if message:
        print(f"autoalign align: {message}", file=sys.stderr)
    return cal


def run(args: argparse.Namespace) -> int:
    from autoalign.app.cli import cli_path
    from autoalign.hardware.base import DeviceError

    if args.demo_micromanager:  # the command line has pointed args.settings at the packaged demo
        from autoalign.settings import DEMO_MICROMANAGER_SETTINGS_PATH

        if args.settings is None:
            args.settings = str(DEMO_MICROMANAGER_SETTINGS_PATH)
        args.backend = "micromanager"
    base = load_settings(args.settings)
    if args.corrector is None:
        args.corrector = base.loop.corrector
    if args.backend is None:
        args.backend = "micromanager" if base.hardware.backend == "micromanager" else "sim"
    report_dir = _prepare_report(cli_path(args.report), args.force)
    iterations = args.iterations or base.loop.max_iterations
    calibration = default_calibration(device_settings_for(args), cli_path(args.calibration),
                                      args.no_calibration)
    if args.backend == "sim" and not args.fixed_iterations:
        from autoalign.app.trials import run_from_args  # the loop's own run(), hidden errors, honest truth

        return run_from_args(args, report_dir=report_dir, calibration=calibration)
    trials_n = args.trials if args.backend == "sim" else 1
    predictor = None
    trials: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    stopped: tuple[str, int] | None = None
    try:
        for t in range(trials_n):
            settings = _settings_for(args, t)
            if predictor is None and args.corrector in ("model", "refined"):
                from autoalign.models.predictor import Predictor

                predictor = Predictor.load(settings=settings)
            try:
                trials.append(run_trial(settings, iterations, args.corrector, args.gain, predictor, calibration))
            except DeviceError:
                raise
            except Exception as exc:  # noqa: BLE001 - report which trial failed, keep the others
                log.error("trial %d failed: %s", t, exc)
                if args.backend != "sim":
                    raise
                continue
            if not args.json and args.backend == "sim":
                print(f"trial {t + 1}/{trials_n}: residual {_fmt(trials[-1]['rows'][0]['true_residual_rms'])} -> "
                      f"{_fmt(trials[-1]['rows'][-1]['true_residual_rms'])} rad", file=sys.stderr)
    except KeyboardInterrupt:
        stopped = (f"interrupted (Ctrl-C) after {len(trials)} of {trials_n} trial(s)", 130)
    except DeviceError as exc:
        stopped = (f"device error after {len(trials)} of {trials_n} trial(s): {str(exc).rstrip('. ')}", 1)
    if not trials:
        if stopped:
            print(f"autoalign align: {stopped[0]}; nothing to report", file=sys.stderr)
            return stopped[1]
        print("autoalign align: every trial failed (see the messages above)", file=sys.stderr)
        return 1
    summary = _summary(args, trials, iterations, time.perf_counter() - t_start)
    if stopped:
        summary["stopped"] = stopped[0]
    if report_dir is not None:
        from autoalign.files import atomic_write_text

        summary["plots"] = write_plots(summary["table"], trials, report_dir,
                                       f"{args.corrector}, {len(trials)} trials")
        atomic_write_text(report_dir / "summary.json", json.dumps(summary, indent=1, default=float))
    hardware = args.backend != "sim"
    demo = hardware and base.slm.backend == "simulated"   # Micro-Manager devices, an SLM no beam sees
    measured = any(row.get("null_depth") is not None and np.isfinite(row["null_depth"])
                   for t in trials for row in t["rows"])
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_trial"}, indent=1, default=float))
    elif hardware:
        if demo:
            print("WIRING DEMO, not an alignment: Micro-Manager devices with the SLM pattern kept in memory "
                  "(no beam sees it); the demo camera images no bead, so its stacks are refused by design")
        print(format_measured(trials[0]))
        median = summary["iteration_s_median"]
        print(f"iteration wall time median {_fmt(median, '.3f')} s; measured null floor with this bead "
              f"(perfect correction, no noise) {_pct(summary['ideal_null_depth'])}")
        if not measured:
            print("no result: no stack was valid (" + _first_refusal(trials[0]) + "); nothing was measured")
    else:
        print(format_table(summary["table"]))
        median = summary["iteration_s_median"]
        print(f"dry-run iteration wall time median {_fmt(median, '.3f')} s; measured null "
              f"depth floor with this bead (perfect correction, no noise) {_fmt(summary['ideal_null_depth'], '.4f')}")
    if hardware and not measured and not demo and not stopped:
        print("autoalign align: no valid stack in the whole run: nothing was aligned (see the decisions above)",
              file=sys.stderr)
        return 1
    if stopped:
        where = f"; report for them in {report_dir}" if report_dir is not None else ""
        print(f"autoalign align: {stopped[0]}; kept {len(trials)} finished trial(s){where}", file=sys.stderr)
        return stopped[1]
    return 0


def _fmt(value: Any, spec: str = ".4f") -> str:
    return "n/a" if value is None else format(value, spec)


def device_settings_for(args: argparse.Namespace) -> Any:
    from autoalign.app.cli import device_settings

    return device_settings(args)


def _summary(args: argparse.Namespace, trials: list[dict[str, Any]], iterations: int, wall_s: float) -> dict[str, Any]:
    table = summarise(trials)
    iter_s = [s for t in trials for s in t["iteration_s"]]
    return {
        "kind": REPORT_KIND,
        "backend": args.backend, "corrector": args.corrector, "trials": len(trials), "iterations": iterations,
        "seed": args.seed, "aberration_rms": args.aberration_rms, "table": table,
        "ideal_null_depth": trials[0]["ideal_null_depth"], "measured_null_floor": trials[0]["ideal_null_depth"],
        "hidden_rms": [t["rows"][0]["true_residual_rms"] for t in trials],
        "iteration_s_median": float(np.median(iter_s)) if iter_s else None,
        "iteration_s_p95": float(np.percentile(iter_s, 95)) if iter_s else None,
        "stacks_per_trial_median": float(np.median([t["stacks"] for t in trials])),
        "wall_s": wall_s, "per_trial": trials,
    }
