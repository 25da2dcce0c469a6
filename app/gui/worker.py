"""The worker that owns the devices and the alignment loop, living in its own ``QThread``.

The window never touches a device or the loop: it sends requests through :attr:`AlignWorker.request`
-like signals connected (queued) to :meth:`AlignWorker.execute`, and receives everything back through
the worker's signals. The loop's callbacks (called in the worker thread) are turned into Qt signals,
which Qt delivers queued to the GUI thread.

The one exception is :meth:`AlignWorker.stop`: it is called directly from the GUI thread, because the
worker's event loop is busy while a run is in progress. It only sets the loop's (and the bead walk's)
thread-safe stop flag, which the loop honours between steps.

Every request runs inside one ``try``: an exception is logged, reported through :attr:`error` and the
worker stays alive for the next request. Safety of the SLM (it stays on the last good mask) is the
loop's guarantee; the worker only reports it.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PyQt5 import QtCore

from autoalign.app.estimators import make_estimator

log = logging.getLogger(__name__)


def _default_open_devices(settings):
    from autoalign.hardware.factory import open_devices

    return open_devices(settings)


def _default_load_predictor(settings):
    from autoalign.models.predictor import Predictor

    return Predictor.load(None, settings)


def _default_make_loop(devices, settings, predictor, callbacks):
    from autoalign.app.loop import AlignmentLoop

    return AlignmentLoop(devices, settings, make_estimator("model", settings, predictor), callbacks=callbacks)


class _LoopCallbacks:
    """The loop's callback object: each callback becomes a signal emission (thread-safe)."""

    def __init__(self, worker: "AlignWorker") -> None:
        self._w = worker

    def on_log(self, message: str) -> None:
        self._w.log.emit(str(message))

    def on_measurement(self, m: Any) -> None:
        self._w.measurement.emit(m)

    def on_iteration(self, r: Any) -> None:
        self._w.iteration.emit(r)

    def on_progress(self, done: int, total: int | None) -> None:
        self._w.progress.emit(int(done), -1 if total is None else int(total))

    def on_slm_phase(self, phase_rad: np.ndarray) -> None:
        self._w.slm_phase.emit(np.array(phase_rad, dtype=np.float32, copy=True))


