"""The devices side of the alignment loop: what calibrations and probing estimators use
(:class:`autoalign.estimator.ProbeHost`) and what each iteration of ``app.loop.AlignmentLoop``
is built from: the one gate to the SLM (:meth:`LoopHost._show`: checked by ``app.safety``, finite
phase only, the last good mask stays when the SLM refuses), acquisition and analysis of a stack,
stage moves, the ideal reference and the simulated truth (``app.loop_truth``), the log and the stop
request. No decisions here: the loop (``app/loop.py``) decides.
"""
from __future__ import annotations

import logging
import threading
from typing import Any
from collections.abc import Callable

import numpy as np

from autoalign.app.callbacks import LoopCallbacks, notify
from autoalign.app.loop_records import LoopStopped
from autoalign.app.loop_truth import LoopReference
from autoalign.app.safety import RefusedError, check_correction
from autoalign.calibration import donut
from autoalign.calibration.measurement import Measurement, analyse_stack
from autoalign.calibration.metrics import null_depth
from autoalign.correction import Correction
from autoalign.hardware.acquisition import acquire_stack, move_stage_by
from autoalign.hardware.base import SLMInputError, Stack
from autoalign.settings import Settings

logger = logging.getLogger("autoalign.loop")


class LoopHost:
    """Open devices (``hardware.factory.Devices``-like: ``camera``, ``focus``, ``xy``, ``slm`` and
    ``microscope``, the simulated truth or ``None``) with the loop's correction on the SLM.

    ``calibration``: a :class:`calibration.poke.PokeCalibration` or ``None``; ``acquire_stack``:
    replaces ``hardware.acquisition.acquire_stack(camera, focus, settings)``; ``truth_metrics``:
    record the simulated microscope's truth."""

    def __init__(self, devices: Any, settings: Settings, callbacks: LoopCallbacks | Any = None,
                 calibration: Any = None, acquire_stack: Callable[..., Stack] | None = None,
                 truth_metrics: bool = True) -> None:
        self.devices = devices
        self.settings = settings
        self.callbacks = callbacks
        self.calibration = calibration
        self._acquire_fn = acquire_stack
        self.truth_metrics = bool(truth_metrics)  # simulated microscope: true residual / null depth
        self.correction = Correction()
        self.stacks_acquired = 0
        self._stop = threading.Event()
        self._reference = LoopReference(settings)  # the ideal donut (bead floor), the truth per SLM state

    @property
    def microscope(self) -> Any:
        return getattr(self.devices, "microscope", None)

    def log(self, fmt: str, *args: Any, level: int = logging.INFO) -> None:
        """Log to ``autoalign.loop`` and to the ``on_log`` callback."""
        message = fmt % args if args else fmt
        logger.log(level, message)
        notify(self.callbacks, "on_log", message)

    def stop(self) -> None:
        """Ask the loop to stop; honoured between steps (thread-safe)."""
        self._stop.set()

    def clear_stop(self) -> None:
        """Forget an earlier :meth:`stop` (called at the start of every new request)."""
        self._stop.clear()

    def check_stop(self) -> None:
        """Raise :class:`LoopStopped` when a stop was requested."""
        if self._stop.is_set():
            raise LoopStopped()

    # ------------------------------------------------------------------ SLM
    def check_correction(self, correction: Correction) -> None:
        """Raise :class:`RefusedError` when a correction must not reach the SLM (``app.safety``)."""
        check_correction(correction, self.settings.loop)

    def _show(self, correction: Correction) -> np.ndarray:
        """Check and show vortex + ``correction``; raises RefusedError (nothing shown),
        DeviceError (device failed). Does not change ``self.correction``."""
        self.check_correction(correction)
        try:
            phase = donut.show_correction(self.devices.slm, self.settings, correction)
        except SLMInputError as exc:  # NaN/inf phase, unsafe shift: nothing shown
            raise RefusedError(f"SLM refused the phase: {exc}") from exc
        notify(self.callbacks, "on_slm_phase", phase)
        return phase

    def apply(self, correction: Correction) -> None:
        """Show vortex + ``correction`` and make it the loop's correction (checked first)."""
        correction = correction.copy()
        self._show(correction)
        self.correction = correction
        self.log("applied correction: RMS %.3f rad, %s", correction.rms(), _fmt(correction.coefficients))

    def zero_slm(self) -> None:
        """Vortex only; the correction is cleared."""
        self.apply(Correction())
        self.log("SLM zeroed (vortex mask only)")

    def probe(self, correction: Correction) -> Measurement:
        """Honour a stop request, show ``correction`` (checked; NOT adopted as the loop's) and
        acquire. For estimators and calibrations that scan; call :meth:`restore` afterwards."""
        self.check_stop()
        self._show(correction)
        return self.acquire()

    def restore(self) -> None:
        """Show the loop's own correction again (after :meth:`probe`)."""
        self._show(self.correction)

    # ------------------------------------------------------------------ acquisition and analysis
    def analyse(self, stack: Stack) -> Measurement:
        """Validate a stack and extract re-centred ortho-sections (photons)."""
        try:
            saturation: float | None = float(self.devices.camera.saturation_adu)
        except Exception:  # noqa: BLE001 - analyse_stack falls back on camera.bit_depth
            saturation = None
        return analyse_stack(stack, self.settings, saturation)

    def acquire(self) -> Measurement:
        """Acquire and analyse one stack (no correction applied)."""
        stack = (self._acquire_fn or acquire_stack)(self.devices.camera, self.devices.focus, self.settings)
        self.stacks_acquired += 1
        m = self.analyse(stack)
        if m.valid:
            self.log("stack %d: bead at (%+.3f, %+.3f, %+.3f) um, %.0f photons, null depth %.4f",
                     self.stacks_acquired, *m.offset_um, m.photons,
                     null_depth(m.sections, m.background_photons), level=logging.DEBUG)
        else:
            self.log("stack %d refused: %s", self.stacks_acquired, m.reason, level=logging.WARNING)
        notify(self.callbacks, "on_measurement", m)
        return m

    # ------------------------------------------------------------------ references and truth
    def ideal_sections(self) -> np.ndarray:
        """Unaberrated ortho-sections (background removed, xy peak = 1) on this stack's grid
        (:func:`calibration.donut.ideal_reference`, cached)."""
        return self._reference.ideal_sections()

    def ideal_null_depth(self) -> float:
        """MEASURED null depth of the unaberrated donut imaged with the configured bead, noise-free:
        the floor that a perfect correction reaches in ``null_depth`` of a measurement."""
        return self._reference.ideal_null_depth()

    def true_residual_rms(self) -> float | None:
        """True residual wavefront RMS (rad, Noll 1-4 removed) of what the SLM delivers on the
        simulated microscope, else None (:func:`calibration.donut.true_residual_rms`)."""
        return donut.true_residual_rms(self.microscope)

    def true_null_depth(self) -> float | None:
        """TRUE null depth of the beam now on the SLM (simulated microscope only, else None)."""
        return donut.true_null_depth(self.microscope, self.settings)

    def true_mask_offset(self) -> tuple[float, float] | None:
        """Residual offset (x, y) of the delivered vortex from the beam, pupil radii (simulated
        microscope only, else None)."""
        return donut.true_mask_offset(self.microscope)

    def _truth(self) -> dict[str, float]:
        """The simulated truth of the state on the SLM now, once per state (``app.loop_truth``)."""
        return self._reference.truth(self.microscope) if self.truth_metrics else {}

    # ------------------------------------------------------------------ stage
    def _move_stage(self, move: tuple[float, float, float]) -> None:
        move_stage_by(self.devices.xy, self.devices.focus, move)
        self.log("stage re-centred by (%+.3f, %+.3f, %+.3f) um", *move)


def _fmt(coeffs: dict[int, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:+.3f}" for k, v in sorted(coeffs.items()) if v) + "}"


__all__ = ["LoopHost"]
