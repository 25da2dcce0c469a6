"""The measured quality figure of a donut: its residual wavefront in rad RMS, from the stack.

Why not the null depth: through an 80 nm bead the null is filled to ~2.6 % by the bead itself, the
darkest patch near the centre is found by a minimum search, and an aberrated donut moves its dark
spot rather than filling it. On the simulated microscope (``benchmarks/quality_figure.py``: 100
random states, 0-1 rad RMS over the model's modes, default photons, one stack each through the
loop's own acquisition and analysis, the ``refined`` estimator) the measured null ranks the states
by their true residual with Spearman 0.003 and reads 69 of the 91 states above 0.1 rad at or
below the bead floor + margin. Spearman of the candidates there: null 0.003, intensity at the
expected null position (the centroid) 0.627, the same along the expected null line (z axis)
0.783, ``1 - correlation`` with the ideal donut 0.948 (20 of 91 aberrated states above the loop's
0.97), its noise-corrected ``shape`` 0.951, the model fit's residual 0.998, the loop's score
``null + 1 - corr`` 0.922.

:func:`quality_figure` is what the loop decides on and the window shows first (the null second):

* ``fit``: the model-based fit's residual wavefront (the ``refined`` estimator's
  ``residual_rms``: the RMS, Noll >= 5, of the aberration the Poisson fit of the vectorial model
  finds in the raw stack), with its Cramér–Rao bound as sigma (0.006 rad at default photons),
  when the fit explains the data (valid estimate, not skipped, not refused: :func:`fit_residual`);
* ``shape``: otherwise (another estimator, a fit that does not explain the data, real data beyond
  the model), the correlation of the three ortho-sections with the ideal donut for this bead,
  the ideal shifted to the stack's sub-voxel centroid (:func:`ideal_sections_at`: a half-pixel
  decentring alone would read 0.14 rad), corrected for the photon noise (the correlation a
  noise-free stack of the same donut would have, :func:`noise_free_correlation`) and read as an
  equivalent residual ``sqrt((1 - r) / k)``, ``k`` the mean ``(1 - r) / rms**2`` of the settings'
  donut over the model's modes (:func:`shape_constant`, simulated noise-free through the
  measurement pipeline; 0.248 on the default optics, single modes 0.049-1.01, random directions
  0.13-0.54: the equivalent residual reads x0.71-1.47 of the true one).

"Aligned" (:func:`is_aligned_quality`): the figure plus :data:`ALIGNED_SIGMAS` sigma at most
:data:`ALIGNED_RAD` = 0.05 rad, and the noise-corrected shape at most :data:`SHAPE_GUARD_RAD`
(the estimator-independent reading must not contradict a fit). How 0.05 rad was derived: on the
benchmark (the 100 states above and 40 more in 0-0.12 rad, seed 5000) the states with a true
residual below 0.03 rad read at most 0.029 (fit) / 0.031 (shape) rad, those above 0.1 rad at
least 0.098 (fit) / 0.068 (shape); 0.05 rad lies between with both margins larger than the
noise: the fit's 2 sigma (0.012 rad) fits below it (0.029 + 0.012 = 0.041) and its smallest
aberrated reading is twice it, and the shape's smallest aberrated reading (the weakest direction,
x0.71) is still above it. Result: 0 of 91 (and 0 of 8 in the second set) states above 0.1 rad read
aligned, all 11 below 0.03 rad do. Physically a residual of 0.05 rad scatters
``1 - exp(-0.05**2)`` = 0.25 % of the power, a tenth of the bead's floor: nothing a bead of this
size shows. At fewer photons the sigmas grow and the rule asks for more (the threshold stays).

Units: rad RMS over the unit pupil (Noll >= 5); sections (3, n, n) photons with the background
kept, as :class:`calibration.measurement.Measurement` holds them; voxel positions (z, y, x).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

log = logging.getLogger("autoalign.calibration.quality")

#: largest residual (rad RMS) that reads "aligned" (figure + ALIGNED_SIGMAS x sigma); see the module docstring
ALIGNED_RAD = 0.05
#: sigmas added to the figure before it is compared with ALIGNED_RAD
ALIGNED_SIGMAS = 2.0
#: a fit's "aligned" also needs the noise-corrected shape at most this (rad, equivalent residual)
SHAPE_GUARD_RAD = 0.1
#: RMS (rad) of the single-mode aberrations :func:`shape_constant` simulates
SHAPE_CALIBRATION_RAD = 0.15

#: short names of the figure's sources (``Quality.source``), as the window words them
SOURCE_WORDS = {"fit": "model fit", "shape": "donut shape"}


@dataclass(frozen=True)
class Quality:
    """The measured residual wavefront: ``value`` and ``sigma`` (rad RMS), ``source`` ("fit" or
    "shape", see :data:`SOURCE_WORDS`), ``shape`` (the noise-corrected shape's reading, rad, NaN
    when unknown) and ``correlation`` (the noise-corrected correlation with the ideal donut)."""

    value: float
    sigma: float
    source: str
    shape: float = math.nan
    correlation: float = math.nan

    def upper_at(self, sigmas: float = ALIGNED_SIGMAS) -> float:
        """``value + sigmas * sigma`` (a NaN sigma counts as 0)."""
        s = self.sigma if math.isfinite(self.sigma) else 0.0
        return float(self.value + sigmas * s)

    def as_metrics(self) -> dict[str, float]:
        """The loop's metrics keys: ``quality_rad``, ``quality_sigma_rad``, ``quality_shape_rad``,
        ``quality_from_fit`` (1.0 fit, 0.0 shape) and ``correlation_noise_free``."""
        return {"quality_rad": float(self.value), "quality_sigma_rad": float(self.sigma),
                "quality_shape_rad": float(self.shape), "quality_from_fit": 1.0 if self.source == "fit" else 0.0,
                "correlation_noise_free": float(self.correlation)}

    @classmethod
    def from_metrics(cls, metrics: dict[str, float] | None) -> Quality | None:
        """The figure a metrics dict holds (:meth:`as_metrics`), None when it holds none."""
        metrics = metrics or {}
        value = metrics.get("quality_rad")
        if value is None or not math.isfinite(value):
            return None
        return cls(float(value), float(metrics.get("quality_sigma_rad", math.nan)),
                   "fit" if metrics.get("quality_from_fit", 0.0) >= 0.5 else "shape",
                   float(metrics.get("quality_shape_rad", math.nan)),
                   float(metrics.get("correlation_noise_free", math.nan)))

    def text(self, pm: str = "+-") -> str:
        """E.g. ``"residual 0.012 +- 0.006 rad (model fit)"`` (``pm``: the plus-minus sign)."""
        sigma = f" {pm} {self.sigma:.3f}" if math.isfinite(self.sigma) else ""
        return f"residual {self.value:.3f}{sigma} rad ({SOURCE_WORDS.get(self.source, self.source)})"


# ---------------------------------------------------------------------------- the shape
def _noise_variance(sections: np.ndarray, settings: Any) -> np.ndarray:
    """Per-pixel variance (photons^2) of a section pixel: Poisson on the detected electrons, read
    noise and ADU rounding, from the measured photons (background kept)."""
    cam = settings.camera
    qe = float(cam.quantum_efficiency)
    gain = float(cam.gain_adu_per_electron)
    read2 = float(cam.read_noise_electrons) ** 2 + 1.0 / (12.0 * gain * gain)
    return (np.clip(sections, 0.0, None) * qe + read2) / (qe * qe)


def noise_free_correlation(sections: np.ndarray, background: float, ideal: np.ndarray, settings: Any
                           ) -> tuple[float, float, float]:
    """(measured Pearson r of ``sections`` with ``ideal``, r corrected for the photon noise, 1-sigma
    of ``1 - r`` corrected).

    With the measurement ``x = s + n`` (``s`` the noise-free donut, ``n`` the noise of known
    per-pixel variance ``v``) and ``y`` the ideal: ``r(x, y)^2 = <s,y>^2 / ((|s|^2 + sum v) |y|^2)``
    on average, so ``r_s = r * sqrt(|x|^2 / (|x|^2 - sum v))`` (centred sums). Its noise, to first
    order in ``1 - r``: ``var(1 - r_s) = (4 sum x_perp^2 v + 2 sum v^2) / (4 |x|^4)`` with
    ``x_perp`` the part of ``x`` orthogonal to ``y`` (the measured one: an upper bound)."""
    x = np.asarray(sections, dtype=float).ravel()
    y = np.asarray(ideal, dtype=float).ravel()
    v = _noise_variance(x, settings)
    xc, yc = x - x.mean(), y - y.mean()
    # elementwise sums, not BLAS dot products: OpenBLAS threads spin on a loaded machine (1-2 ms each)
    xx, yy = float(np.sum(xc * xc)), float(np.sum(yc * yc))
    if xx <= 0 or yy <= 0:
        return math.nan, math.nan, math.nan
    r = float(np.sum(xc * yc) / math.sqrt(xx * yy))
    noise = float(v.sum()) * (1.0 - 1.0 / x.size)
    signal = xx - noise
    if signal <= 0:
        return r, math.nan, math.nan
    rs = min(r * math.sqrt(xx / signal), 1.0)
    yhat = yc / math.sqrt(yy)
    perp = xc - float(np.sum(xc * yhat)) * yhat
    var = (4.0 * float(np.sum(perp * perp * v)) + 2.0 * float(np.sum(v * v))) / (4.0 * signal * signal)
    return r, rs, math.sqrt(max(var, 0.0))


def _shift_weights(n: int, c: int, d: float) -> np.ndarray:
    """Weights ``w`` (length ``n``) with ``sum(w * a) = b[c]`` for ``b`` the periodic
    band-limited (Fourier) shift of the samples ``a`` by ``d`` samples."""
    ph = np.exp(-2j * np.pi * np.fft.fftfreq(n) * float(d))
    kernel = np.fft.ifft(ph).real
    return kernel[(c - np.arange(n)) % n]


def _shift2d(image: np.ndarray, d0: float, d1: float) -> np.ndarray:
    """The Fourier shift of a 2-D image by (d0, d1) samples along its axes."""
    f0, f1 = np.fft.fftfreq(image.shape[0]), np.fft.fftfreq(image.shape[1])
    ph = np.exp(-2j * np.pi * (f0[:, None] * d0 + f1[None, :] * d1))
    return np.fft.ifft2(np.fft.fft2(image) * ph).real


def shifted_sections(stack: np.ndarray, centre_zyx: Any, target_zyx: Any) -> np.ndarray:
    """Ortho-sections (3, n, n: xy[y, x], xz[z, x], yz[z, y]) through voxel ``n // 2`` of a cubic
    ``stack`` whose donut is centred at ``centre_zyx`` (voxels), after a band-limited shift that
    puts that centre at ``target_zyx``: what a measurement re-centred by whole voxels sees of the
    same donut when its centroid lies at ``target_zyx`` (``n // 2`` plus its sub-voxel part).
    Separable: each section is the out-of-plane shift (weights over one axis) followed by the
    in-plane Fourier shift; equal to slicing the 3-D Fourier-shifted stack."""
    a = np.asarray(stack, dtype=float)
    n = a.shape[0]
    c = n // 2
    dz, dy, dx = (float(t) - float(s0) for t, s0 in zip(target_zyx, centre_zyx))
    # einsum's own loops (no BLAS: its threads spin on a loaded machine)
    xy = _shift2d(np.einsum("z,zyx->yx", _shift_weights(n, c, dz), a), dy, dx)
    xz = _shift2d(np.einsum("y,zyx->zx", _shift_weights(n, c, dy), a), dz, dx)
    yz = _shift2d(np.einsum("x,zyx->zy", _shift_weights(n, c, dx), a), dz, dy)
    return np.stack([xy, xz, yz])


_IDEAL_STACKS: dict[tuple[Any, ...], tuple[np.ndarray, tuple[float, float, float]]] = {}


def ideal_sections_at(settings: Any, centre_zyx: Any) -> np.ndarray:
    """The ideal donut's sections (noise-free, through the configured bead; background kept, in
    photons; Pearson correlation ignores offset and scale) as a stack whose centroid lies at the
    voxel ``centre_zyx`` is re-centred by the measurement (:func:`shifted_sections` of
    :func:`calibration.donut.reference_measurement`'s stack). A half-voxel decentring alone costs
    ``1 - r`` = 5e-3 against the centred ideal on the default optics, which would read as 0.14 rad
    of aberration; matched, 5e-5."""
    from autoalign.calibration.donut import reference_measurement
    from autoalign.calibration.measurement import to_photons

    key = _shape_key(settings)
    if key not in _IDEAL_STACKS:
        m = reference_measurement(settings)
        if len(_IDEAL_STACKS) > 8:
            _IDEAL_STACKS.clear()
        cz, cy, cx = (float(v) for v in m.centre_zyx)
        _IDEAL_STACKS[key] = (to_photons(m.stack.data, settings.camera), (cz, cy, cx))
    stack, centre = _IDEAL_STACKS[key]
    n = stack.shape[0]
    frac = [float(v) - round(float(v)) for v in centre_zyx]
    return shifted_sections(stack, centre, [n // 2 + f for f in frac])


def _shape_key(settings: Any) -> tuple[Any, ...]:
    o, c, st = settings.optics, settings.camera, settings.stack
    return (o.numerical_aperture, o.immersion_index, o.wavelength_um, o.beam, o.vortex_charge, o.tophat_radius,
            o.polarisation, o.linear_angle_deg, o.pupil_samples, c.pixel_size_um, c.roi_px, c.bead_diameter_um,
            st.planes, st.z_step_um, tuple(int(m) for m in settings.model.modes))


_SHAPE_SETTINGS: dict[tuple[Any, ...], Any] = {}


def shape_constant(settings: Any) -> tuple[float, float, float]:
    """(mean, min, max) over the model's modes (``model.modes``) of ``k = (1 - r) / rms**2``: the
    correlation ``r`` with the ideal donut of the settings' donut with one mode of
    :data:`SHAPE_CALIBRATION_RAD`, noise-free, through the measurement pipeline
    (:func:`calibration.donut.reference_measurements`). The mean is that of a random direction over
    the modes (``E[w_j w_l] = delta_jl / J``). Cached per optics, camera geometry, bead, stack and
    modes (~0.2 s per mode the first time)."""
    key = _shape_key(settings)
    _SHAPE_SETTINGS.setdefault(key, settings)
    return _shape_constant(key)


@lru_cache(maxsize=8)
def _shape_constant(key: tuple[Any, ...]) -> tuple[float, float, float]:
    from autoalign.calibration.donut import reference_measurements
    from autoalign.calibration.metrics import correlation

    settings = _SHAPE_SETTINGS[key]
    a = SHAPE_CALIBRATION_RAD
    modes = [int(j) for j in key[-1] if int(j) >= 5]
    if not modes:
        raise ValueError("shape_constant: model.modes has no mode >= 5")
    ks = [(1.0 - correlation(m.sections, ideal_sections_at(settings, m.centre_zyx))) / (a * a)
          for m in reference_measurements(settings, [{j: a} for j in modes])]
    return float(np.mean(ks)), float(np.min(ks)), float(np.max(ks))


def shape_residual(sections: np.ndarray, background: float, ideal: np.ndarray | None, settings: Any,
                   centre_zyx: Any = None) -> Quality:
    """The donut's shape read as a residual wavefront (rad RMS): ``sqrt((1 - r_s) / k)`` with
    ``r_s`` the noise-corrected correlation (:func:`noise_free_correlation`) with the ideal donut,
    ``k`` the settings' mean (:func:`shape_constant`); sigma from the noise of ``r_s`` (at a
    reading near 0: ``sqrt(sigma_r / k)``, the smallest residual the photons resolve). The ideal:
    at the measurement's sub-voxel centroid when ``centre_zyx`` (the measurement's
    ``centre_zyx``) is given (:func:`ideal_sections_at`), else the ``ideal`` sections as given."""
    if centre_zyx is not None and all(math.isfinite(float(v)) for v in centre_zyx):
        ideal = ideal_sections_at(settings, centre_zyx)
    if ideal is None:
        return Quality(math.nan, math.nan, "shape")
    _, rs, sr = noise_free_correlation(sections, background, ideal, settings)
    if not math.isfinite(rs):
        return Quality(math.nan, math.nan, "shape")
    try:
        k = shape_constant(settings)[0]
    except Exception as exc:  # noqa: BLE001 - no reading is better than a broken measurement
        log.warning("no shape calibration for these settings (%s): the donut's shape reads no residual", exc)
        return Quality(math.nan, math.nan, "shape", correlation=rs)
    if not k > 0:
        return Quality(math.nan, math.nan, "shape", correlation=rs)
    d = max(1.0 - rs, 0.0)
    value = math.sqrt(d / k)
    sigma = math.sqrt(sr / k) if value < math.sqrt(sr / k) else sr / (2.0 * k * value)
    return Quality(value, sigma, "shape", value, rs)


# ---------------------------------------------------------------------------- the fit
def fit_explains(estimate: Any) -> bool:
    """True when ``estimate`` is a model fit that explains the data: valid, with the fit's summary
    (``extras["refine"]``, the ``refined`` estimator), neither skipped (``fit_skipped``: beyond
    the fit's capture range) nor refused (``fit_refused``: the network's estimate was applied)."""
    if estimate is None or not bool(getattr(estimate, "valid", False)):
        return False
    extras = getattr(estimate, "extras", None) or {}
    fit = extras.get("refine")
    if not fit or extras.get("fit_skipped") or extras.get("fit_refused"):
        return False
    return bool(fit.get("valid", True))


def fit_residual(estimate: Any) -> Quality | None:
    """The model fit's residual wavefront (``estimate.residual_rms``, rad RMS, Noll >= 5) with its
    Cramér–Rao bound as sigma, when the fit explains the data (:func:`fit_explains`), else None."""
    if not fit_explains(estimate):
        return None
    value = getattr(estimate, "residual_rms", None)
    if value is None or not math.isfinite(float(value)):
        return None
    crb = (estimate.extras.get("refine") or {}).get("crb_residual_rms")
    sigma = float(crb) if crb is not None and math.isfinite(float(crb)) else math.nan
    return Quality(float(value), sigma, "fit")


# ---------------------------------------------------------------------------- the figure
def quality_figure(sections: np.ndarray, background: float, ideal: np.ndarray | None, settings: Any,
                   estimate: Any = None, centre_zyx: Any = None) -> Quality:
    """The measured residual wavefront of one stack: the fit's (:func:`fit_residual`) when the
    fit explains the data, else the shape's (:func:`shape_residual`, against the ideal at the
    stack's sub-voxel centroid ``centre_zyx`` when given, else the ``ideal`` sections); both carry
    the shape's reading (``shape``). NaN without an ideal reference and without a fit."""
    shape = shape_residual(sections, background, ideal, settings, centre_zyx)
    fit = fit_residual(estimate)
    if fit is not None:
        return Quality(fit.value, fit.sigma, "fit", shape.value, shape.correlation)
    return shape