class AlignWorker(QtCore.QObject):
    """Owns the devices, the predictor and the :class:`app.loop.AlignmentLoop`.

    Move it to a ``QThread`` and connect a ``pyqtSignal(str, dict)`` of the window to
    :meth:`execute`; requests are names of the ``do_<name>`` methods below.
    """

    # everything the window shows comes through these
    log = QtCore.pyqtSignal(str)
    measurement = QtCore.pyqtSignal(object)      # app.loop.Measurement
    iteration = QtCore.pyqtSignal(object)        # app.loop.IterationRecord
    progress = QtCore.pyqtSignal(int, int)       # done, total (-1: unknown)
    slm_phase = QtCore.pyqtSignal(object)        # np.ndarray, radians (as given to the SLM)
    state = QtCore.pyqtSignal(object)            # dict: correction, true_residual_rms, ...
    busy = QtCore.pyqtSignal(bool, str)          # busy?, task name
    error = QtCore.pyqtSignal(str, str)          # task, message (already in the log)
    finished = QtCore.pyqtSignal(str, object)    # task, result (task-specific, may be None)
    ready = QtCore.pyqtSignal(object)            # dict describing the devices and the model
    reference = QtCore.pyqtSignal(object)        # app.gui.reference.IdealReference
    current_state = QtCore.pyqtSignal(object)    # dict: the state on the SLM now, imaged
    closed = QtCore.pyqtSignal()

    def __init__(
        self,
        settings: Any,
        open_devices: Callable[[Any], Any] | None = None,
        load_predictor: Callable[[Any], Any] | None = None,
        make_loop: Callable[..., Any] | None = None,
        corrector: str | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.initial_corrector = corrector or str(getattr(settings.loop, "corrector", "model"))
        self._open_devices = open_devices or _default_open_devices
        self._load_predictor = load_predictor or _default_load_predictor
        self._make_loop = make_loop or _default_make_loop
        self.devices: Any = None
        self.predictor: Any = None
        self.loop: Any = None
        self._walk: Any = None                   # the running BeadWalk, for stop()
        self._lock = threading.Lock()            # guards _walk / loop references used by stop()
        self._callbacks = _LoopCallbacks(self)
        self._closed = False
        self._stop_requested_at = -1.0           # time.monotonic() of the last stop()

    # ------------------------------------------------------------------ called from the GUI thread
    def stop(self) -> None:
        """Ask the running loop / bead walk to stop between steps. Thread-safe; called directly."""
        with self._lock:
            self._stop_requested_at = time.monotonic()
            loop, walk = self.loop, self._walk
        for obj in (walk, loop):
            if obj is not None and hasattr(obj, "stop"):
                try:
                    obj.stop()
                except Exception:  # noqa: BLE001 - stopping must never raise into the GUI
                    log.exception("stop failed")

    # ------------------------------------------------------------------ worker thread
    @QtCore.pyqtSlot(str, dict)
    def execute(self, name: str, kwargs: dict) -> None:
        """Run one request ``do_<name>(**kwargs)``; report errors, never raise."""
        handler = getattr(self, f"do_{name}", None)
        refusal = None
        if handler is None:
            refusal = f"unknown request {name!r}"
        elif self._closed and name != "shutdown":
            refusal = "the devices are closed"
        elif name not in ("open", "shutdown") and self.loop is None:
            refusal = "the devices are not open (see the log for why)"
        if refusal is not None:
            self.log.emit(f"ERROR in {name}: {refusal}")
            self.error.emit(name, refusal)
            self.busy.emit(False, name)
            return
        sent_at = kwargs.pop("_sent_at", None)
        if (name not in ("open", "shutdown") and sent_at is not None
                and self._stop_requested_at >= sent_at):
            # Stop was pressed after this request was sent, before it started: don't start it
            self.log.emit(f"{name}: stopped before it started")
            self.busy.emit(False, name)
            self.finished.emit(name, None)
            return
        self.busy.emit(True, name)
        t0 = time.perf_counter()
        result = None
        failure: str | None = None
        if name not in ("open", "shutdown"):
            self._clear_stop()   # a stale Stop (before this request) must not stop it
        try:
            result = handler(**kwargs)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the worker lives on
            if type(exc).__name__ == "LoopStopped":   # Stop pressed during a single step
                self.log.emit(f"{name}: stopped by request")
                self._emit_state()
                self.busy.emit(False, name)
                self.finished.emit(name, None)
                return
            log.debug("request %s failed:\n%s", name, traceback.format_exc())
            failure = f"{type(exc).__name__}: {exc}"
            self.log.emit(f"ERROR in {name}: {failure}")
            if self.loop is not None:
                self.log.emit("The SLM keeps the last good mask.")
        else:
            self.log.emit(f"{name}: done in {time.perf_counter() - t0:.2f} s")
        # state first, then not-busy, then the outcome: a listener of finished/error can start
        # the next request straight away
        if name != "shutdown":
            self._emit_state()
        self.busy.emit(False, name)
        if failure is not None:
            self.error.emit(name, failure)
        else:
            self.finished.emit(name, result)

    def _clear_stop(self) -> None:
        """Forget a Stop pressed before this request (the loop's flag stays set after a stop,
        and single steps such as correct_once or the self-check honour it)."""
        if self.loop is not None:
            self.loop.clear_stop()

    def _emit_state(self) -> None:
        loop = self.loop
        if loop is None:
            return
        state: dict[str, Any] = {}
        try:  # a copy: the window must never share mutable state with the worker thread
            corr = loop.correction
            state["correction"] = corr.copy() if hasattr(corr, "copy") else copy.deepcopy(corr)
        except Exception:  # noqa: BLE001
            state["correction"] = None
        try:
            state["true_residual_rms"] = loop.true_residual_rms()
        except Exception:  # noqa: BLE001
            state["true_residual_rms"] = None
        try:   # the corrector the loop uses: the one truth the window and the report show
            state["corrector"] = str(loop.corrector)
        except Exception:  # noqa: BLE001
            pass
        try:
            state["history_length"] = len(loop.history)
        except Exception:  # noqa: BLE001
            pass
        self.state.emit(state)

    # --- requests -------------------------------------------------------------------------------
    def do_open(self) -> dict:
        s = self.settings
        if self.loop is not None:
            raise RuntimeError("the devices are already open")
        self.log.emit(
            f"Opening devices: hardware backend '{s.hardware.backend}', SLM backend '{s.slm.backend}'"
        )
        self.devices = self._open_devices(s)
        info: dict[str, Any] = {
            "backend": s.hardware.backend,
            "slm_backend": s.slm.backend,
            "simulated": getattr(self.devices, "microscope", None) is not None,
        }
        try:
            self.predictor = self._load_predictor(s)
            info["model"] = str(getattr(self.predictor, "name", None)
                                or getattr(self.predictor, "architecture", None)
                                or s.model.architecture)
            self.log.emit(f"Model loaded: {info['model']} ({s.model.checkpoint})")
        except Exception as exc:  # noqa: BLE001 - the GUI stays useful without a model
            self.predictor = None
            info["model"] = None
            self.log.emit(
                f"WARNING: no model ({type(exc).__name__}: {exc}); acquire and centre work, "
                "correction needs a model"
            )
        try:
            loop = self._make_loop(self.devices, s, self.predictor, self._callbacks)
        except Exception:
            devices, self.devices = self.devices, None
            self._close_devices(devices)
            raise
        if self.initial_corrector != "model":
            loop.estimator = make_estimator(self.initial_corrector, s, self.predictor)
        info["corrector"] = getattr(loop, "corrector", "model")
        self._use_saved_calibration(loop, s)
        with self._lock:
            self.loop = loop
        self.ready.emit(info)
        self._show_start_mask()
        self._emit_reference()
        return info

    def _use_saved_calibration(self, loop: Any, settings: Any) -> None:
        """Use the poke calibration saved for these optics, as ``align`` does (one log line)."""
        from autoalign.calibration.poke import load_matching_calibration

        try:
            cal, message = load_matching_calibration(settings)
        except Exception as exc:  # noqa: BLE001 - a broken calibration file: optics formulas, said so
            cal, message = None, f"WARNING: saved poke calibration not used ({exc}); using the optics formulas"
        if cal is not None:
            loop.calibration = cal
        if message:
            self.log.emit(message)

    def _show_start_mask(self) -> None:
        """Start on the beam's mask (the vortex) plus the loop's correction, never a flat SLM."""
        try:
            self.loop.apply(self.loop.correction)   # checked; emits the phase it shows
            self.log.emit(f"SLM: {self.settings.optics.beam} mask + correction shown")
        except Exception as exc:  # noqa: BLE001 - report and show what the SLM holds
            self.log.emit(f"WARNING: could not show the mask on the SLM: {exc}")
            phase = getattr(self.devices.slm, "phase_rad", None)
            if phase is not None:
                self.slm_phase.emit(np.array(phase, dtype=np.float32, copy=True))

    def _emit_reference(self) -> None:
        """The ideal donut through the bead (profiles' overlay and the null floor)."""
        try:
            from autoalign.app.gui.reference import ideal_reference

            self.reference.emit(ideal_reference(self.settings))
        except Exception as exc:  # noqa: BLE001 - the window works without it
            self.log.emit(f"WARNING: no ideal donut for comparison: {exc}")
        if not callable(getattr(self.loop, "ideal_sections", None)):
            return
        try:   # what the measured quality figure compares with, once (~5 s): not inside a run
            from autoalign.calibration.quality import shape_constant

            self.loop.ideal_sections()
            shape_constant(self.settings)
        except Exception as exc:  # noqa: BLE001 - the loop then reads no shape figure, and says so
            self.log.emit(f"WARNING: no shape calibration for the measured residual: {exc}")

    def _image_current_state(self, event: str) -> None:
        """Acquire once more so the window shows the state on the SLM now (after a run, a
        best-restore, a single correction, a zero or a load). A failure is only reported."""
        try:
            m = self.loop.acquire()
            # the measured residual as the run measured it: with the estimator's model fit when it
            # reads one stack (not a probing one: it would change the SLM), else the donut's shape
            est = None
            if getattr(m, "valid", False) and not getattr(self.loop.estimator, "probes", True):
                try:
                    est = self.loop.estimator.estimate(m)
                except Exception:  # noqa: BLE001 - the shape still reads it
                    est = None
            metrics = dict(self.loop.metrics(m, None, est))
            self.current_state.emit({"event": event, "metrics": metrics,
                                     "correction": self.loop.correction.copy(),
                                     "valid": bool(getattr(m, "valid", True)),
                                     "timestamp": time.time()})
        except Exception as exc:  # noqa: BLE001
            self.log.emit(f"WARNING: the state on the SLM now could not be imaged: {exc}")

    def do_acquire(self) -> Any:
        m = self.loop.acquire()
        self._report_measurement(m)
        return m

    def do_centre(self) -> Any:
        from autoalign.app.gui.text import tip_tilt_defocus_text

        before = dict(self.loop.correction.coefficients)
        m = self.loop.centre()
        self._report_measurement(m)
        if getattr(m, "valid", True):
            self.log.emit(f"Centre: {tip_tilt_defocus_text(before, self.loop.correction.coefficients)}")
        return m

    def _report_measurement(self, m: Any) -> None:
        valid = getattr(m, "valid", True)
        reason = getattr(m, "reason", "")
        photons = getattr(m, "photons", float("nan"))
        offset = getattr(m, "offset_um", None)   # µm, like the stage moves the loop logs
        where = ""
        if getattr(m, "centroid", None) is not None and offset is not None and len(offset) == 3:
            where = (f", centre of mass ({offset[0]:+.3f}, {offset[1]:+.3f}, {offset[2]:+.3f}) µm from the "
                     "ROI centre (x, y, z)")
        self.log.emit(
            f"Stack: {'valid' if valid else 'INVALID (' + str(reason) + ')'}, "
            f"{photons:.3g} photons{where}"
        )

    def do_correct_once(self, gain: float | None = None) -> Any:
        record = self.loop.correct_once(gain=gain)
        self._image_current_state("correct_once")
        return record

    def do_run(self, iterations: int | None = None, gain: float | None = None) -> Any:
        before = self._true_residual()
        records = self.loop.run(iterations=iterations, gain=gain)
        after = self._true_residual()
        reason = str(getattr(self.loop, "stop_reason", "") or "")
        if before is not None and after is not None:
            self.log.emit(f"True residual (simulated microscope): {before:.3f} rad RMS before this "
                          f"run, {after:.3f} rad RMS after it")
        error = getattr(self.loop, "last_error", None)
        if error is not None:  # the loop stopped cleanly on a device failure: surface it
            raise RuntimeError(f"{reason or error} (after {len(records or [])} iteration(s))")
        if reason != "stopped by request":
            self._image_current_state("restored" if "restored" in reason else "run")
        return {"records": len(records or []), "true_before": before, "true_after": after,
                "stop_reason": reason,
                "diagnosis": str(getattr(self.loop, "diagnosis", "") or "")}

    def _true_residual(self) -> float | None:
        try:
            return self.loop.true_residual_rms()
        except Exception:  # noqa: BLE001
            return None

    def do_set_corrector(self, corrector: str) -> str:
        """``"model"`` (the CNN), ``"refined"`` (CNN + model-based fit with fault diagnosis) or
        ``"modal"`` (classical sensorless modal AO, many stacks)."""
        if corrector not in ("model", "refined", "modal"):
            raise ValueError(f"corrector must be 'model', 'refined' or 'modal', got {corrector!r}")
        self.loop.estimator = make_estimator(corrector, self.settings, self.predictor)
        if hasattr(self.loop, "best_score"):   # scores of the two correctors don't compare
            self.loop.best_score = float("inf")
        self.log.emit(f"Corrector: {corrector}")
        return corrector

    def do_new_aberration(self, rms_rad: float | None = None, seed: int | None = None) -> float:
        """Simulated microscope only: draw a fresh hidden aberration (``simulation`` settings)."""
        mic = getattr(self.devices, "microscope", None)
        if mic is None:
            raise RuntimeError("a new hidden aberration needs the simulated microscope")
        from autoalign.simulation.microscope import draw_aberration

        sim = self.settings.simulation
        rms = float(sim.aberration_rms_rad if rms_rad is None else rms_rad)
        mic.set_aberration(draw_aberration(np.random.default_rng(seed), sim.aberration_modes, rms))
        self.log.emit(f"Simulated microscope: new hidden aberration of {rms:.2f} rad RMS over "
                      f"Noll {min(sim.aberration_modes)}..{max(sim.aberration_modes)}")
        return rms

    def do_zero_slm(self) -> None:
        self.loop.zero_slm()
        self._image_current_state("zero_slm")

    def do_save_correction(self, path: str) -> str:
        self.loop.correction.save_yaml(path, settings=self.settings)
        self.log.emit(f"Correction saved to {path}")
        return path

    def do_load_correction(self, path: str) -> Any:
        """Read and check the file first (format header, modes these settings correct, optics):
        a refused file raises before anything reaches the SLM. Warnings (a file that cannot be
        checked against the optics) go to the window, not only to the console."""
        from autoalign.correction import read_correction

        correction, warnings = read_correction(path, settings=self.settings)  # refuses before the SLM
        for message in warnings:
            self.log.emit(f"WARNING: {message}")
        self.loop.apply(correction)
        self.log.emit(f"Correction loaded from {path} and applied")
        self._image_current_state("load_correction")
        return {"correction": correction, "warnings": list(warnings), "path": str(path)}

    def do_self_check(self, modes: list[int] | None = None,
                      amplitude_rad: float | None = None) -> Any:
        from autoalign.calibration.selfcheck import run_self_check

        kwargs: dict[str, Any] = {} if amplitude_rad is None else {"amplitude_rad": amplitude_rad}
        if modes:
            kwargs["modes"] = [int(m) for m in modes]
        report = run_self_check(self.loop, **kwargs)
        summary = report.summary() if hasattr(report, "summary") else str(report)
        for line in str(summary).splitlines():
            self.log.emit(line)
        return report

    def do_poke_calibration(self, path: str | None = None, amplitude_rad: float | None = None) -> Any:
        from autoalign.calibration.poke import run_poke_calibration

        kwargs = {} if amplitude_rad is None else {"amplitude_rad": amplitude_rad}
        cal = run_poke_calibration(self.loop, **kwargs)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            cal.save(path)
            self.log.emit(f"Poke calibration saved to {path}")
        return cal

    def do_load_poke_calibration(self, path: str) -> Any:
        from autoalign.calibration.poke import PokeCalibration

        cal = PokeCalibration.load(path, settings=self.settings)
        diffs = cal.differences(self.settings) if hasattr(cal, "differences") else []
        for d in diffs:
            self.log.emit(f"WARNING: poke calibration made for other settings: {d}")
        self.loop.calibration = cal
        self.log.emit(f"Poke calibration loaded from {path} (made {getattr(cal, 'created', '?')}); "
                      "centring uses it from now on")
        return cal

    def do_collect(self, path: str, rounds: int | None = None,
                   random_aberration_rms: float = 0.0) -> Any:
        from autoalign.app.collect import BeadWalk

        walk = BeadWalk(self.loop, path, rounds=rounds,
                        random_aberration_rms=random_aberration_rms, callbacks=self._callbacks)
        with self._lock:
            self._walk = walk
        try:
            written = walk.run()
        finally:
            with self._lock:
                self._walk = None
        reason = str(getattr(walk, "stop_reason", "") or "")
        self.log.emit(f"Bead walk: {written} round(s) written to {path} ({reason})")
        if reason.startswith("device failure"):
            raise RuntimeError(f"bead walk: {reason} after {written} round(s); the file is "
                               "readable and a later run appends to it")
        return {"written": written, "stop_reason": reason, "path": str(path)}

    def do_shutdown(self) -> None:
        """Stop, close the devices, then end the thread's event loop."""
        self._closed = True
        try:
            self.stop()
            devices = self.devices
            if devices is not None:
                self._close_devices(devices)
        finally:
            with self._lock:
                self.loop = None
            self.devices = None
            self.closed.emit()
            thread = self.thread()
            if thread is not None and thread is not QtCore.QCoreApplication.instance().thread():
                thread.quit()

    def _close_devices(self, devices: Any) -> None:
        close = getattr(devices, "close", None)
        if callable(close):
            close()
            self.log.emit("Devices closed")
            return
        for name in ("camera", "focus", "xy", "slm", "microscope"):
            dev = getattr(devices, name, None)
            if dev is not None and hasattr(dev, "close"):
                try:
                    dev.close()
                except Exception as exc:  # noqa: BLE001 - close the others anyway
                    self.log.emit(f"closing {name} failed: {exc}")
        self.log.emit("Devices closed")
