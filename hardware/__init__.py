"""Device interfaces and their backends.

* :mod:`hardware.base`: the abstract devices (Camera, FocusStage, XYStage, SLM), ``Stack`` and the
  project's device exceptions.
* :mod:`hardware.slm`: phase (radians) to grey levels (``slm.convert.PhaseToGrey``), the base of
  the SLM backends (``slm.device.ConvertingSLM``), the Qt SLM window and the slmPy adapter.
* :mod:`hardware.simulated`: devices of the simulated microscope.
* :mod:`hardware.micromanager`: camera and stages through Micro-Manager (pycromanager).
* :mod:`hardware.acquisition`: ``acquire_stack(camera, focus, settings)``.
* :mod:`hardware.factory`: ``open_devices(settings) -> Devices``.

Backends are imported on use (Qt, pycromanager and slmPy only when chosen).
"""
from autoalign.hardware.base import (
    SLM,
    Camera,
    Device,
    DeviceError,
    DeviceNotConnected,
    DeviceTimeout,
    FocusStage,
    SLMInputError,
    Stack,
    StageLimitError,
    XYStage,
)

__all__ = [
    "SLM",
    "Camera",
    "Device",
    "DeviceError",
    "DeviceNotConnected",
    "DeviceTimeout",
    "FocusStage",
    "SLMInputError",
    "Stack",
    "StageLimitError",
    "XYStage",
]
