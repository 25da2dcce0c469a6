"""The estimator interface (autoalign.estimator): a new estimator plugs into the loop with no loop
code, the loop obeys its validity, score and residual, and the registry builds the shipped ones."""
from __future__ import annotations

import math

import pytest

from autoalign.app.estimators import ESTIMATORS, make_estimator
from autoalign.app.loop import AlignmentLoop
from autoalign.calibration.modal import ModalEstimator
from autoalign.correction import Correction
from autoalign.estimator import Estimate, Estimator
from autoalign.models.estimator import CNNEstimator
from tests.test_loop_support import ConstantPredictor, sim_devices, small_settings

ABERRATION = {5: 0.3, 6: -0.2, 7: -0.35, 8: 0.2, 11: 0.25}


class TruthEstimator(Estimator):
    """A plug-in written only against the interface: reads the simulated microscope's hidden
    residual (a perfect estimator), or refuses every measurement (``refuse``)."""

    name = "truth"

    def __init__(self, microscope, refuse: str = ""):
        self.microscope = microscope
        self.refuse = refuse
        self.seen = 0

    @property
    def modes(self) -> list[int]:
        return list(ABERRATION)

    def estimate(self, measurement) -> Estimate:
        self.seen += 1
        if self.refuse:
            return Estimate({}, valid=False, reason=self.refuse, source=self.name)
        res = self.microscope.residual_coefficients()
        coeffs = {m: float(res[m - 1]) for m in self.modes}
        residual = Estimate.residual_of(coeffs)
        return Estimate(coeffs, source=self.name, residual_rms=residual, score=residual)


def _loop(estimator_for):
    s = small_settings(**{"loop.floor_margin": 0.02})  # the 32-px ROI's null noise (see tests/test_loop.py)
    dev = sim_devices(s, ABERRATION)
    loop = AlignmentLoop(dev, s, estimator_for(dev))
    loop.zero_slm()
    return loop, dev


def test_a_new_estimator_plugs_in_and_converges():
    loop, dev = _loop(lambda dev: TruthEstimator(dev.microscope))
    start = loop.true_residual_rms()
    records = loop.run(iterations=6)
    # the physics: the hidden residual falls by an order of magnitude, and the loop stops on the
    # MEASURED donut reaching the bead floor (never on the estimator's own residual reading)
    assert start == pytest.approx(math.sqrt(sum(v * v for v in ABERRATION.values())), rel=0.01)
    assert loop.true_residual_rms() < 0.1 * start
    assert loop.stop_reason.startswith("converged"), loop.stop_reason
    assert loop.corrector == "truth" and all(r.estimate.source == "truth" for r in records)


def test_an_invalid_estimate_applies_nothing():
    loop, dev = _loop(lambda dev: TruthEstimator(dev.microscope, refuse="cannot read this donut"))
    frames = dev.slm.frames_shown
    r = loop.correct_once()
    assert r.decision == "refused: cannot read this donut"
    assert dev.slm.frames_shown == frames and loop.correction == Correction()


class _HalfTruth(TruthEstimator):
    """Corrects half the residual per iteration and says what limits it (``fit_refused``)."""

    def estimate(self, measurement) -> Estimate:
        e = super().estimate(measurement)
        half = {k: 0.5 * v for k, v in e.coefficients.items()}
        return Estimate(half, source=self.name, residual_rms=e.residual_rms, score=e.score,
                        extras={"fit_refused": "the fit did not explain the data: fit more modes"})


def test_the_stop_reason_says_what_the_estimator_said_limits_it():
    loop, _ = _loop(lambda dev: _HalfTruth(dev.microscope))
    loop.run(iterations=1)
    # the measured residual first (calibration.quality), then the null of the same stack
    assert loop.stop_reason.startswith("iteration limit (1): measured residual "), loop.stop_reason
    assert " rad (donut shape) vs 0.05 rad aligned; measured null " in loop.stop_reason
    assert loop.stop_reason.endswith("; the fit did not explain the data: fit more modes"), loop.stop_reason


def test_swapping_the_estimator_forgets_the_best_score():
    loop, dev = _loop(lambda dev: TruthEstimator(dev.microscope))
    loop.best_score = 0.1
    loop.estimator = make_estimator("model", loop.settings, ConstantPredictor({5: 0.0}))
    assert loop.best_score == math.inf and loop.corrector == "model"


def test_registry_builds_the_shipped_estimators():
    s = small_settings()
    assert set(ESTIMATORS) >= {"model", "modal"}
    cnn = make_estimator("model", s, ConstantPredictor({5: 0.4, 7: -0.3}, modes=(5, 7)))
    assert isinstance(cnn, CNNEstimator) and not cnn.probes and cnn.modes == [5, 7]
    modal = make_estimator("modal", s, modes=[5, 6], bias_rad=0.4)
    assert isinstance(modal, ModalEstimator) and modal.probes and modal.modes == [5, 6]
    with pytest.raises(ValueError, match="unknown corrector 'nope'"):
        make_estimator("nope", s)


