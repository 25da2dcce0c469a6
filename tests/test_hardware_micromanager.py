"""Micro-Manager backend: the REAL core with the demo adapters of mm-test-adapters (Python backend),
plus error mapping and image reshaping with a stand-in core.

One headless core per process: a module-scoped connection is opened once and stopped at the end
(``pycromanager.stop_headless``), including when a test fails."""
from __future__ import annotations

import numpy as np
import pytest

from autoalign.settings import load_settings
from autoalign.hardware.acquisition import acquire_stack
from autoalign.hardware.base import DeviceError, DeviceNotConnected, DeviceTimeout, StageLimitError
from autoalign.hardware.micromanager import (MicroManagerCamera, MicroManagerConnection, MicroManagerFocusStage,
                                   MicroManagerXYStage, frame_to_2d, resolve_python_backend_paths, stop_all)


def mm_settings(**extra):
    over = {"hardware.backend": "micromanager", "hardware.micromanager.python_backend": True}
    over.update(extra)
    return load_settings().replace(**over)


@pytest.fixture(scope="module")
def mm():
    pytest.importorskip("mm_test_adapters")
    pytest.importorskip("pycromanager")
    s = mm_settings()
    conn = MicroManagerConnection(s)
    devices = [MicroManagerCamera(s, conn), MicroManagerFocusStage(s, conn), MicroManagerXYStage(s, conn)]
    try:
        for d in devices:
            d.open()
        yield s, conn, devices
    finally:
        for d in devices:
            d.close()
        stop_all()
    from mmpycorex import launcher

    assert not launcher.is_pymmcore_active()  # the headless core is gone


@pytest.mark.micromanager
def test_demo_snap_and_pixel_size(mm):
    s, conn, (cam, focus, xy) = mm
    assert cam.label == "Camera" and focus.label == "Z" and xy.label == "XY"
    assert cam.pixel_size_um == pytest.approx(conn.core.get_pixel_size_um()) and cam.pixel_size_um > 0
    assert cam.full_shape == (512, 512)
    frame = cam.snap()
    assert frame.shape == cam.shape == (s.camera.roi_px, s.camera.roi_px) and frame.dtype == np.float64
    assert np.all(np.isfinite(frame)) and frame.std() > 0
    assert cam.saturation_adu == 2**16 - 1
    full = cam.snap_full()
    assert full.shape == (512, 512)


@pytest.mark.micromanager
def test_demo_stage_moves_and_limits(mm):
    s, conn, (cam, focus, xy) = mm
    focus.move_to(focus.origin_um + 7.5)
    assert focus.position_um == pytest.approx(focus.origin_um + 7.5, abs=1e-6)
    x0, y0 = xy.origin_um
    xy.move_to(x0 + 10.0, y0 - 5.0)
    x, y = xy.position_um
    assert (x, y) == pytest.approx((x0 + 10.0, y0 - 5.0), abs=0.02)  # demo stage steps
    with pytest.raises(StageLimitError, match="stage.xy_travel_um"):
        xy.move_to(x0 + s.stage.xy_travel_um + 1, y0)
    with pytest.raises(StageLimitError, match="stage.z_travel_um"):
        focus.move_to(focus.origin_um - s.stage.z_travel_um - 1)
    focus.move_to(focus.origin_um)
    xy.move_to(x0, y0)


@pytest.mark.micromanager
def test_demo_z_stack_returns_focus(mm):
    s, conn, (cam, focus, xy) = mm
    small = s.replace(**{"camera.roi_px": 16, "stack.planes": 16, "model.binning": 1})
    start = focus.origin_um + 2.0
    focus.move_to(start)
    stack = acquire_stack(cam, focus, small, xy=xy)
    assert stack.data.shape == (16, s.camera.roi_px, s.camera.roi_px)  # the camera's own ROI
    np.testing.assert_allclose(stack.z_positions_um, start + (np.arange(16) - 8) * small.stack.z_step_um)
    assert stack.pixel_size_um == cam.pixel_size_um
    assert focus.position_um == pytest.approx(start, abs=1e-6)
    assert stack.xy_position_um == pytest.approx(xy.position_um)


@pytest.mark.micromanager
def test_demo_unknown_device_label_is_named(mm):
    s, conn, _ = mm
    cam = MicroManagerCamera(mm_settings(**{"hardware.micromanager.camera_device": "NoSuchCamera"}), conn)
    with pytest.raises(DeviceNotConnected, match="camera_device = 'NoSuchCamera' is not a loaded device"):
        cam.open()


@pytest.mark.micromanager
def test_factory_with_micromanager_and_qt_slm(mm, qapp):
    from autoalign.hardware.factory import open_devices

    s = mm_settings(**{"slm.backend": "qt", "slm.width_px": 64, "slm.height_px": 48,
                       "slm.pupil_centre_px": [32.0, 24.0], "slm.pupil_radius_px": 20.0, "slm.monitor": 0})
    with open_devices(s, force_slm=True) as dev:
        assert dev.microscope is None
        assert dev.camera.snap().shape == (64, 64)
        dev.slm.show(np.zeros((8, 8)))
    assert not dev.camera.is_open and not dev.slm.is_open


