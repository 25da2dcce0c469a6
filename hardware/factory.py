"""Open the devices the settings ask for: ``open_devices(settings) -> Devices``.

``settings.hardware.backend``: ``simulated`` (one :class:`simulation.microscope.SimulatedMicroscope`
shared by the simulated camera, stages and, with ``slm.backend: simulated``, the SLM) or
``micromanager`` (camera, focus and XY stage through one Micro-Manager connection).
``settings.slm.backend``: ``simulated`` (needs the simulated microscope: the simulated camera can
only see a simulated SLM), ``qt`` (:class:`QtSLMWindow` on screen ``slm.monitor``) or ``slmpy``.

``Devices`` is a context manager: leaving it (or :meth:`Devices.close`) closes every device, SLM
last, even when one fails to close. When opening fails, what was opened is closed again.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from autoalign.hardware.base import Camera, Device, DeviceError, FocusStage, SLM, XYStage
from autoalign.settings import Settings, load_settings

if TYPE_CHECKING:  # pragma: no cover - annotations only; the simulation (torch) loads on use
    from autoalign.simulation.microscope import SimulatedMicroscope

log = logging.getLogger(__name__)

__all__ = ["Devices", "open_devices", "make_slm"]


@dataclass
class Devices:
    """The open devices. ``microscope`` is the simulated truth (``None`` on real hardware)."""

    camera: Camera
    focus: FocusStage
    xy: XYStage
    slm: SLM
    microscope: "SimulatedMicroscope | None" = None

    def all(self) -> list[Device]:
        return [self.camera, self.focus, self.xy, self.slm]

    def close(self) -> None:
        """Close all devices (camera, stages, then the SLM); errors are logged, the first re-raised."""
        first: BaseException | None = None
        for dev in (self.camera, self.focus, self.xy, self.slm):
            try:
                dev.close()
            except Exception as exc:  # noqa: BLE001
                log.error("closing %s failed: %s", getattr(dev, "name", dev), exc)
                first = first or exc
        if first is not None:
            raise first

    def __enter__(self) -> "Devices":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_slm(settings: "Settings", microscope: "SimulatedMicroscope | None" = None, force: bool = False) -> SLM:
    """The (unopened) SLM of ``settings.slm.backend``."""
    backend = settings.slm.backend
    if backend == "simulated":
        if microscope is None:
            # wiring demo (e.g. Micro-Manager's demo camera and stages): the pattern is converted
            # and validated like on a real SLM, then kept in memory; no beam sees it
            from autoalign.hardware.slm.convert import PhaseToGrey
            from autoalign.hardware.slm.device import ConvertingSLM

            class WiringDemoSLM(ConvertingSLM):
                def _open(self) -> None:
                    pass

                def _close(self) -> None:
                    pass

                def _display(self, grey: Any, phase_rad: Any) -> None:
                    pass

            logging.getLogger("autoalign.hardware").warning(
                "slm.backend 'simulated' with hardware.backend %r: WIRING DEMO, the SLM pattern is kept in "
                "memory and reaches no beam", settings.hardware.backend)
            return WiringDemoSLM(PhaseToGrey.from_settings(settings, name="wiring-demo SLM"),
                                 float(settings.slm.pixel_pitch_um), "wiring-demo SLM (in memory)")
        from autoalign.hardware.simulated import SimulatedSLM

        return SimulatedSLM(microscope)
    if backend == "qt":
        from autoalign.hardware.slm.qt_window import QtSLMWindow  # backends load on use (PyQt5)

        return QtSLMWindow.from_settings(settings, force=force)
    if backend == "slmpy":
        from autoalign.hardware.slm.slmpy_adapter import SlmPyAdapter  # backends load on use (slmPy)

        return SlmPyAdapter.from_settings(settings)
    raise DeviceError(f"slm.backend = {backend!r}: expected 'simulated', 'qt' or 'slmpy'")


def open_devices(settings: "Settings | str | None" = None, *, force_slm: bool = False, **microscope_kwargs: Any) -> Devices:
    """Create and open the devices of ``settings`` (a Settings, a path or None for the default file).

    ``microscope_kwargs`` go to :class:`SimulatedMicroscope` (e.g. ``seed``, ``aberration``,
    ``noise``) with the simulated backend; ``force_slm`` lets the Qt SLM window open over the GUI's
    screen or a screen of another size."""
    s = load_settings(settings)
    backend = s.hardware.backend
    microscope = None
    if backend == "simulated":  # backends load on use (the simulation needs torch)
        from autoalign.hardware.simulated import SimulatedCamera, SimulatedFocusStage, SimulatedXYStage
        from autoalign.simulation.microscope import SimulatedMicroscope

        microscope = SimulatedMicroscope(s, **microscope_kwargs)
        devices: list[Device] = [SimulatedCamera(microscope), SimulatedFocusStage(microscope),
                                 SimulatedXYStage(microscope)]
    elif backend == "micromanager":
        if microscope_kwargs:
            raise TypeError(f"simulated-microscope options {sorted(microscope_kwargs)} given with hardware.backend "
                            "= 'micromanager'")
        from autoalign.hardware.micromanager import (  # backends load on use (pycromanager)
            MicroManagerCamera,
            MicroManagerConnection,
            MicroManagerFocusStage,
            MicroManagerXYStage,
        )

        conn = MicroManagerConnection(s)
        devices = [MicroManagerCamera(s, conn), MicroManagerFocusStage(s, conn), MicroManagerXYStage(s, conn)]
    else:
        raise DeviceError(f"hardware.backend = {backend!r}: expected 'simulated' or 'micromanager'")
    devices.append(make_slm(s, microscope, force=force_slm))
    opened: list[Device] = []
    try:
        for dev in devices:
            dev.open()
            opened.append(dev)
    except BaseException:
        for dev in reversed(opened):
            try:
                dev.close()
            except Exception:  # noqa: BLE001
                log.exception("closing %s after a failed open", dev.name)
        raise
    camera, focus, xy, slm = devices
    log.info("devices open: %s", ", ".join(d.name for d in devices))
    return Devices(camera=camera, focus=focus, xy=xy, slm=slm, microscope=microscope)  # type: ignore[arg-type]
