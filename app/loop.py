"""The closed alignment loop, orchestration only: acquire -> check -> centre -> estimate ->
decide -> apply -> record, with callbacks (``app.callbacks``; no Qt here, see ``docs/loop_api.md``).

The steps it calls: ``hardware.acquisition.acquire_stack``; ``calibration.measurement``
(``analyse_stack``: the refusal reasons; ``plan_centring``); any
:class:`autoalign.estimator.Estimator` (never asked which kind it is); ``app.safety`` (the limits);
``calibration.metrics`` and ``calibration.donut`` (phase, references, simulated truth).

Safety: nothing is applied from an invalid measurement or a refused estimate; the SLM only ever
receives a finite phase built from a checked :class:`Correction` (one place: :meth:`_show`); if the
SLM refuses it the last good mask stays; a device failure stops the loop cleanly and nothing is
sent after it. Every decision goes to the ``autoalign.loop`` logger and the ``on_log`` callback.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from autoalign.app.callbacks import LoopCallbacks, notify
from autoalign.app.safety import RefusedError, check_correction, estimate_problem
from autoalign.calibration import donut
from autoalign.calibration.measurement import Measurement, analyse_stack, next_correction, plan_centring
from autoalign.calibration.metrics import measurement_metrics, null_depth
from autoalign.correction import Correction
from autoalign.estimator import Estimate, Estimator
from autoalign.hardware.acquisition import acquire_stack, move_stage_by
from autoalign.hardware.base import DeviceError, SLMInputError, Stack
from autoalign.settings import Settings

logger = logging.getLogger("autoalign.loop")


@dataclass
class IterationRecord:
    """One iteration: its measurement, the estimate (``prediction`` {Noll: rad} and
    ``predicted_offset`` pupil radii are its coefficients and mask offset), the correction after it,
    metrics and the decision ("applied ..." or "refused: <why>")."""

    iteration: int
    measurement: Measurement
    prediction: dict[int, float] | None
    predicted_offset: tuple[float, float] | None
    correction: Correction
    metrics: dict[str, float]
    decision: str
    stacks: int = 0                       # stacks acquired in this iteration
    elapsed_s: float = 0.0
    estimate: Estimate | None = None


class LoopStopped(Exception):
    """Raised when :meth:`AlignmentLoop.stop` was requested; never escapes ``run``."""


class AlignmentLoop:
    """The alignment loop over open devices (``hardware.factory.Devices``-like: ``camera``,
    ``focus``, ``xy``, ``slm`` and ``microscope`` — the simulated truth or ``None``).

    ``estimator``: any :class:`autoalign.estimator.Estimator` (``app.estimators.make_estimator``
    builds one by name). ``calibration``: a :class:`calibration.poke.PokeCalibration` (rad per
    micrometre map and stage signs) or ``None`` for the optics formulas. ``acquire_stack``:
    replaces ``hardware.acquisition.acquire_stack(camera, focus, settings)``. ``truth_metrics``:
    record the simulated microscope's true residual and null depth."""

    #: raw stacks kept in :attr:`history` (older records keep sections, metrics and decisions; the
    #: bead walk writes every raw stack to its file), so a long session does not grow ~2 MB/iteration
    keep_raw_stacks: int = 5

    def __init__(self, devices: Any, settings: Settings, estimator: Estimator,
                 callbacks: LoopCallbacks | Any = None, calibration: Any = None,
                 acquire_stack: Callable[..., Stack] | None = None, truth_metrics: bool = True) -> None:
        self.devices = devices
        self.settings = settings
        self.callbacks = callbacks
        self.calibration = calibration
        self._acquire_fn = acquire_stack
        self.truth_metrics = bool(truth_metrics)  # simulated microscope: true residual / null depth
        self.correction = Correction()
        self.best = Correction()
        self.best_score = math.inf
        self.history: list[IterationRecord] = []
        self.stacks_acquired = 0
        self.stop_reason = ""
        self.last_error: Exception | None = None
        self.patience = settings.loop.patience
        self.max_refusals = settings.loop.max_refusals
        self._stop = threading.Event()
        self._ideal: dict[str, Any] | None = None
        self.estimator = estimator

    # ------------------------------------------------------------------ plumbing
    @property
    def estimator(self) -> Estimator:
        return self._estimator

    @estimator.setter
    def estimator(self, value: Estimator) -> None:
        """Swap the estimator (scores of two estimators do not compare: the best is forgotten)."""
        self._estimator = value
        value.attach(self)
        self.best_score = math.inf

    @property
    def corrector(self) -> str:
        """The estimator's name (``"model"``, ``"modal"``, ...)."""
        return self._estimator.name

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
        phase = donut.build_pupil_phase(self.settings, correction, donut.slm_grid(self.devices.slm, self.settings))
        if not np.all(np.isfinite(phase)):
            raise RefusedError("phase contains NaN or infinity")
        try:
            self.devices.slm.show(phase)
        except SLMInputError as exc:
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
    def _saturation_adu(self) -> float | None:
        try:
            return float(self.devices.camera.saturation_adu)
        except Exception:  # noqa: BLE001 - analyse_stack falls back on camera.bit_depth
            return None

    def analyse(self, stack: Stack) -> Measurement:
        """Validate a stack and extract re-centred ortho-sections (photons)."""
        return analyse_stack(stack, self.settings, self._saturation_adu())

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

    # ------------------------------------------------------------------ metrics
    def ideal_sections(self) -> np.ndarray:
        """Unaberrated ortho-sections (background removed, xy peak = 1) on this stack's grid
        (:func:`calibration.donut.ideal_reference`, cached)."""
        if self._ideal is None:
            self._ideal = donut.ideal_reference(self.settings)
        return self._ideal["sections"]

    def ideal_null_depth(self) -> float:
        """MEASURED null depth of the unaberrated donut imaged with the configured bead, noise-free:
        the floor that a perfect correction reaches in ``null_depth`` of a measurement."""
        self.ideal_sections()
        return float(self._ideal["null_depth"])

    def true_residual_rms(self) -> float | None:
        """True residual wavefront RMS (rad, Noll >= 5) on the simulated microscope, else None."""
        return donut.true_residual_rms(self.microscope)

    def true_null_depth(self) -> float | None:
        """TRUE null depth of the beam now on the SLM (simulated microscope only, else None)."""
        return donut.true_null_depth(self.microscope, self.settings)

    def metrics(self, m: Measurement, prediction: dict[int, float] | None = None) -> dict[str, float]:
        """Image metrics of ``m`` (``calibration.metrics.measurement_metrics``), the predicted
        residual of ``prediction`` and, with ``truth_metrics``, the simulated truth now."""
        out = measurement_metrics(m, self.ideal_sections() if m.valid else None)
        if prediction is not None:
            out["predicted_residual_rms"] = Estimate.residual_of(prediction)
        out.update(self._truth())
        return out

    def _truth(self) -> dict[str, float]:
        if not self.truth_metrics:
            return {}
        out = {"true_residual_rms": self.true_residual_rms(), "true_null_depth": self.true_null_depth()}
        return {k: v for k, v in out.items() if v is not None}

    # ------------------------------------------------------------------ centring
    def _move_stage(self, move: tuple[float, float, float]) -> None:
        move_stage_by(self.devices.xy, self.devices.focus, move)
        self.log("stage re-centred by (%+.3f, %+.3f, %+.3f) um", *move)

    def centre(self) -> Measurement:
        """Acquire; re-centre the bead with the stage when beyond the threshold, else correct tip,
        tilt and defocus on the SLM. Returns the measurement the decision was made on."""
        m = self.acquire()
        if not m.valid:
            self.log("centre: nothing applied (%s)", m.reason, level=logging.WARNING)
            return m
        move, delta = plan_centring(m, self.settings, self.calibration)
        if move is not None:
            self._move_stage(move)
        if delta:
            try:
                self.apply(self.correction.plus(delta))
            except RefusedError as exc:
                self.log("centre: tip/tilt/defocus refused (%s)", exc, level=logging.WARNING)
        return m

    # ------------------------------------------------------------------ estimation
    def check_estimate(self, est: Estimate) -> str | None:
        """Why an estimate must not be applied, or None (``app.safety.estimate_problem``)."""
        return estimate_problem(est, self.settings.loop)

    # ------------------------------------------------------------------ one iteration
    def correct_once(self, gain: float | None = None, iteration: int | None = None) -> IterationRecord:
        """One iteration: acquire, check, plan the centring, estimate, decide, apply, record. A
        refused measurement or estimate applies nothing (``decision`` says why)."""
        t0, stacks0 = time.perf_counter(), self.stacks_acquired
        gain = self.settings.loop.gain if gain is None else float(gain)
        it = len(self.history) if iteration is None else iteration
        before = self.correction.copy()
        m = self.acquire()
        est: Estimate | None = None

        def record(decision: str, metrics: dict[str, float]) -> IterationRecord:
            r = IterationRecord(it, m, None if est is None else est.coefficients,
                                None if est is None else est.mask_offset, self.correction.copy(), metrics,
                                decision, self.stacks_acquired - stacks0, time.perf_counter() - t0, est)
            self.history.append(r)
            self._drop_old_stacks()
            self.log("iteration %d: %s", it, decision, level=logging.INFO if decision == "applied" else logging.WARNING)
            notify(self.callbacks, "on_iteration", r)
            return r

        if not m.valid:
            return record(f"refused: {m.reason}", self.metrics(m))
        move, ttd = plan_centring(m, self.settings, self.calibration)
        try:
            est = self.estimator.estimate(m)
        except (LoopStopped, DeviceError):
            raise
        except Exception as exc:  # noqa: BLE001 - a broken estimator refuses, never applies
            logger.exception("estimation failed")
            return record(f"refused: prediction failed ({exc})", self.metrics(m))
        metrics = self.metrics(m, est.coefficients)
        metrics.update({f"{k}_measured": metrics[k] for k in ("true_residual_rms", "true_null_depth") if k in metrics})
        problem = self.check_estimate(est)
        if problem:
            return record(f"refused: {problem}", metrics)
        new = next_correction(before, est, ttd, gain)
        try:
            self.check_correction(new)
        except RefusedError as exc:
            return record(f"refused: {exc}", metrics)
        self.check_stop()
        if move is not None:
            self._move_stage(move)
        try:
            self._show(new)
        except RefusedError as exc:
            return record(f"refused: {exc}", metrics)
        self.correction = new
        metrics.update(self._truth())  # the state after this iteration's correction
        return record("applied" + (" (stage re-centred)" if move is not None else ""), metrics)

    def _drop_old_stacks(self) -> None:
        for old in self.history[: -self.keep_raw_stacks] if self.keep_raw_stacks else self.history:
            old.measurement.stack = None

    # ------------------------------------------------------------------ run
    def run(self, iterations: int | None = None, gain: float | None = None) -> list[IterationRecord]:
        """Iterate until convergence (the estimate's residual below ``loop.converged_rms_rad``),
        the iteration limit, no improvement of the estimate's score for ``patience`` iterations
        (the best correction is then restored), too many refused measurements, a stop request or a
        device failure (the SLM keeps the last good mask). Returns this run's records;
        ``stop_reason`` says why it ended."""
        total = int(iterations or self.settings.loop.max_iterations)
        self.clear_stop()
        self.stop_reason = ""
        self.last_error = None
        records: list[IterationRecord] = []
        self.best_score = math.inf
        since_best = refusals = 0
        self.log("alignment started: %d iteration(s), corrector %s, gain %s", total, self.corrector,
                 self.settings.loop.gain if gain is None else gain)
        try:
            for i in range(total):
                self.check_stop()
                measured = self.correction.copy()
                r = self.correct_once(gain, iteration=i)
                records.append(r)
                notify(self.callbacks, "on_progress", i + 1, total)
                if r.decision.startswith("refused"):
                    refusals += 1
                    if refusals >= self.max_refusals:
                        self.stop_reason = f"{refusals} refused iterations in a row ({r.decision})"
                        if math.isfinite(self.best_score) and self.best != self.correction:
                            self.check_stop()
                            self.apply(self.best)
                            self.stop_reason += "; best correction restored"
                        break
                    continue
                refusals = 0
                score = r.estimate.score if r.estimate is not None else math.inf
                if score < self.best_score - 1e-3:
                    self.best_score, self.best = score, measured
                    since_best = 0
                else:
                    since_best += 1
                residual = r.estimate.residual_rms if r.estimate is not None else None
                if residual is not None and residual < self.settings.loop.converged_rms_rad:
                    self.stop_reason = f"converged (predicted residual {residual:.3f} rad)"
                    break
                if since_best >= self.patience:
                    self.stop_reason = f"no improvement for {since_best} iterations: best correction restored"
                    self.check_stop()
                    self.apply(self.best)
                    break
            else:
                self.stop_reason = f"iteration limit ({total})"
        except LoopStopped:
            self.stop_reason = "stopped by request"
        except DeviceError as exc:
            self.last_error = exc
            self.stop_reason = f"device failure: {exc}"
            self.log("device failure, loop stopped; the SLM keeps the last good mask: %s", exc,
                     level=logging.ERROR)
        except RefusedError as exc:
            self.stop_reason = f"refused: {exc}"
        self.log("alignment finished: %s", self.stop_reason)
        return records


def _fmt(coeffs: dict[int, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:+.3f}" for k, v in sorted(coeffs.items()) if v) + "}"


__all__ = ["AlignmentLoop", "IterationRecord", "LoopStopped", "RefusedError"]
