"""The loop against the simulated microscope's hidden errors: mask offset (sub-pixel, safe range),
flipped camera frame, bead capture, drift-safe restore, no false success, the diagnosis seam and
the trial flags. Physics from the simulated microscope's hidden truth; small 32-px sizes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from autoalign.app.estimators import make_estimator
from autoalign.app.loop import AlignmentLoop
from autoalign.app.loop_diagnosis import LoopDiagnoser, flip_pattern, mode_parity
from autoalign.calibration.donut import build_pupil_phase
from autoalign.correction import Correction
from autoalign.diagnosis_types import Diagnoser, Diagnosis
from autoalign.simulation.phase import zernike_phase
from autoalign.simulation.zernike import noll_to_nm
from tests.test_loop_support import OraclePredictor, sim_devices, small_settings


def loop_settings(**extra):
    return small_settings(**{"loop.floor_margin": 0.02, **extra})


@dataclass
class _Pred:
    coefficients: dict
    mask_offset: tuple | None = None


class OffsetOracle(OraclePredictor):
    """The hidden residual, mask offset included (what a model predicting the offset would read)."""

    def predict(self, sections):
        base = super().predict(sections)
        ox, oy = self.microscope.residual_mask_offset()
        return _Pred(base.coefficients, (ox, oy))


class FixedOffset:
    modes = [5]

    def __init__(self, offset):
        self.offset = offset

    def predict(self, sections):
        return _Pred({5: 0.0}, self.offset)


def make(settings=None, predictor_cls=OraclePredictor, **kw):
    s = settings or loop_settings()
    dev = sim_devices(s, kw.pop("aberration", {5: 0.2, 7: -0.15}), **kw)
    pred = predictor_cls(dev.microscope) if isinstance(predictor_cls, type) else predictor_cls
    loop = AlignmentLoop(dev, s, make_estimator("model", s, pred))
    loop.zero_slm()
    return loop, dev


def test_a_mask_offset_moves_the_whole_pupil_on_the_slm_not_the_vortex_alone():
    s = small_settings()
    m = 96
    off = (0.0123, -0.0077)
    # the grid is the pattern in the SLM pupil's own frame: the vortex centred, whatever the offset
    centres = -1.0 + (np.arange(m) + 0.5) * 2.0 / m  # the grid, independently
    u, v = np.meshgrid(centres, centres, indexing="xy")
    inside = u * u + v * v <= 1.0
    phase = build_pupil_phase(s, Correction({7: 0.3}, off), m)
    assert np.allclose(phase, build_pupil_phase(s, Correction({7: 0.3}), m))
    expected = s.optics.vortex_charge * np.arctan2(v, u)
    assert np.allclose(np.angle(np.exp(1j * (phase[inside] - expected[inside] - 0.3 * zernike_phase({7: 1.0}, m)[inside]))),
                       0.0, atol=1e-9)


def test_loop_corrects_the_mask_offset_on_the_slm():
    hidden = (0.045, -0.03)
    loop, dev = make(predictor_cls=OffsetOracle, mask_offset=hidden)
    start_off = math.hypot(*dev.microscope.residual_mask_offset())
    loop.run(3)
    after = dev.microscope.residual_mask_offset()
    assert start_off == pytest.approx(math.hypot(*hidden), abs=0.01)
    assert math.hypot(*after) < 0.01  # the delivered vortex sits on the beam
    assert loop.correction.mask_offset == pytest.approx((-hidden[0], -hidden[1]), abs=0.01)
    # the whole pupil moved with it: no crescent of the beam left without vortex and correction
    # (moving the vortex alone leaves ~0.3 rad RMS of the delivered phase wrong at this offset)
    assert dev.microscope.true_residual_rms() < 0.03
    assert dev.slm.pupil_shift == pytest.approx(loop.correction.mask_offset)


def test_mask_offset_beyond_the_safe_range_is_refused_and_diagnosed():
    loop, dev = make(predictor_cls=FixedOffset((-0.25, 0.05)))  # asks for a +0.25 shift
    frames = dev.slm.frames_shown
    loop.run(3)
    assert loop.diagnosis is not None and loop.diagnosis.name == "mask_offset_out_of_range"
    assert loop.stop_reason.startswith("stopped: the vortex mask would have to move")
    assert "pupil_centre_px" in loop.stop_reason and "loop.max_mask_offset = 0.2" in loop.stop_reason
    assert dev.slm.frames_shown == frames  # nothing shown
    assert loop.correction.mask_offset == (0.0, 0.0)


def test_mode_parity_is_minus_one_to_the_m_under_rotation():
    for j in range(2, 23):
        n, m = noll_to_nm(j)
        assert mode_parity(j, "rotate_180") == (-1) ** abs(m)


def test_flip_pattern_names_a_rotated_camera():
    truth = {5: 0.2, 6: -0.15, 7: 0.3, 8: -0.25, 11: 0.12}
    seen = {j: v * mode_parity(j, "rotate_180") for j, v in truth.items()}  # the camera's view
    step = {j: -v for j, v in seen.items()}  # gain 1
    after_truth = {j: truth[j] + step[j] for j in truth}
    after_seen = {j: v * mode_parity(j, "rotate_180") for j, v in after_truth.items()}
    found = flip_pattern(seen, after_seen, step)
    assert found is not None and found[0] == "rotate_180"
    assert found[1]["growth_over_step"] == pytest.approx(1.0, abs=1e-9)
    consistent_after = {j: truth[j] + (-truth[j]) for j in truth}  # a right frame: all gone
    assert flip_pattern(truth, consistent_after, {j: -v for j, v in truth.items()}) is None


class RotatedOracle(OraclePredictor):
    """A perfect reader looking through a camera rotated 180 deg relative to the SLM: every mode of
    odd azimuthal order m reads with the wrong sign (Z_j(-x, -y) = (-1)^m Z_j(x, y))."""

    def predict(self, sections):
        base = super().predict(sections)
        return _Pred({j: (-1) ** abs(noll_to_nm(j)[1]) * v for j, v in base.coefficients.items()})


def test_flipped_camera_stops_the_loop_with_the_flip_settings():
    s = loop_settings(**{"simulation.camera_orientation": "rotate_180"})
    ab = {5: 0.15, 6: -0.12, 7: 0.3, 8: -0.25, 11: 0.12}
    loop, dev = make(settings=s, predictor_cls=RotatedOracle, aberration=ab)
    start = dev.microscope.true_residual_rms()
    loop.run(5)
    assert loop.diagnosis is not None and loop.diagnosis.name == "flipped_frame", loop.stop_reason
    assert "rotated 180 deg" in loop.stop_reason and "slm.flip_x and slm.flip_y" in loop.stop_reason
    assert "restored" in loop.stop_reason
    assert dev.microscope.true_residual_rms() <= 1.05 * start  # it did not diverge


@pytest.mark.parametrize("bead", [(1.0, -0.5, 0.0), (0.0, 0.0, 1.2)])
def test_bead_beyond_the_edge_is_captured(bead):
    loop, dev = make(bead_um=bead)
    r = loop.correct_once()
    assert loop.capture_log, "no stage move toward the bead"
    assert r.decision.startswith("applied"), r.decision
    off = dev.microscope.bead_offset_um()
    assert max(abs(off[0]), abs(off[1]), abs(off[2])) < 0.3  # the bead is back near the centre


def test_bead_that_cannot_be_found_says_what_was_tried():
    loop, dev = make(bead_um=(6.0, 6.0, 0.0))
    loop.run(3)
    assert loop.diagnosis.name == "bead_lost"
    assert "bead search failed" in loop.history[-1].decision and "no light" in loop.stop_reason


def test_restore_keeps_current_tip_tilt_defocus_and_stage():
    loop, dev = make()
    loop.best = Correction({2: 0.5, 4: -0.4, 5: 0.2, 7: 0.1}, (0.01, 0.0))
    loop.apply(Correction({2: -0.1, 4: 0.3, 5: 0.6}))
    dev.xy.move_to(0.05, -0.02)
    stage = dev.xy.position_um
    r = loop.restore_best(7)
    assert loop.correction == Correction({2: -0.1, 4: 0.3, 5: 0.2, 7: 0.1}, (0.01, 0.0))
    assert dev.xy.position_um == stage
    assert r.decision.startswith("restored") and r.measurement.valid and r.correction == loop.correction


@pytest.mark.slow
def test_wrong_hand_is_never_reported_converged():
    """A perfect Zernike correction (the oracle) cannot darken a beam with 2 % in the wrong hand:
    the measured null stays above the bead floor, so no success is claimed. Default 64-px optics
    (in the 32-px ROI the median background includes the donut's tails and the null reads 0)."""
    from autoalign.settings import load_settings

    s = load_settings().replace(**{"simulation.wrong_hand_fraction": 0.02})
    loop, dev = make(settings=s)
    loop.run(3)
    assert dev.microscope.true_null_depth() > 0.015
    assert not loop.result.converged, loop.stop_reason
    assert "vs the bead floor" in loop.stop_reason
    assert loop.diagnosis.name == "not_at_floor"


def test_a_plugged_diagnoser_names_the_stop():
    class Polarisation:
        def diagnose(self, state, last):
            if len(state.history) >= 1:
                return Diagnosis("polarisation_impurity", "polarisation impurity, ~2 % of the power in the wrong "
                                 "circular hand", "rotate the quarter-wave plate", {"wrong_hand": 0.02})
            return None

    assert isinstance(Polarisation(), Diagnoser) and isinstance(LoopDiagnoser(), Diagnoser)
    loop, _ = make()
    loop.add_diagnoser(Polarisation())
    loop.run(3)
    assert loop.stop_reason.startswith("stopped: polarisation impurity, ~2 % of the power in the wrong circular "
                                       "hand: rotate the quarter-wave plate")
    assert loop.result.diagnosis.limiting_terms == {"wrong_hand": 0.02}


def test_trial_flags_set_the_hidden_errors():
    from autoalign.app.trials import HiddenErrors, trial_settings
    from autoalign.simulation.microscope import SimulatedMicroscope

    errors = HiddenErrors(aberration_rms="0.3:0.4", mask_offset=0.06, higher_order_rms=0.25, bead_offset=1.2,
                          bead_offset_z=0.5, drift=0.05, photons=200, wrong_hand=0.02, slm_stroke=0.8,
                          camera_orientation="rotate_180")
    s = trial_settings(small_settings(), errors, seed=3)
    mic = SimulatedMicroscope(s, noise=False)
    assert math.hypot(*mic.mask_offset) == pytest.approx(0.06)
    assert math.hypot(*mic.bead_um[:2]) == pytest.approx(1.2) and abs(mic.bead_um[2]) == pytest.approx(0.5)
    assert 0.3 <= np.sqrt(np.sum(mic.aberration[4:15] ** 2)) <= 0.4
    assert np.sqrt(np.sum(mic.aberration[15:] ** 2)) == pytest.approx(0.25)
    assert (mic.wrong_hand_fraction, mic.slm_phase_scale, mic.camera_orientation) == (0.02, 0.8, "rotate_180")
    assert s.camera.peak_photons == 200 and mic.drift_um_per_step == 0.05
    assert trial_settings(small_settings(), errors, seed=3) == s  # reproducible per seed
    # --higher-order-max-noll 22: the extra content only in Noll 16..22 (within the 5..22 network's modes)
    only = trial_settings(small_settings(), HiddenErrors(higher_order_rms=0.25, higher_order_max_noll=22), seed=3)
    ab = SimulatedMicroscope(only, noise=False).aberration
    assert np.sqrt(np.sum(ab[15:22] ** 2)) == pytest.approx(0.25) and not np.any(ab[22:])
    # --true-instrument: the microscope is another instrument than the settings the loop keeps
    base = small_settings()
    mism = trial_settings(base, HiddenErrors(true_instrument="1.02,1.01,1.05"), seed=3)
    mic = SimulatedMicroscope(mism, noise=False)
    assert mic.settings.optics.numerical_aperture == pytest.approx(1.02 * base.optics.numerical_aperture)
    assert mic.settings.optics.wavelength_um == pytest.approx(1.01 * base.optics.wavelength_um)
    assert mic.pixel_size_um == pytest.approx(1.05 * base.camera.pixel_size_um)
    assert (mism.optics, mism.camera) == (base.optics, base.camera)  # what the loop is told


def test_trial_table_counts_false_successes():
    from autoalign.app.trials import format_trials, run_loop_trial, summarise_trials

    s = loop_settings()
    trials = []
    for seed in (0, 1):
        dev = sim_devices(s, {5: 0.25, 6: -0.2}, seed=seed)
        est = make_estimator("model", s, OraclePredictor(dev.microscope))
        trials.append(run_loop_trial(s, 5, est, devices=dev))
    table = summarise_trials(trials, 5)
    assert table[0]["residual_median"] > 0.25 and table[-1]["residual_median"] < 0.02
    assert all(t["converged"] and not t["false_success"] for t in trials)
    text = format_trials(table, trials)
    assert "false successes" in text and "2 x converged" in text


def test_estimates_out_of_range_are_diagnosed():
    from tests.test_loop_support import ConstantPredictor

    loop, dev = make(predictor_cls=ConstantPredictor({7: 2.5}))  # beyond loop.max_prediction_rad = 2
    frames = dev.slm.frames_shown
    loop.run(5)
    assert loop.diagnosis.name == "estimate_invalid" and "beyond its range" in loop.stop_reason
    assert len(loop.history) == loop.settings.loop.max_refusals and dev.slm.frames_shown == frames
    assert not loop.result.converged
