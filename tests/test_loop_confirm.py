"""app/loop_confirm.py: when the MEASURED donut counts as aligned (its measured residual wavefront
within calibration.quality.ALIGNED_RAD, the null not above the bead floor beyond its noise), and the
confirmation stacks that must back the claim (pooled; one refused stack denies it)."""
from __future__ import annotations

import math

import pytest

from autoalign.app.loop_confirm import CONFIRM_STACKS, confirm_aligned, is_aligned, pool_stacks
from autoalign.app.loop_records import LoopStopped, measured_score
from autoalign.calibration.quality import ALIGNED_RAD, Quality

FLOOR, MARGIN, CORR = 0.026, 0.008, 0.97


def metrics(null, sigma=0.003, corr=0.99, residual=0.01, residual_sigma=0.006, shape=None, fit=True):
    m = {"null_depth": null, "null_depth_sigma": sigma, "correlation_ideal": corr}
    if residual is not None:
        m.update(Quality(residual, residual_sigma, "fit" if fit else "shape",
                         residual if shape is None else shape).as_metrics())
    m["score"] = measured_score(m)
    return m


def aligned(m, sigmas=2.0):
    return is_aligned(m, FLOOR, MARGIN, CORR, sigmas)


def test_aligned_means_the_measured_residual_within_the_threshold_and_the_null_not_above_the_floor():
    assert ALIGNED_RAD == 0.05
    assert aligned(metrics(0.026))                        # 0.01 + 2 x 0.006 <= 0.05
    assert aligned(metrics(0.038))                        # null 0.038 - 2 x 0.003 <= 0.034: within its noise
    assert not aligned(metrics(0.041))                    # null above the floor beyond its noise: a fault fills it
    assert not aligned(metrics(0.026, residual=0.040))    # 0.040 + 0.012 > 0.05
    assert aligned(metrics(0.026, residual=0.040), sigmas=0.0)
    assert aligned(metrics(0.026, residual=0.055), sigmas=-1.0)   # "plausibly aligned": residual - 1 sigma
    assert not aligned(metrics(0.026, residual=0.01, shape=0.3))  # the shape contradicts the fit
    assert not aligned(metrics(0.020, corr=0.95))         # dark centre, misshapen donut
    # an aberrated donut through the bead reads a null AT the floor: the residual decides
    assert not aligned(metrics(0.020, residual=0.8)) and not aligned(metrics(0.026, residual=0.12, fit=False))
    for bad in ({"null_depth": 0.02}, metrics(math.nan), metrics(0.02, sigma=math.inf), metrics(0.02, corr=math.nan),
                metrics(0.02, residual=None), metrics(0.02, residual=math.nan)):
        assert not aligned(bad)


def test_pooled_stacks_average_the_null_and_shrink_its_sigma():
    first = metrics(0.030, sigma=0.004, corr=0.98)
    out = pool_stacks(first, [metrics(0.024, sigma=0.004), metrics(0.027, sigma=0.004)])
    assert out["null_depth"] == pytest.approx(0.027)
    assert out["null_depth_sigma"] == pytest.approx(0.004 / math.sqrt(3))
    assert out["confirm_stacks"] == 2.0
    assert out["correlation_ideal"] == 0.98               # the first stack's
    assert out["score"] == pytest.approx(0.027 + 0.02)
    assert first["null_depth"] == 0.030                   # pool_stacks does not touch its input


def test_pooled_stacks_pool_the_shape_and_keep_a_fits_residual():
    fit = metrics(0.026, residual=0.012, shape=0.03)
    more = [metrics(0.026, residual=0.04, fit=False), metrics(0.026, residual=0.05, fit=False)]
    out = pool_stacks(fit, more)
    assert out["quality_rad"] == 0.012 and out["quality_from_fit"] == 1.0       # the fit's, of the first stack
    assert out["quality_shape_rad"] == pytest.approx(math.sqrt((0.03**2 + 0.04**2 + 0.05**2) / 3))
    shape = pool_stacks(metrics(0.026, residual=0.03, fit=False), more)
    assert shape["quality_rad"] == pytest.approx(math.sqrt((0.03**2 + 0.04**2 + 0.05**2) / 3))
    assert shape["quality_sigma_rad"] == pytest.approx(0.006 / math.sqrt(3))


def test_confirmation_decides_on_the_mean_of_all_stacks():
    m = metrics(0.031, residual=0.048, fit=False)         # one lucky stack: 0.048 - 0.006 within 0.05
    assert aligned(m, sigmas=-1.0) and not aligned(m)
    seen = iter([metrics(0.022, residual=0.01, fit=False), metrics(0.023, residual=0.01, fit=False)])
    assert confirm_aligned(m, lambda: next(seen), aligned)  # rms 0.029 + 2 x 0.0035 <= 0.05
    assert m["confirm_stacks"] == CONFIRM_STACKS and m["null_depth"] == pytest.approx(0.0253333, rel=1e-5)

    m2 = metrics(0.031, residual=0.048, fit=False)
    worse = iter([metrics(0.036, residual=0.06, fit=False), metrics(0.035, residual=0.05, fit=False)])
    assert not confirm_aligned(m2, lambda: next(worse), aligned)
    assert m2["null_depth"] == pytest.approx(0.034)       # the pooled figures are what was decided on


def test_a_refused_confirmation_stack_denies_the_claim_and_leaves_the_metrics():
    m = metrics(0.020)
    calls = []

    def measure():
        calls.append(1)
        return None if len(calls) == 1 else metrics(0.02)

    assert not confirm_aligned(m, measure, aligned)
    assert calls == [1] and "confirm_stacks" not in m and m["null_depth"] == 0.020


def test_a_stop_request_is_honoured_between_confirmation_stacks():
    calls = []

    def stop():
        if calls:
            raise LoopStopped()

    with pytest.raises(LoopStopped):
        confirm_aligned(metrics(0.02), lambda: calls.append(1) or metrics(0.02), aligned, check_stop=stop)
    assert calls == [1]
