"""What the loop can tell itself about why it stops: :class:`LoopDiagnoser`, the default
:class:`autoalign.diagnosis_types.Diagnoser` of :class:`autoalign.app.loop.AlignmentLoop`.

From the history of MEASURED quantities (null depth and correlation of each acquired stack, the
decisions, the estimates and the corrections applied) it names, in this order:

* ``aligned``: the last iteration found the donut aligned (the measured residual wavefront within
  ``calibration.quality.ALIGNED_RAD``, the null at the bead floor; the loop held the correction:
  decision ``"aligned ..."``); the only success;
* ``mask_offset_out_of_range``: a correction was refused because the vortex mask would move
  beyond ``loop.max_mask_offset``; the action names the ``slm.pupil_centre_px`` change that
  re-centres the pattern instead;
* ``flipped_frame``: the estimate after a correction grew in the modes just corrected, by about
  the correction and with the same sign, in the parity pattern of a mirrored or 180-degree
  rotated camera relative to the SLM, while the measured donut got worse (:func:`flip_pattern`);
* ``bead_lost``: a bead search (capture) ended without a usable bead;
* ``estimate_invalid``: ``loop.max_refusals`` estimates in a row were refused (the estimator's
  own refusal, or a reading beyond ``loop.max_prediction_rad``: the aberration is outside its
  range).

:func:`limit_diagnosis` says what limits a run that ended without any of these (iteration limit,
no improvement): the measured residual first, the null second. Units: null depth centre/peak;
radians; pupil radii.
"""
from __future__ import annotations

import math
from functools import cache
from typing import Any
from collections.abc import Sequence

import numpy as np

from autoalign.app.safety import MASK_OFFSET_REFUSAL
from autoalign.calibration.quality import ALIGNED_RAD, Quality, is_aligned_quality
from autoalign.diagnosis_types import Diagnosis, LoopState

#: camera orientations relative to the SLM that only change signs of Zernike modes, and the
#: slm.flip_* settings that undo them
ORIENTATION_FIX = {
    "rotate_180": ("rotated 180 deg", "slm.flip_x and slm.flip_y"),
    "mirror_x": ("mirrored left-right (x)", "slm.flip_x"),
    "mirror_y": ("mirrored up-down (y)", "slm.flip_y"),
}

#: a mode counts in the flip test when the correction moved it by at least this (rad)
FLIP_MIN_STEP_RAD = 0.1
#: ... and the modes that came back with the wrong sign together moved by at least this (rad RMS)
FLIP_MIN_TOTAL_RAD = 0.15


@cache
def mode_parity(noll: int, orientation: str) -> int:
    """+1 or -1: ``Z_j`` under the coordinate change of a camera ``orientation`` ("rotate_180":
    (x, y) -> (-x, -y); "mirror_x": x -> -x; "mirror_y": y -> -y), computed on sample points
    (0 when the mode is not mapped onto +-itself)."""
    from autoalign.simulation.zernike import zernike

    rng = np.random.default_rng(noll)
    rho = rng.uniform(0.1, 1.0, 16)
    theta = rng.uniform(-math.pi, math.pi, 16)
    x, y = rho * np.cos(theta), rho * np.sin(theta)
    tx, ty = {"rotate_180": (-x, -y), "mirror_x": (-x, y), "mirror_y": (x, -y)}[orientation]
    a = zernike(int(noll), rho, theta)
    b = zernike(int(noll), np.hypot(tx, ty), np.arctan2(ty, tx))
    if np.allclose(a, b, atol=1e-9):
        return 1
    if np.allclose(a, -b, atol=1e-9):
        return -1
    return 0


