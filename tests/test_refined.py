"""The ``refined`` estimator (network warm start + model-based Poisson fit) on the simulated
microscope with hidden faults, and the stop-reason adapter (small grids, fixed seeds).

The warm start is the REAL ``CNNEstimator`` path fed by ``OraclePredictor`` (the hidden truth)
plus 0.05 rad of Gaussian noise per mode: the shipped network needs the default 64 px grid, too
slow for the default suite (the closed-loop benchmark ``benchmarks/refined_loop.py`` uses it)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from autoalign.app.estimators import ESTIMATORS, make_estimator
from autoalign.calibration import diagnosis as dg
from autoalign.calibration import donut
from autoalign.calibration import verdict as vd
from autoalign.calibration.measurement import analyse_stack
from autoalign.correction import Correction
from autoalign.hardware.acquisition import acquire_stack
from autoalign.hardware.factory import open_devices
from autoalign.models.estimator import CNNEstimator
from autoalign.models.refined import RefinedEstimator, refine_options
from autoalign.settings import SettingsError, load_settings, settings_from_dict
from tests.test_loop_support import OraclePredictor


@pytest.fixture(scope="module")
def small():
    return load_settings().replace(**{
        "camera.roi_px": 32, "stack.planes": 32, "optics.pupil_samples": 32, "model.binning": 1,
        "hardware.backend": "simulated", "slm.backend": "simulated",
        "refine.crop_px": 24, "refine.pupil_samples": 24,
        "model.modes": list(range(5, 16)), "model.predict_offset": False, "model.fine_checkpoint": ""})


class _Bias:
    """A predictor that adds ``bias`` ({Noll: rad}) to another's prediction."""

    def __init__(self, inner, bias):
        self.inner, self.bias, self.modes = inner, bias, inner.modes

    def predict(self, sections):
        p = self.inner.predict(sections)
        return SimpleNamespace(coefficients={j: v + self.bias.get(j, 0.0) for j, v in p.coefficients.items()},
                               mask_offset=None)


class _Stroked:
    """The aberration present, as the correction sees it, when the SLM delivers ``scale`` x its
    wrapped phase: hidden + commanded (see the stroke test; the oracle's read-back would also
    count the vortex's own stroke error, which no Zernike correction removes), plus noise."""

    def __init__(self, microscope, commanded, scale, noise_rad, seed, modes=tuple(range(5, 16))):
        self.mic, self.commanded, self.scale, self.modes = microscope, commanded, scale, list(modes)
        self.noise, self.rng = noise_rad, np.random.default_rng(seed)

    def present(self):
        return {j: float(self.mic.aberration[j - 1]) + self.commanded.get(j, 0.0) for j in self.modes}

    def predict(self, sections):
        return SimpleNamespace(coefficients={j: v + self.noise * self.rng.normal() for j, v in self.present().items()},
                               mask_offset=None)


def estimate(settings, correction=None, seed=7, noise_rad=0.05, bias=None, **faults):
    """One stack of the simulated microscope with hidden ``faults`` showing vortex + ``correction``,
    the refined estimate (the host's correction is what the SLM shows) and the truth: the
    aberration present per mode (hidden + applied) and the microscope."""
    correction = correction or Correction()
    with open_devices(settings, seed=seed, **faults) as dev:
        donut.show_correction(dev.slm, settings, correction)
        m = analyse_stack(acquire_stack(dev.camera, dev.focus, settings), settings)
        assert m.valid, m.reason
        stroke = faults.get("slm_phase_scale", 1.0)
        if stroke != 1.0:
            predictor = _Stroked(dev.microscope, correction.coefficients, stroke, noise_rad, seed)
        else:
            predictor = OraclePredictor(dev.microscope, noise_rad=noise_rad, seed=seed)
        if bias:
            predictor = _Bias(predictor, bias)
        est = RefinedEstimator(settings, network=CNNEstimator(settings, predictor))
        est.attach(SimpleNamespace(correction=correction, settings=settings))
        e = est.estimate(m)
        if stroke != 1.0:
            truth = predictor.present()
        else:
            truth = {j: float(dev.microscope.residual_coefficients()[j - 1]) for j in est.modes}
        return e, truth, dev.microscope


def rms_error(coefficients, truth):
    return math.sqrt(float(np.mean([(coefficients[j] - truth[j]) ** 2 for j in truth])))


