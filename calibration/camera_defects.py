"""Camera defects: a map of hot, dead, stuck and noisy pixels measured from dark (and flat)
frames, saved, loaded and applied; and, without a map, one-pixel spikes found in the image itself
and a centroid that ignores them.

Measuring (:func:`measure_defects`): the per-pixel mean and variance over a series of dark frames
(the light blocked), compared with robust thresholds: the median over the sensor plus ``k`` times
the scaled median absolute deviation (``1.4826 MAD``, a standard deviation for Gaussian scatter).

* ``hot``: the dark mean above ``median + k MAD`` (dark current, or stuck high: full scale);
* ``stuck``: a variance below ``stuck_variance_fraction`` of the median variance (a value that
  does not change from frame to frame, whatever it is);
* ``dead``: stuck and not hot (a constant at or below the dark level), or, with flat frames, a
  response to light (flat mean minus dark mean) below ``dead_response_fraction`` of the median;
* ``noisy``: the variance above ``median + k MAD`` (random telegraph noise).

Flags are bits (:data:`HOT`, :data:`DEAD`, :data:`STUCK`, :data:`NOISY`); a pixel stuck at full
scale is ``HOT | STUCK``.

The file (:meth:`DefectMap.save`, :meth:`DefectMap.load`) is a compressed ``.npz`` with a format
header: ``format`` = :data:`DEFECT_FORMAT`, ``format_version``, ``flags`` (uint8, the sensor's
shape), ``origin`` (row, column of the map's first pixel on the sensor) and ``info`` (JSON: frame
count, thresholds, statistics, source, time). A file that exists and is not a defect map is never
replaced (unless forced); a foreign, damaged or newer file is refused with a message naming it
(:class:`DefectMapError`).

Applying (:meth:`DefectMap.apply`, :func:`replace_pixels`): each defect pixel is replaced by the
median of its good neighbours (3 x 3; 5 x 5 where all eight are defects), frame by frame, in an
image or stack whose last two axes are (y, x) and whose first pixel sits at ``origin`` on the sensor.

Without a map (:func:`find_spikes`, :func:`robust_centroid`): a pixel is a one-pixel spike when it
stands out of its 3 x 3 median by more than ``k`` local noise sigmas (read noise and the shot noise
of the median's signal) AND by more than its neighbourhood's own signal (a smooth, sampled PSF
never doubles its 3 x 3 median; needs a PSF of FWHM >= ~3 pixels). Spikes are replaced by the median of their
neighbours before the centre of mass is taken, so a hot pixel in the ROI carries no weight.

Conventions: images (..., y, x); rows, columns; ADU.
"""
from __future__ import annotations

import json
import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from autoalign.files import OverwriteRefused, UserError, atomic_writer, check_writable

__all__ = ["DEFECT_FORMAT", "DEFECT_FORMAT_VERSION", "HOT", "DEAD", "STUCK", "NOISY", "DefectMap", "DefectMapError",
           "measure_defects", "replace_pixels", "find_spikes", "noise_sigma", "background_level", "robust_centroid",
           "centre_of_mass", "is_defect_map_file", "default_defect_map_path"]

DEFECT_FORMAT = "autoalign-camera-defects"
DEFECT_FORMAT_VERSION = 1
HOT, DEAD, STUCK, NOISY = 1, 2, 4, 8
_NAMES = {HOT: "hot", DEAD: "dead", STUCK: "stuck", NOISY: "noisy"}
_MAD = 1.4826


class DefectMapError(UserError, ValueError):
    """A defect-map file that cannot be used: the message names the file, what was expected and
    what was found."""


# ----------------------------------------------------------------------------- robust statistics
def _robust(values: np.ndarray) -> tuple[float, float]:
    v = np.asarray(values, dtype=float).ravel()
    v = v[np.isfinite(v)]
    med = float(np.median(v))
    return med, _MAD * float(np.median(np.abs(v - med)))


def noise_sigma(image: np.ndarray) -> float:
    """Robust per-pixel noise (ADU) of an image (last two axes y, x): ``1.4826 MAD`` of the
    differences of horizontally neighbouring pixels, over sqrt(2). Beads, gradients and hot pixels
    are a minority of the differences, so this is the background's noise."""
    a = np.asarray(image, dtype=float)
    d = np.diff(a, axis=-1).ravel()
    if d.size == 0:
        return 1e-12
    return max(_MAD * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2.0), 1e-12)