def flip_pattern(before: dict[int, float], after: dict[int, float], step: dict[int, float]
                 ) -> tuple[str, dict[str, float]] | None:
    """The camera orientation whose sign pattern explains two consecutive estimates, or None.

    ``before``: the estimate {Noll: rad} that a correction acted on; ``step``: what the correction
    changed per mode (rad, normally ``-gain * before``); ``after``: the next estimate. With a
    consistent frame ``after - before`` equals ``step`` (the mode shrinks); a mode that the
    camera shows with the wrong sign comes back as ``before - step`` (it grows by the step, with
    the same sign). Each mode moved by at least :data:`FLIP_MIN_STEP_RAD` is classed as
    consistent or flipped by the sign of ``(after - before) / step``; the flipped set must be
    exactly the set that an orientation of :data:`ORIENTATION_FIX` negates among these modes,
    with at least :data:`FLIP_MIN_TOTAL_RAD` of step in it and a growth of at least half the step
    (least squares over the flipped modes). Returns (orientation, figures)."""
    modes = [j for j, d in step.items() if j >= 2 and abs(d) >= FLIP_MIN_STEP_RAD and j in before and j in after]
    if len(modes) < 2:
        return None
    flipped = {j for j in modes if (after[j] - before[j]) / step[j] < 0}
    if not flipped:
        return None
    d = np.array([step[j] for j in sorted(flipped)])
    growth = np.array([after[j] - before[j] for j in sorted(flipped)])
    ratio = float(-(growth @ d) / (d @ d))  # 1 when the flipped modes grew by exactly the step
    total = float(np.sqrt(np.sum(d * d)))
    if ratio < 0.5 or total < FLIP_MIN_TOTAL_RAD:
        return None
    for orientation in ORIENTATION_FIX:
        predicted = {j for j in modes if mode_parity(j, orientation) == -1}
        if predicted == flipped and all(mode_parity(j, orientation) == 1 for j in set(modes) - flipped):
            return orientation, {"flipped_modes": float(len(flipped)), "growth_over_step": ratio,
                                 "flipped_step_rms_rad": total}
    return None


def _score(record: Any) -> float:
    m = getattr(record, "metrics", {}) or {}
    null, corr = m.get("null_depth"), m.get("correlation_ideal")
    if null is None or corr is None or not (math.isfinite(null) and math.isfinite(corr)):
        return math.inf
    return float(null + (1.0 - corr))


def _applied(record: Any) -> bool:
    return str(getattr(record, "decision", "")).startswith("applied")


def _estimate_ok(record: Any) -> bool:
    est = getattr(record, "estimate", None)
    return est is not None and bool(est.valid) and bool(est.coefficients)


