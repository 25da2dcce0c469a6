"""Camera, focus and XY stage through Micro-Manager's core (pycromanager).

Two ways to reach the core (``settings.hardware.micromanager``):

* Python backend (``python_backend: true``): ``pycromanager.start_headless(install_dir,
  config_file, python_backend=True)`` runs pymmcore in this process. With ``install_dir: null``
  the device adapters of PyPI's ``mm-test-adapters`` are used (``mm_test_adapters.
  device_adapter_path()``), and with ``config_file: null`` the ``MMConfig_demo.cfg`` in that
  folder. Only one headless core can live in a process: it is shared (reference counted) by all
  devices and stopped (``pycromanager.stop_headless``) when the last one closes.
* Java bridge (``python_backend: false``): Micro-Manager is running with its ZMQ server enabled;
  ``Core(port=..., timeout=...)`` connects to it.

Devices: :class:`MicroManagerCamera` (snap, centred ``camera.roi_px`` crop, image size, bit depth and
pixel size read from the core), :class:`MicroManagerFocusStage`, :class:`MicroManagerXYStage`
(moves wait for the device; travel limits of ``settings.stage`` around the position at open).
Device labels default to the core's current camera / focus / XY stage. Every failure is raised
as a :mod:`hardware.base` error naming the device: :class:`DeviceNotConnected` (no config, no such
device, lost connection), :class:`DeviceTimeout` (no answer or no settle in time),
:class:`StageLimitError`, :class:`DeviceError` (anything else).
"""
from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from autoalign.hardware.base import (
    Camera,
    DeviceError,
    DeviceNotConnected,
    DeviceTimeout,
    FocusStage,
    StageLimitError,
    XYStage,
)
from autoalign.settings import MicroManagerSettings, Settings

log = logging.getLogger(__name__)

__all__ = [
    "MicroManagerConnection",
    "MicroManagerCamera",
    "MicroManagerFocusStage",
    "MicroManagerXYStage",
    "resolve_python_backend_paths",
    "frame_to_2d",
    "stop_all",
]

_TIMEOUT_WORDS = ("timed out", "timeout", "time out", "wait for device")
_LOST_WORDS = ("no device with label", "not loaded", "socket", "connection", "closed", "not connected",
               "unloaded", "null pointer", "nullpointer", "bridge")


def _map_error(exc: BaseException, where: str) -> DeviceError:
    """A core exception as the project's error type, naming the device and operation."""
    if isinstance(exc, DeviceError):
        return exc
    text = f"{type(exc).__name__}: {exc}".strip()
    low = text.lower()
    if any(w in low for w in _TIMEOUT_WORDS):
        return DeviceTimeout(f"{where}: timed out ({text})")
    if any(w in low for w in _LOST_WORDS):
        return DeviceNotConnected(f"{where}: device or connection lost ({text})")
    return DeviceError(f"{where}: {text}")


def _strings(seq: Any) -> list[str]:
    """A Micro-Manager string vector (tuple from pymmcore, StrVector from Java) as a list."""
    if seq is None:
        return []
    if hasattr(seq, "size") and hasattr(seq, "get") and not isinstance(seq, (list, tuple)):
        return [str(seq.get(i)) for i in range(int(seq.size()))]
    return [str(s) for s in seq]


# ============================================================================ the connection
def resolve_python_backend_paths(mm: "MicroManagerSettings", base_dir: str | Path | None = None) -> tuple[Path, Path]:
    """The Micro-Manager folder and config file for the Python backend (see module docstring).

    Raises :class:`DeviceNotConnected` naming the settings key and path when one is missing."""
    if mm.install_dir:
        folder = Path(mm.install_dir).expanduser()
        if not folder.is_absolute() and base_dir is not None:
            folder = Path(base_dir) / folder
        key = "hardware.micromanager.install_dir"
        if not folder.is_dir():
            raise DeviceNotConnected(f"Micro-Manager: {key} = '{mm.install_dir}': no such folder ({folder})")
    else:
        try:
            import mm_test_adapters
        except ImportError as exc:
            raise DeviceNotConnected(
                "Micro-Manager: hardware.micromanager.install_dir is null and mm-test-adapters is not "
                "installed; set install_dir to a Micro-Manager folder or `pip install mm-test-adapters`"
            ) from exc
        folder = Path(mm_test_adapters.device_adapter_path())
    if mm.config_file:
        cfg = Path(mm.config_file).expanduser()
        if not cfg.is_absolute():
            candidates = ([Path(base_dir) / cfg] if base_dir is not None else []) + [Path.cwd() / cfg, folder / cfg]
            cfg = next((c for c in candidates if c.is_file()), candidates[0])
        key = f"hardware.micromanager.config_file = '{mm.config_file}'"
    else:
        cfg = folder / "MMConfig_demo.cfg"
        key = "hardware.micromanager.config_file = null (the demo configuration)"
    if not cfg.is_file():
        raise DeviceNotConnected(f"Micro-Manager: {key}: config file not found ({cfg})")
    return folder.resolve(), cfg.resolve()


