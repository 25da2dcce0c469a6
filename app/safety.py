"""What may reach the SLM: the loop's safety limits, in one place (``loop`` settings).

* :func:`check_correction`: a correction that must not be shown raises :class:`RefusedError`
  (NaN/inf, RMS beyond ``loop.max_correction_rms_rad``, an absurd coefficient, a mask offset
  whose length exceeds ``loop.max_mask_offset`` pupil radii, the SLM's configured safe range,
  never more than :data:`MAX_MASK_OFFSET`).
* :func:`estimate_problem`: why an estimate must not be applied, or None (the estimator's own
  refusal, NaN/inf, a coefficient beyond ``loop.max_prediction_rad``, an offset beyond 0.5).

Units: radians (Noll-indexed coefficients), pupil radii (mask offset).
"""
from __future__ import annotations

import math

from autoalign.correction import Correction
from autoalign.estimator import Estimate
from autoalign.settings import LoopSettings

#: the largest mask offset (pupil radii) that may ever be shown or read, whatever the settings say
MAX_MASK_OFFSET = 0.5

#: the start of the refusal message of a mask offset beyond the configured range (diagnosers match it)
MASK_OFFSET_REFUSAL = "mask offset beyond loop.max_mask_offset"


def mask_offset_limit(limits: LoopSettings) -> float:
    """The largest mask-offset length (pupil radii) the SLM may show: ``loop.max_mask_offset``
    capped at :data:`MAX_MASK_OFFSET`."""
    return min(float(getattr(limits, "max_mask_offset", MAX_MASK_OFFSET)), MAX_MASK_OFFSET)


class RefusedError(Exception):
    """A correction or mask that failed a safety check; nothing was applied."""


def check_correction(correction: Correction, limits: LoopSettings) -> None:
    """Raise :class:`RefusedError` when ``correction`` must not reach the SLM."""
    if not correction.is_finite():
        raise RefusedError("correction contains NaN or infinity")
    if correction.rms() > limits.max_correction_rms_rad:
        raise RefusedError(
            f"correction RMS {correction.rms():.3f} rad exceeds loop.max_correction_rms_rad "
            f"= {limits.max_correction_rms_rad}")
    big = {k: v for k, v in correction.coefficients.items() if abs(v) > 4 * limits.max_correction_rms_rad + 50}
    if big:
        raise RefusedError(f"correction coefficient(s) out of range: {big}")
    ox, oy = correction.mask_offset
    limit = mask_offset_limit(limits)
    if math.hypot(ox, oy) > limit + 1e-12:
        raise RefusedError(
            f"{MASK_OFFSET_REFUSAL}: ({ox:+.3f}, {oy:+.3f}) pupil radii, length {math.hypot(ox, oy):.3f} > "
            f"{limit:g}")


def estimate_problem(est: Estimate, limits: LoopSettings) -> str | None:
    """Why ``est`` must not be applied (None when it may)."""
    if not est.valid:
        return est.reason or f"estimator {est.source or '?'} refused"
    coeffs, off = est.coefficients, est.mask_offset
    values = list(coeffs.values()) + (list(off) if off is not None else [])
    if not all(math.isfinite(v) for v in values):
        return "prediction contains NaN or infinity"
    lim = limits.max_prediction_rad
    big = {k: round(v, 3) for k, v in coeffs.items() if abs(v) > lim}
    if big:
        return f"prediction beyond loop.max_prediction_rad = {lim}: {big}"
    if off is not None and max(abs(off[0]), abs(off[1])) > MAX_MASK_OFFSET:
        return f"predicted mask offset {off} beyond {MAX_MASK_OFFSET} pupil radii"
    return None


__all__ = ["RefusedError", "check_correction", "estimate_problem", "mask_offset_limit", "MAX_MASK_OFFSET",
           "MASK_OFFSET_REFUSAL"]