def test_cnn_estimate_carries_the_prediction_and_its_residual():
    s = small_settings()
    cnn = make_estimator("model", s, ConstantPredictor({5: 0.3, 6: 0.4, 2: 5.0}, modes=(2, 5, 6)))
    est = cnn.estimate(type("M", (), {"sections": None})())
    assert est.coefficients == {5: 0.3, 6: 0.4, 2: 5.0} and est.mask_offset is None
    assert est.residual_rms == pytest.approx(0.5) and est.score == pytest.approx(0.5)  # tip ignored


def test_modal_estimator_refuses_to_scan_without_a_loop():
    with pytest.raises(RuntimeError, match="attach"):
        ModalEstimator(modes=[5]).estimate(object())


class _Fixed:
    """A predictor that always reads the same coefficients and offset (counts its calls)."""

    def __init__(self, coefficients, offset=None):
        self.coefficients, self.offset, self.calls = dict(coefficients), offset, 0
        self.modes = sorted(self.coefficients)

    def predict(self, sections):
        self.calls += 1
        return type("P", (), {"coefficients": dict(self.coefficients), "mask_offset": self.offset})()


def test_coarse_plus_fine_routes_by_the_coarse_estimate():
    s = small_settings().replace(**{"model.fine_below_rad": 0.5, "model.fine_below_offset": 0.03,
                                    "model.fine_damping": 0.5})
    meas = type("M", (), {"sections": None})()
    fine = _Fixed({5: 0.01, 6: -0.02})
    # far off (0.6 rad > 0.5): the coarse network alone, undamped, the fine one not asked
    far = CNNEstimator(s, _Fixed({5: 0.6, 6: 0.0, 16: 0.0}, (0.01, 0.0)), fine_predictor=fine).estimate(meas)
    assert far.coefficients == {5: 0.6, 6: 0.0, 16: 0.0} and far.mask_offset == (0.01, 0.0)
    assert far.extras["stage"] == "coarse" and fine.calls == 0
    # a large offset keeps the coarse stage too
    off = CNNEstimator(s, _Fixed({5: 0.1, 16: 0.0}, (0.05, 0.0)), fine_predictor=fine).estimate(meas)
    assert off.extras["stage"] == "coarse" and off.mask_offset == (0.05, 0.0)
    # near (0.2 rad, offset 0.02): the fine network's modes replace the coarse ones, the rest and the
    # offset are halved, and the residual is that of what is applied
    near = CNNEstimator(s, _Fixed({5: 0.2, 6: 0.0, 16: 0.04}, (0.02, -0.01)), fine_predictor=fine).estimate(meas)
    assert near.extras["stage"] == "fine" and fine.calls == 1
    assert near.coefficients == pytest.approx({5: 0.01, 6: -0.02, 16: 0.02})
    assert near.mask_offset == pytest.approx((0.01, -0.005))
    assert near.residual_rms == pytest.approx(math.sqrt(0.01**2 + 0.02**2 + 0.02**2))
    # a fine network that reads the offset too: its offset is taken as it is
    reader = _Fixed({5: 0.01, 6: -0.02, 16: 0.005}, (0.004, 0.001))
    both = CNNEstimator(s, _Fixed({5: 0.2, 6: 0.0, 16: 0.04}, (0.02, -0.01)), fine_predictor=reader).estimate(meas)
    assert both.coefficients == pytest.approx({5: 0.01, 6: -0.02, 16: 0.005}) and both.mask_offset == (0.004, 0.001)


def test_an_offset_read_beside_a_large_aberration_is_not_applied():
    """model.offset_below_rad: above it (coarse estimate, rad RMS Noll >= 5) the network's mask
    offset is held (None: the mask stays where it is), below it the offset is applied as read."""
    s = small_settings().replace(**{"model.offset_below_rad": 0.6})
    meas = type("M", (), {"sections": None})()
    large = CNNEstimator(s, _Fixed({5: 1.0, 6: 0.5}, (0.08, 0.0))).estimate(meas)
    assert large.mask_offset is None and large.extras["offset_held"]
    assert large.coefficients == {5: 1.0, 6: 0.5}
    small = CNNEstimator(s, _Fixed({5: 0.3, 6: 0.2}, (0.08, 0.0))).estimate(meas)
    assert small.mask_offset == (0.08, 0.0) and not small.extras["offset_held"]
    always = CNNEstimator(small_settings().replace(**{"model.offset_below_rad": 0.0}),
                          _Fixed({5: 1.0, 6: 0.5}, (0.08, 0.0))).estimate(meas)
    assert always.mask_offset == (0.08, 0.0)
