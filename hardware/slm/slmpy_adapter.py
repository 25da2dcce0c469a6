"""The SLM through slmPy (wavefrontshaping project, module ``slmpy``), imported lazily in
:meth:`SlmPyAdapter.open` (an optional dependency installed from source by its users)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from autoalign.hardware.base import DeviceError, DeviceNotConnected
from autoalign.hardware.slm.convert import PhaseToGrey
from autoalign.hardware.slm.device import ConvertingSLM
from autoalign.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["SlmPyAdapter"]


class SlmPyAdapter(ConvertingSLM):
    """The SLM through ``slmpy`` (https://github.com/wavefrontshaping/slmPy), a wxPython full-screen
    display: ``slmpy.SLMdisplay(monitor=..., isImageLock=True)``, ``updateArray(uint8 2-D)``,
    ``getSize() -> (width, height)``, ``close()``. Imported only in :meth:`open`.

    Note: the PyPI package called ``slmpy`` is an unrelated library; install slmPy from its
    repository (``pip install git+https://github.com/wavefrontshaping/slmPy``)."""

    INSTALL_HINT = ("install slmPy from the wavefrontshaping project: "
                    "pip install git+https://github.com/wavefrontshaping/slmPy "
                    "(the PyPI package named 'slmpy' is an unrelated library)")

    def __init__(self, converter: PhaseToGrey, pixel_pitch_um: float, monitor: int = 1,
                 is_image_lock: bool = True, name: str = "slmPy SLM") -> None:
        super().__init__(converter, pixel_pitch_um, name)
        self.monitor = int(monitor)
        self.is_image_lock = bool(is_image_lock)
        self._display_obj: Any = None

    @classmethod
    def from_settings(cls, settings: "Settings") -> "SlmPyAdapter":
        return cls(PhaseToGrey.from_settings(settings, name="slmPy SLM"), settings.slm.pixel_pitch_um,
                   monitor=settings.slm.monitor)

    def _open(self) -> None:
        import importlib

        try:
            slmpy = importlib.import_module("slmpy")
        except ImportError as exc:
            raise DeviceNotConnected(f"{self.name}: module 'slmpy' not found ({exc}); {self.INSTALL_HINT}") from exc
        cls = getattr(slmpy, "SLMdisplay", None)
        if cls is None:
            where = getattr(slmpy, "__file__", "?")
            raise DeviceNotConnected(
                f"{self.name}: the imported 'slmpy' ({where}) has no SLMdisplay class: it is not slmPy "
                f"from the wavefrontshaping project; {self.INSTALL_HINT}"
            )
        try:
            self._display_obj = cls(monitor=self.monitor, isImageLock=self.is_image_lock)
        except Exception as exc:  # noqa: BLE001
            raise DeviceNotConnected(
                f"{self.name}: slmpy.SLMdisplay(monitor={self.monitor}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            size = tuple(int(s) for s in self._display_obj.getSize())
        except Exception as exc:  # noqa: BLE001
            self._safe_close()
            raise DeviceError(f"{self.name}: getSize() failed: {type(exc).__name__}: {exc}") from exc
        if size != (self.shape[1], self.shape[0]):
            self._safe_close()
            raise DeviceError(
                f"{self.name}: monitor {self.monitor} is {size[0]} x {size[1]} px, the settings say "
                f"{self.shape[1]} x {self.shape[0]} (slm.width_px, slm.height_px)"
            )

    def _safe_close(self) -> None:
        obj, self._display_obj = self._display_obj, None
        if obj is not None:
            try:
                obj.close()
            except Exception:  # noqa: BLE001
                log.warning("%s: close() failed", self.name, exc_info=True)

    def _close(self) -> None:
        self._safe_close()

    def _display(self, grey: np.ndarray, phase_rad: np.ndarray) -> None:
        if self._display_obj is None:
            raise DeviceNotConnected(f"{self.name}: not open")
        try:
            self._display_obj.updateArray(np.ascontiguousarray(grey, dtype=np.uint8))
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"{self.name}: updateArray failed: {type(exc).__name__}: {exc}") from exc
