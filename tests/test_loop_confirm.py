"""app/loop_confirm.py: when the MEASURED donut counts as aligned, and the confirmation stacks that
must back the claim (their mean null decides; one refused stack denies it)."""
from __future__ import annotations

import math

import pytest

from autoalign.app.loop_confirm import CONFIRM_STACKS, confirm_aligned, is_aligned, pool_stacks
from autoalign.app.loop_records import LoopStopped, measured_score

FLOOR, MARGIN, CORR = 0.026, 0.008, 0.97


def metrics(null, sigma=0.003, corr=0.99):
    m = {"null_depth": null, "null_depth_sigma": sigma, "correlation_ideal": corr}
    m["score"] = measured_score(m)
    return m


def aligned(m, sigmas=2.0):
    return is_aligned(m, FLOOR, MARGIN, CORR, sigmas)


def test_aligned_means_null_plus_sigmas_within_the_floor_and_margin():
    assert aligned(metrics(0.026))                        # 0.032 <= 0.034
    assert not aligned(metrics(0.029))                    # 0.035 >  0.034
    assert aligned(metrics(0.029), sigmas=0.0)
    assert aligned(metrics(0.036), sigmas=-1.0)           # "plausibly aligned": null - 1 sigma
    assert not aligned(metrics(0.020, corr=0.95))         # dark centre, misshapen donut
    for bad in ({"null_depth": 0.02}, metrics(math.nan), metrics(0.02, sigma=math.inf), metrics(0.02, corr=math.nan)):
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


def test_confirmation_decides_on_the_mean_of_all_stacks():
    m = metrics(0.031, sigma=0.006)                       # one lucky stack: 0.031 - 0.006 within 0.034
    assert aligned(m, sigmas=-1.0) and not aligned(m)
    seen = iter([metrics(0.022, sigma=0.006), metrics(0.023, sigma=0.006)])
    assert confirm_aligned(m, lambda: next(seen), aligned)  # mean 0.0253 + 2 x 0.0035 = 0.0323
    assert m["confirm_stacks"] == CONFIRM_STACKS and m["null_depth"] == pytest.approx(0.0253333, rel=1e-5)

    m2 = metrics(0.031, sigma=0.006)
    worse = iter([metrics(0.036, sigma=0.006), metrics(0.035, sigma=0.006)])
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