def background_level(image: np.ndarray, block_px: int = 64) -> np.ndarray:
    """A smooth background map (same shape as the 2-D ``image``): the median of each block of
    ``block_px`` pixels (beads are a minority of a block), smoothed and interpolated back to the
    pixels; the image's median when it is smaller than two blocks."""
    a = np.asarray(image, dtype=float)
    ny, nx = a.shape
    by, bx = max(1, ny // max(block_px, 1)), max(1, nx // max(block_px, 1))
    if by < 2 and bx < 2:
        return np.full(a.shape, float(np.median(a)))
    ys = np.linspace(0, ny, by + 1).astype(int)
    xs = np.linspace(0, nx, bx + 1).astype(int)
    grid = np.array([[np.median(a[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]) for j in range(bx)] for i in range(by)])
    grid = ndimage.median_filter(grid, size=3, mode="nearest")  # a block full of beads takes its neighbours'
    cy = 0.5 * (ys[:-1] + ys[1:]) - 0.5
    cx = 0.5 * (xs[:-1] + xs[1:]) - 0.5
    rows = np.interp(np.arange(ny), cy, np.arange(by))
    cols = np.interp(np.arange(nx), cx, np.arange(bx))
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return ndimage.map_coordinates(grid, [rr, cc], order=1, mode="nearest")


# ----------------------------------------------------------------------------- spikes and repair
def find_spikes(image: np.ndarray, k: float = 6.0, background: np.ndarray | float | None = None,
                noise: float | None = None, gain_adu_per_electron: float = 1.0, hot_ratio: float = 2.0,
                cold: bool = False, cold_ratio: float = 0.25) -> np.ndarray:
    """Boolean mask of one-pixel spikes of a 2-D image, ADU (see the module docstring).
    ``background``: the background level (scalar or map; default the median); ``noise``: the
    background's per-pixel noise (default :func:`noise_sigma`). A hot spike has ``I - med > k
    sigma_local`` and ``I - B > hot_ratio (med - B)``, with ``med`` the 3 x 3 median and
    ``sigma_local = sqrt(noise^2 + gain (med - B))``. With ``cold``, also cold spikes (dead
    pixels): ``med - I > k sigma_local`` and ``I - B < cold_ratio (med - B)`` -- off by default,
    because a donut's null sampled by coarse pixels is such a spike too (dead pixels are for the
    defect map)."""
    a = np.asarray(image, dtype=float)
    if a.ndim != 2:
        raise ValueError(f"find_spikes: expected a 2-D image, got shape {a.shape}")
    med = ndimage.median_filter(a, size=3, mode="nearest")
    bg = float(np.median(a)) if background is None else background
    sigma0 = noise_sigma(a) if noise is None else float(noise)
    signal = np.clip(med - bg, 0.0, None)
    local = np.sqrt(sigma0**2 + max(gain_adu_per_electron, 0.0) * signal)
    d = a - med
    hot = (d > k * local) & (a - bg > hot_ratio * signal)
    if not cold:
        return hot
    return hot | ((-d > k * local) & (a - bg < cold_ratio * signal))


def replace_pixels(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A copy of ``images`` (..., ny, nx) with the pixels of ``mask`` (ny, nx) replaced, in every
    frame, by the median of their good 3 x 3 neighbours (5 x 5 where all eight are in ``mask``;
    the frame's median of good pixels where all 24 are)."""
    a = np.array(images, dtype=float, copy=True)
    m = np.asarray(mask, dtype=bool)
    if a.shape[-2:] != m.shape:
        raise ValueError(f"replace_pixels: a mask of {m.shape} for frames of {a.shape[-2:]}")
    rows, cols = np.nonzero(m)
    if len(rows) == 0:
        return a
    ny, nx = m.shape
    todo = np.ones(len(rows), bool)
    for half in (1, 2):
        offsets = [(dr, dc) for dr in range(-half, half + 1) for dc in range(-half, half + 1) if (dr, dc) != (0, 0)]
        r = rows[todo][:, None] + np.array([o[0] for o in offsets])[None, :]
        c = cols[todo][:, None] + np.array([o[1] for o in offsets])[None, :]
        inside = (r >= 0) & (r < ny) & (c >= 0) & (c < nx)
        rc, cc = np.clip(r, 0, ny - 1), np.clip(c, 0, nx - 1)
        good = inside & ~m[rc, cc]
        values = np.where(good, a[..., rc, cc], np.nan)          # (..., K, n_offsets)
        have = good.any(axis=1)
        idx = np.nonzero(todo)[0][have]
        if len(idx):
            a[..., rows[idx], cols[idx]] = np.nanmedian(values[..., have, :], axis=-1)
        todo[idx] = False
        if not todo.any():
            break
    if todo.any():
        good = np.where(m, np.nan, a).reshape(a.shape[:-2] + (-1,))
        fill = np.nanmedian(good, axis=-1) if (~m).any() else np.zeros(a.shape[:-2])
        a[..., rows[todo], cols[todo]] = np.asarray(fill)[..., None]
    return a


# ----------------------------------------------------------------------------- centroids
def centre_of_mass(image: np.ndarray, start: tuple[float, float], radius_px: float,
                   background: float | np.ndarray = 0.0, iterations: int = 30,
                   tolerance_px: float = 0.002) -> tuple[float, float]:
    """Plain centre of mass (row, col) of ``image - background`` inside a disc of ``radius_px``
    around ``start``, iterated so the disc follows the centroid (signed weights: the background's
    noise averages out; no outlier rejection). Raises :class:`ValueError` when the disc holds no
    signal or the centroid leaves the image."""
    a = np.asarray(image, dtype=float)
    w_all = a - background
    ny, nx = a.shape
    r0, c0 = float(start[0]), float(start[1])
    rad = float(radius_px)
    for _ in range(max(1, iterations)):
        lo_r, hi_r = max(0, int(math.floor(r0 - rad))), min(ny, int(math.ceil(r0 + rad)) + 1)
        lo_c, hi_c = max(0, int(math.floor(c0 - rad))), min(nx, int(math.ceil(c0 + rad)) + 1)
        if lo_r >= hi_r or lo_c >= hi_c:
            raise ValueError(f"centre of mass: the disc around ({r0:.1f}, {c0:.1f}) left the image")
        rr, cc = np.mgrid[lo_r:hi_r, lo_c:hi_c]
        inside = (rr - r0) ** 2 + (cc - c0) ** 2 <= rad**2
        w = np.where(inside, w_all[lo_r:hi_r, lo_c:hi_c], 0.0)
        total = float(w.sum())
        if not (total > 0 and math.isfinite(total)):
            raise ValueError("centre of mass: no signal above the background in the disc")
        r1, c1 = float((w * rr).sum() / total), float((w * cc).sum() / total)
        moved = math.hypot(r1 - r0, c1 - c0)
        r0, c0 = r1, c1
        if moved < tolerance_px:
            break
    return r0, c0


def robust_centroid(image: np.ndarray, roi_radius_px: float | None = None, defects: np.ndarray | None = None,
                    k: float = 6.0, gain_adu_per_electron: float = 1.0,
                    background: float | None = None) -> tuple[float, float]:
    """Centre of mass (row, col), pixels, of the bead in a 2-D image, robust to hot pixels
    without a defect map: the one-pixel spikes (:func:`find_spikes`) and the ``defects`` mask
    (when given) are replaced by the median of their neighbours, the start is the maximum of the
    median-filtered, smoothed image (a hot pixel cannot win it), then :func:`centre_of_mass` in a
    disc of ``roi_radius_px`` (default a quarter of the smaller side) on the repaired image."""
    a = np.asarray(image, dtype=float)
    if a.ndim != 2:
        raise ValueError(f"robust_centroid: expected a 2-D image, got shape {a.shape}")
    bg = float(np.median(a)) if background is None else float(background)
    sigma0 = noise_sigma(a)
    bad = find_spikes(a, k, bg, sigma0, gain_adu_per_electron)
    if defects is not None:
        bad = bad | np.asarray(defects, dtype=bool)
    clean = replace_pixels(a, bad)
    search = ndimage.gaussian_filter(ndimage.median_filter(clean, size=3, mode="nearest"), 1.5)
    start = np.unravel_index(int(np.argmax(search)), search.shape)
    radius = 0.25 * min(a.shape) if roi_radius_px is None else float(roi_radius_px)
    return centre_of_mass(clean, (float(start[0]), float(start[1])), radius, bg)


# ----------------------------------------------------------------------------- the defect map
@dataclass
class DefectMap:
    """Defect flags (uint8 bits :data:`HOT` | :data:`DEAD` | :data:`STUCK` | :data:`NOISY`) of a
    sensor region whose first pixel is at ``origin`` (row, column) on the sensor; ``info``: how it
    was measured (frames, thresholds, statistics, source)."""

    flags: np.ndarray
    origin: tuple[int, int] = (0, 0)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.flags = np.asarray(self.flags, dtype=np.uint8)
        if self.flags.ndim != 2:
            raise ValueError(f"defect flags of shape {self.flags.shape}: expected (ny, nx)")
        self.origin = (int(self.origin[0]), int(self.origin[1]))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.flags.shape[0]), int(self.flags.shape[1]))

    def mask(self, kind: int | None = None) -> np.ndarray:
        """Boolean mask of the pixels with any flag (``kind`` None) or with the bits of ``kind``."""
        return self.flags != 0 if kind is None else (self.flags & kind) != 0

    def positions(self, kind: int | None = None) -> np.ndarray:
        """(K, 2) sensor (row, column) of the flagged pixels."""
        r, c = np.nonzero(self.mask(kind))
        return np.stack([r + self.origin[0], c + self.origin[1]], axis=1)

    def counts(self) -> dict[str, int]:
        out = {name: int(np.count_nonzero(self.flags & bit)) for bit, name in _NAMES.items()}
        out["defects"] = int(np.count_nonzero(self.flags))
        out["full_scale"] = int(self.info.get("full_scale_pixels", 0))
        return out

    def summary(self) -> str:
        c = self.counts()
        n = self.flags.size
        full = f" ({c['full_scale']} stuck at full scale)" if c["full_scale"] else ""
        return (f"{c['defects']} defect pixel(s) of {n} ({100 * c['defects'] / max(n, 1):.3f} %): hot {c['hot']}{full}, "
                f"dead {c['dead']}, stuck {c['stuck']}, noisy {c['noisy']}")

    def window(self, shape: tuple[int, int], origin: tuple[int, int] | None = None) -> np.ndarray:
        """The defect mask of a camera window of ``shape`` whose first pixel is at sensor
        ``origin`` (default: the map's own). Raises :class:`ValueError` when the window leaves the map."""
        o = self.origin if origin is None else (int(origin[0]), int(origin[1]))
        r0, c0 = o[0] - self.origin[0], o[1] - self.origin[1]
        ny, nx = int(shape[0]), int(shape[1])
        if r0 < 0 or c0 < 0 or r0 + ny > self.shape[0] or c0 + nx > self.shape[1]:
            raise ValueError(f"a camera window of {ny} x {nx} pixels at sensor ({o[0]}, {o[1]}) leaves the defect "
                             f"map ({self.shape[0]} x {self.shape[1]} at ({self.origin[0]}, {self.origin[1]})); "
                             "measure the map on the whole sensor (or this window) with 'autoalign calibrate camera'")
        return self.mask()[r0:r0 + ny, c0:c0 + nx]

    def apply(self, images: np.ndarray, origin: tuple[int, int] | None = None) -> np.ndarray:
        """A copy of ``images`` (..., ny, nx; frames or a stack) with every defect pixel replaced
        by the median of its good neighbours (:func:`replace_pixels`)."""
        a = np.asarray(images, dtype=float)
        return replace_pixels(a, self.window(a.shape[-2:], origin))

    # -------------------------------------------------------------- file
    def to_dict(self) -> dict[str, Any]:
        return {"format": DEFECT_FORMAT, "format_version": DEFECT_FORMAT_VERSION, "shape": list(self.shape),
                "origin": list(self.origin), "counts": self.counts(), "info": self.info}

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Write the map (compressed npz, atomically). An existing file that is not a defect map is
        refused (:class:`~autoalign.files.OverwriteRefused`) unless ``force``."""
        p = Path(path)
        if p.exists() and not force and not is_defect_map_file(p):
            raise OverwriteRefused(f"{p}: exists and is not an autoalign camera defect map; choose another name "
                                   "or pass --force")
        check_writable(p, "camera defect map")
        with atomic_writer(p, "wb") as fh:
            np.savez_compressed(fh, format=np.array(DEFECT_FORMAT), format_version=np.array(DEFECT_FORMAT_VERSION),
                                flags=self.flags, origin=np.array(self.origin, dtype=np.int64),
                                info=np.array(json.dumps(self.info, default=float)))
        return p

    @classmethod
    def load(cls, path: str | Path) -> "DefectMap":
        """Read a map written by :meth:`save`; raises :class:`DefectMapError` naming the file and
        the problem (missing, not a defect map, damaged, newer format)."""
        p = Path(path)
        if not p.is_file():
            raise DefectMapError(f"{p}: no such camera defect map; measure one with 'autoalign calibrate camera'")
        try:
            data = np.load(p, allow_pickle=False)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
            raise DefectMapError(f"{p}: expected an autoalign camera defect map (.npz), found a file numpy cannot "
                                 f"read as one ({type(exc).__name__}: {exc}); measure the map again with "
                                 "'autoalign calibrate camera'") from exc
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise DefectMapError(f"{p}: expected an autoalign camera defect map (.npz with a format header), found "
                                 f"a single numpy array of shape {getattr(data, 'shape', '?')}")
        with data:
            try:
                keys = set(data.files)
                fmt = str(data["format"][()]) if "format" in keys else None
                if fmt != DEFECT_FORMAT:
                    found = f"format {fmt!r}" if fmt is not None else f"entries {sorted(keys)[:6]} and no 'format'"
                    raise DefectMapError(f"{p}: expected an autoalign camera defect map (format {DEFECT_FORMAT!r}), "
                                         f"found {found}; it was not written by 'autoalign calibrate camera'")
                version = int(data["format_version"][()]) if "format_version" in keys else -1
                if version < 1 or version > DEFECT_FORMAT_VERSION:
                    raise DefectMapError(f"{p}: camera defect map format version {version}; this autoalign reads "
                                         f"1..{DEFECT_FORMAT_VERSION} (a newer file: update autoalign)")
                missing = [k for k in ("flags", "origin", "info") if k not in keys]
                if missing:
                    raise DefectMapError(f"{p}: camera defect map without {', '.join(missing)}: the file is damaged; "
                                         "measure the map again")
                flags = np.asarray(data["flags"])
                origin = tuple(int(v) for v in np.asarray(data["origin"]).ravel()[:2])
                info = json.loads(str(data["info"][()]))
            except DefectMapError:
                raise
            except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
                raise DefectMapError(f"{p}: camera defect map is damaged ({type(exc).__name__}: {exc}); measure the "
                                     "map again with 'autoalign calibrate camera'") from exc
        if flags.ndim != 2 or flags.dtype.kind not in "ui" or len(origin) != 2:
            raise DefectMapError(f"{p}: camera defect map with flags of shape {flags.shape} ({flags.dtype}): "
                                 "expected a 2-D unsigned array; the file is damaged")
        return cls(flags.astype(np.uint8), (origin[0], origin[1]), dict(info) if isinstance(info, dict) else {})


def default_defect_map_path(settings: Any) -> Path:
    """Where the defect map for ``settings`` lives: ``<settings folder>/camera_defects.npz``, or
    ``<user data folder>/camera_defects.npz`` for the packaged defaults (as the poke calibration)."""
    from autoalign.files import user_data_dir
    from autoalign.settings import is_packaged_default

    source = Path(str(getattr(settings, "source", "<memory>")))
    if is_packaged_default(settings) or not source.is_file():
        return user_data_dir() / "camera_defects.npz"
    return source.absolute().parent / "camera_defects.npz"


def is_defect_map_file(path: str | Path) -> bool:
    """True when ``path`` is a readable camera defect map (any supported version)."""
    try:
        DefectMap.load(path)
    except DefectMapError:
        return False
    return True


# ----------------------------------------------------------------------------- measuring
def _as_frames(frames: Any, what: str) -> np.ndarray:
    a = np.asarray(frames, dtype=float)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{what}: expected frames (n, ny, nx), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: frames contain NaN or infinity")
    return a


def measure_defects(dark: np.ndarray, flat: np.ndarray | None = None, k: float = 8.0,
                    stuck_variance_fraction: float = 0.05, dead_response_fraction: float = 0.5,
                    saturation_adu: float | None = None, origin: tuple[int, int] = (0, 0),
                    source: str = "") -> DefectMap:
    """The defect map of a sensor from ``dark`` frames (n, ny, nx) ADU, n >= 2 (>= 20
    recommended: the variance of each pixel is measured to ``sqrt(2 / (n - 1))``), and optionally
    ``flat`` frames under uniform light (see the module docstring for the rules). ``saturation_adu``
    (default: the largest value seen if it is a power of two minus one) names full-scale pixels."""
    d = _as_frames(dark, "dark frames")
    n = d.shape[0]
    if n < 2:
        raise ValueError(f"dark frames: {n} frame; need at least 2 (20 or more recommended) for per-pixel variances")
    mean = d.mean(axis=0)
    var = d.var(axis=0, ddof=1)
    med_m, mad_m = _robust(mean)
    med_v, mad_v = _robust(var)
    # floors: ADU rounding of the mean, and the sampling scatter of a variance from n frames
    mad_m = max(mad_m, math.sqrt(1 / 12 / n), 1e-6)
    mad_v = max(mad_v, med_v * math.sqrt(2.0 / (n - 1)) * 0.5, 1e-6)
    flags = np.zeros(mean.shape, np.uint8)
    hot = mean > med_m + k * mad_m
    stuck = var <= max(stuck_variance_fraction * med_v, 1e-9)
    noisy = var > med_v + k * mad_v
    flags[hot] |= HOT
    flags[stuck] |= STUCK
    flags[stuck & ~hot] |= DEAD
    flags[noisy & ~stuck] |= NOISY
    info: dict[str, Any] = {
        "dark_frames": int(n), "k": float(k), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": source,
        "dark_mean_median_adu": med_m, "dark_mean_mad_adu": mad_m, "dark_variance_median_adu2": med_v,
        "dark_variance_mad_adu2": mad_v, "hot_above_adu": med_m + k * mad_m,
        "stuck_variance_below_adu2": max(stuck_variance_fraction * med_v, 1e-9),
        "noisy_variance_above_adu2": med_v + k * mad_v,
    }
    sat = saturation_adu
    if sat is None:
        top = float(d.max())
        sat = top if top >= 255 and math.log2(top + 1).is_integer() else None
    if sat is not None:
        full = stuck & (mean >= float(sat) - 0.5)
        info["saturation_adu"] = float(sat)
        info["full_scale_pixels"] = int(np.count_nonzero(full))
    if flat is not None:
        f = _as_frames(flat, "flat frames")
        if f.shape[1:] != d.shape[1:]:
            raise ValueError(f"flat frames of {f.shape[1:]} pixels for dark frames of {d.shape[1:]}")
        response = f.mean(axis=0) - mean
        med_r, _ = _robust(response)
        if not med_r > 10 * math.sqrt(max(med_v, 1e-12)):
            raise ValueError(f"flat frames: median response {med_r:.1f} ADU above the dark level is within 10 noise "
                             "sigmas; expose the flats to more light")
        dead = (response < dead_response_fraction * med_r) & ~stuck   # a stuck pixel is flagged already
        flags[dead] |= DEAD
        info.update({"flat_frames": int(f.shape[0]), "flat_response_median_adu": med_r,
                     "dead_response_below_adu": dead_response_fraction * med_r})
    info["counts"] = {name: int(np.count_nonzero(flags & bit)) for bit, name in _NAMES.items()}
    if n < 10:
        info["note"] = f"only {n} dark frames: variances are uncertain by {100 * math.sqrt(2 / (n - 1)):.0f} %"
    return DefectMap(flags, origin, info)
