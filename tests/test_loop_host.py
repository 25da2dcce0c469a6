"""app/loop_host.py and app/loop_truth.py: the devices side of the loop on the real simulated
devices (the one checked gate to the SLM, probe/restore, acquisition, stop) and the cached ideal
reference and per-state truth (on a counting stand-in microscope)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autoalign.app.loop_host import LoopHost
from autoalign.app.loop_records import LoopStopped
from autoalign.app.loop_truth import LoopReference
from autoalign.app.safety import RefusedError
from autoalign.calibration import donut
from autoalign.correction import Correction
from tests.test_loop_support import sim_devices, small_settings


class Listener:
    def __init__(self):
        self.phases, self.measurements, self.logs = [], [], []

    def on_slm_phase(self, phase):
        self.phases.append(phase)

    def on_measurement(self, m):
        self.measurements.append(m)

    def on_log(self, message):
        self.logs.append(message)


@pytest.fixture(scope="module")
def host():
    s = small_settings()
    with sim_devices(s, {5: 0.2}) as dev:
        h = LoopHost(dev, s, callbacks=Listener())
        h.apply(Correction())
        yield h, dev


def test_a_refused_correction_never_reaches_the_slm(host):
    h, dev = host
    h.apply(Correction({5: 0.1}))
    frames, phase, shown = dev.slm.frames_shown, dev.slm.phase_rad.copy(), len(h.callbacks.phases)
    for bad in (Correction({5: math.nan}), Correction({6: 50.0}), Correction({}, (0.9, 0.0))):
        with pytest.raises(RefusedError):
            h.apply(bad)
        with pytest.raises(RefusedError):
            h.probe(bad)
    assert dev.slm.frames_shown == frames and np.array_equal(dev.slm.phase_rad, phase)
    assert h.correction == Correction({5: 0.1}) and len(h.callbacks.phases) == shown


def test_probe_shows_without_adopting_and_restore_shows_the_loops_own_again(host):
    h, dev = host
    h.apply(Correction({5: -0.2}))
    own = dev.slm.phase_rad.copy()
    stacks = h.stacks_acquired
    m = h.probe(Correction({5: -0.2, 7: 0.3}))
    assert m.valid and h.stacks_acquired == stacks + 1 and h.callbacks.measurements[-1] is m
    assert not np.array_equal(dev.slm.phase_rad, own) and h.correction == Correction({5: -0.2})
    h.restore()
    assert np.array_equal(dev.slm.phase_rad, own)


def test_a_stop_request_is_honoured_before_anything_is_shown(host):
    h, dev = host
    frames = dev.slm.frames_shown
    h.stop()
    with pytest.raises(LoopStopped):
        h.probe(Correction({5: 0.1}))
    assert dev.slm.frames_shown == frames
    h.clear_stop()
    h.check_stop()


def test_the_stage_moves_by_the_requested_amount_and_says_so(host):
    h, dev = host
    x0, y0 = dev.xy.position_um
    z0 = dev.focus.position_um
    h._move_stage((0.1, -0.05, 0.02))
    assert dev.xy.position_um == pytest.approx((x0 + 0.1, y0 - 0.05))
    assert dev.focus.position_um == pytest.approx(z0 + 0.02)
    assert h.callbacks.logs[-1] == "stage re-centred by (+0.100, -0.050, +0.020) um"
    h._move_stage((-0.1, 0.05, -0.02))


class CountingMicroscope:
    """What the truth functions read: an SLM image, the hidden aberration and the three metrics."""

    def __init__(self):
        self.slm_image = np.zeros((4, 4), np.uint8)
        self.aberration = np.zeros(22)
        self.calls = 0

    def true_residual_rms(self):
        self.calls += 1
        return 0.1 + float(self.slm_image.sum())

    def true_null_depth(self):
        return 0.01

    def residual_mask_offset(self):
        return (0.03, 0.04)


def test_the_truth_is_computed_once_per_slm_state():
    ref = LoopReference(small_settings())
    mic = CountingMicroscope()
    first = ref.truth(mic)
    assert first == {"true_residual_rms": 0.1, "true_null_depth": 0.01, "true_mask_offset": pytest.approx(0.05)}
    first["true_residual_rms"] = -1.0                    # a caller's copy, not the cache
    assert ref.truth(mic)["true_residual_rms"] == 0.1 and mic.calls == 1
    mic.slm_image[0, 0] = 1                              # a new state on the SLM
    assert ref.truth(mic)["true_residual_rms"] == 1.1 and mic.calls == 2
    assert ref.truth(None) == {}                         # no simulated microscope: no truth


def test_the_ideal_reference_is_computed_once(monkeypatch):
    calls = []
    monkeypatch.setattr(donut, "ideal_reference",
                        lambda s: calls.append(s) or {"sections": np.ones((3, 2, 2)), "null_depth": 0.025})
    ref = LoopReference(small_settings())
    assert ref.ideal_null_depth() == 0.025 and ref.ideal_sections().shape == (3, 2, 2)
    assert ref.ideal_null_depth() == 0.025 and len(calls) == 1