class LoopDiagnoser:
    """The default :class:`autoalign.diagnosis_types.Diagnoser` (see the module docstring).
    Stateless: everything comes from the history it is shown."""

    def diagnose(self, state: LoopState, last_estimate: Any) -> Diagnosis | None:
        history: Sequence[Any] = state.history
        if not history:
            return None
        last = history[-1]
        decision = str(last.decision)
        metrics = last.metrics or {}
        null = metrics.get("null_depth", math.nan)
        sigma = metrics.get("null_depth_sigma", math.nan)
        terms = {"null_depth": null, "null_depth_sigma": sigma, "bead_floor": state.null_floor,
                 "floor_margin": state.floor_margin}
        q = Quality.from_metrics(metrics)
        if q is not None:
            terms.update(quality_rad=q.value, quality_sigma_rad=q.sigma, aligned_rad=ALIGNED_RAD)
        if decision.startswith("aligned"):
            residual = f"measured {q.text()} within {ALIGNED_RAD:g} rad; " if q is not None else ""
            return Diagnosis("aligned", f"{residual}measured null {null:.4f} +- {sigma:.4f} at the bead floor "
                             f"{state.null_floor:.4f} (+{state.floor_margin:g} margin)", "",
                             terms, "info", stop=True, success=True)
        if MASK_OFFSET_REFUSAL in decision:
            return self._mask_offset(state, last, terms)
        flip = self._flip(history)
        if flip is not None:
            return flip
        if "bead search failed" in decision:
            return Diagnosis("bead_lost", "no usable bead: " + decision.split("bead search failed", 1)[1].strip(" :;"),
                             "bring a bead into the field of view (check the sample and the focus), or raise "
                             "loop.capture_tries / loop.capture_max_step_um", terms, "error")
        n = int(getattr(getattr(state.settings, "loop", None), "max_refusals", 3) or 3)
        recent = history[-n:]
        if len(recent) == n and all(str(r.decision).startswith("refused") and r.estimate is not None
                                    for r in recent):
            beyond = "max_prediction_rad" in decision
            cause = (f"the estimator read an aberration beyond its range in {n} iterations in a row ({decision})"
                     if beyond else f"the estimator refused {n} measurements in a row ({decision})")
            action = ("the aberration is beyond what this estimator reads: start from a coarser correction "
                      "(e.g. `--corrector modal`) or a model trained over a wider range") if beyond else \
                "check the bead and the imaging conditions against the estimator's domain"
            return Diagnosis("estimate_invalid", cause, action, terms, "error")
        return None

    @staticmethod
    def _mask_offset(state: LoopState, last: Any, terms: dict[str, float]) -> Diagnosis:
        proposed = getattr(last, "proposed", None)
        wanted = tuple(proposed.mask_offset) if proposed is not None else (math.nan, math.nan)
        limit = float(getattr(getattr(state.settings, "loop", None), "max_mask_offset", 0.2))
        slm = getattr(state.settings, "slm", None)
        radius = float(getattr(slm, "pupil_radius_px", 0.0) or 0.0)
        sx = -1.0 if getattr(slm, "flip_x", False) else 1.0
        sy = -1.0 if getattr(slm, "flip_y", False) else 1.0
        action = "re-centre the beam on the SLM (steering mirror) or move slm.pupil_centre_px"
        if radius > 0:
            action += f" by about ({sx * wanted[0] * radius:+.0f}, {sy * wanted[1] * radius:+.0f}) px"
        terms = dict(terms, mask_offset_x=wanted[0], mask_offset_y=wanted[1], max_mask_offset=limit)
        return Diagnosis("mask_offset_out_of_range",
                         f"the vortex mask would have to move by ({wanted[0]:+.3f}, {wanted[1]:+.3f}) pupil radii, "
                         f"beyond the SLM's safe range loop.max_mask_offset = {limit:g}", action, terms, "error")

    @staticmethod
    def _flip(history: Sequence[Any]) -> Diagnosis | None:
        """The flipped-frame pattern between the last record with a valid estimate and the applied
        one before it (nothing applied in between)."""
        if len(history) < 2:
            return None
        after, before = history[-1], history[-2]
        if not (_estimate_ok(after) and _estimate_ok(before) and _applied(before)):
            return None
        measured = getattr(before, "measured_correction", None)
        if measured is None:
            return None
        step = {j: before.correction.coefficients.get(j, 0.0) - measured.coefficients.get(j, 0.0)
                for j in before.estimate.coefficients}
        found = flip_pattern(before.estimate.coefficients, after.estimate.coefficients, step)
        if found is None:
            return None
        worse = _score(after) > _score(before)
        if not worse:
            return None
        orientation, figures = found
        words, fix = ORIENTATION_FIX[orientation]
        terms = dict(figures, score_before=_score(before), score_after=_score(after),
                     null_depth=after.metrics.get("null_depth", math.nan))
        return Diagnosis("flipped_frame",
                         f"corrections make the donut worse as if the camera were {words} relative to the SLM",
                         f"run `autoalign calibrate` self-check; likely fix {fix}", terms, "error")