def test_wrong_hand_fault_is_valid_and_named(small):
    e, truth, _ = estimate(small, Correction({6: 0.2, 2: 0.05}), wrong_hand_fraction=0.02, wrong_hand_phase_rad=0.8)
    assert e.valid, e.reason
    assert e.source == "refined"
    assert rms_error(e.coefficients, truth) < 0.5 * rms_error(e.extras["network"], truth)
    summary = vd.summarise_diagnoses(e, e.extras["measured_null"], e.extras["null_floor"])
    name, cause, action, terms = summary
    assert name == "polarisation_impurity"
    assert "quarter-wave plate" in action and "wrong circular hand" in cause
    assert terms["polarisation_impurity"] == pytest.approx(0.02, rel=0.3)
    assert e.extras["refine"]["wrong_hand_fraction"] == pytest.approx(0.02, rel=0.3)
    assert str(summary).startswith("polarisation impurity, ~")
    # every sigma is a positive finite number, and the errors are within a few of them
    assert all(math.isfinite(s) and s > 0 for s in e.uncertainty.values())


def test_unmodelled_higher_modes_make_the_fit_invalid_and_the_network_is_applied(small):
    """0.3 rad beyond the fitted modes: the fit does not explain the data. By default the network's
    estimate is applied, saying why and naming the fault; with refine.network_fallback off the
    estimate is refused."""
    e, _, _ = estimate(small, higher_order_rms_rad=0.3)
    assert e.valid and e.coefficients == e.extras["network"]
    assert "did not explain the data" in e.extras["fit_refused"] and "Noll 28" in e.extras["fit_refused"]
    assert e.extras["diagnoses"][0]["name"] == "unmodelled_aberration"
    assert vd.summarise_diagnoses(e, e.extras["measured_null"], e.extras["null_floor"]).name == "unmodelled_aberration"
    strict, _, _ = estimate(small.replace(**{"refine.network_fallback": False}), higher_order_rms_rad=0.3)
    assert not strict.valid
    assert "chi^2/dof" in strict.reason or "structured residual" in strict.reason


def test_refinement_beats_its_warm_start_on_a_clean_aberration(small):
    s = small.replace(**{"simulation.aberration_rms_rad": 0.5})
    e, truth, mic = estimate(s, seed=11)
    assert float(np.sqrt(np.sum(mic.aberration[4:15] ** 2))) == pytest.approx(0.5, rel=0.05)
    assert e.valid, e.reason
    fit, net = rms_error(e.coefficients, truth), rms_error(e.extras["network"], truth)
    assert fit < 0.3 * net
    assert e.residual_rms == pytest.approx(math.sqrt(sum(v * v for v in e.coefficients.values())))
    assert e.score == e.residual_rms
    assert e.extras["refine"]["crb_residual_rms"] < 0.02
    assert e.extras["diagnoses"] == []  # nothing but Zernike modes; a measured null of ~0 is no "floor"


def test_a_network_out_of_its_domain_is_named_and_the_fit_used(small):
    """A network wrong by 0.6 rad on Z7: the fit, which explains the data, finds the truth and is
    used, the network's mode named as outside its domain; with refine.require_agreement the same
    estimate is refused naming the mode."""
    e, truth, _ = estimate(small, bias={7: 0.6})
    assert e.valid and e.reason == ""
    assert "disagree" in e.extras["network_outside_domain"] and "Z7" in e.extras["network_outside_domain"]
    assert e.extras["disagreement"][7] == pytest.approx(-0.6, abs=0.1)
    assert abs(e.coefficients[7] - truth[7]) < 0.05  # the fit found the truth
    strict, _, _ = estimate(small.replace(**{"refine.require_agreement": True}), bias={7: 0.6})
    assert not strict.valid and "disagree" in strict.reason and "Z7" in strict.reason


def test_far_off_the_network_estimate_is_applied_unfitted(small):
    """Above refine.fit_below_rad (the fit's capture range) the network's estimate is returned as
    it is, valid, saying the fit was skipped; with the limit off the same stack is fitted."""
    bias = {5: 1.0, 6: -0.8}  # the network reads > 1.2 rad RMS
    e, truth, _ = estimate(small.replace(**{"refine.fit_below_rad": 1.0}), bias=bias)
    assert e.valid and "fit_skipped" in e.extras and "refine.fit_below_rad" in e.extras["fit_skipped"]
    assert e.coefficients == e.extras["network"]
    assert e.coefficients[5] - truth[5] == pytest.approx(1.0, abs=0.2)
    # why: fitted from 1.3 rad off, the fit lands in another minimum that does not explain the data
    fitted, _, _ = estimate(small.replace(**{"refine.fit_below_rad": 0.0, "refine.network_fallback": False}),
                            bias=bias)
    assert "fit_skipped" not in fitted.extras and not fitted.valid
    assert "does not explain the data" in fitted.reason and "disagree" in fitted.reason


