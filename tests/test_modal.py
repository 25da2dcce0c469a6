"""The classical modal sensorless-AO baseline (``calibration.modal``): the parabolic and the
known-curvature optima against synthetic quadratic metrics with a known optimum, the estimator's
sign convention and trust region on a synthetic host, the noise correction of the correlation
against a known noise variance, and both schemes on the small simulated microscope."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from autoalign.app.estimators import make_estimator
from autoalign.app.loop import AlignmentLoop
from autoalign.calibration.metrics import correlation
from autoalign.calibration.modal import (
    ModalEstimator,
    known_curvature_optimum,
    noise_corrected_correlation,
    parabola_optimum,
)
from autoalign.correction import Correction
from autoalign.settings import load_settings
from tests.test_loop_support import sim_devices, small_settings


def quadratic_metric(optimum: dict[int, float], curvature: dict[int, float], peak: float = 0.9):
    """M(x) = peak - sum_j c_j (x_j - x*_j)^2 of a correction's coefficients."""
    def metric(coefficients: dict[int, float]) -> float:
        return peak - sum(c * (coefficients.get(j, 0.0) - optimum[j]) ** 2 for j, c in curvature.items())
    return metric


def test_parabola_optimum_recovers_the_optimum_of_a_quadratic():
    m = quadratic_metric({7: 0.23}, {7: 2.0})
    b = 0.5
    x = parabola_optimum(b, m({7: -b}), m({}), m({7: b}), max_step=3.0)
    assert x == pytest.approx(0.23, abs=1e-9)
    # clipped to max_step * b, and towards the better side when the triple is not concave
    assert parabola_optimum(b, m({7: -b}), m({}), m({7: b}), max_step=0.2) == pytest.approx(0.1)
    assert parabola_optimum(0.5, 0.1, 0.0, 0.3, max_step=1.0) == pytest.approx(0.5)
    assert parabola_optimum(0.5, math.nan, 0.0, 0.3) == 0.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_known_curvature_optimum_recovers_the_optimum(sign):
    c, opt = 0.35, -0.41
    m = quadratic_metric({9: opt}, {9: c})
    b = sign * 0.6
    assert known_curvature_optimum(b, m({}), m({9: b}), c, max_step=3.0) == pytest.approx(opt, abs=1e-9)
    # a wrong curvature gives a wrong optimum (the scheme needs the known one)
    assert abs(known_curvature_optimum(b, m({}), m({9: b}), 2 * c, max_step=3.0) - opt) > 0.05
    assert known_curvature_optimum(b, m({}), m({9: b}), 0.0) == 0.0


@dataclass
class _Probe:
    coefficients: dict
    valid: bool = True


class SyntheticHost:
    """A ProbeHost whose 'measurement' carries the correction shown; the metric is a known
    quadratic of it (the estimator's ``measure`` is replaced accordingly)."""

    def __init__(self):
        self.settings = load_settings()
        self.correction = Correction()
        self.probes = 0
        self.restored = 0

    def probe(self, correction):
        self.probes += 1
        return _Probe(dict(correction.coefficients))

    def restore(self):
        self.restored += 1

    def ideal_sections(self):  # pragma: no cover - the synthetic metric does not use it
        raise AssertionError


def synthetic_estimator(metric, **kw) -> tuple[ModalEstimator, SyntheticHost]:
    est = ModalEstimator(**kw)
    est.measure = lambda m: metric(m.coefficients)  # type: ignore[method-assign]
    host = SyntheticHost()
    est.attach(host)
    return est, host


@pytest.mark.parametrize("scheme", ["2n+1", "n+1"])
def test_one_round_on_a_separable_quadratic_finds_the_aberration(scheme):
    aberration = {5: 0.3, 8: -0.2, 12: 0.15}            # present; the metric peaks at minus it
    curvature = {5: 0.5, 8: 0.3, 12: 0.2}
    metric = quadratic_metric({j: -a for j, a in aberration.items()}, curvature)
    est, host = synthetic_estimator(metric, modes=list(aberration), bias_rad=0.5, scheme=scheme, step_gain=1.0,
                                    max_step=3.0, curvature=curvature, n1_min_metric=-1.0, n1_bias_rad=0.4)
    e = est.estimate(_Probe({}))
    assert e.valid and e.source == "modal"
    for j, a in aberration.items():
        assert e.coefficients[j] == pytest.approx(a, abs=1e-9)
    assert host.probes == (2 if scheme == "2n+1" else 1) * len(aberration) and host.restored == 1
    assert est.stacks_per_round == (7 if scheme == "2n+1" else 4)
    assert e.score == pytest.approx(-metric({}))


def test_trust_region_steps_back_to_the_best_base():
    metric = quadratic_metric({5: 0.0}, {5: 1.0})
    est, host = synthetic_estimator(metric, modes=[5], bias_rad=0.5, step_gain=1.0)
    host.correction = Correction({5: 0.1})
    est.estimate(_Probe({5: 0.1}))                       # best base: x5 = 0.1, metric 0.89
    host.correction = Correction({5: 0.6})                # a worse base
    probes = host.probes
    e = est.estimate(_Probe({5: 0.6}))
    assert host.probes == probes                          # no scan
    gain = host.settings.loop.gain
    assert 0.6 - gain * e.coefficients[5] == pytest.approx(0.1)  # the loop lands on the best base
    assert e.extras["backtrack"]


def test_noise_corrected_correlation_removes_the_attenuation_of_known_noise():
    rng = np.random.default_rng(4)
    y, x = np.mgrid[-16:16, -16:16] / 6.0
    r2 = x * x + y * y
    ideal = np.stack([r2 * np.exp(-r2)] * 3)
    image = 100 * np.stack([r2 * np.exp(-r2), (r2 + 0.3 * x) * np.exp(-r2), r2 * np.exp(-1.2 * r2)])
    clean = correlation(image, ideal)
    sigma = 6.0
    noisy = image + rng.normal(0, sigma, image.shape)
    raw = correlation(noisy, ideal)
    fixed = noise_corrected_correlation(noisy, 0.0, ideal, sigma**2)
    assert raw < clean - 0.02                             # noise attenuates the plain correlation
    assert fixed == pytest.approx(clean, abs=0.01)


@pytest.mark.parametrize("scheme", ["2n+1", pytest.param("n+1", marks=pytest.mark.slow)])
def test_baseline_reduces_a_two_mode_aberration_threefold(scheme):  # ~8 / 12 s on an idle machine
    s = small_settings()
    dev = sim_devices(s, {6: 0.4, 7: -0.35}, seed=1)
    modes = [5, 6, 7, 8, 11]
    est = make_estimator("modal", s, modes=modes, scheme=scheme)
    loop = AlignmentLoop(dev, s, est)
    loop.zero_slm()
    start = loop.true_residual_rms()
    budget = 6 * (2 * len(modes) + 1)                    # six 2N+1 rounds
    while loop.stacks_acquired + 2 * len(modes) + 1 <= budget:  # a round is at most 2N+1 stacks
        loop.correct_once()
    assert loop.stacks_acquired <= budget
    assert loop.true_residual_rms() < start / 3