def limit_diagnosis(state: LoopState, stop_reason: str) -> Diagnosis:
    """What limits a run that ended without a diagnosis (iteration limit, no improvement, a stop):
    the last stack's measured residual wavefront (``calibration.quality``) against the aligned
    threshold, and its null against the bead floor. The null alone never reads "at the floor":
    through the bead an aberrated donut's null can (``benchmarks/quality_figure.py``)."""
    last = None
    for r in reversed(list(state.history)):
        if (r.metrics or {}).get("null_depth") is not None and math.isfinite(r.metrics["null_depth"]):
            last = r
            break
    if last is None:
        return Diagnosis("no_measurement", "no valid measurement of the donut", "check the bead and the camera",
                         {}, "warning", stop=False)
    null = last.metrics["null_depth"]
    sigma = last.metrics.get("null_depth_sigma", math.nan)
    limit = state.null_floor + state.floor_margin
    terms = {"null_depth": null, "null_depth_sigma": sigma, "bead_floor": state.null_floor,
             "floor_margin": state.floor_margin, "correlation_ideal": last.metrics.get("correlation_ideal", math.nan)}
    nulltext = f"measured null {null:.4f} +- {sigma:.4f} vs the bead floor {state.null_floor:.4f} (+{state.floor_margin:g})"
    q = Quality.from_metrics(last.metrics)
    fault = ("a fault that Zernike correction cannot fix may remain (polarisation, SLM stroke, "
             "modes beyond the estimator's): run the diagnosis")
    if q is None:
        return Diagnosis("not_at_floor", f"{nulltext}; no measured residual", fault, terms, "warning", stop=False)
    terms.update(quality_rad=q.value, quality_sigma_rad=q.sigma, aligned_rad=ALIGNED_RAD)
    residual = f"measured {q.text()}"
    null_above = null - 2 * sigma > limit
    if is_aligned_quality(q):
        if null_above:
            cause = f"{residual} within {ALIGNED_RAD:g} rad, but the {nulltext}"
            action = fault
        else:
            cause = f"{residual} within {ALIGNED_RAD:g} rad and the {nulltext}: aligned, not confirmed"
            action = "run the alignment again to confirm it on more stacks"
    elif is_aligned_quality(q, sigmas=0.0):
        cause = f"{residual} cannot be told from aligned ({ALIGNED_RAD:g} rad) at these photons; {nulltext}"
        action = "collect more photons (exposure, laser power) to confirm the alignment"
    else:
        cause = f"{residual} above the {ALIGNED_RAD:g} rad of an aligned donut: aberrated; {nulltext}"
        action = ("run more iterations; when they do not improve it, the aberration is beyond what this "
                  "corrector reads or a fault remains: run the diagnosis")
    return Diagnosis("not_at_floor", cause, action, terms, "warning", stop=False)


__all__ = ["LoopDiagnoser", "flip_pattern", "mode_parity", "limit_diagnosis", "ORIENTATION_FIX"]


class FitDiagnoser:
    """Names the faults that a model-based fit found (the ``refined`` estimator puts
    :func:`calibration.diagnosis.diagnose` results in ``Estimate.extras["diagnoses"]``), with the
    knob to turn. Inert for estimators without a fit. Stops the run only when the same named fault
    (:data:`calibration.verdict.FAULT_NAMES`) is the dominant finding of ``persistence``
    consecutive applied estimates, so one noisy fit does not end an alignment; a named fault
    forbids a "converged" claim (see :func:`calibration.verdict.is_converged_physics`)."""

    def __init__(self, persistence: int = 2) -> None:
        self.persistence = int(persistence)

    def diagnose(self, state: LoopState, last_estimate: Any) -> Diagnosis | None:
        from autoalign.calibration.verdict import FAULT_NAMES, summarise_diagnoses

        names: list[str] = []
        summary = None
        for record in list(state.history)[-self.persistence:]:
            est = getattr(record, "estimate", None)
            extras = getattr(est, "extras", None) or {}
            if "diagnoses" not in extras:
                return None
            null = (record.metrics or {}).get("null_depth")
            summary = summarise_diagnoses(est, null, state.null_floor,
                                          quality=Quality.from_metrics(record.metrics))
            names.append(summary.name)
        if summary is None or len(names) < self.persistence or len(set(names)) != 1 or names[0] not in FAULT_NAMES:
            return None
        return Diagnosis(summary.name, summary.cause, summary.action, dict(summary.limiting_terms), "warning",
                         stop=True, success=False)
