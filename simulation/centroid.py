"""Centre of mass of the PSF: robust background subtraction, ROI around the brightest region,
and the ortho-sections through the bead.

Shared by the physics floor (the data-set writer centres its samples as the loop does,
:mod:`simulation.dataset`) and the analysis above it (``calibration.measurement``, ``donut``,
``refine``, ``modal``; ``calibration.centroid`` re-exports these names), so it lives here and imports
nothing of the project.

Conventions: stacks (nz, ny, nx); ortho-sections (3, n, n) as xy[y, x], xz[z, x], yz[z, y];
centroid offsets in pixels (planes for z) relative to the centre pixel ``n // 2``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Centroid:
    """Centre of mass offsets from the centre pixel (x, y in pixels; z in planes)."""

    x_px: float
    y_px: float
    z_px: float

    def as_um(self, pixel_size_um: float, z_step_um: float) -> tuple[float, float, float]:
        return self.x_px * pixel_size_um, self.y_px * pixel_size_um, self.z_px * z_step_um


def subtract_background(image: np.ndarray, percentile: float = 20.0) -> np.ndarray:
    """Subtract a robust background level (a low percentile of the image) and clip at zero."""
    image = np.asarray(image, dtype=float)
    return np.clip(image - np.percentile(image, percentile), 0.0, None)


def _robust(image: np.ndarray) -> np.ndarray:
    """Median-filter (3 px) a background-subtracted image, so single hot pixels carry no weight."""
    return ndimage.median_filter(subtract_background(image), size=3, mode="nearest")


def _com_1d(weights: np.ndarray) -> float:
    total = weights.sum()
    if total <= 0 or not np.isfinite(total):
        raise ValueError("image has no signal above background: cannot find a centre of mass")
    return float((weights * np.arange(weights.size)).sum() / total)


def image_centroid(image: np.ndarray, roi_radius_px: float | None = None) -> tuple[float, float]:
    """Centre of mass (row, col) in pixels of a 2-D image, after background subtraction and a
    3 px median filter; optionally within a disc of ``roi_radius_px`` around the smoothed maximum
    (iterated twice so the ROI follows the centroid)."""
    w = _robust(image)
    if roi_radius_px is not None:
        smooth = ndimage.gaussian_filter(w, 2.0)
        r0, c0 = (float(v) for v in np.unravel_index(np.argmax(smooth), smooth.shape))
        rows, cols = np.indices(w.shape)
        for _ in range(2):
            mask = (rows - r0) ** 2 + (cols - c0) ** 2 <= roi_radius_px**2
            wm = np.where(mask, w, 0.0)
            r0, c0 = _com_1d(wm.sum(axis=1)), _com_1d(wm.sum(axis=0))
        return float(r0), float(c0)
    return _com_1d(w.sum(axis=1)), _com_1d(w.sum(axis=0))


def section_centroid(sections: np.ndarray) -> Centroid:
    """Centroid offsets from the ortho-sections (3, n, n): x and y from the xy section, z as the
    average of the z centroids of the xz and yz sections."""
    sections = np.asarray(sections, dtype=float)
    if sections.ndim != 3 or sections.shape[0] != 3:
        raise ValueError(f"expected ortho-sections of shape (3, n, n), got {sections.shape}")
    n_y, n_x = sections.shape[1], sections.shape[2]
    y, x = image_centroid(sections[0])
    z_xz, _ = image_centroid(sections[1])
    z_yz, _ = image_centroid(sections[2])
    nz = sections.shape[1]
    return Centroid(x - n_x // 2, y - n_y // 2, 0.5 * (z_xz + z_yz) - nz // 2)


def stack_centroid(stack: np.ndarray) -> tuple[float, float, float]:
    """Centre of mass (z, y, x) in pixels (absolute indices) of a background-subtracted stack."""
    stack = np.asarray(stack, dtype=float)
    if stack.ndim != 3:
        raise ValueError(f"expected a stack (nz, ny, nx), got shape {stack.shape}")
    w = ndimage.median_filter(subtract_background(stack), size=3, mode="nearest")
    return (
        _com_1d(w.sum(axis=(1, 2))),
        _com_1d(w.sum(axis=(0, 2))),
        _com_1d(w.sum(axis=(0, 1))),
    )


def orthosections(stack: np.ndarray, centre_zyx: tuple[float, float, float] | None = None) -> np.ndarray:
    """Ortho-sections (3, n, n) through ``centre_zyx`` (default: the stack's centre of mass,
    rounded to the nearest voxel): xy[y, x] at z0, xz[z, x] at y0, yz[z, y] at x0.

    The stack must be cubic-sampled in counts (nz == ny == nx)."""
    stack = np.asarray(stack, dtype=float)
    if stack.ndim != 3 or not stack.shape[0] == stack.shape[1] == stack.shape[2]:
        raise ValueError(f"expected a cubic stack (n, n, n) for square sections, got {stack.shape}")
    if centre_zyx is None:
        centre_zyx = stack_centroid(stack)
    n = stack.shape[0]
    z0, y0, x0 = (int(np.clip(round(c), 0, n - 1)) for c in centre_zyx)
    return np.stack([stack[z0], stack[:, y0, :], stack[:, :, x0]])


# ---------------------------------------------------------------------------- robust 3-D analysis
def background_and_noise(data: np.ndarray) -> tuple[float, float]:
    """Robust background level (median) and noise (1.4826 x median absolute deviation) of an
    array in which the signal covers a minority of the pixels (a bead in its ROI)."""
    data = np.asarray(data, dtype=float)
    bg = float(np.median(data))
    mad = float(np.median(np.abs(data - bg)))
    return bg, max(1.4826 * mad, 1e-12)


def robust_stack_centroid(
    stack: np.ndarray, roi_radius_px: float | None = None, threshold_sigma: float = 3.0
) -> tuple[float, float, float]:
    """Centre of mass (z, y, x), absolute voxel indices, robust to background and hot pixels.

    Each plane is median-filtered (3 x 3 pixels: a hot camera pixel, which shows at the same
    (y, x) in every plane, carries no weight), the stack's median
    background removed and only voxels above ``threshold_sigma`` times the filtered noise kept; the
    centre of mass is then taken inside a sphere of ``roi_radius_px`` (default 0.35 of the stack's
    smallest side) around the brightest smoothed voxel, iterated so the ROI follows the centroid.
    Raises :class:`ValueError` when there is no signal above the background."""
    stack = np.asarray(stack, dtype=float)
    if stack.ndim != 3:
        raise ValueError(f"expected a stack (nz, ny, nx), got shape {stack.shape}")
    filtered = ndimage.median_filter(stack, size=(1, 3, 3), mode="nearest")
    bg, sigma = background_and_noise(filtered)
    w = np.clip(filtered - bg - threshold_sigma * sigma, 0.0, None)
    if not np.any(w > 0):
        raise ValueError("stack has no signal above background: cannot find a centre of mass")
    if roi_radius_px is None:
        roi_radius_px = 0.35 * min(stack.shape)
    smooth = ndimage.gaussian_filter(w, 1.5)
    centre = np.array(np.unravel_index(np.argmax(smooth), smooth.shape), dtype=float)
    nz, ny, nx = stack.shape
    zz, yy, xx = np.ogrid[:nz, :ny, :nx]  # as np.indices(stack.shape, sparse=True)
    for _ in range(3):
        inside = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 <= roi_radius_px**2
        wm = np.where(inside, w, 0.0)
        new = np.array([
            _com_1d(wm.sum(axis=(1, 2))), _com_1d(wm.sum(axis=(0, 2))), _com_1d(wm.sum(axis=(0, 1)))
        ])
        if np.allclose(new, centre, atol=0.05):
            centre = new
            break
        centre = new
    return float(centre[0]), float(centre[1]), float(centre[2])


def centred_sections(
    stack: np.ndarray, centre_zyx: tuple[float, float, float], fill: float | None = None
) -> np.ndarray:
    """Ortho-sections (3, n, n) of a cubic stack re-centred on ``centre_zyx`` by a whole-voxel
    shift (the residual decentring is at most half a voxel, as in the training data; no
    interpolation, so the noise statistics are untouched). The section planes go through the
    rounded centre; the centre voxel lands on index ``n // 2``. Voxels shifted in from outside the
    stack take ``fill`` (default: the stack's median, i.e. the background)."""
    stack = np.asarray(stack, dtype=float)
    if stack.ndim != 3 or not stack.shape[0] == stack.shape[1] == stack.shape[2]:
        raise ValueError(f"expected a cubic stack (n, n, n) for square sections, got {stack.shape}")
    n = stack.shape[0]
    if fill is None:
        fill = float(np.median(stack))
    z0, y0, x0 = (int(np.clip(round(c), 0, n - 1)) for c in centre_zyx)
    h = n // 2
    padded = np.pad(stack, n, mode="constant", constant_values=fill)
    zs, ys, xs = (slice(c - h + n, c - h + 2 * n) for c in (z0, y0, x0))
    xy = padded[z0 + n, ys, xs]
    xz = padded[zs, y0 + n, xs]
    yz = padded[zs, ys, x0 + n]
    return np.stack([xy, xz, yz])


__all__ = ["Centroid", "subtract_background", "image_centroid", "section_centroid", "stack_centroid", "orthosections",
           "background_and_noise", "robust_stack_centroid", "centred_sections"]