class _Registry:
    """Process-wide bookkeeping: one headless Python core (reference counted), Java bridges per port."""

    lock = threading.RLock()
    python_core: Any = None
    python_key: tuple[str, str] | None = None
    python_refs = 0
    python_started_here = False
    java: dict[int, list[Any]] = {}  # port -> [core, refs]


class MicroManagerConnection:
    """A reference to the Micro-Manager core shared by the devices (``acquire``/``release``).

    ``MicroManagerConnection(settings)`` connects as ``settings.hardware.micromanager`` says on the
    first :meth:`acquire`; ``MicroManagerConnection.from_core(core)`` wraps an existing core object
    (a pycromanager ``Core`` or a test double) without owning it."""

    def __init__(self, settings: "Settings | None" = None) -> None:
        self.settings = settings
        self._core: Any = None
        self._refs = 0
        self._kind: str | None = None  # "python", "java" or "external"
        self._port: int | None = None
        self.description = "Micro-Manager"

    @classmethod
    def from_core(cls, core: Any, description: str = "Micro-Manager (external core)") -> "MicroManagerConnection":
        conn = cls(None)
        conn._core = core
        conn._kind = "external"
        conn.description = description
        return conn

    @property
    def core(self) -> Any:
        if self._core is None:
            raise DeviceNotConnected(f"{self.description}: not connected")
        return self._core

    @property
    def timeout_ms(self) -> int:
        return int(self.settings.hardware.micromanager.timeout_ms) if self.settings is not None else 5000

    def acquire(self) -> Any:
        """Connect if needed and count a user; returns the core."""
        if self._kind == "external":
            self._refs += 1
            return self._core
        if self._refs == 0:
            self._connect()
        self._refs += 1
        return self._core

    def release(self) -> None:
        """Count a user gone; the last one disconnects (stops a headless core started here)."""
        if self._refs == 0:
            return
        self._refs -= 1
        if self._refs == 0 and self._kind != "external":
            self._disconnect()

    # ------------------------------------------------------------------ internals
    def _connect(self) -> None:
        if self.settings is None:
            raise DeviceNotConnected("Micro-Manager: no settings to connect with")
        mm = self.settings.hardware.micromanager
        if mm.python_backend:
            self._connect_python(mm)
        else:
            self._connect_java(mm)
        try:
            self._core.set_timeout_ms(int(mm.timeout_ms))
        except Exception as exc:  # noqa: BLE001
            self._disconnect()
            raise _map_error(exc, self.description) from exc

    def _connect_python(self, mm: "MicroManagerSettings") -> None:
        source = getattr(self.settings, "source", None)
        base_dir = Path(source).resolve().parent if source and not str(source).startswith("<") else None
        folder, cfg = resolve_python_backend_paths(mm, base_dir)
        key = (str(folder), str(cfg))
        self.description = f"Micro-Manager (Python backend, {cfg.name})"
        try:
            import pycromanager
            from mmpycorex import launcher
        except ImportError as exc:
            raise DeviceNotConnected(f"{self.description}: pycromanager is not installed ({exc})") from exc
        with _Registry.lock:
            if _Registry.python_refs > 0:
                if _Registry.python_key != key:
                    raise DeviceError(
                        f"{self.description}: a headless Micro-Manager core is already running in this "
                        f"process with {_Registry.python_key[1]}; only one can run at a time"
                    )
            elif launcher.is_pymmcore_active():
                log.warning("reusing a headless Micro-Manager core started elsewhere in this process")
                _Registry.python_core = pycromanager.Core()
                _Registry.python_key = key
                _Registry.python_started_here = False
            else:
                log.info("starting headless Micro-Manager: %s, %s", folder, cfg)
                try:
                    pycromanager.start_headless(str(folder), str(cfg), python_backend=True)
                    core = pycromanager.Core()
                except Exception as exc:  # noqa: BLE001
                    try:
                        pycromanager.stop_headless()
                    except Exception:  # noqa: BLE001
                        pass
                    raise DeviceNotConnected(
                        f"{self.description}: could not start the core with {cfg} "
                        f"(adapters in {folder}): {type(exc).__name__}: {exc}"
                    ) from exc
                _Registry.python_core = core
                _Registry.python_key = key
                _Registry.python_started_here = True
            _Registry.python_refs += 1
            self._core = _Registry.python_core
            self._kind = "python"

    def _connect_java(self, mm: "MicroManagerSettings") -> None:
        port = int(mm.port)
        self.description = f"Micro-Manager (Java bridge, port {port})"
        with _Registry.lock:
            entry = _Registry.java.get(port)
            if entry is None:
                try:
                    from mmpycorex import launcher
                    from pycromanager import Core

                    if launcher.is_pymmcore_active():
                        # pycromanager's Core() returns the in-process Python core when one runs;
                        # ask for the remote (Java) core explicitly.
                        from mmpycorex.core import ZMQRemoteMMCoreJ as Core  # noqa: N813
                    core = Core(port=port, timeout=int(mm.timeout_ms))
                except ImportError as exc:
                    raise DeviceNotConnected(f"{self.description}: pycromanager is not installed ({exc})") from exc
                except Exception as exc:  # noqa: BLE001
                    raise DeviceNotConnected(
                        f"{self.description}: cannot connect ({type(exc).__name__}: {exc}). Is Micro-Manager "
                        f"running with its server enabled on port {port} (Tools > Options > Run server on "
                        "port)? Or set hardware.micromanager.python_backend: true."
                    ) from exc
                entry = _Registry.java[port] = [core, 0]
            entry[1] += 1
            self._core = entry[0]
            self._kind = "java"
            self._port = port

    def _disconnect(self) -> None:
        kind, self._kind = self._kind, None
        self._core = None
        with _Registry.lock:
            if kind == "python":
                _Registry.python_refs = max(0, _Registry.python_refs - 1)
                if _Registry.python_refs == 0:
                    started = _Registry.python_started_here
                    _Registry.python_core = None
                    _Registry.python_key = None
                    _Registry.python_started_here = False
                    if started:
                        _stop_headless()
            elif kind == "java" and self._port in _Registry.java:
                entry = _Registry.java[self._port]
                entry[1] -= 1
                if entry[1] <= 0:
                    del _Registry.java[self._port]
                    closer = getattr(entry[0], "_close", None)
                    if callable(closer):
                        try:
                            closer()
                        except Exception:  # noqa: BLE001
                            log.debug("closing the Java bridge failed", exc_info=True)


