"""Simulated devices sharing one :class:`simulation.microscope.SimulatedMicroscope`.

First-class implementations of :mod:`hardware.base`: the camera renders what the microscope sees
(from the grey image the simulated SLM shows), the stages move the microscope's stage with the
travel limits of ``settings.stage`` (relative to the start position, 0), the SLM converts phases
with the same :class:`hardware.slm.convert.PhaseToGrey` as the real backends.

Fault injection for tests: every device has ``fail_after(n, error=DeviceNotConnected)``: the next
``n`` operations succeed, the one after raises ``error`` (a lost connection by default) and so does
every later one until the device is closed and reopened. Operations: camera frames (each plane of
a stack counts), stage moves and settles, SLM frames shown.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from autoalign.hardware.base import (
    Camera,
    DeviceError,
    DeviceNotConnected,
    FocusStage,
    StageLimitError,
    XYStage,
)
from autoalign.hardware.slm.convert import PhaseToGrey
from autoalign.hardware.slm.device import ConvertingSLM

if TYPE_CHECKING:  # pragma: no cover
    from autoalign.simulation.microscope import SimulatedMicroscope

__all__ = ["SimulatedCamera", "SimulatedFocusStage", "SimulatedXYStage", "SimulatedSLM", "FaultInjection"]


class FaultInjection:
    """Mixin: ``fail_after(n)`` makes the (n+1)-th following operation fail, and all after it."""

    _fail_countdown: int | None = None
    _fail_error: type[DeviceError] = DeviceNotConnected
    _failed: bool = False

    def fail_after(self, n: int | None, error: type[DeviceError] = DeviceNotConnected) -> None:
        """Let ``n`` more operations succeed, then fail with ``error`` (``None`` disarms)."""
        if n is not None and (int(n) != n or n < 0):
            raise ValueError(f"fail_after(n = {n!r}): expected an integer >= 0 or None")
        self._fail_countdown = None if n is None else int(n)
        self._fail_error = error
        self._failed = False

    def _tick(self) -> None:
        """Count one operation; raise the injected error when it is due."""
        name = getattr(self, "name", type(self).__name__)
        if self._failed:
            raise self._fail_error(f"{name}: connection lost (injected fault)")
        if self._fail_countdown is not None:
            if self._fail_countdown <= 0:
                self._failed = True
                raise self._fail_error(f"{name}: connection lost (injected fault)")
            self._fail_countdown -= 1

    def _reset_fault(self) -> None:
        self._failed = False
        self._fail_countdown = None


class SimulatedCamera(FaultInjection, Camera):
    """The simulated microscope's camera: ``snap`` renders one frame (ADU, float64, (roi, roi)) at
    the current stage and focus; :meth:`acquire_z_series` is the batched stack path."""

    def __init__(self, microscope: "SimulatedMicroscope", name: str = "simulated camera") -> None:
        super().__init__(name)
        self.microscope = microscope

    def _open(self) -> None:
        self._reset_fault()

    def _close(self) -> None:
        pass

    @property
    def pixel_size_um(self) -> float:
        """The configured pixel size (the settings'; with ``simulation.true_pixel_scale`` the
        camera's true pixels differ, as a miscalibrated Micro-Manager pixel size would)."""
        return float(getattr(self.microscope, "reported_pixel_size_um", self.microscope.pixel_size_um))

    @property
    def shape(self) -> tuple[int, int]:
        n = self.microscope.roi_px
        return (n, n)

    @property
    def saturation_adu(self) -> float:
        return float(self.microscope.camera_model.saturation_adu)

    @property
    def xy_position_um(self) -> tuple[float, float]:
        """Where the stage is (the camera knows it through the microscope); for stack records."""
        return self.microscope.stage_xy_um

    def begin_sequence(self, n_frames: int) -> None:
        """One acquisition starts: the bead drifts one random-walk step."""
        self._require_open()
        self.microscope.new_acquisition()

    def snap(self) -> np.ndarray:
        self._require_open()
        self._tick()
        return self.microscope.snap()

    def acquire_z_series(self, focus: FocusStage, z_positions_um: Sequence[float]) -> np.ndarray | None:
        """Frames (nz, roi, roi) ADU at each focus position, rendered in one batch, when ``focus``
        is this microscope's simulated focus (else ``None``: use the generic per-snap path). All
        positions are checked against the travel first; faults are counted per frame (a failure
        mid-stack leaves the focus at the plane where it happened). The focus ends on the last
        position."""
        if not isinstance(focus, SimulatedFocusStage) or focus.microscope is not self.microscope:
            return None
        self._require_open()
        focus._require_open()
        z = np.asarray(z_positions_um, dtype=float).ravel()
        for value in z:
            focus.check_target(float(value))
        for value in z:  # count the frames and moves so injected faults fire where they would
            focus._tick()
            self._tick()
            self.microscope.focus_um = float(value)
        return self.microscope.render_stack(z)


class _SimulatedStage(FaultInjection):
    microscope: "SimulatedMicroscope"
    name: str

    def wait_until_settled(self, timeout_s: float = 5.0) -> None:
        """Moves are instantaneous; counts as an operation for fault injection."""
        self._require_open()  # type: ignore[attr-defined]
        self._tick()

    @staticmethod
    def _finite(name: str, **values: float) -> None:
        for axis, value in values.items():
            if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
                raise StageLimitError(f"{name}: {axis} = {value!r} µm is not a finite number; move refused")


class SimulatedFocusStage(_SimulatedStage, FocusStage):
    """Focus drive of the simulated microscope, micrometres; travel ``+-settings.stage.z_travel_um``
    around the start position (0)."""

    def __init__(self, microscope: "SimulatedMicroscope", name: str = "simulated focus stage") -> None:
        super().__init__(name)
        self.microscope = microscope
        self.travel_um = float(microscope.settings.stage.z_travel_um)
        self.origin_um = 0.0

    def _open(self) -> None:
        self._reset_fault()

    def _close(self) -> None:
        pass

    @property
    def position_um(self) -> float:
        self._require_open()
        return float(self.microscope.focus_um)

    def check_target(self, z_um: float) -> None:
        """Raise :class:`StageLimitError` when ``z_um`` is not finite or beyond the travel."""
        self._finite(self.name, z=z_um)
        if abs(z_um - self.origin_um) > self.travel_um + 1e-9:
            raise StageLimitError(
                f"{self.name}: z = {z_um:g} µm is outside the travel {self.origin_um:g} +- "
                f"{self.travel_um:g} µm (stage.z_travel_um); move refused"
            )

    def move_to(self, z_um: float) -> None:
        self._require_open()
        self.check_target(z_um)
        self._tick()
        self.microscope.focus_um = float(z_um)


class SimulatedXYStage(_SimulatedStage, XYStage):
    """Lateral stage of the simulated microscope, micrometres; travel ``+-settings.stage.xy_travel_um``
    per axis around the start position (0, 0)."""

    def __init__(self, microscope: "SimulatedMicroscope", name: str = "simulated XY stage") -> None:
        super().__init__(name)
        self.microscope = microscope
        self.travel_um = float(microscope.settings.stage.xy_travel_um)
        self.origin_um = (0.0, 0.0)

    def _open(self) -> None:
        self._reset_fault()

    def _close(self) -> None:
        pass

    @property
    def position_um(self) -> tuple[float, float]:
        self._require_open()
        x, y = self.microscope.stage_xy_um
        return (float(x), float(y))

    def check_target(self, x_um: float, y_um: float) -> None:
        """Raise :class:`StageLimitError` when a target is not finite or beyond the travel."""
        self._finite(self.name, x=x_um, y=y_um)
        for axis, value, origin in (("x", x_um, self.origin_um[0]), ("y", y_um, self.origin_um[1])):
            if abs(value - origin) > self.travel_um + 1e-9:
                raise StageLimitError(
                    f"{self.name}: {axis} = {value:g} µm is outside the travel {origin:g} +- "
                    f"{self.travel_um:g} µm (stage.xy_travel_um); move refused"
                )

    def move_to(self, x_um: float, y_um: float) -> None:
        self._require_open()
        self.check_target(x_um, y_um)
        self._tick()
        self.microscope.stage_xy_um = (float(x_um), float(y_um))


class SimulatedSLM(FaultInjection, ConvertingSLM):
    """The simulated SLM: converts with ``converter`` (default the microscope's true geometry,
    i.e. ``settings.slm``) and hands the grey image to the microscope, which decodes it with the
    true geometry. Pass another converter to emulate a misconfigured SLM (wrong flip or centre)."""

    def __init__(
        self,
        microscope: "SimulatedMicroscope",
        converter: PhaseToGrey | None = None,
        name: str = "simulated SLM",
    ) -> None:
        conv = converter if converter is not None else microscope.slm_geometry
        if conv.shape != microscope.slm_geometry.shape:
            raise DeviceError(
                f"{name}: converter for {conv.shape} px, the simulated SLM is {microscope.slm_geometry.shape}"
            )
        super().__init__(conv, float(microscope.settings.slm.pixel_pitch_um), name)
        self.microscope = microscope

    def _open(self) -> None:
        self._reset_fault()

    def _close(self) -> None:
        pass

    def _display(self, grey: np.ndarray, phase_rad: np.ndarray) -> None:
        self._tick()
        self.microscope.set_slm_image(grey, phase_rad, flips=(self.converter.flip_x, self.converter.flip_y))
