"""When is the MEASURED donut aligned, and the confirmation stacks that back the claim.

:func:`is_aligned`: the measured residual wavefront (``calibration.quality``: the model fit's
when it explains the data, else the donut's shape; metrics ``quality_rad``, ``quality_sigma_rad``)
plus ``sigmas`` times its sigma is within ``calibration.quality.ALIGNED_RAD`` (and the shape's
reading within ``SHAPE_GUARD_RAD``); the measured null depth is not above the bead floor plus
``loop.floor_margin`` beyond :data:`ALIGNED_SIGMAS` of its noise (a fault that fills the null, e.g.
the wrong circular hand, is not aligned); and the donut correlates with the ideal one by at least
``loop.aligned_min_correlation``. The null alone decides nothing: through an 80 nm bead an
aberrated donut reads a null at the floor (``benchmarks/quality_figure.py``).
:func:`confirm_aligned`: once one stack looks plausibly aligned, :data:`CONFIRM_STACKS` more
stacks of the same state are measured and the claim is decided on all of them
(:func:`pool_stacks`). ``AlignmentLoop`` calls both; the stacks are measured through a callable,
so the rule is tested without a microscope.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from autoalign.app.loop_records import measured_score
from autoalign.calibration.quality import Quality, is_aligned_quality

#: noise sigmas added to the measured residual before it is compared with the aligned threshold
#: (and allowed to the null above the bead floor + margin)
ALIGNED_SIGMAS = 2.0
#: extra stacks of the same state acquired to confirm an aligned-looking measurement (the null is
#: averaged over all of them before the claim)
CONFIRM_STACKS = 2


def is_aligned(metrics: dict[str, float], floor: float, margin: float, min_correlation: float,
               sigmas: float = ALIGNED_SIGMAS) -> bool:
    """True when the measured residual ``quality_rad + sigmas * quality_sigma_rad`` is within the
    aligned threshold (:func:`calibration.quality.is_aligned_quality`), ``null_depth -
    ALIGNED_SIGMAS * null_depth_sigma <= floor + margin`` and ``correlation_ideal >=
    min_correlation`` (False when any of them is missing or not finite)."""
    null, sigma = metrics.get("null_depth"), metrics.get("null_depth_sigma")
    corr = metrics.get("correlation_ideal")
    if null is None or sigma is None or corr is None or not all(map(math.isfinite, (null, sigma, corr))):
        return False
    if corr < float(min_correlation):
        return False  # a dark centre in a misshapen donut (e.g. coarse pixels) is no alignment
    if not is_aligned_quality(Quality.from_metrics(metrics), sigmas=sigmas):
        return False  # the residual the stack shows: the null through a bead cannot tell
    return bool(null - ALIGNED_SIGMAS * sigma <= floor + margin)


def pool_stacks(metrics: dict[str, float], more: list[dict[str, float]]) -> dict[str, float]:
    """``metrics`` with the null depth averaged over it and ``more`` (sigma / sqrt(n) for equal
    sigmas: the root sum of squares over n), the shape's residual pooled likewise (its square is
    what a stack measures: the root of the mean square), the residual itself pooled when it is the
    shape's (a fit's, of the first stack, stays), ``confirm_stacks`` (len(more)) and the score of
    the pooled figures; the correlation stays the first stack's."""
    nulls = [metrics["null_depth"], *(m["null_depth"] for m in more)]
    sigmas = [metrics["null_depth_sigma"], *(m["null_depth_sigma"] for m in more)]
    n = len(nulls)
    out = dict(metrics)
    out["null_depth"] = float(np.mean(nulls))
    out["null_depth_sigma"] = float(math.sqrt(sum(x * x for x in sigmas)) / n)
    shapes = [metrics.get("quality_shape_rad", math.nan), *(m.get("quality_shape_rad", math.nan) for m in more)]
    if all(math.isfinite(v) for v in shapes):
        out["quality_shape_rad"] = float(math.sqrt(np.mean(np.square(shapes))))
        if metrics.get("quality_from_fit", 0.0) < 0.5 and "quality_rad" in metrics:
            qs = [metrics.get("quality_sigma_rad", math.nan), *(m.get("quality_sigma_rad", math.nan) for m in more)]
            out["quality_rad"] = out["quality_shape_rad"]
            out["quality_sigma_rad"] = float(math.sqrt(sum(x * x for x in qs)) / n)
    out["confirm_stacks"] = float(n - 1)
    out["score"] = measured_score(out)
    return out


def confirm_aligned(metrics: dict[str, float], measure: Callable[[], dict[str, float] | None],
                    aligned: Callable[[dict[str, float]], bool], stacks: int = CONFIRM_STACKS,
                    check_stop: Callable[[], None] = lambda: None) -> bool:
    """Measure ``stacks`` more stacks of the same state (``measure()``: the metrics of a new stack,
    None when it was refused, which ends the confirmation: False) and return ``aligned`` of the
    pooled figures. ``metrics`` is updated in place with them (:func:`pool_stacks`) when all
    stacks were valid."""
    more: list[dict[str, float]] = []
    for _ in range(int(stacks)):
        check_stop()
        m = measure()
        if m is None:
            return False
        more.append(m)
    metrics.update(pool_stacks(metrics, more))
    return aligned(metrics)


__all__ = ["ALIGNED_SIGMAS", "CONFIRM_STACKS", "is_aligned", "pool_stacks", "confirm_aligned"]