def _stop_headless() -> None:
    try:
        import pycromanager

        pycromanager.stop_headless()
        log.info("headless Micro-Manager stopped")
    except Exception:  # noqa: BLE001 - shutting down must not raise
        log.warning("stopping the headless Micro-Manager core failed", exc_info=True)


def stop_all() -> None:
    """Stop the headless core started here even if devices still hold it (end of a test session)."""
    with _Registry.lock:
        if _Registry.python_refs and _Registry.python_started_here:
            _stop_headless()
        _Registry.python_core = None
        _Registry.python_key = None
        _Registry.python_refs = 0
        _Registry.python_started_here = False


# ============================================================================ images
def frame_to_2d(image: Any, height: int, width: int, components: int = 1, bytes_per_pixel: int | None = None) -> np.ndarray:
    """A Micro-Manager image as a float64 (height, width) array.

    Accepts 2-D arrays, 1-D buffers (Java bridge), signed Java integer types (read as unsigned),
    RGB(A) as (h, w, 3|4), packed 32-bit BGRA words (``components == 4``) or byte buffers; colour
    becomes the mean of R, G and B. Raises ``ValueError`` when the size does not fit."""
    arr = np.asarray(image)
    if arr.dtype.kind == "i":  # Java has no unsigned types: short[] for 16-bit pixels
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("=")).view(f"u{arr.dtype.itemsize}")
    n = height * width
    if components >= 3:
        if arr.dtype.itemsize == 4 and arr.size == n:  # packed BGRA words
            rgba = np.ascontiguousarray(arr).reshape(height, width).view(np.uint8).reshape(height, width, 4)
            return rgba[..., :3].astype(float).mean(axis=-1)
        if arr.size == n * 4:
            return arr.reshape(height, width, 4)[..., :3].astype(float).mean(axis=-1)
        if arr.size == n * 3:
            return arr.reshape(height, width, 3).astype(float).mean(axis=-1)
    if arr.ndim == 3 and arr.shape[:2] == (height, width) and arr.shape[2] in (3, 4):
        return arr[..., :3].astype(float).mean(axis=-1)
    if arr.size == n:
        return arr.reshape(height, width).astype(float)
    if bytes_per_pixel and arr.dtype == np.uint8 and arr.size == n * bytes_per_pixel:
        dtype = {2: np.uint16, 4: np.uint32}.get(int(bytes_per_pixel))
        if dtype is not None:
            return np.ascontiguousarray(arr).view(dtype).reshape(height, width).astype(float)
    raise ValueError(
        f"image with {arr.size} values of {arr.dtype} (shape {arr.shape}) does not fit {height} x {width} "
        f"x {components} component(s)"
    )


