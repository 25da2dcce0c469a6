"""Simulated devices against the hardware.base interfaces; stack acquisition; the factory."""
from __future__ import annotations

import math
import time

import numpy as np
import pytest

from autoalign.settings import load_settings
from autoalign.hardware.acquisition import acquire_stack, stack_positions
from autoalign.hardware.base import (SLM, Camera, DeviceNotConnected, DeviceTimeout, FocusStage,
                           SLMInputError, Stack, StageLimitError, XYStage)
from autoalign.hardware.factory import Devices, open_devices
from autoalign.hardware.simulated import SimulatedCamera, SimulatedFocusStage
from autoalign.simulation.phase import total_phase


@pytest.fixture(scope="module")
def settings():
    return load_settings()


@pytest.fixture
def dev(settings):
    with open_devices(settings, noise=False, aberration={}) as d:
        yield d


def test_devices_implement_the_interfaces(dev):
    assert isinstance(dev, Devices)
    assert isinstance(dev.camera, Camera) and isinstance(dev.focus, FocusStage)
    assert isinstance(dev.xy, XYStage) and isinstance(dev.slm, SLM)
    assert all(d.is_open for d in dev.all())
    frame = dev.camera.snap()
    assert frame.shape == dev.camera.shape == (64, 64) and frame.dtype == np.float64
    assert dev.camera.pixel_size_um == 0.04 and dev.camera.saturation_adu == 2**16 - 1
    assert dev.slm.shape == (1152, 1920) and dev.slm.pixel_pitch_um == 9.2
    dev.xy.move_to(1.5, -2.0)
    dev.xy.wait_until_settled()
    assert dev.xy.position_um == (1.5, -2.0) == dev.microscope.stage_xy_um
    dev.focus.move_to(0.3)
    assert dev.focus.position_um == 0.3


def test_closed_devices_refuse(settings):
    d = open_devices(settings)
    d.close()
    d.close()  # idempotent
    assert not any(x.is_open for x in d.all())
    with pytest.raises(DeviceNotConnected, match="simulated camera: device is not open"):
        d.camera.snap()
    with pytest.raises(DeviceNotConnected):
        d.slm.show(np.zeros((4, 4)))


def test_stage_limits(dev, settings):
    travel = settings.stage.xy_travel_um
    with pytest.raises(StageLimitError, match=r"x = 100.5 µm is outside.*stage.xy_travel_um"):
        dev.xy.move_to(travel + 0.5, 0.0)
    with pytest.raises(StageLimitError, match="not a finite number"):
        dev.xy.move_to(0.0, math.nan)
    with pytest.raises(StageLimitError, match="stage.z_travel_um"):
        dev.focus.move_to(-settings.stage.z_travel_um - 1)
    assert dev.xy.position_um == (0.0, 0.0) and dev.focus.position_um == 0.0


def test_slm_refuses_bad_phases_and_keeps_last_image(dev, settings):
    good = total_phase(settings, 64, coefficients={6: 0.3})
    dev.slm.show(good)
    grey = dev.slm.grey_image
    seen = dev.microscope.slm_image
    for bad in (np.full((64, 64), np.nan), np.zeros((64, 63)), np.zeros((2, 8, 8)), np.full((8, 8), 1e5)):
        with pytest.raises(SLMInputError):
            dev.slm.show(bad)
    np.testing.assert_array_equal(dev.slm.grey_image, grey)
    np.testing.assert_array_equal(dev.microscope.slm_image, seen)
    np.testing.assert_array_equal(dev.slm.phase_rad, good)


def test_stack_acquisition_returns_focus(dev, settings):
    dev.focus.move_to(1.25)
    dev.xy.move_to(0.5, 0.25)
    stack = acquire_stack(dev.camera, dev.focus, settings)
    assert isinstance(stack, Stack)
    assert stack.data.shape == (64, 64, 64)
    np.testing.assert_allclose(stack.z_positions_um, 1.25 + (np.arange(64) - 32) * 0.04)
    assert stack.z_step_um == 0.04 and stack.pixel_size_um == 0.04
    assert stack.xy_position_um == (0.5, 0.25)
    assert dev.focus.position_um == 1.25


