"""The closed alignment loop, orchestration only: acquire -> check -> centre -> estimate ->
decide -> apply -> record, with callbacks (``app.callbacks``; no Qt here, see ``docs/loop_api.md``).

The steps it calls: ``hardware.acquisition.acquire_stack``; ``calibration.measurement``
(``analyse_stack``: the refusal reasons; ``plan_centring``); any
:class:`autoalign.estimator.Estimator` (never asked which kind it is); ``app.safety`` (the limits);
``calibration.metrics`` and ``calibration.donut`` (phase, references, simulated truth).

Decisions (issues 12, 13) rest on MEASURED quantities only: the null depth and the correlation
with the ideal donut of each acquired stack (:func:`measured_score`), never an estimator's own
predicted residual. "Converged" means the measured null (+2 sigma of its shot noise, averaged over
:data:`CONFIRM_STACKS` + 1 stacks) is within the bead floor (:meth:`AlignmentLoop.ideal_null_depth`)
plus ``loop.floor_margin`` and the donut correlates with the ideal one by
``loop.aligned_min_correlation``, with a valid estimate. After every iteration the loop's
diagnosers (:mod:`autoalign.diagnosis_types`; default :class:`app.loop_diagnosis.LoopDiagnoser`)
may stop it with a named fault and the knob to turn. A bead refused at the edge is searched for
with step-limited stage moves (:meth:`AlignmentLoop.capture`); best-restore puts back only the
higher-order modes and mask offset, never a stale tip/tilt/defocus or stage position, and
re-acquires. See ``docs/loop.md``.

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
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable

import numpy as np

from autoalign.app.callbacks import LoopCallbacks, notify
from autoalign.app.loop_diagnosis import FitDiagnoser, LoopDiagnoser, limit_diagnosis
from autoalign.app.safety import RefusedError, check_correction, estimate_problem
from autoalign.calibration import donut
from autoalign.calibration.measurement import (CAPTURABLE, Measurement, analyse_stack, next_correction,
                                               plan_capture, plan_centring)
from autoalign.calibration.metrics import measurement_metrics, null_depth, null_depth_sigma
from autoalign.correction import Correction
from autoalign.diagnosis_types import Diagnoser, Diagnosis, LoopState
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
    measured_correction: Correction | None = None  # the correction on the SLM when the stack was taken
    proposed: Correction | None = None    # the correction this iteration wanted (also when refused)


#: the measured score's minimum improvement that counts (patience, best state)
MIN_SCORE_IMPROVEMENT = 0.002
#: noise sigmas added to the measured null before it is compared with the bead floor
ALIGNED_SIGMAS = 2.0
#: extra stacks of the same state acquired to confirm an aligned-looking measurement (the null is
#: averaged over all of them before the claim)
CONFIRM_STACKS = 2


def measured_score(metrics: dict[str, float]) -> float:
    """Figure of merit of an acquired stack, LOWER is better, from measured quantities only:
    ``null_depth + (1 - correlation_ideal)`` (both 0-ish for a perfect donut; inf when either is
    missing). The correlation with the ideal donut carries the large-aberration regime, where the
    centre is bright anyway; the null depth carries the fine one."""
    null, corr = metrics.get("null_depth"), metrics.get("correlation_ideal")
    if null is None or corr is None or not (math.isfinite(null) and math.isfinite(corr)):
        return math.inf
    return float(null + (1.0 - corr))


@dataclass
class LoopResult:
    """The outcome of :meth:`AlignmentLoop.run`: ``converged`` (True only when the MEASURED null
    reached the bead floor plus ``loop.floor_margin`` with a valid estimate), ``stop_reason`` (one
    line), ``diagnosis`` (what limits the result, or the aligned state), the records of this run,
    and the final measured metrics (of a stack acquired after the last change when the best
    state was restored)."""

    converged: bool
    stop_reason: str
    diagnosis: Diagnosis | None
    records: list[IterationRecord] = field(default_factory=list)
    null_floor: float = math.nan
    final_metrics: dict[str, float] = field(default_factory=dict)


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
        #: (truth_key, metrics): the truth of the state now on the SLM, computed once per state (the
        #: state an iteration measures is the one the previous iteration left: ~1 s each on 2 cores)
        self._truth_cache: tuple[bytes | None, dict[str, float]] = (None, {})
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

    def add_diagnoser(self, diagnoser: Diagnoser, first: bool = True) -> None:
        """Ask ``diagnoser`` after every iteration (before the loop's own when ``first``)."""
        if not hasattr(diagnoser, "diagnose"):
            raise TypeError(f"{type(diagnoser).__name__} has no diagnose(state, last_estimate) method")
        if first:
            self.diagnosers.insert(0, diagnoser)
        else:
            self.diagnosers.append(diagnoser)

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
        """True residual wavefront RMS (rad; what the SLM delivers against what the hidden
        aberration and a centred vortex need, Noll 1-4 removed) on the simulated microscope, else
        None (:func:`calibration.donut.true_residual_rms`)."""
        return donut.true_residual_rms(self.microscope)

    def true_null_depth(self) -> float | None:
        """TRUE null depth of the beam now on the SLM (simulated microscope only, else None)."""
        return donut.true_null_depth(self.microscope, self.settings)

    def true_mask_offset(self) -> tuple[float, float] | None:
        """Residual offset (x, y) of the delivered vortex from the beam, pupil radii (simulated
        microscope only, else None)."""
        return donut.true_mask_offset(self.microscope)

    @property
    def floor_margin(self) -> float:
        """``loop.floor_margin``: measured null depth above the bead floor still counted as aligned."""
        return float(self.settings.loop.floor_margin)

    def is_aligned(self, metrics: dict[str, float], sigmas: float = ALIGNED_SIGMAS) -> bool:
        """True when the MEASURED null depth plus ``sigmas`` (default :data:`ALIGNED_SIGMAS`) times
        its shot-noise sigma is within the bead floor (:meth:`ideal_null_depth`) plus ``loop.floor_margin`` and
        the measured donut correlates with the ideal one by at least
        ``loop.aligned_min_correlation``."""
        null, sigma = metrics.get("null_depth"), metrics.get("null_depth_sigma")
        corr = metrics.get("correlation_ideal")
        if null is None or sigma is None or corr is None or not all(map(math.isfinite, (null, sigma, corr))):
            return False
        if corr < float(self.settings.loop.aligned_min_correlation):
            return False  # a dark centre in a misshapen donut (e.g. coarse pixels) is no alignment
        return null + sigmas * sigma <= self.ideal_null_depth() + self.floor_margin

    def metrics(self, m: Measurement, prediction: dict[int, float] | None = None) -> dict[str, float]:
        """Image metrics of ``m`` (``calibration.metrics.measurement_metrics``), the predicted
        residual of ``prediction`` and, with ``truth_metrics``, the simulated truth now."""
        out = measurement_metrics(m, self.ideal_sections() if m.valid else None)
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

    def _truth(self) -> dict[str, float]:
        if not self.truth_metrics:
            return {}
        key = donut.truth_key(self.microscope)
        if key is not None and key == self._truth_cache[0]:
            return dict(self._truth_cache[1])
        out = {"true_residual_rms": self.true_residual_rms(), "true_null_depth": self.true_null_depth()}
        off = self.true_mask_offset()
        if off is not None and all(math.isfinite(v) for v in off):
            out["true_mask_offset"] = math.hypot(*off)
        out = {k: v for k, v in out.items() if v is not None}
        self._truth_cache = (key, out)
        return dict(out)

    def _confirm_aligned(self, metrics: dict[str, float]) -> bool:
        """Acquire :data:`CONFIRM_STACKS` more stacks of the same state and decide on the mean of
        all the measured null depths (sigma / sqrt(n)) with :meth:`is_aligned`; ``metrics`` gets
        the averaged figures. Called when one stack looks plausibly aligned (its null minus one
        sigma within the floor plus margin)."""
        nulls, sigmas = [metrics["null_depth"]], [metrics["null_depth_sigma"]]
        for _ in range(CONFIRM_STACKS):
            self.check_stop()
            m = self.acquire()
            if not m.valid:
                return False
            more = self.metrics(m)
            nulls.append(more["null_depth"])
            sigmas.append(more["null_depth_sigma"])
        n = len(nulls)
        metrics["null_depth"] = float(np.mean(nulls))
        metrics["null_depth_sigma"] = float(math.sqrt(sum(x * x for x in sigmas)) / n)
        metrics["confirm_stacks"] = float(n - 1)
        metrics["score"] = measured_score(metrics)
        return self.is_aligned(metrics)  # the correlation is the first stack's

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

    def capture(self, m: Measurement) -> Measurement:
        """Bring a bead refused as "bead at edge" / "no bead" back into the ROI: up to
        ``loop.capture_tries`` stage moves toward the stack's brightest region, each limited to
        ``loop.capture_max_step_um`` (:func:`calibration.measurement.plan_capture`), re-acquiring
        after each. Returns the last measurement (valid when found); when not found its ``reason``
        ends with "; bead search failed: <what was tried>". :attr:`capture_log` lists the moves."""
        tries = int(self.settings.loop.capture_tries)
        tried: list[str] = []
        for _ in range(tries):
            if m.valid or not m.reason.startswith(CAPTURABLE):
                break
            self.check_stop()
            move, what = plan_capture(m, self.settings, self.calibration)
            if move is None:
                tried.append(what)
                break
            self._move_stage(move)
            tried.append(f"{what}: stage moved by ({move[0]:+.2f}, {move[1]:+.2f}, {move[2]:+.2f}) um")
            self.log("bead search: %s", tried[-1], level=logging.WARNING)
            m = self.acquire()
        self.capture_log.extend(tried)
        if not m.valid and m.reason.startswith(CAPTURABLE) and tries > 0:
            summary = "; ".join(tried) if tried else "nothing tried"
            m.reason = f"{m.reason}; bead search failed: {len(tried)} attempt(s) ({summary})"
        return m

    # ------------------------------------------------------------------ estimation
    def check_estimate(self, est: Estimate) -> str | None:
        """Why an estimate must not be applied, or None (``app.safety.estimate_problem``)."""
        return estimate_problem(est, self.settings.loop)

    # ------------------------------------------------------------------ one iteration
    def correct_once(self, gain: float | None = None, iteration: int | None = None,
                     hold_if_aligned: bool = False) -> IterationRecord:
        """One iteration: acquire (a bead at the edge is searched for: :meth:`capture`), check,
        plan the centring, estimate, decide, apply, record. A refused measurement or estimate
        applies nothing (``decision`` says why). ``hold_if_aligned``: when the MEASURED null is at
        the bead floor (:meth:`is_aligned`) and the estimate is valid, nothing is applied and the
        decision reads "aligned: ..." (the state claimed is the one measured)."""
        t0, stacks0 = time.perf_counter(), self.stacks_acquired
        gain = self.settings.loop.gain if gain is None else float(gain)
        it = len(self.history) if iteration is None else iteration
        before = self.correction.copy()
        m = self.acquire()
        if not m.valid and m.reason.startswith(CAPTURABLE) and self.settings.loop.capture_tries > 0:
            m = self.capture(m)
            before = self.correction.copy()
        est: Estimate | None = None
        proposed: Correction | None = None

        def record(decision: str, metrics: dict[str, float]) -> IterationRecord:
            r = IterationRecord(it, m, None if est is None else est.coefficients,
                                None if est is None else est.mask_offset, self.correction.copy(), metrics,
                                decision, self.stacks_acquired - stacks0, time.perf_counter() - t0, est,
                                before, proposed)
            self.history.append(r)
            self._drop_old_stacks()
            self.log("iteration %d: %s", it, decision,
                     level=logging.INFO if decision.startswith(("applied", "aligned")) else logging.WARNING)
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
        metrics.update({f"{k}_measured": metrics[k] for k in ("true_residual_rms", "true_null_depth",
                                                              "true_mask_offset") if k in metrics})
        problem = self.check_estimate(est)
        if problem:
            return record(f"refused: {problem}", metrics)
        if hold_if_aligned and self.is_aligned(metrics, sigmas=-1.0) and self._confirm_aligned(metrics):
            return record(f"aligned: measured null {metrics['null_depth']:.4f} +- {metrics['null_depth_sigma']:.4f} "
                          f"within the bead floor {self.ideal_null_depth():.4f} + {self.floor_margin:g}; "
                          "nothing applied", metrics)
        new = proposed = next_correction(before, est, ttd, gain)
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
        keeping the current tip/tilt/defocus and stage position (they follow the bead, which may
        have drifted since), then acquire a stack so the last record is the state on the SLM
        now. Returns that record."""
        t0, stacks0 = time.perf_counter(), self.stacks_acquired
        keep = {k: v for k, v in self.correction.coefficients.items() if k < 5}
        keep.update({k: v for k, v in self.best.coefficients.items() if k >= 5})
        before = self.correction.copy()
        self.apply(Correction(keep, tuple(self.best.mask_offset)))
        m = self.acquire()
        metrics = self.metrics(m)
        r = IterationRecord(iteration, m, None, None, self.correction.copy(), metrics,
                            "restored: best measured higher-order correction and mask offset "
                            "(tip/tilt/defocus and stage kept); re-acquired",
                            self.stacks_acquired - stacks0, time.perf_counter() - t0, None, before, None)
        self.history.append(r)
        self._drop_old_stacks()
        notify(self.callbacks, "on_iteration", r)
        return r

    def _limits_text(self, records: list[IterationRecord]) -> str:
        """The last measured null against the bead floor, and what the estimator said limits it
        (``extras["fit_refused"]`` of the last estimate, e.g. a fit that did not explain the data)."""
        last = next((r.estimate for r in reversed(records) if r.estimate is not None), None)
        note = str((last.extras or {}).get("fit_refused") or "") if last is not None else ""
        note = f"; {note}" if note else ""
        for r in reversed(records):
            null = (r.metrics or {}).get("null_depth")
            if null is not None and math.isfinite(null):
                sigma = r.metrics.get("null_depth_sigma", math.nan)
                return (f"measured null {null:.4f} +- {sigma:.4f} vs the bead floor {self.ideal_null_depth():.4f} "
                        f"(+{self.floor_margin:g}){note}")
        return "no valid measurement" + note

    def run(self, iterations: int | None = None, gain: float | None = None) -> list[IterationRecord]:
        """Iterate until the MEASURED donut is aligned (null depth + 2 sigma within the bead floor
        plus ``loop.floor_margin``, valid estimate: "converged"; checked once
        ``loop.min_corrections`` corrections were applied, since the bead floor cannot see the
        last ~0.1 rad that the estimator still reads), a diagnoser stops it ("stopped:
        <cause>: <action>", e.g. a flipped frame or a mask offset beyond the SLM's range), the
        iteration limit, no improvement of the measured score (:func:`measured_score`) for
        ``patience`` iterations, ``loop.max_refusals`` refusals in a row, a stop request or a
        device failure (the SLM keeps the last good mask). On no improvement, refusals and
        diagnosed faults the best measured higher-order correction is restored
        (:meth:`restore_best`). Never decides on an estimator's own predicted residual.

        Returns this run's records; :attr:`stop_reason`, :attr:`diagnosis` and :attr:`result`
        (:class:`LoopResult`) say how it ended."""
        total = int(iterations or self.settings.loop.max_iterations)
        self.clear_stop()
        self.stop_reason = ""
        self.last_error = None
        self.diagnosis = None
        self.capture_log = []
        records: list[IterationRecord] = []
        self.best_score = math.inf
        self.best = self.correction.copy()
        since_best = refusals = 0
        converged = False
        self.log("alignment started: %d iteration(s), corrector %s, gain %s", total, self.corrector,
                 self.settings.loop.gain if gain is None else gain)

        def restore(i: int) -> str:
            if not math.isfinite(self.best_score):
                return ""
            self.check_stop()
            records.append(self.restore_best(i))
            return "; best higher-order correction restored"

        try:
            for i in range(total):
                self.check_stop()
                applied = sum(1 for x in records if x.decision.startswith("applied"))
                r = self.correct_once(gain, iteration=i,
                                      hold_if_aligned=applied >= int(self.settings.loop.min_corrections))
                records.append(r)
                notify(self.callbacks, "on_progress", i + 1, total)
                score = r.metrics.get("score", math.inf) if r.measurement.valid else math.inf
                if score < self.best_score - MIN_SCORE_IMPROVEMENT:
                    self.best_score, self.best = score, (r.measured_correction or self.correction).copy()
                    since_best = 0
                elif not r.decision.startswith("refused"):
                    since_best += 1
                found = self.diagnose(records)
                if found is not None and found.stop:
                    self.diagnosis = found
                    if found.success:
                        converged = True
                        self.stop_reason = f"converged: {found.cause}"
                    else:
                        self.stop_reason = f"stopped: {found.message()}"
                        if found.name == "flipped_frame" or self.best != self.correction:
                            self.stop_reason += restore(i + 1)
                    break
                if r.decision.startswith("refused"):
                    refusals += 1
                    if refusals >= self.max_refusals:
                        self.stop_reason = f"{refusals} refused iterations in a row ({r.decision})"
                        if self.best != self.correction:
                            self.stop_reason += restore(i + 1)
                        break
                    continue
                refusals = 0
                if since_best >= self.patience:
                    self.stop_reason = (f"no improvement of the measured donut for {since_best} iterations "
                                        f"({self._limits_text(records)})")
                    self.stop_reason += restore(i + 1)
                    break
            else:
                self.stop_reason = f"iteration limit ({total}): {self._limits_text(records)}"
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


def _fmt(coeffs: dict[int, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:+.3f}" for k, v in sorted(coeffs.items()) if v) + "}"


__all__ = ["AlignmentLoop", "IterationRecord", "LoopResult", "LoopStopped", "RefusedError", "measured_score",
           "MIN_SCORE_IMPROVEMENT", "ALIGNED_SIGMAS", "CONFIRM_STACKS"]