def measurement_quality(m: Any, ideal: np.ndarray | None, settings: Any, estimate: Any = None) -> Quality:
    """:func:`quality_figure` of a :class:`calibration.measurement.Measurement` (NaN when invalid)."""
    if not getattr(m, "valid", False):
        return Quality(math.nan, math.nan, "shape")
    return quality_figure(m.sections, m.background_photons, ideal, settings, estimate, getattr(m, "centre_zyx", None))


def is_aligned_quality(q: Quality | None, threshold: float = ALIGNED_RAD, sigmas: float = ALIGNED_SIGMAS,
                       shape_guard: float = SHAPE_GUARD_RAD) -> bool:
    """True when the figure plus ``sigmas`` sigma is at most ``threshold`` and the shape's
    reading, when known, at most ``shape_guard`` (False for None / NaN)."""
    if q is None or not math.isfinite(q.value):
        return False
    if math.isfinite(q.shape) and q.shape > shape_guard:
        return False
    return bool(q.upper_at(sigmas) <= threshold)


__all__ = ["ALIGNED_RAD", "ALIGNED_SIGMAS", "SHAPE_GUARD_RAD", "SOURCE_WORDS", "Quality", "noise_free_correlation",
           "shifted_sections", "ideal_sections_at", "shape_constant", "shape_residual", "fit_explains", "fit_residual",
           "quality_figure", "measurement_quality", "is_aligned_quality"]
