"""Small abstract device interfaces and the project's device exceptions.

Style of python-microscope: each device is a small abstract class, each backend a subclass;
simulated devices are first-class implementations. Every device is a context manager
(``open`` on enter, ``close`` on exit); ``close`` is idempotent.

Units: positions in micrometres, phases in radians, images in camera ADU (float arrays),
arrays in (z, y, x) order.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np

from autoalign.recording import SectionScans


class DeviceError(RuntimeError):
    """A device failed or is unusable. The message names the device and what went wrong."""


class DeviceNotConnected(DeviceError):
    """The device is missing, closed or lost its connection."""


class DeviceTimeout(DeviceError):
    """The device did not answer or settle in time."""


class StageLimitError(DeviceError):
    """A move was refused because it leaves the allowed travel."""


class SLMInputError(ValueError):
    """A phase given to an SLM was refused (NaN, wrong shape, out of range); nothing was shown."""


class Device(abc.ABC):
    """Base of all devices: a name, open/close, context manager."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._is_open = False

    @property
    def is_open(self) -> bool:
        return self._is_open

    def open(self) -> None:
        """Connect. Raises :class:`DeviceError` with a clear message on failure."""
        self._open()
        self._is_open = True

    def close(self) -> None:
        """Disconnect; safe to call twice."""
        if self._is_open:
            try:
                self._close()
            finally:
                self._is_open = False

    def _require_open(self) -> None:
        if not self._is_open:
            raise DeviceNotConnected(f"{self.name}: device is not open")

    @abc.abstractmethod
    def _open(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def __enter__(self):  # noqa: ANN204
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Camera(Device):
    """A camera seen in sample space."""

    @abc.abstractmethod
    def snap(self) -> np.ndarray:
        """Acquire one frame, float64 ADU, shape (roi, roi)."""

    @property
    @abc.abstractmethod
    def pixel_size_um(self) -> float:
        """Pixel size in sample space, micrometres."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """Frame shape (ny, nx) in pixels."""

    @property
    def saturation_adu(self) -> float:
        """Highest value the camera can report (saturation), ADU."""
        return float(2**16 - 1)

    def begin_sequence(self, n_frames: int) -> None:
        """Hint that the next ``n_frames`` snaps form one acquisition (a z-stack). Default: nothing;
        the simulated camera lets the bead drift one step here."""


class Stage(Device):
    """Common part of stages: settle and travel limits."""

    @abc.abstractmethod
    def wait_until_settled(self, timeout_s: float = 5.0) -> None:
        """Block until the last move ended; :class:`DeviceTimeout` otherwise."""


class FocusStage(Stage):
    """Focus (z) drive, micrometres."""

    @property
    @abc.abstractmethod
    def position_um(self) -> float: ...

    @abc.abstractmethod
    def move_to(self, z_um: float) -> None:
        """Absolute move; returns after the stage settled."""


class XYStage(Stage):
    """Lateral stage, micrometres."""

    @property
    @abc.abstractmethod
    def position_um(self) -> tuple[float, float]:
        """(x, y) in micrometres."""

    @abc.abstractmethod
    def move_to(self, x_um: float, y_um: float) -> None:
        """Absolute move; returns after the stage settled."""


class SLM(Device):
    """Spatial light modulator. ``show`` takes phase in radians as a float array; conversion to
    grey levels (pupil geometry, wrapping, flatness, LUT) happens inside, in one place."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """(height, width) in SLM pixels."""

    @property
    @abc.abstractmethod
    def pixel_pitch_um(self) -> float: ...

    @abc.abstractmethod
    def show(self, phase_rad: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> None:
        """Display a phase (radians, float) given on a square ``(m, m)`` pupil grid of any size
        spanning the pupil diameter (``simulation.phase.pupil_grid``; indexed ``[v, u]``); the
        SLM maps it onto its pixels (``hardware.slm.convert.PhaseToGrey``), the whole pupil
        displaced by ``shift`` (pupil radii, u and v; sub-pixel) when given. Invalid input raises
        :class:`SLMInputError` and the last good image stays on the SLM."""

    @property
    @abc.abstractmethod
    def phase_rad(self) -> np.ndarray:
        """The phase currently shown (radians, pupil grid, as given to :meth:`show`)."""


class SectionScanner(Device):
    """A scanning (STED / confocal) microscope that records the xy, xz and yz section scans of one
    bead, per detection channel (a depletion and an excitation channel, say), as
    :class:`autoalign.recording.SectionScans`: each scan with its own pixel sizes (µm), centre and
    counts. Backends: ``hardware.recorded.RecordedScanner`` replays a recorded file; a live
    backend (Imspector, say) implements the same two methods."""

    @abc.abstractmethod
    def channels(self) -> list[str]:
        """Names of the channels :meth:`scan_sections` can record, in the instrument's order."""

    @abc.abstractmethod
    def scan_sections(self, channel: str | None = None) -> SectionScans:
        """Record the section scans of the bead at the scan centre in ``channel`` (default: the
        first of :meth:`channels`). Raises :class:`DeviceError` when the scan fails and
        :class:`ValueError` for a channel the scanner does not have."""


@dataclass(frozen=True)
class Stack:
    """A z-stack: ``data`` (nz, ny, nx) ADU, pixel sizes in micrometres, focus positions."""

    data: np.ndarray
    pixel_size_um: float
    z_step_um: float
    z_positions_um: np.ndarray
    xy_position_um: tuple[float, float]
