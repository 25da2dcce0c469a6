"""The closed alignment loop: acquire a z-stack of a gold bead, validate it, re-centre (stage and
SLM tip/tilt/defocus), predict the aberration (CNN, or the classical modal corrector), update the
correction and show vortex + correction on the SLM. No Qt here: the GUI and the command line both
drive :class:`AlignmentLoop` and listen through callbacks (see ``docs/loop_api.md``).

Safety rules, enforced in one place (:meth:`AlignmentLoop._show`):

* nothing is applied from an invalid measurement (no bead, saturated, too few photons, bead at
  the edge) or from a refused prediction (NaN/inf, a coefficient beyond
  ``loop.max_prediction_rad``, a correction beyond ``loop.max_correction_rms_rad``);
* the SLM only ever receives a finite phase built from a checked :class:`Correction`; if the SLM
  refuses it, the last good mask stays and the loop's correction is not updated;
* a device failure stops the loop cleanly; the SLM keeps the last good mask (nothing is sent
  after the failure).

Every decision goes to the ``autoalign.loop`` logger and to the ``on_log`` callback.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import yaml

from autoalign.calibration import centroid as cen
from autoalign.calibration import optics as opt
from autoalign.correction import Correction
from autoalign.hardware.base import DeviceError, SLMInputError, Stack

log = logging.getLogger("autoalign.loop")

TTD_MODES = (2, 3, 4)


# ============================================================================ data
@dataclass
class Measurement:
    """One acquired and analysed stack."""

    stack: Stack | None                   # None in history records older than keep_raw_stacks
    sections: np.ndarray                  # (3, n, n) photons, background kept, re-centred
    centroid: cen.Centroid | None         # offsets from the ROI centre (px, planes)
    valid: bool
    reason: str                           # "" when valid
    photons: float                        # background-subtracted photons in the xy section
    peak_photons: float = 0.0             # brightest (3x3-averaged) xy pixel above background
    background_photons: float = 0.0       # per pixel
    saturated_fraction: float = 0.0
    offset_um: tuple[float, float, float] = (0.0, 0.0, 0.0)  # bead offset from the ROI centre
    centre_zyx: tuple[float, float, float] | None = None       # absolute voxel indices
    timestamp: float = 0.0
    elapsed_s: float = 0.0


@dataclass
class IterationRecord:
    iteration: int
    measurement: Measurement
    prediction: dict[int, float] | None
    predicted_offset: tuple[float, float] | None
    correction: Correction
    metrics: dict[str, float]
    decision: str
    stacks: int = 0                       # stacks acquired in this iteration
    elapsed_s: float = 0.0


class LoopCallbacks(Protocol):  # pragma: no cover - documentation of the optional methods
    def on_log(self, message: str) -> None: ...
    def on_measurement(self, m: Measurement) -> None: ...
    def on_iteration(self, r: IterationRecord) -> None: ...
    def on_progress(self, done: int, total: int) -> None: ...
    def on_slm_phase(self, phase_rad: np.ndarray) -> None: ...


class LoopStopped(Exception):
    """Raised internally when :meth:`AlignmentLoop.stop` was requested; never escapes ``run``."""


class RefusedError(Exception):
    """A correction or mask that failed a safety check; nothing was applied."""


# ============================================================================ phase
def build_pupil_phase(settings: Any, correction: Correction, m: int) -> np.ndarray:
    """Float phase (rad) on the m x m pupil grid that ``SLM.show`` takes: the beam's mask (vortex
    of the configured charge, shifted by ``correction.mask_offset``) plus the Zernike correction,
    zero outside the pupil. One place builds it: :func:`simulation.phase.total_phase` (the same
    function the simulated microscope subtracts to read back what the SLM applies)."""
    from autoalign.simulation import phase as ph

    return np.asarray(ph.total_phase(settings, m, coefficients=correction.coefficients or None,
                                     mask_offset=correction.mask_offset), dtype=float)


# ============================================================================ metrics
def _quadratic_min(patch: np.ndarray) -> float:
    """Minimum value of a least-squares quadratic surface through a small patch (sub-pixel null)."""
    n = patch.shape[0]
    c = np.arange(n) - n // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    a = np.stack([np.ones(n * n), xx.ravel(), yy.ravel(), xx.ravel() ** 2, yy.ravel() ** 2,
                  (xx * yy).ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(a, patch.ravel(), rcond=None)
    p0, px, py, pxx, pyy, pxy = coef
    h = np.array([[2 * pxx, pxy], [pxy, 2 * pyy]])
    if np.linalg.det(h) > 0 and pxx > 0:
        x, y = np.linalg.solve(h, [-px, -py])
        if abs(x) <= 1 and abs(y) <= 1:
            return float(p0 + px * x + py * y + pxx * x * x + pyy * y * y + pxy * x * y)
    return float(patch[n // 2, n // 2])


def null_depth(sections: np.ndarray, background: float, search_px: int = 3) -> float:
    """Central over peak intensity of the xy section (background subtracted).

    The centre is the donut's minimum within ``search_px`` of the section centre (the sections are
    re-centred on the bead), refined by a quadratic fit over 3 x 3 pixels (the donut's null is
    quadratic, so a sub-pixel decentring does not read as a shallow null); the peak is the
    brightest 3 x 3-averaged pixel. A bead of finite size fills the null: the unaberrated floor is
    :meth:`AlignmentLoop.ideal_null_depth`."""
    from scipy import ndimage

    xy = np.asarray(sections[0], dtype=float) - background
    n = xy.shape[0]
    mean3 = ndimage.uniform_filter(xy, 3, mode="nearest")
    peak = float(mean3.max())
    if peak <= 0:
        return float("nan")
    c = n // 2
    lo, hi = max(c - search_px, 1), min(c + search_px + 1, n - 1)
    win = mean3[lo:hi, lo:hi]
    iy, ix = np.unravel_index(np.argmin(win), win.shape)
    iy, ix = iy + lo, ix + lo
    centre = _quadratic_min(xy[iy - 1 : iy + 2, ix - 1 : ix + 2])
    return float(max(centre, 0.0) / peak)


def true_focal_null_depth(plane: np.ndarray, search_px: int = 3, upsample: int = 8) -> float:
    """Null depth of a NOISE-FREE focal plane (no background): the minimum within ``search_px``
    of the plane's centre, refined on a cubic spline ``upsample`` x finer (the beam is band-limited
    at NA / lambda, so 40 nm pixels resolve it; the pixel minimum alone overestimates a deep null
    several-fold), over the plane's maximum."""
    from scipy import ndimage

    xy = np.asarray(plane, dtype=float)
    n = xy.shape[0]
    peak = float(xy.max())
    if peak <= 0:
        return float("nan")
    c = n // 2
    lo, hi = max(c - search_px, 3), min(c + search_px + 1, n - 3)
    iy, ix = np.unravel_index(np.argmin(xy[lo:hi, lo:hi]), (hi - lo, hi - lo))
    iy, ix = iy + lo, ix + lo
    patch = xy[iy - 3: iy + 4, ix - 3: ix + 4]
    fine = ndimage.zoom(patch, upsample, order=3, mode="nearest", grid_mode=False)
    k = fine.shape[0]
    centre = fine[k // 2 - upsample: k // 2 + upsample + 1, k // 2 - upsample: k // 2 + upsample + 1]
    return float(max(float(centre.min()), 0.0) / peak)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else float("nan")


def slm_grid(slm: Any, settings: Any) -> int:
    """Size m of the m x m pupil grid a phase for ``slm`` is built on (the SLM's own when it
    says, else ``optics.pupil_samples``)."""
    for attr in ("pupil_samples", "pupil_grid_size", "m"):
        value = getattr(slm, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(settings.optics.pupil_samples)


def _call(callbacks: Any, name: str, *args: Any) -> None:
    fn = getattr(callbacks, name, None) if callbacks is not None else None
    if fn is None:
        return
    try:
        fn(*args)
    except Exception:  # a broken listener must not break the loop
        log.exception("callback %s failed", name)


# ============================================================================ the loop
class AlignmentLoop:
    """The alignment loop over open devices (``hardware.factory.Devices``-like: ``camera``,
    ``focus``, ``xy``, ``slm`` and ``microscope`` — the simulated truth or ``None``).

    ``predictor``: an object with ``modes`` and ``predict(sections (3, n, n) photons) ->``
    an object with ``coefficients`` {Noll: rad, the aberration present} and ``mask_offset``;
    loaded lazily from ``settings.model.checkpoint`` when ``None`` and the corrector is ``"model"``.
    ``corrector``: ``"model"`` (the CNN) or ``"modal"`` (classical sensorless modal AO,
    :class:`app.baseline.ModalCorrector`). ``calibration``: a
    :class:`calibration.poke.PokeCalibration` (rad per micrometre map and stage signs) or ``None``
    for the optics formulas."""

    def __init__(self, devices: Any, settings: Any, predictor: Any = None, corrector: str = "model",
                 callbacks: Any = None, calibration: Any = None, modal_options: dict | None = None,
                 acquire_stack: Any = None, truth_metrics: bool = True) -> None:
        if corrector not in ("model", "modal"):
            raise ValueError(f"corrector must be 'model' or 'modal', got {corrector!r}")
        self.devices = devices
        self.settings = settings
        self._predictor = predictor
        self.corrector = corrector
        self.callbacks = callbacks
        self.calibration = calibration
        self.modal_options = dict(modal_options or {})
        self._acquire_fn = acquire_stack
        self.truth_metrics = bool(truth_metrics)  # simulated microscope: true residual / null depth
        self.correction = Correction()
        self.best = Correction()
        self.best_score = math.inf
        self.history: list[IterationRecord] = []
        self.stacks_acquired = 0
        self.stop_reason = ""
        self.last_error: Exception | None = None
        self._stop = threading.Event()
        self._last_good: Correction | None = None
        self._ideal: np.ndarray | None = None
        self._modal = None
        lp = settings.loop
        self.patience = int(getattr(lp, "patience", 2))
        self.max_refusals = int(getattr(lp, "max_refusals", 3))
        self.min_snr = float(getattr(lp, "min_snr", 8.0))
        self.max_edge_fraction = float(getattr(lp, "max_edge_fraction", 0.5))
        self.ttd_gain = float(getattr(lp, "tip_tilt_defocus_gain", 1.0))
        st = settings.stage
        self.recentre_threshold_um = float(st.recentre_threshold_um)
        self.recentre_threshold_z_um = float(getattr(st, "recentre_threshold_z_um", st.recentre_threshold_um))

    # ------------------------------------------------------------------ plumbing
    @property
    def microscope(self) -> Any:
        return getattr(self.devices, "microscope", None)

    @property
    def predictor(self) -> Any:
        if self._predictor is None and self.corrector == "model":
            from autoalign.models.predictor import Predictor  # issue 3

            self._log("loading the model from %s", self.settings.model.checkpoint)
            self._predictor = Predictor.load(settings=self.settings)
        return self._predictor

    @predictor.setter
    def predictor(self, value: Any) -> None:
        self._predictor = value

    def _log(self, fmt: str, *args: Any, level: int = logging.INFO) -> None:
        message = fmt % args if args else fmt
        log.log(level, message)
        _call(self.callbacks, "on_log", message)

    def stop(self) -> None:
        """Ask the loop to stop; honoured between steps (thread-safe)."""
        self._stop.set()

    #: raw stacks kept in :attr:`history` (older records keep sections, metrics and decisions; the
    #: bead walk writes every raw stack to its file), so a long session does not grow ~2 MB/iteration
    keep_raw_stacks: int = 5

    def _drop_old_stacks(self) -> None:
        old = self.history[: -self.keep_raw_stacks] if self.keep_raw_stacks else self.history
        for record in old:
            if record.measurement.stack is not None:
                record.measurement.stack = None

    def clear_stop(self) -> None:
        """Forget an earlier :meth:`stop` (called at the start of every new request)."""
        self._stop.clear()

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise LoopStopped()

    def true_residual_rms(self) -> float | None:
        """True residual wavefront RMS (rad, Noll >= 5) on the simulated microscope, else None."""
        mic = self.microscope
        if mic is None or not hasattr(mic, "residual_rms"):
            return None
        try:
            return float(mic.residual_rms())
        except Exception:  # noqa: BLE001 - a report, never a failure
            log.debug("residual_rms failed", exc_info=True)
            return None

    def _phase_grid(self) -> int:
        return slm_grid(self.devices.slm, self.settings)

    # ------------------------------------------------------------------ SLM
    def check_correction(self, correction: Correction) -> None:
        """Raise :class:`RefusedError` when a correction must not reach the SLM."""
        lp = self.settings.loop
        if not correction.is_finite():
            raise RefusedError("correction contains NaN or infinity")
        if correction.rms() > lp.max_correction_rms_rad:
            raise RefusedError(
                f"correction RMS {correction.rms():.3f} rad exceeds loop.max_correction_rms_rad "
                f"= {lp.max_correction_rms_rad}")
        big = {k: v for k, v in correction.coefficients.items() if abs(v) > 4 * lp.max_correction_rms_rad + 50}
        if big:
            raise RefusedError(f"correction coefficient(s) out of range: {big}")
        if max(abs(correction.mask_offset[0]), abs(correction.mask_offset[1])) > 0.5:
            raise RefusedError(f"mask offset {correction.mask_offset} beyond 0.5 pupil radii")

    def _show(self, correction: Correction) -> np.ndarray:
        """Check and show vortex + ``correction``; raises RefusedError (nothing shown),
        DeviceError (device failed). Does not change ``self.correction``."""
        self.check_correction(correction)
        phase = build_pupil_phase(self.settings, correction, self._phase_grid())
        if not np.all(np.isfinite(phase)):
            raise RefusedError("phase contains NaN or infinity")
        try:
            self.devices.slm.show(phase)
        except SLMInputError as exc:
            raise RefusedError(f"SLM refused the phase: {exc}") from exc
        self._last_good = correction.copy()
        _call(self.callbacks, "on_slm_phase", phase)
        return phase

    def apply(self, correction: Correction) -> None:
        """Show vortex + ``correction`` and make it the loop's correction (checked first)."""
        correction = correction.copy()
        self._show(correction)
        self.correction = correction
        self._log("applied correction: RMS %.3f rad, %s", correction.rms(), _fmt(correction.coefficients))

    def zero_slm(self) -> None:
        """Vortex only; the correction is cleared."""
        self.apply(Correction())
        self._log("SLM zeroed (vortex mask only)")

    # ------------------------------------------------------------------ acquisition and analysis
    def _acquire_stack(self) -> Stack:
        fn = self._acquire_fn
        if fn is None:
            from autoalign.hardware.acquisition import acquire_stack as fn  # issue 4
        stack = fn(self.devices.camera, self.devices.focus, self.settings)
        self.stacks_acquired += 1
        return stack

    def _to_photons(self, adu: np.ndarray) -> np.ndarray:
        c = self.settings.camera
        return (np.asarray(adu, dtype=float) - c.offset_adu) / (c.gain_adu_per_electron * c.quantum_efficiency)

    def _saturation_adu(self) -> float:
        cam = self.devices.camera
        try:
            return float(cam.saturation_adu)
        except Exception:  # noqa: BLE001
            return float(2 ** self.settings.camera.bit_depth - 1)

    def analyse(self, stack: Stack) -> Measurement:
        """Validate a stack and extract re-centred ortho-sections (photons)."""
        t0 = time.perf_counter()
        lp = self.settings.loop
        data = np.asarray(stack.data, dtype=float)
        n = data.shape[-1]

        def invalid(reason: str, **kw: Any) -> Measurement:
            sections = np.zeros((3, n, n))
            if data.ndim == 3 and data.shape[0] == data.shape[1] == data.shape[2]:
                mid = data.shape[0] // 2
                sections = self._to_photons(cen.centred_sections(data, (mid, mid, mid)))
            return Measurement(stack, sections, kw.pop("centroid", None), False, reason,
                               kw.pop("photons", 0.0), timestamp=time.time(),
                               elapsed_s=time.perf_counter() - t0, **kw)

        if data.ndim != 3 or not data.shape[0] == data.shape[1] == data.shape[2]:
            return invalid(f"bad stack shape {data.shape} (expected a cube)")
        if not np.all(np.isfinite(data)):
            return invalid("stack contains NaN or infinity")
        sat = float(np.mean(data >= self._saturation_adu()))
        if sat > lp.saturation_fraction:
            return invalid(f"saturated ({100 * sat:.2f} % of the pixels)", saturated_fraction=sat)
        photons = self._to_photons(data)
        bg, sigma = cen.background_and_noise(photons)
        try:
            centre = cen.robust_stack_centroid(photons)
        except ValueError:
            return invalid("no bead", background_photons=bg, saturated_fraction=sat)
        h = n // 2
        centroid = cen.Centroid(centre[2] - h, centre[1] - h, centre[0] - h)
        sections = cen.centred_sections(photons, centre, fill=bg)
        from scipy import ndimage

        mean3 = ndimage.uniform_filter(sections[0] - bg, 3, mode="nearest")
        peak = float(mean3.max())
        snr = peak / (sigma / 3.0)  # noise of a 3 x 3 mean
        total = float(np.sum(sections[0] - bg))
        offset = (centroid.x_px * stack.pixel_size_um, centroid.y_px * stack.pixel_size_um,
                  centroid.z_px * stack.z_step_um)
        common = dict(centroid=centroid, photons=total, peak_photons=peak, background_photons=bg,
                      saturated_fraction=sat, offset_um=offset, centre_zyx=centre)
        if snr < self.min_snr:
            return invalid(f"no bead (peak signal-to-noise {snr:.1f} < {self.min_snr:g})", **common)
        if total < lp.min_photons:
            return invalid(f"too few photons ({total:.0f} < loop.min_photons = {lp.min_photons:g})", **common)
        margin = lp.edge_margin_px
        edge_fraction = self._edge_signal(photons, bg, margin)
        if min(min(c, n - 1 - c) for c in centre) < margin or edge_fraction > self.max_edge_fraction:
            return invalid(
                f"bead at edge (centre z,y,x = {centre[0]:.1f}, {centre[1]:.1f}, {centre[2]:.1f} px; "
                f"margin {margin} px; {100 * edge_fraction:.0f} % of the peak within it)", **common)
        return Measurement(stack, sections, centroid, True, "", total, peak, bg, sat, offset, centre,
                           timestamp=time.time(), elapsed_s=time.perf_counter() - t0)

    @staticmethod
    def _edge_signal(photons: np.ndarray, bg: float, margin: int) -> float:
        """Brightest signal within ``margin`` pixels of the ROI's lateral edges, over the brightest
        overall (3 x 3 mean per plane so single hot pixels do not count). Axially only the
        centroid's margin is checked: a donut is long in z and legitimately fills the stack."""
        if margin <= 0:
            return 0.0
        from scipy import ndimage

        sm = ndimage.uniform_filter(photons - bg, size=(1, 3, 3), mode="nearest")
        peak = float(sm.max())
        if peak <= 0:
            return 0.0
        inner = sm[:, margin:-margin, margin:-margin]
        outer = sm.copy()
        outer[:, margin:-margin, margin:-margin] = -np.inf
        return float(max(outer.max(), 0.0) / peak) if inner.size else 1.0

    def acquire(self) -> Measurement:
        """Acquire and analyse one stack (no correction applied)."""
        self._check_stop_soft()
        m = self.analyse(self._acquire_stack())
        if m.valid:
            self._log("stack %d: bead at (%+.3f, %+.3f, %+.3f) um, %.0f photons, null depth %.4f",
                      self.stacks_acquired, *m.offset_um, m.photons,
                      null_depth(m.sections, m.background_photons), level=logging.DEBUG)
        else:
            self._log("stack %d refused: %s", self.stacks_acquired, m.reason, level=logging.WARNING)
        _call(self.callbacks, "on_measurement", m)
        return m

    def _check_stop_soft(self) -> None:
        pass  # acquire() itself is a single step; stops are honoured between steps in run()

    # ------------------------------------------------------------------ metrics
    def _reference(self) -> dict[str, Any]:
        """The unaberrated donut seen through this loop's own pipeline, noise-free: a simulated
        microscope without aberration, the configured bead and camera, the vortex on a simulated
        SLM, a stack acquired and analysed exactly like a measurement (cached). Gives the ideal
        sections (correlation reference) and the measured null-depth floor of the bead."""
        if self._ideal is None:
            from autoalign.hardware.simulated import SimulatedCamera, SimulatedFocusStage, SimulatedSLM
            from autoalign.hardware.acquisition import acquire_stack
            from autoalign.simulation.microscope import SimulatedMicroscope

            s = self.settings.replace(**{"hardware.backend": "simulated", "slm.backend": "simulated"})
            mic = SimulatedMicroscope(s, aberration={}, mask_offset=(0.0, 0.0), bead_um=(0.0, 0.0, 0.0),
                                      drift_um_per_step=0.0, noise=False)
            cam, focus, slm = SimulatedCamera(mic), SimulatedFocusStage(mic), SimulatedSLM(mic)
            for dev in (cam, focus, slm):
                dev.open()
            slm.show(build_pupil_phase(s, Correction(), slm_grid(slm, s)))
            m = self.analyse(acquire_stack(cam, focus, s))
            if not m.valid:  # pragma: no cover - the unaberrated donut is always a valid bead
                raise RuntimeError(f"reference donut refused: {m.reason}")
            sections = m.sections - m.background_photons
            self._ideal = {"sections": sections / max(float(sections[0].max()), 1e-12),
                           "null_depth": null_depth(m.sections, m.background_photons)}
        return self._ideal

    def ideal_sections(self) -> np.ndarray:
        """Unaberrated ortho-sections (background removed, xy peak = 1) on this stack's grid, as
        the loop's own analysis extracts them from a noise-free stack of the configured bead."""
        return self._reference()["sections"]

    def ideal_null_depth(self) -> float:
        """MEASURED null depth of the unaberrated donut imaged with the configured bead, noise-free:
        the floor that a perfect correction reaches in :func:`null_depth` of a measurement (an
        80 nm bead fills the null to a few per cent). Compare :meth:`true_null_depth`."""
        return float(self._reference()["null_depth"])

    def true_null_depth(self) -> float | None:
        """TRUE null depth of the beam now on the SLM (simulated microscope only, else None):
        centre over peak of the beam's own focal intensity from the microscope's truth (hidden
        aberration + what the SLM shows, mask misregistration included), noise-free and without
        the bead. A 64-plane stack of the beam around its nominal focus is rendered, its focal
        plane found by the robust centroid, and :func:`true_focal_null_depth` taken in that plane
        (sub-pixel minimum of the cubic-spline-interpolated intensity over the plane's maximum; the
        exact unaberrated vortex gives < 1e-4)."""
        mic = self.microscope
        if mic is None or not hasattr(mic, "pupil_phase") or not hasattr(mic, "aberration"):
            return None
        try:
            z = (np.arange(self.settings.stack.planes) - self.settings.stack.planes // 2) * self.settings.stack.z_step_um
            coeffs = np.asarray(mic.aberration, dtype=float)
            # the microscope's own renderer, without the bead's offset (tip/tilt), blur or noise
            inten = mic.simulator.stack(coeffs, z_um=z, pupil_phase=mic.pupil_phase(), include_mask=False)
            inten = np.asarray(inten, dtype=float)
            centre = cen.robust_stack_centroid(inten + 1e-6)
            return true_focal_null_depth(cen.centred_sections(inten, centre, fill=0.0)[0])
        except Exception:  # noqa: BLE001 - a report, never a failure
            log.debug("true_null_depth failed", exc_info=True)
            return None

    def metrics(self, m: Measurement, prediction: dict[int, float] | None = None) -> dict[str, float]:
        out: dict[str, float] = {"photons": float(m.photons), "peak_photons": float(m.peak_photons)}
        if m.valid:
            out["null_depth"] = null_depth(m.sections, m.background_photons)
            out["correlation_ideal"] = correlation(m.sections - m.background_photons, self.ideal_sections())
        else:
            out["null_depth"] = float("nan")
            out["correlation_ideal"] = float("nan")
        if prediction is not None:
            out["predicted_residual_rms"] = float(math.sqrt(sum(v * v for k, v in prediction.items() if k >= 5)))
        if self.truth_metrics:
            true = self.true_residual_rms()
            if true is not None:
                out["true_residual_rms"] = true
            tnd = self.true_null_depth()
            if tnd is not None:
                out["true_null_depth"] = tnd
        return out

    # ------------------------------------------------------------------ centring
    def _ttd_from_offset(self, offset_um: tuple[float, float, float]) -> dict[int, float]:
        """Tip/tilt/defocus (rad) that CANCEL a focus displaced by ``offset_um`` (poke calibration
        when present, else the optics formulas)."""
        if self.calibration is not None:
            return self.calibration.correction_for_shift(offset_um)
        o = self.settings.optics
        seen = opt.shift_to_zernike(*offset_um, o.numerical_aperture, o.immersion_index, o.wavelength_um)
        return {k: -v for k, v in seen.items()}

    def _stage_sign(self) -> tuple[float, float, float]:
        """Sign (per axis) of the stage move that cancels an apparent bead offset: the poke
        calibration's when it measured one, else +1. +1 is the simulated microscope's convention
        (the camera sees ``bead - stage`` and ``bead_z - focus``, so moving the stage/focus by the
        measured offset re-centres) and that of a stage whose axes match the camera's."""
        if self.calibration is not None and getattr(self.calibration, "stage_sign", None):
            return tuple(self.calibration.stage_sign)  # type: ignore[return-value]
        return (1.0, 1.0, 1.0)

    def _plan_centring(self, m: Measurement) -> tuple[tuple[float, float, float] | None, dict[int, float]]:
        """(stage move in um or None, SLM tip/tilt/defocus delta) for a valid measurement."""
        dx, dy, dz = m.offset_um
        move = None
        if max(abs(dx), abs(dy)) > self.recentre_threshold_um or abs(dz) > self.recentre_threshold_z_um:
            sx, sy, sz = self._stage_sign()
            move = (sx * dx, sy * dy, sz * dz)
            return move, {}
        delta = {k: self.ttd_gain * v for k, v in self._ttd_from_offset((dx, dy, dz)).items()}
        return move, delta

    def _move_stage(self, move: tuple[float, float, float]) -> None:
        xy, focus = self.devices.xy, self.devices.focus
        x, y = xy.position_um
        z = focus.position_um
        if move[0] or move[1]:
            xy.move_to(x + move[0], y + move[1])
        if move[2]:
            focus.move_to(z + move[2])
        self._log("stage re-centred by (%+.3f, %+.3f, %+.3f) um", *move)

    def centre(self) -> Measurement:
        """Acquire; re-centre the bead with the stage when beyond the threshold, else correct tip,
        tilt and defocus on the SLM. Returns the measurement the decision was made on."""
        m = self.acquire()
        if not m.valid:
            self._log("centre: nothing applied (%s)", m.reason, level=logging.WARNING)
            return m
        move, delta = self._plan_centring(m)
        if move is not None:
            self._move_stage(move)
        if delta:
            new = self.correction.plus(delta)
            try:
                self.apply(new)
            except RefusedError as exc:
                self._log("centre: tip/tilt/defocus refused (%s)", exc, level=logging.WARNING)
        return m

    # ------------------------------------------------------------------ prediction
    def _modal_corrector(self) -> Any:
        if self._modal is None:
            from autoalign.app.baseline import ModalCorrector

            self._modal = ModalCorrector(self, **self.modal_options)
        return self._modal

    def _predict(self, m: Measurement) -> tuple[dict[int, float], tuple[float, float] | None]:
        if self.corrector == "modal":
            est = self._modal_corrector().estimate(m)
            return est, None
        pred = self.predictor.predict(m.sections)
        coeffs = {int(k): float(v) for k, v in dict(pred.coefficients).items()}
        off = getattr(pred, "mask_offset", None)
        off = None if off is None else (float(off[0]), float(off[1]))
        return coeffs, off

    def _check_prediction(self, coeffs: dict[int, float], off: tuple[float, float] | None) -> str | None:
        values = list(coeffs.values()) + (list(off) if off is not None else [])
        if not all(math.isfinite(v) for v in values):
            return "prediction contains NaN or infinity"
        lim = self.settings.loop.max_prediction_rad
        big = {k: round(v, 3) for k, v in coeffs.items() if abs(v) > lim}
        if big:
            return f"prediction beyond loop.max_prediction_rad = {lim}: {big}"
        if off is not None and max(abs(off[0]), abs(off[1])) > 0.5:
            return f"predicted mask offset {off} beyond 0.5 pupil radii"
        return None

    # ------------------------------------------------------------------ one iteration
    def correct_once(self, gain: float | None = None, iteration: int | None = None) -> IterationRecord:
        """One iteration: acquire, validate, re-centre, predict, update and show. A refused
        measurement or prediction applies nothing (``decision`` says why)."""
        t0 = time.perf_counter()
        stacks0 = self.stacks_acquired
        gain = self.settings.loop.gain if gain is None else float(gain)
        it = len(self.history) if iteration is None else iteration
        before = self.correction.copy()
        m = self.acquire()
        pred: dict[int, float] | None = None
        off: tuple[float, float] | None = None

        def record(decision: str, metrics: dict[str, float]) -> IterationRecord:
            r = IterationRecord(it, m, pred, off, self.correction.copy(), metrics, decision,
                                self.stacks_acquired - stacks0, time.perf_counter() - t0)
            self.history.append(r)
            self._drop_old_stacks()
            self._log("iteration %d: %s", it, decision, level=logging.INFO if decision == "applied" else logging.WARNING)
            _call(self.callbacks, "on_iteration", r)
            return r

        if not m.valid:
            return record(f"refused: {m.reason}", self.metrics(m))
        move, ttd = self._plan_centring(m)
        try:
            pred, off = self._predict(m)
        except (LoopStopped, DeviceError):
            raise
        except Exception as exc:  # noqa: BLE001 - a broken predictor refuses, never applies
            log.exception("prediction failed")
            pred = None
            return record(f"refused: prediction failed ({exc})", self.metrics(m))
        metrics = self.metrics(m, pred)
        if "true_residual_rms" in metrics:
            metrics["true_residual_rms_measured"] = metrics["true_residual_rms"]
        if "true_null_depth" in metrics:
            metrics["true_null_depth_measured"] = metrics["true_null_depth"]
        problem = self._check_prediction(pred, off)
        if problem:
            return record(f"refused: {problem}", metrics)
        delta = {k: -gain * v for k, v in pred.items() if k >= 2 and k not in ttd}
        if ttd:  # the centroid owns tip/tilt/defocus
            delta = {k: v for k, v in delta.items() if k not in TTD_MODES}
            delta.update(ttd)
        off_delta = (-gain * off[0], -gain * off[1]) if off is not None else (0.0, 0.0)
        new = before.plus(delta, off_delta)
        try:
            self.check_correction(new)
        except RefusedError as exc:
            return record(f"refused: {exc}", metrics)
        self._check_stop()
        if move is not None:
            self._move_stage(move)
        try:
            self._show(new)
        except RefusedError as exc:
            return record(f"refused: {exc}", metrics)
        self.correction = new
        if self.truth_metrics:  # the state after this iteration's correction
            true_after = self.true_residual_rms()
            if true_after is not None:
                metrics["true_residual_rms"] = true_after
            nd_after = self.true_null_depth()
            if nd_after is not None:
                metrics["true_null_depth"] = nd_after
        decision = "applied" + (" (stage re-centred)" if move is not None else "")
        return record(decision, metrics)

    # ------------------------------------------------------------------ run
    def _score(self, r: IterationRecord) -> float:
        if self.corrector == "modal":
            return -float(r.metrics.get("modal_metric", r.metrics.get("correlation_ideal", 0.0)))
        return float(r.metrics.get("predicted_residual_rms", math.inf))

    def run(self, iterations: int | None = None, gain: float | None = None) -> list[IterationRecord]:
        """Iterate until convergence (predicted residual below ``loop.converged_rms_rad``), the
        iteration limit, no improvement for ``patience`` iterations (the best correction is then
        restored), too many refused measurements, a stop request or a device failure (the SLM
        keeps the last good mask). Returns this run's records; ``stop_reason`` says why it ended."""
        total = int(iterations or self.settings.loop.max_iterations)
        self.clear_stop()
        self.stop_reason = ""
        self.last_error = None
        records: list[IterationRecord] = []
        self.best_score = math.inf
        since_best = 0
        refusals = 0
        self._log("alignment started: %d iteration(s), corrector %s, gain %s", total, self.corrector,
                  self.settings.loop.gain if gain is None else gain)
        try:
            for i in range(total):
                self._check_stop()
                measured = self.correction.copy()
                r = self.correct_once(gain, iteration=i)
                records.append(r)
                _call(self.callbacks, "on_progress", i + 1, total)
                if r.decision.startswith("refused"):
                    refusals += 1
                    if refusals >= self.max_refusals:
                        self.stop_reason = f"{refusals} refused iterations in a row ({r.decision})"
                        if math.isfinite(self.best_score) and self.best != self.correction:
                            self._check_stop()
                            self.apply(self.best)
                            self.stop_reason += "; best correction restored"
                        break
                    continue
                refusals = 0
                score = self._score(r)
                if score < self.best_score - 1e-3:
                    self.best_score, self.best = score, measured
                    since_best = 0
                else:
                    since_best += 1
                pr = r.metrics.get("predicted_residual_rms")
                if self.corrector == "model" and pr is not None and pr < self.settings.loop.converged_rms_rad:
                    self.stop_reason = f"converged (predicted residual {pr:.3f} rad)"
                    break
                if since_best >= self.patience:
                    self.stop_reason = f"no improvement for {since_best} iterations: best correction restored"
                    self._check_stop()
                    self.apply(self.best)
                    break
            else:
                self.stop_reason = f"iteration limit ({total})"
        except LoopStopped:
            self.stop_reason = "stopped by request"
        except DeviceError as exc:
            self.last_error = exc
            self.stop_reason = f"device failure: {exc}"
            self._log("device failure, loop stopped; the SLM keeps the last good mask: %s", exc,
                      level=logging.ERROR)
        except RefusedError as exc:
            self.stop_reason = f"refused: {exc}"
        self._log("alignment finished: %s", self.stop_reason)
        return records


def _fmt(coeffs: dict[int, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:+.3f}" for k, v in sorted(coeffs.items()) if v) + "}"


__all__ = ["Correction", "Measurement", "IterationRecord", "LoopCallbacks", "AlignmentLoop",
           "RefusedError", "LoopStopped", "build_pupil_phase", "null_depth", "true_focal_null_depth",
           "correlation"]
