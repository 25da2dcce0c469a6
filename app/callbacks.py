"""The listener side of the loop: the optional callback methods (:class:`LoopCallbacks`) and
:func:`notify`, which calls one if the listener has it and never lets a broken listener break the
loop. Used by the alignment loop and the bead walk; the GUI's worker turns each call into a Qt
signal (see ``docs/loop_api.md``)."""
from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np

from autoalign.calibration.measurement import Measurement

log = logging.getLogger("autoalign.loop")


class LoopCallbacks(Protocol):  # pragma: no cover - documentation of the optional methods
    def on_log(self, message: str) -> None: ...
    def on_measurement(self, m: Measurement) -> None: ...
    def on_iteration(self, r: Any) -> None: ...  # an autoalign.app.loop.IterationRecord
    def on_progress(self, done: int, total: int) -> None: ...
    def on_slm_phase(self, phase_rad: np.ndarray) -> None: ...


def notify(callbacks: Any, name: str, *args: Any) -> None:
    """Call ``callbacks.<name>(*args)`` when the listener has that method; log its exceptions."""
    fn = getattr(callbacks, name, None) if callbacks is not None else None
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:  # a broken listener must not break the loop
        log.exception("callback %s failed", name)


__all__ = ["LoopCallbacks", "notify"]