def test_a_misregistration_the_slm_can_shift_away_is_not_a_fault(small):
    """A vortex 0.13 pupil radii off the pupil: within loop.max_mask_offset (0.2) the SLM shifts
    the pattern (no named fault, the fit's offset is applied); beyond it (0.1) the fault is named
    with the pupil centre to set."""
    s = small.replace(**{"refine.pupil_samples": 32})
    e, _, _ = estimate(s.replace(**{"loop.max_mask_offset": 0.2}), mask_offset=(0.13, 0.02))
    assert e.valid and math.hypot(*e.mask_offset) == pytest.approx(math.hypot(0.13, 0.02), abs=0.02)
    assert "mask_offset" not in [d["name"] for d in e.extras["diagnoses"]]
    tight, _, _ = estimate(s.replace(**{"loop.max_mask_offset": 0.1}), mask_offset=(0.13, 0.02))
    assert "mask_offset" in [d["name"] for d in tight.extras["diagnoses"]]


def test_settings_that_do_not_match_the_instrument_fail_the_fit_and_say_so(small):
    """The true instrument has 2 % more NA, 1 % longer wavelength and 5 % larger pixels than the
    settings say: the fit (built from the settings) does not explain the data, the network's
    estimate is applied and the note names the optics settings to check."""
    mismatch = {"simulation.true_na_scale": 1.02, "simulation.true_wavelength_scale": 1.01,
                "simulation.true_pixel_scale": 1.05}
    e, _, _ = estimate(small.replace(**mismatch))
    assert e.valid and "fit_refused" in e.extras and e.coefficients == e.extras["network"]
    assert "optics.numerical_aperture" in e.extras["fit_refused"] and "camera.pixel_size_um" in e.extras["fit_refused"]
    matched, _, _ = estimate(small)
    assert "fit_refused" not in matched.extras  # the same stack from a matching instrument is explained


def test_without_the_raw_stack_the_estimate_is_refused(small):
    sections = np.ones((3, 32, 32))
    est = RefinedEstimator(small, network=CNNEstimator(small, SimpleNamespace(
        modes=list(range(5, 16)), predict=lambda s: SimpleNamespace(coefficients={5: 0.1}, mask_offset=None))))
    e = est.estimate(SimpleNamespace(sections=sections, background_photons=0.0, valid=True, stack=None))
    assert not e.valid and "raw stack" in e.reason


def test_the_registry_builds_refined(small):
    assert "refined" in ESTIMATORS
    est = make_estimator("refined", small, predictor=OraclePredictor(None))
    assert isinstance(est, RefinedEstimator) and est.name == "refined"
    assert est.modes == list(small.model.modes)
    opts = refine_options(small)
    assert (opts.crop_px, opts.pupil_samples, opts.fit_slm_scale) == (24, 24, False)
    assert opts.plane_offsets_um == (-0.6, -0.3, 0.0, 0.3, 0.6)
    assert refine_options(small.replace(**{"refine.plane_offsets_um": [-0.4, 0.4]})).plane_offsets_um == (-0.4, 0.4)


def test_refine_settings_are_optional_and_checked():
    data = load_settings().to_dict()
    data.pop("refine")
    assert settings_from_dict(data).refine.agreement_rad == 0.4
    data["refine"] = {"pupil_samples": 4}
    with pytest.raises(SettingsError, match="refine.pupil_samples"):
        settings_from_dict(data)


# ---------------------------------------------------------------- the stop-reason adapter
def _d(name, contribution, cause="c", action="a"):
    return {"name": name, "cause": cause, "action": action, "value": contribution, "settings": {},
            "null_contribution": contribution}


def test_summary_picks_the_fault_that_fills_the_null_most():
    found = [_d("mask_offset", 0.004), _d("slm_stroke", 0.06, "stroke", "set slm.grey_level_2pi: 255"),
             _d("polarisation_impurity", 0.02), _d("unmodelled_aberration", 0.0)]
    s = vd.summarise_diagnoses({"diagnoses": found}, measured_null=0.15, floor=0.048, residual_rms=0.1)
    assert (s.name, s.action) == ("slm_stroke", "set slm.grey_level_2pi: 255")
    t = s.limiting_terms
    assert t["bead_floor"] == 0.048 and t["slm_stroke"] == 0.06 and t["polarisation_impurity"] == 0.02
    assert t["residual_aberration"] == pytest.approx(1 - math.exp(-0.01))
    assert t["unexplained"] == pytest.approx(0.15 - sum(v for k, v in t.items() if k != "unexplained"))


def test_summary_when_the_fit_does_not_explain_the_data_or_nothing_is_found():
    ranked = [_d("unmodelled_aberration", 0.0, "structure"), _d("polarisation_impurity", 0.02)]
    assert vd.summarise_diagnoses(ranked, measured_null=0.2, floor=0.048).name == "unmodelled_aberration"
    # at the bead's floor, the floor is the reason; a named fault still comes first
    assert vd.summarise_diagnoses(ranked[:1], measured_null=0.05, floor=0.048).name == "at_bead_floor"
    assert vd.summarise_diagnoses(ranked[1:], measured_null=0.05, floor=0.048).name == "polarisation_impurity"
    assert vd.summarise_diagnoses([], measured_null=0.2, floor=0.048).name == "none"
    assert vd.summarise_diagnoses([_d("at_bead_floor", 0.0)], measured_null=0.2, floor=0.048).name == "none"
    with pytest.raises(TypeError, match="expected an Estimate"):
        vd.summarise_diagnoses(3.0)


