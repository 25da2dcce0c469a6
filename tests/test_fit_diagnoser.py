"""The loop's FitDiagnoser turns a model-based fit's named faults into the stop reason."""
from __future__ import annotations

from types import SimpleNamespace

from autoalign.app.loop_diagnosis import FitDiagnoser
from autoalign.diagnosis_types import LoopState


def _record(diagnoses, null=0.045):
    est = SimpleNamespace(extras={"diagnoses": diagnoses}, residual_rms=0.02)
    return SimpleNamespace(decision="applied", metrics={"null_depth": null}, estimate=est)


WRONG_HAND = {"name": "polarisation_impurity", "cause": "~2 % of the power in the wrong circular hand",
              "action": "rotate the quarter-wave plate", "null_contribution": 0.018, "value": 0.02}


def test_a_persistent_named_fault_stops_with_its_knob_and_never_claims_success():
    state = LoopState(history=[_record([WRONG_HAND]), _record([WRONG_HAND])], null_floor=0.026, floor_margin=0.008)
    d = FitDiagnoser().diagnose(state, None)
    assert d is not None and d.name == "polarisation_impurity"
    assert d.stop and not d.success
    assert "quarter-wave plate" in d.action and "wrong circular hand" in d.cause
    # the null the fault explains is among the limiting terms, beside the bead's floor
    assert d.limiting_terms["polarisation_impurity"] == 0.018 and d.limiting_terms["bead_floor"] == 0.026


def test_one_fit_alone_or_no_fit_says_nothing():
    one = LoopState(history=[_record([WRONG_HAND])], null_floor=0.026, floor_margin=0.008)
    assert FitDiagnoser().diagnose(one, None) is None
    no_fit = SimpleNamespace(decision="applied", metrics={"null_depth": 0.03}, estimate=SimpleNamespace(extras={}))
    assert FitDiagnoser().diagnose(LoopState([no_fit, no_fit], 0.026, 0.008), None) is None


def test_different_findings_in_a_row_do_not_stop():
    stroke = {"name": "slm_stroke", "cause": "the SLM delivers 80 % of the commanded phase",
              "action": "set slm.grey_level_2pi", "null_contribution": 0.03}
    state = LoopState(history=[_record([WRONG_HAND]), _record([stroke])], null_floor=0.026, floor_margin=0.008)
    assert FitDiagnoser().diagnose(state, None) is None