def test_generic_per_snap_path_matches_batched_path(dev, settings):
    class PlainCamera(SimulatedCamera):
        acquire_z_series = None  # no fast path: acquire_stack moves and snaps plane by plane

    visited = []

    class RecordingFocus(SimulatedFocusStage):
        def move_to(self, z_um):
            visited.append(z_um)
            super().move_to(z_um)

    s = settings.replace(**{"camera.roi_px": 16, "stack.planes": 16})
    from autoalign.simulation.microscope import SimulatedMicroscope

    mic = SimulatedMicroscope(s, noise=False, aberration={7: 0.3}, bead_um=(0.05, 0.0, 0.1))
    cam, focus = PlainCamera(mic), RecordingFocus(mic)
    with cam, focus:
        focus.move_to(0.2)
        visited.clear()
        slow = acquire_stack(cam, focus, s)
        moves = list(visited)
        fast = acquire_stack(SimulatedCamera(mic).__enter__(), focus, s)
    np.testing.assert_allclose(moves, list(stack_positions(0.2, 16, 0.04)) + [0.2])
    np.testing.assert_allclose(slow.data, fast.data, rtol=1e-4, atol=1e-3)


def test_stack_refused_beyond_travel_before_moving(settings):
    s = settings.replace(**{"stage.z_travel_um": 1.0})
    with open_devices(s) as d:
        d.focus.move_to(0.5)
        with pytest.raises(StageLimitError):
            acquire_stack(d.camera, d.focus, s)
        assert d.focus.position_um == 0.5


def test_disconnect_mid_stack_returns_focus_and_keeps_slm(dev, settings):
    dev.focus.move_to(0.4)
    dev.slm.show(total_phase(settings, 32))
    grey = dev.slm.grey_image
    dev.camera.fail_after(10)  # the 11th frame fails: in the middle of the stack
    with pytest.raises(DeviceNotConnected, match="connection lost"):
        acquire_stack(dev.camera, dev.focus, settings)
    assert dev.focus.position_um == 0.4
    with pytest.raises(DeviceNotConnected):
        dev.camera.snap()  # stays lost
    dev.slm.fail_after(0)
    with pytest.raises(DeviceNotConnected):
        dev.slm.show(total_phase(settings, 32, coefficients={5: 1.0}))
    np.testing.assert_array_equal(dev.slm.grey_image, grey)
    dev.xy.fail_after(0, error=DeviceTimeout)
    with pytest.raises(DeviceTimeout):
        dev.xy.move_to(1.0, 1.0)
    dev.camera.close()
    dev.camera.open()  # reconnecting clears the fault
    assert dev.camera.snap().shape == (64, 64)


def test_stack_is_fast(dev, settings):
    best = min(_timed(lambda: acquire_stack(dev.camera, dev.focus, settings)) for _ in range(3))
    assert best < 0.5, f"a 64-plane simulated stack took {best:.3f} s"


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def test_factory_backends(settings):
    # Micro-Manager hardware with slm.backend 'simulated': the wiring demo's in-memory SLM (no microscope)
    from autoalign.hardware.factory import make_slm

    demo_slm = make_slm(settings.replace(**{"hardware.backend": "micromanager"}), None)
    assert "wiring-demo" in demo_slm.name and demo_slm.shape == (settings.slm.height_px, settings.slm.width_px)
    # simulated hardware with another SLM backend: the SLM opens, the microscope is still there
    import sys
    import types

    fake = types.ModuleType("slmpy")

    class Display:
        def __init__(self, monitor=1, isImageLock=False):  # noqa: N803
            pass

        def getSize(self):  # noqa: N802
            return (1920, 1152)

        def updateArray(self, a):  # noqa: N802
            pass

        def close(self):
            pass

    fake.SLMdisplay = Display
    sys.modules["slmpy"] = fake
    try:
        with open_devices(settings.replace(**{"slm.backend": "slmpy"})) as d:
            assert d.microscope is not None and type(d.slm).__name__ == "SlmPyAdapter"
    finally:
        del sys.modules["slmpy"]