# ============================================================================ devices
class _MMDevice:
    """Shared part: the connection, the device label and calls that map errors."""

    name: str
    _role = "device"
    _label_key = ""

    def _setup(self, settings: "Settings", connection: MicroManagerConnection | None) -> None:
        self.settings = settings
        self.connection = connection if connection is not None else MicroManagerConnection(settings)
        self.label: str | None = None

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as exc:  # noqa: BLE001
            raise _map_error(exc, f"{self.name} ({self.label or '?'}): {what}") from exc

    @property
    def core(self) -> Any:
        return self.connection.core

    def _resolve_label(self, configured: str | None, current: Callable[[], Any]) -> str:
        core = self.core
        loaded = self._call("list the loaded devices", core.get_loaded_devices)
        loaded = _strings(loaded)
        if configured:
            if configured not in loaded:
                raise DeviceNotConnected(
                    f"{self.name}: hardware.micromanager.{self._label_key} = '{configured}' is not a loaded "
                    f"device in {self.connection.description} (loaded: {', '.join(loaded) or 'none'})"
                )
            return configured
        label = str(self._call(f"ask for the current {self._role}", current) or "")
        if not label:
            raise DeviceNotConnected(
                f"{self.name}: the Micro-Manager configuration sets no {self._role} (Core-{self._role.title()} "
                f"is empty) and hardware.micromanager.{self._label_key} is null; loaded devices: "
                f"{', '.join(loaded) or 'none'}"
            )
        return label

    def _open_connection(self) -> None:
        self.connection.acquire()

    def _close_connection(self) -> None:
        self.connection.release()