def test_missing_config_and_folder_are_named(tmp_path):
    pytest.importorskip("mm_test_adapters")
    s = mm_settings(**{"hardware.micromanager.config_file": str(tmp_path / "nope.cfg")})
    with pytest.raises(DeviceNotConnected, match=r"config_file = '.*nope.cfg': config file not found"):
        resolve_python_backend_paths(s.hardware.micromanager)
    with pytest.raises(DeviceNotConnected, match="config file not found"):
        MicroManagerCamera(s).open()
    s = mm_settings(**{"hardware.micromanager.install_dir": str(tmp_path / "mm")})
    with pytest.raises(DeviceNotConnected, match="install_dir = .*no such folder"):
        MicroManagerCamera(s).open()
    # a folder without the demo config and no config given
    s = mm_settings(**{"hardware.micromanager.install_dir": str(tmp_path)})
    with pytest.raises(DeviceNotConnected, match="demo configuration"):
        MicroManagerCamera(s).open()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_java_bridge_not_running_is_clear():
    pytest.importorskip("pycromanager")
    s = mm_settings(**{"hardware.micromanager.python_backend": False, "hardware.micromanager.port": 45931,
                       "hardware.micromanager.timeout_ms": 200})
    with pytest.raises(DeviceNotConnected, match="Java bridge, port 45931.*server enabled on port 45931"):
        MicroManagerCamera(s).open()


# ---------------------------------------------------------------------------- stand-in core
class FakeCore:
    """Just enough of the core API; ``fail`` maps a method name to the exception it raises."""

    def __init__(self, image=None, components=1, bpp=2):
        self.fail: dict[str, Exception] = {}
        self.image = np.arange(100 * 80, dtype=np.uint16).reshape(80, 100) if image is None else image
        self.components, self.bpp = components, bpp
        self.z, self.timeout = 0.0, 5000

    def __getattribute__(self, name):
        fail = object.__getattribute__(self, "fail")
        if name in fail:
            def boom(*a):
                raise fail[name]
            return boom
        return object.__getattribute__(self, name)

    def get_loaded_devices(self): return ("Cam", "Z", "Core")
    def get_camera_device(self): return "Cam"
    def set_camera_device(self, label): pass
    def set_exposure(self, ms): pass
    def get_image_width(self): return 100
    def get_image_height(self): return 80
    def get_image_bit_depth(self): return 12
    def get_pixel_size_um(self): return 0.0  # uncalibrated
    def snap_image(self): pass
    def get_image(self): return self.image
    def get_number_of_components(self): return self.components
    def get_bytes_per_pixel(self): return self.bpp
    def get_focus_device(self): return "Z"
    def get_xy_stage_device(self): return ""
    def get_position(self, label): return self.z
    def set_position(self, label, z): self.z = z
    def wait_for_device(self, label): pass
    def get_timeout_ms(self): return self.timeout
    def set_timeout_ms(self, ms): self.timeout = ms


def test_errors_are_mapped_with_device_names():
    s = mm_settings(**{"camera.roi_px": 32, "stack.planes": 32, "model.binning": 1})
    core = FakeCore()
    conn = MicroManagerConnection.from_core(core)
    cam, focus = MicroManagerCamera(s, conn), MicroManagerFocusStage(s, conn)
    cam.open()
    focus.open()
    assert cam.pixel_size_um == s.camera.pixel_size_um  # fallback when the core has no calibration
    assert cam.saturation_adu == 4095
    frame = cam.snap()
    # centred crop of the 80 x 100 frame: rows 24..55, columns 34..65
    np.testing.assert_array_equal(frame, core.image[24:56, 34:66])
    core.fail["wait_for_device"] = RuntimeError('Wait for device "Z" timed out after 5000ms')
    with pytest.raises(DeviceTimeout, match=r"Micro-Manager focus \(Z\).*did not settle"):
        focus.move_to(1.0)
    assert core.timeout == 5000  # restored
    core.fail.clear()
    core.fail["snap_image"] = RuntimeError('No device with label "Cam"')
    with pytest.raises(DeviceNotConnected, match=r"Micro-Manager camera \(Cam\): snap: device or connection lost"):
        cam.snap()
    core.fail["snap_image"] = RuntimeError("Camera error 42")
    with pytest.raises(DeviceError, match="Camera error 42"):
        cam.snap()
    core.fail.clear()
    core.image = np.zeros(7)
    with pytest.raises(DeviceError, match="does not fit 80 x 100"):
        cam.snap()
    cam.close()
    focus.close()


def test_no_camera_in_configuration():
    core = FakeCore()
    core.get_camera_device = lambda: ""  # type: ignore[method-assign]  # Core-Camera not set
    conn = MicroManagerConnection.from_core(core)
    with pytest.raises(DeviceNotConnected, match="sets no camera.*camera_device is null"):
        MicroManagerCamera(mm_settings(), conn).open()


def test_frame_to_2d_variants():
    img = np.arange(12, dtype=np.uint16).reshape(3, 4)
    np.testing.assert_array_equal(frame_to_2d(img.ravel(), 3, 4), img)  # 1-D buffer (Java bridge)
    np.testing.assert_array_equal(frame_to_2d(img.astype(">i2").ravel(), 3, 4), img)  # Java short[]
    neg = np.array([-1, 0, 1, 2], dtype=np.int16)  # 65535 read as -1 by Java
    np.testing.assert_array_equal(frame_to_2d(neg, 2, 2), [[65535, 0], [1, 2]])
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 30, 60, 90, 255  # B, G, R, A
    packed = rgba.view(np.uint32).reshape(3, 4)
    np.testing.assert_array_equal(frame_to_2d(packed, 3, 4, components=4), np.full((3, 4), 60.0))
    np.testing.assert_array_equal(frame_to_2d(rgba.ravel(), 3, 4, components=4), np.full((3, 4), 60.0))
    np.testing.assert_array_equal(frame_to_2d(img.view(np.uint8).ravel(), 3, 4, 1, 2), img)  # raw bytes
    with pytest.raises(ValueError, match="does not fit"):
        frame_to_2d(np.zeros(5), 3, 4)
