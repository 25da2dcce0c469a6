"""The closed alignment loop, orchestration only: acquire -> check -> centre -> estimate ->
decide -> apply -> record, with callbacks (``app.callbacks``; no Qt here, see ``docs/loop_api.md``).

:class:`AlignmentLoop` builds on :class:`app.loop_host.LoopHost` (the devices: the one checked gate
to the SLM, acquisition and analysis, stage moves, references and simulated truth) and calls:
``calibration.measurement`` (``plan_centring``, ``next_correction``); any
:class:`autoalign.estimator.Estimator` (never asked which kind it is); ``app.safety`` (the limits);
and the rules, each in its own module with its own tests: ``app.loop_records`` (records,
:func:`measured_score`), ``app.loop_capture`` (the bead search), ``app.loop_confirm`` (aligned?
the confirmation stacks), ``app.loop_stop`` (stop rules, what a best-restore shows),
``app.loop_diagnosis`` (named faults).

Decisions rest on MEASURED quantities only (the measured residual wavefront of each acquired
stack, ``calibration.quality``: the model fit's when it explains the data, else the donut's shape
against the ideal one; the null depth and the correlation with the ideal donut), never an
estimator's own predicted residual (a network's reading, a fit that does not explain the data). Nothing is applied
from an invalid measurement or a refused estimate; a device failure stops the loop cleanly and
nothing is sent after it. Every decision goes to the ``autoalign.loop`` logger and the ``on_log``
callback. See ``docs/loop.md``.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any
from collections.abc import Callable

from autoalign.app import loop_confirm
from autoalign.app.callbacks import LoopCallbacks, notify
from autoalign.app.loop_capture import capturable, search_bead
from autoalign.app.loop_confirm import ALIGNED_SIGMAS, CONFIRM_STACKS
from autoalign.app.loop_diagnosis import FitDiagnoser, LoopDiagnoser, limit_diagnosis
from autoalign.app.loop_host import LoopHost
from autoalign.app.loop_records import IterationRecord, LoopResult, LoopStopped, measured_score, record_score
from autoalign.app.loop_stop import (MIN_SCORE_IMPROVEMENT, Stop, StopRules, applied_corrections, limits_text,
                                     restored_correction)
from autoalign.app.safety import RefusedError, estimate_problem
from autoalign.calibration.measurement import Measurement, next_correction, plan_centring
from autoalign.calibration.metrics import measurement_metrics, null_depth_sigma
from autoalign.calibration.quality import ALIGNED_RAD, Quality, measurement_quality
from autoalign.correction import Correction
from autoalign.diagnosis_types import Diagnoser, Diagnosis, LoopState
from autoalign.estimator import Estimate, Estimator
from autoalign.hardware.base import DeviceError, Stack
from autoalign.settings import Settings

logger = logging.getLogger("autoalign.loop")


class AlignmentLoop(LoopHost):
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
        super().__init__(devices, settings, callbacks, calibration, acquire_stack, truth_metrics)
        self.best = Correction()
        self.best_score = math.inf
        self.history: list[IterationRecord] = []
        self.stop_reason = ""
        self.last_error: Exception | None = None
        self.patience = settings.loop.patience
        self.max_refusals = settings.loop.max_refusals
        self.estimator = estimator
        #: asked in order after every iteration; the first diagnosis wins (``add_diagnoser``)
        self.diagnosers: list[Diagnoser] = [FitDiagnoser(), LoopDiagnoser()]
        self.diagnosis: Diagnosis | None = None
        self.result: LoopResult | None = None
        self.capture_log: list[str] = []

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

    def add_diagnoser(self, diagnoser: Diagnoser, first: bool = True) -> None:
        """Ask ``diagnoser`` after every iteration (before the loop's own when ``first``)."""
        if not hasattr(diagnoser, "diagnose"):
            raise TypeError(f"{type(diagnoser).__name__} has no diagnose(state, last_estimate) method")
        if first:
            self.diagnosers.insert(0, diagnoser)
        else:
            self.diagnosers.append(diagnoser)

    # ------------------------------------------------------------------ decisions on measurements
    @property
    def floor_margin(self) -> float:
        """``loop.floor_margin``: measured null depth above the bead floor still counted as aligned."""
        return float(self.settings.loop.floor_margin)

    def is_aligned(self, metrics: dict[str, float], sigmas: float = ALIGNED_SIGMAS) -> bool:
        """The MEASURED residual (+ ``sigmas`` x its sigma) within ``calibration.quality.ALIGNED_RAD``,
        the null not above the bead floor + ``loop.floor_margin`` beyond its noise, and the
        correlation >= ``loop.aligned_min_correlation`` (:func:`app.loop_confirm.is_aligned`)."""
        return loop_confirm.is_aligned(metrics, self.ideal_null_depth(), self.floor_margin,
                                       float(self.settings.loop.aligned_min_correlation), sigmas)

    def metrics(self, m: Measurement, prediction: dict[int, float] | None = None,
                estimate: Estimate | None = None) -> dict[str, float]:
        """Image metrics of ``m`` (``calibration.metrics.measurement_metrics``), its null depth's
        shot-noise sigma, the measured quality figure (``quality_rad`` ...: the residual wavefront
        the stack shows, from the model fit of ``estimate`` when it explains the data, else from
        the donut's shape; :func:`calibration.quality.quality_figure`), the measured ``score``, the
        predicted residual of ``prediction`` and, with ``truth_metrics``, the simulated truth now."""
        ideal = self.ideal_sections() if m.valid else None
        out = measurement_metrics(m, ideal)
        out.update(measurement_quality(m, ideal, self.settings, estimate).as_metrics())
        cam = self.settings.camera
        qe = float(cam.quantum_efficiency)
        out["null_depth_sigma"] = (null_depth_sigma(m.sections, m.background_photons, qe,
                                                    float(cam.read_noise_electrons) / qe)
                                   if m.valid else math.nan)
        out["score"] = measured_score(out)
        if prediction is not None:
            out["predicted_residual_rms"] = Estimate.residual_of(prediction)
        out.update(self._truth())
        return out

    def _confirm_aligned(self, metrics: dict[str, float]) -> bool:
        """:data:`CONFIRM_STACKS` more stacks of this state, decided on the mean null of all
        (:func:`app.loop_confirm.confirm_aligned`; ``metrics`` gets the pooled figures)."""
        def measure() -> dict[str, float] | None:
            m = self.acquire()
            return self.metrics(m) if m.valid else None

        return loop_confirm.confirm_aligned(metrics, measure, self.is_aligned, CONFIRM_STACKS, self.check_stop)

    # ------------------------------------------------------------------ centring
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

    def capture(self, m: Measurement) -> Measurement:
        """Bring a bead refused as "bead at edge" / "no bead" back into the ROI
        (:func:`app.loop_capture.search_bead`). Returns the last measurement; when the bead was not
        found its ``reason`` ends with "; bead search failed: <what was tried>"; :attr:`capture_log`
        lists the moves."""
        m, tried = search_bead(m, self.settings, self.calibration, acquire=self.acquire,
                               move_stage=self._move_stage, check_stop=self.check_stop, log=self.log)
        self.capture_log.extend(tried)
        return m

    # ------------------------------------------------------------------ one iteration
    def check_estimate(self, est: Estimate) -> str | None:
        """Why an estimate must not be applied, or None (``app.safety.estimate_problem``)."""
        return estimate_problem(est, self.settings.loop)

    def correct_once(self, gain: float | None = None, iteration: int | None = None,
                     hold_if_aligned: bool = False) -> IterationRecord:
        """One iteration: acquire (a bead at the edge is searched for: :meth:`capture`), check,
        plan the centring, estimate, decide, apply, record. A refused measurement or estimate
        applies nothing (``decision`` says why). ``hold_if_aligned``: when the MEASURED null is at
        the bead floor (:meth:`is_aligned`, confirmed on more stacks) and the estimate is valid,
        nothing is applied and the decision reads "aligned: ..." (the state claimed is the one measured)."""
        t0, stacks0 = time.perf_counter(), self.stacks_acquired
        gain = self.settings.loop.gain if gain is None else float(gain)
        it = len(self.history) if iteration is None else iteration
        before = self.correction.copy()
        m = self.acquire()
        if capturable(m, self.settings):
            m = self.capture(m)
            before = self.correction.copy()
        est: Estimate | None = None
        proposed: Correction | None = None

        def record(decision: str, metrics: dict[str, float]) -> IterationRecord:
            return self._record(IterationRecord(
                it, m, None if est is None else est.coefficients, None if est is None else est.mask_offset,
                self.correction.copy(), metrics, decision, self.stacks_acquired - stacks0,
                time.perf_counter() - t0, est, before, proposed))

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
        metrics = self.metrics(m, est.coefficients, est)
        metrics.update({f"{k}_measured": metrics[k] for k in ("true_residual_rms", "true_null_depth",
                                                              "true_mask_offset") if k in metrics})
        problem = self.check_estimate(est)
        if problem:
            return record(f"refused: {problem}", metrics)
        if hold_if_aligned and self.is_aligned(metrics, sigmas=-1.0) and self._confirm_aligned(metrics):
            q = Quality.from_metrics(metrics)
            return record(f"aligned: measured {q.text() if q else 'residual unknown'} within {ALIGNED_RAD:g} rad, "
                          f"null {metrics['null_depth']:.4f} +- {metrics['null_depth_sigma']:.4f} "
                          f"at the bead floor {self.ideal_null_depth():.4f} + {self.floor_margin:g}; "
                          "nothing applied", metrics)
        new = proposed = next_correction(before, est, ttd, gain)
        try:
            self.check_correction(new)
            self.check_stop()
            if move is not None:
                self._move_stage(move)
            self._show(new)
        except RefusedError as exc:
            return record(f"refused: {exc}", metrics)
        self.correction = new
        metrics.update(self._truth())  # the state after this iteration's correction
        return record("applied" + (" (stage re-centred)" if move is not None else ""), metrics)

    def _record(self, r: IterationRecord, log: bool = True) -> IterationRecord:
        """Append ``r`` to :attr:`history`, drop old raw stacks, log and notify."""
        self.history.append(r)
        self._drop_old_stacks()
        if log:
            self.log("iteration %d: %s", r.iteration, r.decision,
                     level=logging.INFO if r.decision.startswith(("applied", "aligned")) else logging.WARNING)
        notify(self.callbacks, "on_iteration", r)
        return r

    def _drop_old_stacks(self) -> None:
        for old in self.history[: -self.keep_raw_stacks] if self.keep_raw_stacks else self.history:
            old.measurement.stack = None

    # ------------------------------------------------------------------ run
    def loop_state(self, records: list[IterationRecord]) -> LoopState:
        """What the diagnosers are shown (:class:`autoalign.diagnosis_types.LoopState`)."""
        return LoopState(records, self.ideal_null_depth(), self.floor_margin, self.settings,
                         {"capture_log": list(self.capture_log), "corrector": self.corrector})

    def diagnose(self, records: list[IterationRecord]) -> Diagnosis | None:
        """The first diagnosis of :attr:`diagnosers` for this run so far (a diagnoser that
        raises is logged and skipped)."""
        state = self.loop_state(records)
        last = records[-1].estimate if records else None
        for d in self.diagnosers:
            try:
                found = d.diagnose(state, last)
            except Exception:  # noqa: BLE001 - a diagnosis never breaks the loop
                logger.exception("diagnoser %s failed", type(d).__name__)
                continue
            if found is not None:
                return found
        return None

    def restore_best(self, iteration: int) -> IterationRecord:
        """Put back the best MEASURED state's higher-order modes (Noll >= 5) and mask offset,
        keeping the current tip/tilt/defocus and stage position
        (:func:`app.loop_stop.restored_correction`), then acquire a stack so the last record is
        the state on the SLM now. Returns that record."""
        t0, stacks0 = time.perf_counter(), self.stacks_acquired
        before = self.correction.copy()
        self.apply(restored_correction(self.correction, self.best))
        m = self.acquire()
        return self._record(IterationRecord(
            iteration, m, None, None, self.correction.copy(), self.metrics(m),
            "restored: best measured higher-order correction and mask offset (tip/tilt/defocus and stage kept); "
            "re-acquired", self.stacks_acquired - stacks0, time.perf_counter() - t0, None, before, None), log=False)

    def run(self, iterations: int | None = None, gain: float | None = None) -> list[IterationRecord]:
        """Iterate until the MEASURED donut is aligned ("converged"; checked once
        ``loop.min_corrections`` corrections were applied), a diagnoser stops it ("stopped:
        <cause>: <action>"), the iteration limit, no improvement of the measured score for
        ``patience`` iterations, ``loop.max_refusals`` refusals in a row (the rules:
        :class:`app.loop_stop.StopRules`; the best measured higher-order correction is restored
        where they say so: :meth:`restore_best`), a stop request or a device failure (the SLM
        keeps the last good mask).

        Returns this run's records; :attr:`stop_reason`, :attr:`diagnosis` and :attr:`result`
        (:class:`LoopResult`) say how it ended."""
        total = int(iterations or self.settings.loop.max_iterations)
        self.clear_stop()
        self.stop_reason, self.last_error, self.diagnosis, self.capture_log = "", None, None, []
        records: list[IterationRecord] = []
        self.best_score, self.best = math.inf, self.correction.copy()
        rules = StopRules(self.patience, self.max_refusals)
        reset = getattr(self.estimator, "reset", None)  # a run depends on the devices and settings only
        if callable(reset):
            reset()
        converged = False
        self.log("alignment started: %d iteration(s), corrector %s, gain %s", total, self.corrector,
                 self.settings.loop.gain if gain is None else gain)

        def limits() -> str:
            return limits_text(records, self.ideal_null_depth(), self.floor_margin)

        try:
            stop: Stop | None = None
            for i in range(total):
                self.check_stop()
                hold = applied_corrections(records) >= int(self.settings.loop.min_corrections)
                r = self.correct_once(gain, iteration=i, hold_if_aligned=hold)
                records.append(r)
                notify(self.callbacks, "on_progress", i + 1, total)
                if rules.improved(r, self.best_score):
                    self.best_score, self.best = record_score(r), (r.measured_correction or self.correction).copy()
                stop = rules.decide(r, self.diagnose(records), self.best != self.correction, limits)
                if stop is not None:
                    self.stop_reason, self.diagnosis, converged = stop.reason, stop.diagnosis, stop.converged
                    if stop.restore and math.isfinite(self.best_score):
                        self.check_stop()
                        records.append(self.restore_best(i + 1))
                        self.stop_reason += "; best higher-order correction restored"
                    break
            else:
                self.stop_reason = StopRules.at_limit(total, limits).reason
        except LoopStopped:
            self.stop_reason = "stopped by request"
        except DeviceError as exc:
            self.last_error = exc
            self.stop_reason = f"device failure: {exc}"
            self.log("device failure, loop stopped; the SLM keeps the last good mask: %s", exc,
                     level=logging.ERROR)
        except RefusedError as exc:
            self.stop_reason = f"refused: {exc}"
        if self.diagnosis is None and records:
            self.diagnosis = limit_diagnosis(self.loop_state(records), self.stop_reason)
        self.result = LoopResult(converged, self.stop_reason, self.diagnosis, records,
                                 self.ideal_null_depth() if records else math.nan,
                                 dict(records[-1].metrics) if records else {})
        self.log("alignment finished: %s", self.stop_reason)
        return records



__all__ = ["AlignmentLoop", "IterationRecord", "LoopResult", "LoopStopped", "RefusedError", "measured_score",
           "MIN_SCORE_IMPROVEMENT", "ALIGNED_SIGMAS", "CONFIRM_STACKS", "Correction", "Measurement"]
