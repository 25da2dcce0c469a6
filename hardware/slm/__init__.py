"""The SLM: phase (radians) to grey levels and the display backends.

* :mod:`~autoalign.hardware.slm.convert`: :class:`PhaseToGrey` (pupil geometry, split screen,
  wrapping, flatness, LUT; pure numpy), :func:`load_flatness`, :func:`load_lut`.
* :mod:`~autoalign.hardware.slm.device`: :class:`ConvertingSLM`, the base of every backend.
* :mod:`~autoalign.hardware.slm.qt_window`: :class:`QtSLMWindow` (PyQt5 imported lazily).
* :mod:`~autoalign.hardware.slm.slmpy_adapter`: :class:`SlmPyAdapter` (slmPy imported lazily).
The simulated SLM is ``autoalign.hardware.simulated.SimulatedSLM``.
"""
from autoalign.hardware.slm.convert import MAX_ABS_PHASE_RAD, PhaseToGrey, SLMConfigError, load_flatness, load_lut
from autoalign.hardware.slm.device import ConvertingSLM
from autoalign.hardware.slm.qt_window import QtSLMWindow
from autoalign.hardware.slm.slmpy_adapter import SlmPyAdapter

__all__ = ["MAX_ABS_PHASE_RAD", "SLMConfigError", "PhaseToGrey", "load_flatness", "load_lut", "ConvertingSLM",
           "QtSLMWindow", "SlmPyAdapter"]
