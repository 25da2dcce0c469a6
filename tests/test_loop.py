"""The alignment loop's logic on fake devices (the simulated microscope's stand-in in
tests/test_loop_support.py): convergence, refusals, safety, device failure, stop, restore-best."""
from __future__ import annotations

import math

import numpy as np
import pytest

from app.loop import AlignmentLoop, Correction, build_pupil_phase, null_depth
from hardware.base import DeviceError
from tests.test_loop_support import (ConstantPredictor, OraclePredictor, fake_acquire_stack, fake_devices,
                                     small_settings)

ABERRATION = {5: 0.3, 6: -0.2, 7: -0.35, 8: 0.2, 11: 0.25, 12: -0.15}


def make_loop(settings=None, predictor=None, callbacks=None, **kw):
    s = settings or small_settings()
    dev = fake_devices(s, kw.pop("aberration", ABERRATION), **kw)
    loop = AlignmentLoop(dev, s, predictor=predictor or OraclePredictor(dev.microscope), callbacks=callbacks,
                         acquire_stack=fake_acquire_stack)
    loop.zero_slm()
    return loop, dev


def test_correction_yaml_roundtrip_and_rms(tmp_path):
    c = Correction({2: 0.1, 5: 0.3, 7: -0.4}, (0.01, -0.02))
    assert c.rms() == pytest.approx(0.5)
    c.save_yaml(tmp_path / "c.yaml")
    back = Correction.load_yaml(tmp_path / "c.yaml")
    assert back == c
    (tmp_path / "bad.yaml").write_text("coefficients: {5: .nan}\n")
    with pytest.raises(ValueError):
        Correction.load_yaml(tmp_path / "bad.yaml")


def test_pupil_phase_is_vortex_plus_zernike():
    s = small_settings()
    p = build_pupil_phase(s, Correction({5: 0.5}), 48)
    assert p.shape == (48, 48) and np.all(np.isfinite(p))
    assert p[24, 36] == pytest.approx(math.atan2(0.5 / 48, 25 / 48) + 0.5 * math.sqrt(6) * 2 * 0, abs=0.2)


def test_loop_converges_with_oracle_and_recentres(caplog):
    events = []

    class CB:
        def on_iteration(self, r):
            events.append(r.decision)

        def on_slm_phase(self, phase):
            assert np.all(np.isfinite(phase))

    loop, dev = make_loop(callbacks=CB(), bead_um=(0.25, -0.1, 0.2))
    start = loop.true_residual_rms()
    records = loop.run(4)
    assert start > 0.6
    assert loop.true_residual_rms() < 0.05
    assert "stage re-centred" in records[0].decision
    assert dev.xy.position_um[0] == pytest.approx(0.25, abs=0.05)
    assert loop.stop_reason.startswith("converged")
    assert events == [r.decision for r in records]
    m = records[-1].metrics
    assert m["correlation_ideal"] > 0.95 and m["null_depth"] < 0.15
    assert {"photons", "predicted_residual_rms", "true_residual_rms"} <= set(m)


@pytest.mark.parametrize("case, kwargs, reason", [
    ("no bead", dict(bead_um=(5.0, 5.0, 0.0)), "no bead"),
    ("edge", dict(bead_um=(0.75, 0.0, 0.0)), "bead at edge"),
    ("dim", dict(settings=small_settings(**{"camera.peak_photons": 3.0})), "no bead|too few photons"),
    ("saturated", dict(settings=small_settings(**{"camera.peak_photons": 2e5})), "saturated"),
])
def test_invalid_measurement_applies_nothing(case, kwargs, reason):
    import re

    loop, dev = make_loop(**kwargs)
    shown = len(dev.slm.shown)
    xy = dev.xy.position_um
    r = loop.correct_once()
    assert r.decision.startswith("refused") and re.search(reason, r.decision), r.decision
    assert not r.measurement.valid
    assert len(dev.slm.shown) == shown and dev.xy.position_um == xy
    assert loop.correction == Correction()


@pytest.mark.parametrize("prediction, why", [({5: float("nan")}, "NaN"), ({7: 2.5}, "max_prediction_rad")])
def test_bad_prediction_refused(prediction, why):
    loop, dev = make_loop(predictor=ConstantPredictor(prediction))
    last = dev.slm.shown[-1].copy()
    r = loop.correct_once()
    assert r.decision.startswith("refused") and why in r.decision
    assert np.array_equal(dev.slm.shown[-1], last) and loop.correction == Correction()