class MicroManagerCamera(_MMDevice, Camera):
    """The camera through Micro-Manager: frames cropped to a centred ``settings.camera.roi_px``
    square, float64 ADU; exposure set from ``settings.camera.exposure_ms`` on open; pixel size
    from the core's pixel-size calibration (``settings.camera.pixel_size_um`` when it has none)."""

    _role = "camera"
    _label_key = "camera_device"

    def __init__(self, settings: "Settings", connection: MicroManagerConnection | None = None,
                 name: str = "Micro-Manager camera") -> None:
        Camera.__init__(self, name)
        self._setup(settings, connection)
        self.roi_px = int(settings.camera.roi_px)
        self._pixel_size: float | None = None
        self._bit_depth = 16

    def _open(self) -> None:
        self._open_connection()
        try:
            core = self.core
            self.label = self._resolve_label(self.settings.hardware.micromanager.camera_device,
                                             core.get_camera_device)
            if str(self._call("get the camera", core.get_camera_device)) != self.label:
                self._call("select the camera", core.set_camera_device, self.label)
            self._call("set the exposure", core.set_exposure, float(self.settings.camera.exposure_ms))
            w = int(self._call("read the image width", core.get_image_width))
            h = int(self._call("read the image height", core.get_image_height))
            if w < self.roi_px or h < self.roi_px:
                raise DeviceError(
                    f"{self.name} ({self.label}): the image is {w} x {h} px, smaller than camera.roi_px = "
                    f"{self.roi_px}"
                )
            self._bit_depth = int(self._call("read the bit depth", core.get_image_bit_depth)) or 16
            size = float(self._call("read the pixel size", core.get_pixel_size_um))
            if not (math.isfinite(size) and size > 0):
                size = float(self.settings.camera.pixel_size_um)
                log.warning("%s: Micro-Manager has no pixel-size calibration; using camera.pixel_size_um = %g µm",
                            self.name, size)
            self._pixel_size = size
        except Exception:
            self._close_connection()
            raise

    def _close(self) -> None:
        self._close_connection()

    @property
    def pixel_size_um(self) -> float:
        """Pixel size in sample space (µm), from the core at open."""
        self._require_open()
        return float(self._pixel_size)  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.roi_px, self.roi_px)

    @property
    def full_shape(self) -> tuple[int, int]:
        """(height, width) of the camera's full frame, pixels."""
        self._require_open()
        return (int(self._call("read the image height", self.core.get_image_height)),
                int(self._call("read the image width", self.core.get_image_width)))

    @property
    def saturation_adu(self) -> float:
        return float(2**self._bit_depth - 1)

    @property
    def xy_position_um(self) -> tuple[float, float] | None:
        """The core's XY stage position, when it has one (for stack records)."""
        if not self.is_open:
            return None
        try:
            label = str(self.core.get_xy_stage_device() or "")
            if not label:
                return None
            return (float(self.core.get_x_position(label)), float(self.core.get_y_position(label)))
        except Exception:  # noqa: BLE001 - informative only
            return None

    def snap_full(self) -> np.ndarray:
        """One full frame (height, width) float64 ADU."""
        self._require_open()
        core = self.core
        self._call("snap", core.snap_image)
        img = self._call("read the image", core.get_image)
        h = int(self._call("read the image height", core.get_image_height))
        w = int(self._call("read the image width", core.get_image_width))
        comps = int(self._call("read the number of components", core.get_number_of_components))
        bpp = int(self._call("read the bytes per pixel", core.get_bytes_per_pixel))
        try:
            return frame_to_2d(img, h, w, comps, bpp)
        except ValueError as exc:
            raise DeviceError(f"{self.name} ({self.label}): {exc}") from exc

    def snap(self) -> np.ndarray:
        """One frame cropped to the centred ``roi_px`` square, float64 ADU."""
        full = self.snap_full()
        h, w = full.shape
        n = self.roi_px
        if h < n or w < n:
            raise DeviceError(f"{self.name} ({self.label}): frame {w} x {h} px is smaller than camera.roi_px = {n}")
        y0, x0 = (h - n) // 2, (w - n) // 2
        return np.ascontiguousarray(full[y0 : y0 + n, x0 : x0 + n])


class _MMStage(_MMDevice):
    def wait_until_settled(self, timeout_s: float = 5.0) -> None:
        """Wait for the device (``core.wait_for_device`` with the core timeout set to ``timeout_s``)."""
        self._require_open()  # type: ignore[attr-defined]
        core = self.core
        previous = None
        try:
            previous = int(core.get_timeout_ms())
        except Exception:  # noqa: BLE001
            previous = None
        try:
            self._call("set the timeout", core.set_timeout_ms, max(1, int(round(timeout_s * 1000))))
            try:
                self._call(f"wait for the device (timeout {timeout_s:g} s)", core.wait_for_device, self.label)
            except DeviceError as exc:
                if isinstance(exc, DeviceNotConnected):
                    raise
                raise DeviceTimeout(f"{self.name} ({self.label}): did not settle within {timeout_s:g} s: {exc}") from exc
        finally:
            if previous is not None:
                try:
                    core.set_timeout_ms(previous)
                except Exception:  # noqa: BLE001
                    pass

    @staticmethod
    def _finite(name: str, **values: float) -> None:
        for axis, value in values.items():
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise StageLimitError(f"{name}: {axis} = {value!r} µm is not a finite number; move refused")


