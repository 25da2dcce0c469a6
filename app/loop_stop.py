"""The stop rules of ``AlignmentLoop.run`` and the best state it restores.

After every iteration :meth:`StopRules.decide` says whether the run ends, in this order:

1. a diagnosis with ``stop=True`` (the loop's diagnosers): ``"converged: <cause>"`` when it is a
   success, else ``"stopped: <cause>: <action>"`` (the best state is restored when it differs from
   the current one, and always after a flipped frame);
2. ``max_refusals`` refused iterations in a row (restore when the best differs);
3. no improvement of the MEASURED score (:func:`autoalign.app.loop_records.measured_score`) by
   :data:`MIN_SCORE_IMPROVEMENT` for ``patience`` iterations (restore).

At the iteration limit :meth:`StopRules.at_limit` gives the reason. Nothing is decided on an
estimator's own predicted residual. :func:`restored_correction` is what a restore puts on the SLM:
the best state's higher-order modes (Noll >= 5) and mask offset, with the CURRENT tip/tilt/defocus
(they follow the bead, which may have drifted since).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from autoalign.app.loop_records import IterationRecord, record_score
from autoalign.calibration.quality import ALIGNED_RAD, Quality
from autoalign.correction import Correction
from autoalign.diagnosis_types import Diagnosis

#: the measured score's minimum improvement that counts (patience, best state)
MIN_SCORE_IMPROVEMENT = 0.002


@dataclass
class Stop:
    """Why a run ends: ``reason`` (the stop reason's text), ``restore`` (put back the best measured
    state first, when there is one), ``converged`` and the ``diagnosis`` that stopped it."""

    reason: str
    restore: bool = False
    converged: bool = False
    diagnosis: Diagnosis | None = None


class StopRules:
    """The counters of one run: iterations since the best measured score (``since_best``) and
    refusals in a row (``refusals``)."""

    def __init__(self, patience: int, max_refusals: int) -> None:
        self.patience = int(patience)
        self.max_refusals = int(max_refusals)
        self.since_best = 0
        self.refusals = 0

    def improved(self, record: IterationRecord, best_score: float) -> bool:
        """True when ``record``'s measured score beats ``best_score`` by
        :data:`MIN_SCORE_IMPROVEMENT` (the caller keeps its state as the best); a record that is
        neither better nor refused counts toward ``patience``."""
        if record_score(record) < best_score - MIN_SCORE_IMPROVEMENT:
            self.since_best = 0
            return True
        if not record.decision.startswith("refused"):
            self.since_best += 1
        return False

    def decide(self, record: IterationRecord, diagnosis: Diagnosis | None, best_differs: bool,
               limits: Callable[[], str]) -> Stop | None:
        """The stop after ``record`` (None: go on). ``diagnosis``: the diagnosers' answer;
        ``best_differs``: the best measured state is not the one on the SLM; ``limits()``: what
        limits the result (:func:`limits_text`), asked only when needed."""
        if diagnosis is not None and diagnosis.stop:
            if diagnosis.success:
                return Stop(f"converged: {diagnosis.cause}", converged=True, diagnosis=diagnosis)
            return Stop(f"stopped: {diagnosis.message()}", diagnosis=diagnosis,
                        restore=diagnosis.name == "flipped_frame" or best_differs)
        if record.decision.startswith("refused"):
            self.refusals += 1
            if self.refusals >= self.max_refusals:
                return Stop(f"{self.refusals} refused iterations in a row ({record.decision})", restore=best_differs)
            return None
        self.refusals = 0
        if self.since_best >= self.patience:
            return Stop(f"no improvement of the measured donut for {self.since_best} iterations ({limits()})",
                        restore=True)
        return None

    @staticmethod
    def at_limit(iterations: int, limits: Callable[[], str]) -> Stop:
        """The stop at the iteration limit."""
        return Stop(f"iteration limit ({iterations}): {limits()}")


def applied_corrections(records: Sequence[IterationRecord]) -> int:
    """How many of ``records`` applied a correction (the loop claims alignment only after
    ``loop.min_corrections``)."""
    return sum(1 for r in records if r.decision.startswith("applied"))


def limits_text(records: Sequence[IterationRecord], floor: float, margin: float) -> str:
    """The last stack's measured residual against the aligned threshold
    (:func:`calibration.quality.ALIGNED_RAD`) and its null against the bead floor (``floor`` +
    ``margin``), both of ONE stack, and what the estimator said limits it
    (``extras["fit_refused"]`` of the last estimate, e.g. a fit that did not explain the data)."""
    last = next((r.estimate for r in reversed(records) if r.estimate is not None), None)
    note = str((last.extras or {}).get("fit_refused") or "") if last is not None else ""
    note = f"; {note}" if note else ""
    for r in reversed(records):
        null = (r.metrics or {}).get("null_depth")
        if null is not None and math.isfinite(null):
            sigma = r.metrics.get("null_depth_sigma", math.nan)
            q = Quality.from_metrics(r.metrics)
            residual = f"measured {q.text()} vs {ALIGNED_RAD:g} rad aligned; " if q is not None else ""
            return f"{residual}measured null {null:.4f} +- {sigma:.4f} vs the bead floor {floor:.4f} (+{margin:g}){note}"
    return "no valid measurement" + note


def restored_correction(current: Correction, best: Correction) -> Correction:
    """What a best-restore shows: ``best``'s Noll >= 5 and mask offset, ``current``'s Noll < 5."""
    keep = {k: v for k, v in current.coefficients.items() if k < 5}
    keep.update({k: v for k, v in best.coefficients.items() if k >= 5})
    return Correction(keep, tuple(best.mask_offset))  # type: ignore[arg-type]


__all__ = ["MIN_SCORE_IMPROVEMENT", "Stop", "StopRules", "applied_corrections", "limits_text",
           "restored_correction"]
