"""SLM backends: the Qt window (offscreen pixel grab), the slmPy adapter, the simulated SLM."""
from __future__ import annotations

import os
import sys
import threading
import types

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from autoalign.settings import load_settings  # noqa: E402
from autoalign.hardware.base import DeviceError, DeviceNotConnected, SLMInputError  # noqa: E402
from autoalign.hardware.slm import PhaseToGrey, QtSLMWindow, SlmPyAdapter  # noqa: E402
from autoalign.simulation.phase import total_phase  # noqa: E402


def small_settings(**extra):
    over = {"slm.width_px": 64, "slm.height_px": 48, "slm.pupil_centre_px": [32.0, 24.0],
            "slm.pupil_radius_px": 20.0, "slm.monitor": 0}
    over.update(extra)
    return load_settings().replace(**over)


# ---------------------------------------------------------------------------- Qt window
def test_qt_window_shows_the_grey_image_pixel_for_pixel(qtbot):
    s = small_settings(**{"slm.backend": "qt"})
    slm = QtSLMWindow.from_settings(s, force=True)  # offscreen: the only screen is the primary one
    with slm:
        qtbot.addWidget(slm.widget)
        phase = total_phase(s, 40, coefficients={5: 0.7, 8: -0.4})
        slm.show(phase)
        want = PhaseToGrey.from_settings(s).encode(phase)
        got = slm.grab_image()
        assert got.shape == (48, 64)
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(slm.grey_image, want)
        # a bad phase is refused and the window keeps the last good image
        with pytest.raises(SLMInputError):
            slm.show(np.full((40, 40), np.nan))
        np.testing.assert_array_equal(slm.grab_image(), want)
        np.testing.assert_array_equal(slm.phase_rad, phase)
    assert slm.widget is None and not slm.is_open


def test_qt_window_hand_image_and_worker_thread(qtbot):
    # 8 x 6 SLM (the geometry of test_slm_convert): grid a,b/c,d -> 64, 191 / 4, 122 by hand
    s = load_settings().replace(**{"slm.width_px": 8, "slm.height_px": 6, "slm.pupil_centre_px": [4.0, 3.0],
                                   "slm.pupil_radius_px": 2.0, "slm.monitor": 0, "slm.pupil_margin": 0.0})
    slm = QtSLMWindow.from_settings(s, force=True)
    slm.open()
    try:
        grid = np.array([[np.pi / 2, -np.pi / 2], [2 * np.pi + 0.1, 3.0]])
        done = threading.Event()
        errors = []

        def worker():  # the GUI's worker thread owns the devices
            try:
                slm.show(grid)
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)
            done.set()

        threading.Thread(target=worker).start()
        qtbot.waitUntil(done.is_set, timeout=5000)
        assert not errors
        got = slm.grab_image()
        np.testing.assert_array_equal(got[1:5, 2:6], [[0, 64, 191, 0], [64, 64, 191, 191],
                                                       [4, 4, 122, 122], [0, 4, 122, 0]])
        assert got[0].max() == 0 and got[5].max() == 0
    finally:
        slm.close()


def test_qt_window_refuses_the_gui_screen_and_unknown_screens(qapp):
    s = small_settings()
    with pytest.raises(DeviceError, match="refusing to cover"):
        QtSLMWindow.from_settings(s).open()
    with pytest.raises(DeviceNotConnected, match="slm.monitor = 7: no such screen"):
        QtSLMWindow.from_settings(small_settings(**{"slm.monitor": 7}), force=True).open()


# ---------------------------------------------------------------------------- slmPy
def test_slmpy_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "slmpy", None)  # import slmpy -> ImportError
    with pytest.raises(DeviceNotConnected, match="wavefrontshaping"):
        SlmPyAdapter.from_settings(small_settings()).open()


def test_slmpy_wrong_package_is_named(monkeypatch):
    fake = types.ModuleType("slmpy")  # e.g. PyPI's unrelated 'slmpy'
    fake.__file__ = "/site-packages/slmpy/__init__.py"
    monkeypatch.setitem(sys.modules, "slmpy", fake)
    with pytest.raises(DeviceNotConnected, match="no SLMdisplay class.*not slmPy"):
        SlmPyAdapter.from_settings(small_settings()).open()


class _FakeDisplay:
    instances: list = []
    size = (64, 48)

    def __init__(self, monitor=1, isImageLock=False):  # noqa: N803 - slmPy's signature
        self.monitor, self.lock, self.frames, self.closed = monitor, isImageLock, [], False
        _FakeDisplay.instances.append(self)

    def getSize(self):  # noqa: N802
        return self.size

    def updateArray(self, array):  # noqa: N802
        assert array.dtype == np.uint8 and array.ndim == 2
        self.frames.append(array.copy())

    def close(self):
        self.closed = True


def test_slmpy_adapter_sends_grey_frames(monkeypatch):
    fake = types.ModuleType("slmpy")
    fake.SLMdisplay = _FakeDisplay
    monkeypatch.setitem(sys.modules, "slmpy", fake)
    s = small_settings(**{"slm.monitor": 2})
    with SlmPyAdapter.from_settings(s) as slm:
        disp = _FakeDisplay.instances[-1]
        assert disp.monitor == 2 and disp.lock
        phase = total_phase(s, 40)
        slm.show(phase)
        np.testing.assert_array_equal(disp.frames[-1], PhaseToGrey.from_settings(s).encode(phase))
        n = len(disp.frames)
        with pytest.raises(SLMInputError):
            slm.show(np.zeros((3, 4)))
        assert len(disp.frames) == n
    assert disp.closed
    _FakeDisplay.size = (800, 600)
    try:
        with pytest.raises(DeviceError, match="800 x 600"):
            SlmPyAdapter.from_settings(s).open()
    finally:
        _FakeDisplay.size = (64, 48)