def test_over_amplitude_correction_refused():
    loop, dev = make_loop(predictor=ConstantPredictor({5: -1.9, 6: -1.9, 7: -1.9}))
    n = len(dev.slm.shown)
    r = loop.correct_once()
    assert "max_correction_rms_rad" in r.decision and len(dev.slm.shown) == n


def test_camera_failure_mid_loop_stops_cleanly():
    loop, dev = make_loop(camera_fail_after=2)
    loop.predictor = OraclePredictor(dev.microscope, scale=0.5)  # slow enough not to converge
    records = loop.run(5)
    assert len(records) == 2
    assert loop.stop_reason.startswith("device failure") and isinstance(loop.last_error, DeviceError)
    good = build_pupil_phase(loop.settings, loop.correction, dev.slm.pupil_samples)
    assert np.array_equal(dev.slm.shown[-1], good)  # the SLM holds the last good mask
    assert all(np.all(np.isfinite(p)) for p in dev.slm.shown)


def test_slm_failure_keeps_correction():
    loop, dev = make_loop(slm_fail_after=2)  # zero_slm used one show
    loop.predictor = OraclePredictor(dev.microscope, scale=0.5)
    loop.run(5)
    assert loop.stop_reason.startswith("device failure")
    assert len(dev.slm.shown) == 2
    # the loop's correction is what the SLM shows, never a correction it failed to show
    assert np.array_equal(dev.slm.shown[-1], build_pupil_phase(loop.settings, loop.correction, 48))


def test_stop_between_steps():
    class Stopper:
        def __init__(self):
            self.loop = None

        def on_iteration(self, r):
            self.loop.stop()

    cb = Stopper()
    loop, _ = make_loop(callbacks=cb)
    cb.loop = loop
    records = loop.run(5)
    assert len(records) == 1 and loop.stop_reason == "stopped by request"


def test_no_improvement_restores_best():
    loop, dev = make_loop()
    oracle = loop.predictor
    loop.predictor = OraclePredictor(dev.microscope, scale=-0.2)  # makes things worse
    loop.patience = 2
    loop.run(6)
    assert loop.stop_reason.startswith("no improvement")
    assert loop.correction == loop.best == Correction() or loop.best.rms() == pytest.approx(0.0, abs=1e-9)
    assert loop.true_residual_rms() == pytest.approx(math.sqrt(sum(v * v for v in ABERRATION.values())), rel=1e-6)
    del oracle


def test_null_depth_metric():
    x = np.linspace(-1, 1, 33)
    xx, yy = np.meshgrid(x, x)
    r2 = (xx * xx + yy * yy) / 0.09
    donut = 1000 * r2 * np.exp(-r2) + 10
    sections = np.stack([donut, donut, donut])
    assert null_depth(sections, 10.0) < 0.005
    assert null_depth(sections + 0.05 * (donut.max() - 10) * (r2 < 0.5), 10.0) > 0.03


@pytest.mark.slow
def test_modal_corrector_reduces_residual():
    s = small_settings()
    dev = fake_devices(s, {5: 0.4, 6: -0.3, 11: 0.3})
    loop = AlignmentLoop(dev, s, corrector="modal", acquire_stack=fake_acquire_stack,
                         modal_options={"modes": [5, 6, 11], "bias_rad": 0.5})
    loop.zero_slm()
    start = loop.true_residual_rms()
    for _ in range(3):
        r = loop.correct_once()
        assert r.stacks == 7  # 2N + 1
    assert loop.true_residual_rms() < 0.3 * start


def test_align_command_pipeline_on_fake_devices(tmp_path):
    from app.commands.align import format_table, run_trial, summarise, write_plots

    s = small_settings()
    trials = []
    for seed in range(2):
        dev = fake_devices(s, ABERRATION, seed=seed)
        trials.append(run_trial(s, 2, predictor=OraclePredictor(dev.microscope), devices=dev,
                                acquire_stack=fake_acquire_stack))
    table = summarise(trials)
    assert len(table) == 3 and table[0]["residual_median"] > 0.6 and table[2]["residual_median"] < 0.05
    assert table[2]["stacks_median"] == 2 and np.isfinite(table[2]["null_depth_p95"])
    assert "residual median" in format_table(table)
    assert (tmp_path / "align.png").exists() is False
    write_plots(table, trials, tmp_path, "test")
    assert (tmp_path / "align.png").stat().st_size > 1000
