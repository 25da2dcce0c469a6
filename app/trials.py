"""Simulated alignment trials with injected hidden errors, and their tables (``autoalign align
--backend sim --trials T ...``).

Each trial opens a fresh simulated microscope (seed ``S + t``) with the hidden errors of
:class:`HiddenErrors` (the flags of :func:`add_trial_arguments`), runs the loop exactly as a
user would (:meth:`autoalign.app.loop.AlignmentLoop.run`: its stop rules, diagnosis and
best-restore) and records, after every iteration, the microscope's HONEST truth: the true residual
wavefront RMS of the phase the SLM delivers (``SimulatedMicroscope.true_residual_rms``), the
residual vortex-mask offset, the true null depth of the beam (exact, no bead), next to the
MEASURED null depth of the stack (bead included). A trial that stops early keeps its last state in
the later rows.

A FALSE SUCCESS is a trial reported "converged" whose true null depth is above 1 %.

Units: radians, pupil radii (mask offset), micrometres, null depth centre/peak.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: "kind" of the summary.json that ``autoalign align --report`` writes (recognised before overwriting)
REPORT_KIND = "autoalign align report"

#: true null depth above which a "converged" claim counts as a false success
FALSE_SUCCESS_NULL = 0.01


@dataclass
class HiddenErrors:
    """Hidden errors injected into each simulated trial (None/0: the settings' own).

    ``aberration_rms``: "A" or "A:B" rad RMS over ``simulation.aberration_modes`` (uniform per
    trial). ``mask_offset``: length (pupil radii) of the vortex-mask misregistration, direction
    random per trial. ``higher_order_rms``: rad RMS over Noll 16..``higher_order_max_noll`` (28). ``bead_offset``: lateral
    distance (um) of the bead from the ROI centre at start, direction random per trial;
    ``bead_offset_z``: axial (um, sign random). ``drift``: bead random walk (um RMS per axis per
    stack). ``photons``: peak photons of the unaberrated donut (``camera.peak_photons``).
    ``wrong_hand``: fraction of the intensity in the wrong circular hand. ``slm_stroke``: the SLM
    delivers this x the commanded phase. ``camera_orientation``: camera vs SLM frame.
    ``true_instrument``: "NA,WAVELENGTH,PIXEL" scales of the true instrument against the settings
    the loop uses (sim-to-real mismatch; ``simulation.true_*_scale``)."""

    aberration_rms: str | None = None
    mask_offset: float = 0.0
    higher_order_rms: float = 0.0
    higher_order_max_noll: int = 28
    bead_offset: float = 0.0
    bead_offset_z: float = 0.0
    drift: float = 0.0
    photons: float | None = None
    wrong_hand: float = 0.0
    slm_stroke: float = 1.0
    camera_orientation: str = "identity"
    true_instrument: str | None = None

    def describe(self) -> str:
        default = HiddenErrors()
        parts = [f"{k}={v}" for k, v in asdict(self).items() if v != getattr(default, k)]
        return ", ".join(parts) or "none beyond the settings"


def add_trial_arguments(p: argparse.ArgumentParser) -> None:
    """The hidden-error flags of ``autoalign align`` (simulated backend only)."""
    g = p.add_argument_group("hidden errors of the simulated microscope (--backend sim; see docs/loop.md)")
    g.add_argument("--mask-offset", type=float, default=0.0, metavar="R",
                   help="vortex-mask misregistration, pupil radii (random direction per trial)")
    g.add_argument("--higher-order-rms", type=float, default=0.0, metavar="RAD",
                   help="extra hidden aberration over Noll 16..N (--higher-order-max-noll), rad RMS")
    g.add_argument("--higher-order-max-noll", type=int, default=28, choices=range(16, 29), metavar="N",
                   help="last Noll index of --higher-order-rms, 16..28 (default 28; 22: within the 5..22 model's modes)")
    g.add_argument("--bead-offset", type=float, default=0.0, metavar="UM",
                   help="bead's lateral distance from the ROI centre at start, um (random direction)")
    g.add_argument("--bead-offset-z", type=float, default=0.0, metavar="UM",
                   help="bead's axial distance from the focus at start, um (random sign)")
    g.add_argument("--drift", type=float, default=0.0, metavar="UM", help="bead drift, um RMS per axis per stack")
    g.add_argument("--photons", type=float, default=None, metavar="N", help="peak photons of the unaberrated donut")
    g.add_argument("--wrong-hand", type=float, default=0.0, metavar="F",
                   help="fraction of the beam's intensity in the wrong circular hand")
    g.add_argument("--slm-stroke", type=float, default=1.0, metavar="S",
                   help="the SLM delivers S x the commanded phase (LUT / 2 pi grey level error)")
    g.add_argument("--camera-orientation", default="identity",
                   choices=["identity", "mirror_x", "mirror_y", "rotate_180", "rot180", "transpose"],
                   help="camera image orientation relative to the SLM frame")
    g.add_argument("--true-instrument", default=None, metavar="NA,WL,PIX", type=_scales,
                   help="the true instrument differs from the settings the loop uses: NA, wavelength and camera "
                   "pixel size scaled by these factors, e.g. 1.02,1.01,1.05")


def _scales(text: str) -> str:
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(0.5 < v < 1.5 for v in values):
        raise argparse.ArgumentTypeError(f"expected three factors NA,WL,PIX in (0.5, 1.5), got {text!r}")
    return str(text)


def errors_from_args(args: argparse.Namespace) -> HiddenErrors:
    orientation = getattr(args, "camera_orientation", "identity")
    return HiddenErrors(
        aberration_rms=getattr(args, "aberration_rms", None), mask_offset=float(getattr(args, "mask_offset", 0.0)),
        higher_order_rms=float(getattr(args, "higher_order_rms", 0.0)),
        higher_order_max_noll=int(getattr(args, "higher_order_max_noll", 28)),
        bead_offset=float(getattr(args, "bead_offset", 0.0)), bead_offset_z=float(getattr(args, "bead_offset_z", 0.0)),
        drift=float(getattr(args, "drift", 0.0)), photons=getattr(args, "photons", None),
        wrong_hand=float(getattr(args, "wrong_hand", 0.0)), slm_stroke=float(getattr(args, "slm_stroke", 1.0)),
        camera_orientation="rotate_180" if orientation == "rot180" else orientation,
        true_instrument=getattr(args, "true_instrument", None))


def trial_settings(base: Any, errors: HiddenErrors, seed: int) -> Any:
    """``base`` with the simulated microscope's hidden errors of trial ``seed`` (reproducible)."""
    rng = np.random.default_rng([int(seed), 4243])
    over: dict[str, Any] = {"simulation.seed": int(seed), "hardware.backend": "simulated",
                            "slm.backend": "simulated"}
    if errors.aberration_rms is not None:
        text = str(errors.aberration_rms)
        if ":" in text:
            lo, hi = (float(v) for v in text.split(":", 1))
            over["simulation.aberration_rms_rad"] = float(np.random.default_rng([int(seed), 7919]).uniform(lo, hi))
        else:
            over["simulation.aberration_rms_rad"] = float(text)
    angle = rng.uniform(0, 2 * math.pi)
    if errors.mask_offset:
        over["simulation.mask_offset"] = [errors.mask_offset * math.cos(angle), errors.mask_offset * math.sin(angle)]
    angle_b = rng.uniform(0, 2 * math.pi)
    z_sign = 1.0 if rng.uniform() < 0.5 else -1.0
    if errors.bead_offset or errors.bead_offset_z:
        over["simulation.bead_position_um"] = [errors.bead_offset * math.cos(angle_b),
                                               errors.bead_offset * math.sin(angle_b), z_sign * errors.bead_offset_z]
    if errors.higher_order_rms:
        over["simulation.higher_order_rms_rad"] = errors.higher_order_rms
        over["simulation.higher_order_modes"] = list(range(16, int(errors.higher_order_max_noll) + 1))
    if errors.drift:
        over["simulation.drift_um_per_step"] = errors.drift
    if errors.photons is not None:
        over["camera.peak_photons"] = float(errors.photons)
    if errors.wrong_hand:
        over["simulation.wrong_hand_fraction"] = errors.wrong_hand
    if errors.slm_stroke != 1.0:
        over["simulation.slm_phase_scale"] = errors.slm_stroke
    if errors.camera_orientation != "identity":
        over["simulation.camera_orientation"] = errors.camera_orientation
    if errors.true_instrument:
        na, wl, pix = (float(v) for v in errors.true_instrument.split(","))
        over.update({"simulation.true_na_scale": na, "simulation.true_wavelength_scale": wl,
                     "simulation.true_pixel_scale": pix})
    return base.replace(**over)


def _truth_row(loop: Any) -> dict[str, float]:
    off = loop.true_mask_offset()
    return {"true_residual_rms": loop.true_residual_rms(), "true_null_depth": loop.true_null_depth(),
            "true_mask_offset": math.hypot(*off) if off is not None else math.nan}


def run_loop_trial(settings: Any, iterations: int, estimator: Any, devices: Any = None,
                   gain: float | None = None, calibration: Any = None) -> dict[str, Any]:
    """One trial through :meth:`AlignmentLoop.run`. Returns ``rows`` (row k: the state after k
    iterations, honest truth and the measured null of the stack taken in that state), the stop
    reason, the diagnosis, ``converged`` and ``false_success``."""
    from contextlib import nullcontext

    from autoalign.app.loop import AlignmentLoop

    if devices is None:
        from autoalign.hardware.factory import open_devices

        ctx = open_devices(settings)
    else:
        ctx = nullcontext(devices)
    with ctx as dev:
        loop = AlignmentLoop(dev, settings, estimator, calibration=calibration, truth_metrics=True)
        loop.zero_slm()
        rows: list[dict[str, Any]] = [{"iteration": 0, **_truth_row(loop)}]
        t0 = time.perf_counter()
        records = loop.run(iterations, gain)
        wall = time.perf_counter() - t0
        for k, r in enumerate(records):
            rows[k]["null_depth"] = r.metrics.get("null_depth")
            rows[k]["decision"] = r.decision
            rows.append({"iteration": k + 1, "true_residual_rms": r.metrics.get("true_residual_rms"),
                         "true_null_depth": r.metrics.get("true_null_depth"),
                         "true_mask_offset": r.metrics.get("true_mask_offset")})
        final = loop.acquire()
        rows[-1]["null_depth"] = loop.metrics(final).get("null_depth") if final.valid else math.nan
        end = rows[-1]
        converged = bool(loop.result.converged) if loop.result is not None else False
        true_null = end.get("true_null_depth")
        return {"rows": rows, "stop": loop.stop_reason, "converged": converged,
                "diagnosis": loop.diagnosis.to_dict() if loop.diagnosis is not None else None,
                "false_success": bool(converged and true_null is not None and true_null > FALSE_SUCCESS_NULL),
                "ideal_null_depth": loop.ideal_null_depth(), "stacks": loop.stacks_acquired, "wall_s": wall,
                "worse_than_start": bool((end.get("true_residual_rms") or 0) > (rows[0].get("true_residual_rms") or 0))}


def _q(values: list[Any], q: float) -> float:
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    return float(np.percentile(v, q)) if v.size else float("nan")


def summarise_trials(trials: list[dict[str, Any]], iterations: int) -> list[dict[str, float]]:
    """Per-iteration medians and 95th percentiles over trials (a trial that stopped early keeps
    its last state)."""
    table = []
    for k in range(iterations + 2):
        def col(key: str, k: int = k) -> list[Any]:
            out = []
            for t in trials:
                rows = t["rows"]
                out.append(rows[min(k, len(rows) - 1)].get(key))
            return out

        if k > max(len(t["rows"]) - 1 for t in trials):
            break
        table.append({"iteration": k,
                      "residual_median": _q(col("true_residual_rms"), 50), "residual_p95": _q(col("true_residual_rms"), 95),
                      "mask_offset_median": _q(col("true_mask_offset"), 50),
                      "true_null_median": _q(col("true_null_depth"), 50), "true_null_p95": _q(col("true_null_depth"), 95),
                      "measured_null_median": _q(col("null_depth"), 50)})
    return table


def stop_kind(reason: str) -> str:
    """The kind of a stop reason, for counting ("converged", "stopped: <diagnosis>", ...)."""
    if reason.startswith("stopped:"):
        return "stopped: " + reason.split(":", 2)[1].strip()[:60]
    return reason.split(":")[0].split("(")[0].strip()


def format_trials(table: list[dict[str, float]], trials: list[dict[str, Any]]) -> str:
    lines = [f"{'iter':>4} {'true resid med':>14} {'p95':>7} {'mask off med':>12} {'true null med':>13} "
             f"{'p95':>7} {'meas. null med':>14}"]
    for r in table:
        lines.append(f"{r['iteration']:>4} {r['residual_median']:>14.4f} {r['residual_p95']:>7.4f} "
                     f"{r['mask_offset_median']:>12.4f} {r['true_null_median']:>13.4f} {r['true_null_p95']:>7.4f} "
                     f"{r['measured_null_median']:>14.4f}")
    counts = Counter(stop_kind(t["stop"]) for t in trials)
    lines.append("stop reasons: " + "; ".join(f"{n} x {k}" for k, n in counts.most_common()))
    n_false = sum(t["false_success"] for t in trials)
    lines.append(f"converged: {sum(t['converged'] for t in trials)} of {len(trials)}; false successes (converged "
                 f"with true null > {FALSE_SUCCESS_NULL:.0%}): {n_false}; ended worse than started: "
                 f"{sum(t['worse_than_start'] for t in trials)}; measured null floor of the bead "
                 f"{trials[0]['ideal_null_depth']:.4f}")
    return "\n".join(lines)


def run_from_args(args: argparse.Namespace, report_dir: Path | None = None, calibration: Any = None) -> int:
    """``autoalign align --backend sim``: the trials with the hidden errors of the flags.

    ``report_dir``: a folder already checked by the command (summary.json written atomically);
    ``calibration``: the poke calibration the command chose. Ctrl-C keeps the finished trials,
    writes their report and returns 130."""
    import json

    from autoalign.app.cli import device_settings
    from autoalign.app.estimators import make_estimator

    base = device_settings(args)
    if getattr(args, "corrector", None) is None:
        args.corrector = base.loop.corrector
    errors = errors_from_args(args)
    iterations = args.iterations or base.loop.max_iterations
    first_seed = base.simulation.seed if args.seed is None else args.seed
    predictor = None
    if args.corrector in ("model", "refined"):
        from autoalign.models.predictor import Predictor

        predictor = Predictor.load(settings=base)  # errors: the CLI's boundary says what to do (exit 2)
    fine = None
    if args.corrector in ("model", "refined") and base.model.fine_checkpoint:  # coarse + fine: both loaded once
        from autoalign.models.estimator import CNNEstimator

        fine = CNNEstimator(base).fine_predictor
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    trials = []
    seeds = range(first_seed, first_seed + int(args.trials))
    bar = tqdm(seeds, desc="trials", file=sys.stderr, disable=args.json) if tqdm else seeds
    interrupted = None
    try:
        for seed in bar:
            s = trial_settings(base, errors, seed)
            options: dict[str, Any] = {}
            if fine is not None and args.corrector == "model":
                options = {"fine_predictor": fine}
            elif fine is not None:  # refined: its network is the coarse + fine pair, loaded once
                options = {"network": CNNEstimator(s, predictor, fine_predictor=fine)}
            est = make_estimator(args.corrector, s, predictor, **options)
            try:
                trials.append(dict(run_loop_trial(s, iterations, est, gain=args.gain, calibration=calibration),
                                   seed=seed))
            except Exception as exc:  # noqa: BLE001 - report which trial failed, keep the others
                print(f"trial seed {seed} failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = f"interrupted (Ctrl-C) after {len(trials)} of {args.trials} trial(s)"
    if not trials:
        if interrupted:
            print(f"autoalign align: {interrupted}; nothing to report", file=sys.stderr)
            return 130
        return 1
    table = summarise_trials(trials, iterations)
    summary = {"errors": asdict(errors), "corrector": args.corrector, "trials": len(trials), "iterations": iterations,
               "first_seed": first_seed, "table": table,
               "converged": sum(t["converged"] for t in trials),
               "false_successes": sum(t["false_success"] for t in trials),
               "stop_reasons": dict(Counter(stop_kind(t["stop"]) for t in trials)),
               "ideal_null_depth": trials[0]["ideal_null_depth"], "per_trial": trials}
    if interrupted:
        summary["stopped"] = interrupted
    if report_dir is not None:
        from autoalign.files import atomic_write_text

        report_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report_dir / "summary.json", json.dumps(dict(summary, kind=REPORT_KIND), indent=1,
                                                                  default=float))
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "per_trial"}, indent=1, default=float))
    else:
        print(f"hidden errors: {errors.describe()}; corrector {args.corrector}; {len(trials)} trial(s), "
              f"seeds {first_seed}..{first_seed + len(trials) - 1}")
        print(format_trials(table, trials))
        for t in trials:
            print(f"  seed {t['seed']}: {t['stop']}")
    if interrupted:
        print(f"autoalign align: {interrupted}; the report covers the finished trials", file=sys.stderr)
        return 130
    return 0


__all__ = ["HiddenErrors", "add_trial_arguments", "errors_from_args", "trial_settings", "run_loop_trial",
           "summarise_trials", "format_trials", "run_from_args", "stop_kind", "FALSE_SUCCESS_NULL"]