def test_physics_stop_rule():
    at = vd.is_converged_physics(0.05, 0.004, measured_null=0.05, floor=0.048)
    assert at and at.stop and at.at_floor and "floor" in at.reason
    crb = vd.is_converged_physics(0.006, 0.004, measured_null=0.07, floor=0.048)
    assert not crb and crb.stop and crb.within_crb and "not converged" in crb.reason
    go = vd.is_converged_physics(0.03, 0.004, measured_null=0.07, floor=0.048)
    assert not go and not go.stop and go.reason == ""
    unknown = vd.is_converged_physics(None, float("nan"), None, 0.048)
    assert not unknown.stop
    # a reading far below the bead's floor failed (no correction goes below it): not converged
    assert not vd.is_converged_physics(0.3, 0.004, measured_null=0.0, floor=0.048)
    assert vd.null_at_floor(0.03, 0.048) and not vd.null_at_floor(0.02, 0.048)
    # an aberrated donut seen through the bead can read a null at the floor: not converged
    assert not vd.is_converged_physics(0.8, 0.004, measured_null=0.05, floor=0.048)
    assert vd.is_converged_physics(0.04, 0.004, measured_null=0.05, floor=0.048)
    assert vd.summarise_diagnoses([], measured_null=0.05, floor=0.048, residual_rms=0.8).name == "none"
    # a named fault forbids success even at the floor's margin; the stop says why
    faulty = vd.is_converged_physics(0.01, 0.004, 0.055, 0.048, diagnoses=[_d("polarisation_impurity", 0.02,
                                                                              "wrong hand", "rotate the plate")])
    assert faulty.stop and not faulty.converged and "wrong hand: rotate the plate" in faulty.reason


def test_a_wrong_stroke_is_read_and_the_step_is_the_one_that_wraps_right(small):
    """The SLM delivers 80 % of the commanded phase, wrapped first (as grey levels are). Modulo
    2 pi, s wrap(x) = x - (1 - s) wrap(x): the SLM delivers the full commanded phase minus a
    sawtooth no correction removes. So the right step subtracts hidden + commanded (what the
    estimate reports), not the fit's s C + A: after it only the vortex's own stroke error
    ``stroke_residual_rms(0.8)`` is left (honest delivered-phase metric), while the s C + A step
    leaves (1 - s) C on top."""
    # the fit's pupil quadrature as fine as the microscope's here (32 nodes, the settings' default):
    # with 24 the stroke's wrapped sawtooth is not represented and the fit fails its structured-
    # residual test (chi^2/dof 1.65; docs/refined.md)
    s = small.replace(**{"simulation.aberration_rms_rad": 0.5, "refine.fit_slm_scale": True, "refine.pupil_samples": 32})
    before = Correction({6: 0.4, 8: -0.3, 11: 0.2})
    e, truth, _ = estimate(s, before, seed=11, slm_phase_scale=0.8)
    assert e.valid, e.reason  # chi^2 fine; the structure the stroke's wraps leave is attributed to it
    assert e.extras["structure_attributed_to"] == "slm_stroke"
    scale = e.extras["refine"]["slm_phase_scale"]
    assert scale == pytest.approx(0.8, abs=0.03)
    assert [d["name"] for d in e.extras["diagnoses"]][0] == "slm_stroke"
    assert rms_error(e.coefficients, truth) < 0.03  # truth here: hidden + commanded
    fitted_present = {j: v - (1 - scale) * before.coefficients.get(j, 0.0) for j, v in e.coefficients.items()}

    def residual_after(coefficients):
        """The honest residual (delivered phase + hidden aberration vs the ideal vortex, wraps and
        stroke included) after one full step ``before - coefficients``."""
        step = Correction({j: before.coefficients.get(j, 0.0) - coefficients.get(j, 0.0)
                           for j in set(before.coefficients) | set(coefficients)})
        with open_devices(s, seed=11, slm_phase_scale=0.8) as dev:
            dev.slm.show(donut.build_pupil_phase(s, step, donut.slm_grid(dev.slm, s)))
            return dev.microscope.true_residual_rms()

    ours, scaled = residual_after(e.coefficients), residual_after(fitted_present)
    vortex = dg.stroke_residual_rms(0.8)
    left = 0.2 * math.sqrt(sum(v * v for j, v in before.coefficients.items()))  # (1 - s) C
    assert ours == pytest.approx(vortex, rel=0.15)
    assert scaled == pytest.approx(math.hypot(vortex, left), rel=0.15) and ours < scaled
