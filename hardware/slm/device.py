"""Base of the SLM display backends: validation and phase-to-grey conversion by a
:class:`~autoalign.hardware.slm.convert.PhaseToGrey`, last good image kept on refusal."""
from __future__ import annotations

import abc
import threading

import numpy as np

from autoalign.hardware.base import SLM
from autoalign.hardware.slm.convert import PhaseToGrey

__all__ = ["ConvertingSLM"]


class ConvertingSLM(SLM):
    """Base of the SLM backends: validation and conversion by a :class:`PhaseToGrey`, last good
    image kept on refusal. Subclasses implement ``_open``, ``_close`` and ``_display(grey)``.

    ``show(phase)`` takes a square pupil-grid phase of any size (radians); :attr:`pupil_samples`
    is a good size. On open the SLM shows phase 0 (the flat image)."""

    def __init__(self, converter: PhaseToGrey, pixel_pitch_um: float, name: str) -> None:
        super().__init__(name)
        self.converter = converter
        converter.name = name
        self._pixel_pitch_um = float(pixel_pitch_um)
        self._grey: np.ndarray | None = None
        self._phase: np.ndarray | None = None
        self._shift: tuple[float, float] = (0.0, 0.0)
        self._lock = threading.RLock()
        self.frames_shown = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.converter.shape

    @property
    def pixel_pitch_um(self) -> float:
        return self._pixel_pitch_um

    @property
    def pupil_samples(self) -> int:
        """Recommended pupil-grid size for :meth:`show` (see :attr:`PhaseToGrey.pupil_samples`)."""
        return self.converter.pupil_samples

    @property
    def phase_rad(self) -> np.ndarray:
        """The phase (radians, pupil grid) last shown successfully; zeros (1, 1) before any."""
        with self._lock:
            return np.zeros((1, 1)) if self._phase is None else self._phase.copy()

    @property
    def grey_image(self) -> np.ndarray | None:
        """The 8-bit image (height, width) on the SLM now, or ``None`` before the first frame."""
        with self._lock:
            return None if self._grey is None else self._grey.copy()

    def open(self) -> None:
        super().open()
        try:
            self.show(np.zeros((1, 1)))
        except Exception:
            self.close()
            raise

    def show(self, phase_rad: np.ndarray, shift: tuple[float, float] = (0.0, 0.0)) -> None:
        """Convert and display a pupil phase (radians, ``(m, m)``), the whole pupil drawn
        displaced by ``shift`` pupil radii (:meth:`PhaseToGrey.levels`). Invalid input raises
        :class:`SLMInputError`, a device failure :class:`DeviceError`; in both cases the previous
        image stays on the SLM and :attr:`phase_rad` is unchanged."""
        self._require_open()
        phase = self.converter.validate(phase_rad)
        checked = self.converter.check_shift(shift)
        grey = self.converter.encode(phase, checked)
        with self._lock:
            self._display(grey, phase)
            self._grey = grey
            self._phase = phase.copy()
            self._shift = checked
            self.frames_shown += 1

    @property
    def pupil_shift(self) -> tuple[float, float]:
        """The displacement (pupil radii) of the pattern shown now (see :meth:`show`)."""
        return self._shift

    @abc.abstractmethod
    def _display(self, grey: np.ndarray, phase_rad: np.ndarray) -> None:
        """Put the uint8 image (height, width) on the device; raise DeviceError on failure."""