class MicroManagerFocusStage(_MMStage, FocusStage):
    """The focus drive through Micro-Manager (µm); travel ``+-stage.z_travel_um`` around the
    position at open; ``move_to`` waits until the device settled (``stage.settle_timeout_s``)."""

    _role = "focus"
    _label_key = "focus_device"

    def __init__(self, settings: "Settings", connection: MicroManagerConnection | None = None,
                 name: str = "Micro-Manager focus") -> None:
        FocusStage.__init__(self, name)
        self._setup(settings, connection)
        self.travel_um = float(settings.stage.z_travel_um)
        self.settle_timeout_s = float(settings.stage.settle_timeout_s)
        self.origin_um = 0.0

    def _open(self) -> None:
        self._open_connection()
        try:
            self.label = self._resolve_label(self.settings.hardware.micromanager.focus_device,
                                             self.core.get_focus_device)
            self.origin_um = float(self._call("read the position", self.core.get_position, self.label))
        except Exception:
            self._close_connection()
            raise

    def _close(self) -> None:
        self._close_connection()

    @property
    def position_um(self) -> float:
        self._require_open()
        return float(self._call("read the position", self.core.get_position, self.label))

    def check_target(self, z_um: float) -> None:
        """Raise :class:`StageLimitError` when ``z_um`` is not finite or beyond the travel."""
        self._finite(self.name, z=z_um)
        if abs(z_um - self.origin_um) > self.travel_um + 1e-9:
            raise StageLimitError(
                f"{self.name} ({self.label}): z = {z_um:g} µm is outside the travel {self.origin_um:g} +- "
                f"{self.travel_um:g} µm (stage.z_travel_um); move refused"
            )

    def move_to(self, z_um: float) -> None:
        self._require_open()
        self.check_target(z_um)
        self._call(f"move to z = {z_um:g} µm", self.core.set_position, self.label, float(z_um))
        self.wait_until_settled(self.settle_timeout_s)


class MicroManagerXYStage(_MMStage, XYStage):
    """The XY stage through Micro-Manager (µm); travel ``+-stage.xy_travel_um`` per axis around the
    position at open; ``move_to`` waits until the device settled."""

    _role = "xy stage"
    _label_key = "xy_device"

    def __init__(self, settings: "Settings", connection: MicroManagerConnection | None = None,
                 name: str = "Micro-Manager XY stage") -> None:
        XYStage.__init__(self, name)
        self._setup(settings, connection)
        self.travel_um = float(settings.stage.xy_travel_um)
        self.settle_timeout_s = float(settings.stage.settle_timeout_s)
        self.origin_um = (0.0, 0.0)

    def _resolve_xy(self) -> str:
        return self._resolve_label(self.settings.hardware.micromanager.xy_device, self.core.get_xy_stage_device)

    def _open(self) -> None:
        self._open_connection()
        try:
            self.label = self._resolve_xy()
            self.origin_um = self._read()
        except Exception:
            self._close_connection()
            raise

    def _close(self) -> None:
        self._close_connection()

    def _read(self) -> tuple[float, float]:
        x = float(self._call("read x", self.core.get_x_position, self.label))
        y = float(self._call("read y", self.core.get_y_position, self.label))
        return (x, y)

    @property
    def position_um(self) -> tuple[float, float]:
        self._require_open()
        return self._read()

    def check_target(self, x_um: float, y_um: float) -> None:
        self._finite(self.name, x=x_um, y=y_um)
        for axis, value, origin in (("x", x_um, self.origin_um[0]), ("y", y_um, self.origin_um[1])):
            if abs(value - origin) > self.travel_um + 1e-9:
                raise StageLimitError(
                    f"{self.name} ({self.label}): {axis} = {value:g} µm is outside the travel {origin:g} +- "
                    f"{self.travel_um:g} µm (stage.xy_travel_um); move refused"
                )

    def move_to(self, x_um: float, y_um: float) -> None:
        self._require_open()
        self.check_target(x_um, y_um)
        self._call(f"move to ({x_um:g}, {y_um:g}) µm", self.core.set_xy_position, self.label,
                   float(x_um), float(y_um))
        self.wait_until_settled(self.settle_timeout_s)
