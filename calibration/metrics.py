"""Image metrics of a measured donut: null depth (measured and true), correlation.

Sections are ortho-sections stacked as xy[y, x], xz[z, x], yz[z, y], in photons; a background
(photons per pixel) is subtracted where a function takes one.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import ndimage


def _quadratic_centre_weights() -> np.ndarray:
    """Row 0 of ``(A^T A)^-1 A^T`` for the 6-term quadratic fitted on a 3 x 3 patch: the fitted
    centre value is ``weights @ patch.ravel()`` (its variance ``sum(weights^2 var_i)``)."""
    c = np.arange(3) - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    a = np.stack([np.ones(9), xx.ravel(), yy.ravel(), xx.ravel() ** 2, yy.ravel() ** 2, (xx * yy).ravel()], axis=1)
    return (np.linalg.inv(a.T @ a) @ a.T)[0]


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
    :meth:`autoalign.app.loop.AlignmentLoop.ideal_null_depth`."""
    found = _darkest_patch(sections, background, search_px)
    if found is None:
        return float("nan")
    peak, (iy, ix) = found
    xy = np.asarray(sections[0], dtype=float) - background
    centre = _quadratic_min(xy[iy - 1 : iy + 2, ix - 1 : ix + 2])
    return float(max(centre, 0.0) / peak)


def _darkest_patch(sections: np.ndarray, background: float, search_px: int) -> tuple[float, tuple[int, int]] | None:
    """(peak, (y, x)) of the xy section: the brightest 3 x 3 mean above ``background`` and the darkest
    3 x 3 mean within ``search_px`` of the centre (kept one pixel from the edge); None without signal."""
    xy = np.asarray(sections[0], dtype=float) - background
    n = xy.shape[0]
    mean3 = ndimage.uniform_filter(xy, 3, mode="nearest")
    peak = float(mean3.max())
    if peak <= 0:
        return None
    c = n // 2
    lo, hi = max(c - search_px, 1), min(c + search_px + 1, n - 1)
    win = mean3[lo:hi, lo:hi]
    iy, ix = np.unravel_index(np.argmin(win), win.shape)
    return peak, (int(iy) + lo, int(ix) + lo)


def null_depth_sigma(sections: np.ndarray, background: float, quantum_efficiency: float = 1.0,
                     read_noise_photons: float = 0.0, search_px: int = 3) -> float:
    """One-sigma shot-noise uncertainty of :func:`null_depth` (same units: centre over peak).

    The null is the constant term of a quadratic surface fitted by least squares to the 3 x 3
    pixels around the darkest point; its variance is ``(A^T A)^-1[0, 0]`` times the pixels'
    variance, taken as Poisson on the detected electrons (``photons / quantum_efficiency`` in
    photon units, background included) plus the read noise (photons). The peak (a 3 x 3 mean of
    a bright ring) is treated as exact. NaN when the section has no signal."""
    found = _darkest_patch(sections, background, search_px)
    if found is None:
        return float("nan")
    peak, (iy, ix) = found
    xy = np.asarray(sections[0], dtype=float)
    patch = xy[iy - 1: iy + 2, ix - 1: ix + 2]
    var = np.clip(patch.ravel(), 0.0, None) / max(float(quantum_efficiency), 1e-6) + float(read_noise_photons) ** 2
    return float(math.sqrt(max(float(_QUADRATIC_CENTRE_WEIGHTS ** 2 @ var), 1e-12)) / peak)


def true_focal_null_depth(plane: np.ndarray, search_px: int = 3, upsample: int = 8) -> float:
    """Null depth of a NOISE-FREE focal plane (no background): the minimum within ``search_px``
    of the plane's centre, refined on a cubic spline ``upsample`` x finer (the beam is band-limited
    at NA / lambda, so 40 nm pixels resolve it; the pixel minimum alone overestimates a deep null
    several-fold), over the plane's maximum."""
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


_QUADRATIC_CENTRE_WEIGHTS = _quadratic_centre_weights()


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two arrays of the same size (NaN when either is constant)."""
    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    a = a - a.mean()
    b = b - b.mean()
    den = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b / den) if den > 0 else float("nan")


def measurement_metrics(m: Any, ideal_sections: np.ndarray | None) -> dict[str, float]:
    """Metrics of a measurement (``calibration.measurement.Measurement``): ``photons``,
    ``peak_photons``, ``null_depth`` and ``correlation_ideal`` (with the unaberrated
    ``ideal_sections``; both NaN for an invalid measurement)."""
    out = {"photons": float(m.photons), "peak_photons": float(m.peak_photons),
           "null_depth": math.nan, "correlation_ideal": math.nan}
    if m.valid:
        out["null_depth"] = null_depth(m.sections, m.background_photons)
        out["correlation_ideal"] = correlation(m.sections - m.background_photons, ideal_sections)
    return out


__all__ = ["null_depth", "null_depth_sigma", "true_focal_null_depth", "correlation", "measurement_metrics"]
