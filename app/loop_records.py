"""What the alignment loop records and decides on: :class:`IterationRecord` (one iteration),
:class:`LoopResult` (one run), :class:`LoopStopped` and the measured score of a stack
(:func:`measured_score`). Shared by ``app/loop.py`` and its helpers (``loop_capture``,
``loop_confirm``, ``loop_stop``), so that none of them imports the loop itself.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from autoalign.calibration.measurement import Measurement
from autoalign.correction import Correction
from autoalign.diagnosis_types import Diagnosis
from autoalign.estimator import Estimate


@dataclass
class IterationRecord:
    """One iteration: its measurement, the estimate (``prediction`` {Noll: rad} and
    ``predicted_offset`` pupil radii are its coefficients and mask offset), the correction after it,
    metrics and the decision ("applied ..." or "refused: <why>")."""

    iteration: int
    measurement: Measurement
    prediction: dict[int, float] | None
    predicted_offset: tuple[float, float] | None
    correction: Correction
    metrics: dict[str, float]
    decision: str
    stacks: int = 0                       # stacks acquired in this iteration
    elapsed_s: float = 0.0
    estimate: Estimate | None = None
    measured_correction: Correction | None = None  # the correction on the SLM when the stack was taken
    proposed: Correction | None = None    # the correction this iteration wanted (also when refused)


@dataclass
class LoopResult:
    """The outcome of ``AlignmentLoop.run``: ``converged`` (True only when the MEASURED null
    reached the bead floor plus ``loop.floor_margin`` with a valid estimate), ``stop_reason`` (one
    line), ``diagnosis`` (what limits the result, or the aligned state), the records of this run,
    and the final measured metrics (of a stack acquired after the last change when the best
    state was restored)."""

    converged: bool
    stop_reason: str
    diagnosis: Diagnosis | None
    records: list[IterationRecord] = field(default_factory=list)
    null_floor: float = math.nan
    final_metrics: dict[str, float] = field(default_factory=dict)


class LoopStopped(Exception):
    """Raised when ``AlignmentLoop.stop`` was requested; never escapes ``run``."""


def measured_score(metrics: dict[str, float]) -> float:
    """Figure of merit of an acquired stack, LOWER is better, from measured quantities only:
    ``null_depth + (1 - correlation_ideal)`` (both 0-ish for a perfect donut; inf when either is
    missing). The correlation with the ideal donut carries the large-aberration regime, where the
    centre is bright anyway; the null depth carries the fine one."""
    null, corr = metrics.get("null_depth"), metrics.get("correlation_ideal")
    if null is None or corr is None or not (math.isfinite(null) and math.isfinite(corr)):
        return math.inf
    return float(null + (1.0 - corr))


def record_score(record: IterationRecord) -> float:
    """The measured score of a record's stack (inf for a refused measurement)."""
    return record.metrics.get("score", math.inf) if record.measurement.valid else math.inf


__all__ = ["IterationRecord", "LoopResult", "LoopStopped", "measured_score", "record_score"]
