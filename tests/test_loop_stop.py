"""app/loop_stop.py: the run's stop rules (diagnosis, refusals in a row, patience on the MEASURED
score), the limits text and what a best-restore shows, on hand-made records (no devices)."""
from __future__ import annotations

import math

from autoalign.app.loop_records import IterationRecord
from autoalign.app.loop_stop import (MIN_SCORE_IMPROVEMENT, StopRules, applied_corrections, limits_text,
                                     restored_correction)
from autoalign.calibration.measurement import Measurement
from autoalign.correction import Correction
from autoalign.diagnosis_types import Diagnosis
from autoalign.estimator import Estimate


def rec(decision="applied", score=0.5, valid=True, null=0.05, estimate=None):
    m = Measurement(stack=None, sections=None, centroid=None, valid=valid, reason="" if valid else "no bead",
                    photons=0.0)
    metrics = {"score": score, "null_depth": null, "null_depth_sigma": 0.004} if valid else {}
    return IterationRecord(0, m, None, None, Correction(), metrics, decision, estimate=estimate)


def never() -> str:
    raise AssertionError("limits() asked when no stop needs it")


def run(rules, records, best=math.inf, best_differs=True, diagnoses=None):
    """Feed ``records`` through the rules as the loop does; returns (stop, best score, iteration)."""
    for i, r in enumerate(records):
        if rules.improved(r, best):
            best = r.metrics["score"]
        found = (diagnoses or {}).get(i)
        stop = rules.decide(r, found, best_differs, lambda: "LIMITS")
        if stop is not None:
            return stop, best, i
    return None, best, len(records)


def test_patience_counts_iterations_without_a_measured_improvement():
    stop, best, i = run(StopRules(patience=2, max_refusals=3), [rec(score=s) for s in (0.5, 0.3, 0.299, 0.31, 0.2)])
    assert i == 3 and best == 0.3        # 0.299 is not better by MIN_SCORE_IMPROVEMENT
    assert stop.reason == "no improvement of the measured donut for 2 iterations (LIMITS)"
    assert stop.restore and not stop.converged


def test_an_improvement_resets_patience_and_refusals_do_not_count_toward_it():
    rules = StopRules(patience=2, max_refusals=3)
    stop, best, _ = run(rules, [rec(score=0.5), rec(score=0.6), rec("refused: x", valid=False),
                                rec(score=0.5 - 2 * MIN_SCORE_IMPROVEMENT), rec(score=0.6)])
    assert stop is None and rules.since_best == 1 and best == 0.5 - 2 * MIN_SCORE_IMPROVEMENT


def test_refusals_in_a_row_stop_and_restore_only_a_different_best():
    refused = [rec("refused: no bead", valid=False)] * 3
    stop, _, i = run(StopRules(patience=5, max_refusals=3), refused, best_differs=False)
    assert i == 2 and stop.reason == "3 refused iterations in a row (refused: no bead)" and not stop.restore
    stop, _, _ = run(StopRules(patience=5, max_refusals=3), refused, best_differs=True)
    assert stop.restore
    # an applied iteration in between starts the count again
    stop, _, _ = run(StopRules(patience=5, max_refusals=2), [refused[0], rec(score=0.4), refused[0]])
    assert stop is None


def test_a_diagnosis_stops_first_success_converges_faults_restore():
    ok = Diagnosis("aligned", "measured null at the bead floor", severity="info", success=True)
    stop, _, i = run(StopRules(2, 3), [rec(), rec()], diagnoses={1: ok})
    assert i == 1 and stop.converged and stop.reason == "converged: measured null at the bead floor"
    assert stop.diagnosis is ok and not stop.restore
    flip = Diagnosis("flipped_frame", "camera rotated", "fix slm.flip_x")
    stop, _, _ = run(StopRules(2, 3), [rec()], best_differs=False, diagnoses={0: flip})
    assert stop.reason == "stopped: camera rotated: fix slm.flip_x" and stop.restore  # always after a flip
    other = Diagnosis("bead_lost", "bead search failed")
    stop, _, _ = run(StopRules(2, 3), [rec()], best_differs=False, diagnoses={0: other})
    assert not stop.restore
    note = Diagnosis("polarisation", "2 % wrong hand", stop=False)  # not a stop: the rules go on
    assert run(StopRules(2, 3), [rec()], diagnoses={0: note})[0] is None


def test_the_limits_text_is_asked_only_when_a_stop_needs_it():
    rules = StopRules(patience=1, max_refusals=1)
    assert rules.decide(rec(), None, True, never) is None       # a first iteration: nothing to say
    assert StopRules.at_limit(5, lambda: "L").reason == "iteration limit (5): L"


def test_limits_text_names_the_last_measured_null_and_the_estimators_note():
    est = Estimate({5: 0.1}, extras={"fit_refused": "the fit did not explain the data"})
    records = [rec(null=0.05, estimate=est), rec("refused: no bead", valid=False)]
    assert limits_text(records, 0.0262, 0.008) == ("measured null 0.0500 +- 0.0040 vs the bead floor 0.0262 (+0.008); "
                                                  "the fit did not explain the data")
    assert limits_text([rec("refused: x", valid=False)], 0.026, 0.008) == "no valid measurement"


def test_a_restore_shows_the_best_higher_order_state_with_the_current_centring():
    current = Correction({2: 0.3, 3: -0.1, 4: 0.2, 5: 0.9, 7: 0.4}, (0.05, 0.0))
    best = Correction({2: -1.0, 4: 1.0, 5: 0.1, 11: -0.2}, (0.01, -0.02))
    out = restored_correction(current, best)
    assert out.coefficients == {2: 0.3, 3: -0.1, 4: 0.2, 5: 0.1, 11: -0.2}
    assert tuple(out.mask_offset) == (0.01, -0.02)
    assert current.coefficients[5] == 0.9                        # inputs untouched


def test_applied_corrections_count_only_applied_iterations():
    assert applied_corrections([rec("applied"), rec("applied (stage re-centred)"), rec("refused: x"),
                                rec("aligned: ...")]) == 2
