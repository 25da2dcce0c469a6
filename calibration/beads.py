"""Beads in an overview image: detection, sub-pixel centroids, accepted or rejected with the
reason, and the best-isolated bead to align on.

:func:`detect_beads` (an image in ADU, its pixel size) -> :class:`OverviewResult`:

1. A defect map's pixels (when given) and the image's own one-pixel spikes
   (:func:`~autoalign.calibration.camera_defects.find_spikes`: a hot pixel stands far out of its
   3 x 3 median) are replaced by the median of their neighbours; each spike is kept as a
   candidate of kind ``hot pixel`` (rejected, never a bead, never chosen).
2. A smooth background (block medians) is subtracted, the image median-filtered (3 x 3) and
   scaled to the background's noise; ``skimage.feature.blob_log`` finds blobs at the PSF's scale
   (sigma ``0.5 .. 1.0 lambda / NA``, no pruning of overlapping blobs: a donut, or the lobes of
   an aberrated PSF, give blobs of the one bead; two beads never hide under one larger blob).
3. From each blob a centre of mass in a disc of ``window_radius_um`` (default ``1.1 lambda /
   NA``) on the repaired, background-subtracted image, iterated until the disc follows the
   centroid: lobes of one PSF converge to the same centroid and are merged (within
   ``merge_um``); the centroid is sub-pixel (no model of the PSF's shape: donut or spot alike).
   A centroid that would walk more than 0.8 disc radii from its blob is pulled by a neighbour or
   cut by the border: that blob is an object of its own, centred in a disc of 0.4 radii.
4. Each object is measured (peak SNR, signal in the disc, distance to the border and to the
   nearest other object). An object whose light is mostly (``lobe_explained``) what the other
   beads' PSF puts there, and at most half as bright as the bead it belongs to, is a ``lobe`` of
   that bead's PSF (the side lobe of an aberrated PSF), neither a bead nor anyone's neighbour;
   the PSF is measured, not modelled: the median of the well-measured beads' registered patches,
   each over its own signal (a neighbour adds light to a few patches, the PSF is in all). Each
   bead is then judged. Rejected, with every reason that applies, in words:
   ``at the edge`` (closer than ``edge_margin_um`` to the border: its disc or its neighbours are
   cut off), ``saturated`` (pixels at full scale that are not hot pixels), ``too dim`` (peak SNR
   below ``min_snr``, or a signal below ``min_relative_signal`` of the median bead),
   ``cluster`` (a signal above ``cluster_signal_factor`` times the median bead: beads closer than
   the resolution), ``neighbour`` (another bead closer than ``min_distance_um``; two or more:
   ``cluster of N beads``). The relative tests need at least three beads to form a median.
5. The chosen bead: among the accepted, the most isolated (nearest neighbour distance, capped at
   twice ``min_distance_um``), then the most typical signal (closest to the median bead), then
   the nearest to the image centre (the shortest stage move).

Positions are micrometres in the overview's frame: the centre pixel ``[ny // 2, nx // 2]`` is
at ``centre_um`` (the stage position when the overview was taken), ``x = cx + (col - nx // 2)
pixel``, ``y = cy + (row - ny // 2) pixel``. :meth:`OverviewResult.to_dict` is the JSON;
:func:`plot_overview` the PNG (accepted green, rejected red with the reason, chosen yellow,
lobes dashed grey, hot pixels as small crosses).

Limits: the spike test needs a sampled PSF (FWHM >= ~3 pixels); for coarser overviews use a
defect map. Beads at different heights are found as long as their PSF keeps its scale.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from autoalign.calibration.camera_defects import (
    background_level,
    centre_of_mass,
    find_spikes,
    noise_sigma,
    replace_pixels,
)

__all__ = ["OverviewOptions", "BeadCandidate", "OverviewResult", "detect_beads", "plot_overview",
           "OVERVIEW_FORMAT"]

OVERVIEW_FORMAT = "autoalign-overview"


@dataclass(frozen=True)
class OverviewOptions:
    """What counts as a good bead. Lengths in µm; ``None``: derived from the optics
    (``wavelength_um / numerical_aperture``)."""

    wavelength_um: float = 0.775
    numerical_aperture: float = 1.4
    min_distance_um: float = 1.5          # a neighbour closer than this rejects both beads
    edge_margin_um: float | None = None   # default: window_radius_um
    window_radius_um: float | None = None  # centroid disc; default 1.1 lambda / NA
    merge_um: float | None = None         # centroids closer than this are one object; default 0.25 lambda / NA
    min_snr: float = 8.0                  # peak above background in noise sigmas (as loop.min_snr)
    detect_snr: float = 4.0               # below this a blob is noise, not a candidate
    min_relative_signal: float = 0.25     # too dim: signal below this x the median bead
    cluster_signal_factor: float = 1.7    # cluster: signal above this x the median bead
    lobe_explained: float = 0.5           # a lobe: at least this of its light is the other beads' PSF there,
    lobe_max_fraction: float = 0.5        # ... at most this x the signal of the bead it belongs to,
    lobe_range_psf: float = 4.0           # ... from beads within this many lambda/NA
    spike_k: float = 6.0                  # hot pixels: noise sigmas above the 3 x 3 median
    gain_adu_per_electron: float = 1.0    # for the shot noise of the spike test
    saturation_adu: float | None = 65535.0  # full scale (None: not tested)

    @classmethod
    def from_settings(cls, settings: Any, **overrides: Any) -> "OverviewOptions":
        """Options for the settings' optics and camera; ``min_distance_um`` defaults to half the
        camera ROI plus ``lambda / NA``, so a neighbour's PSF stays out of the loop's ROI when the
        chosen bead is centred in it."""
        o, c = settings.optics, settings.camera
        kw: dict[str, Any] = {
            "wavelength_um": float(o.wavelength_um), "numerical_aperture": float(o.numerical_aperture),
            "min_distance_um": round(0.5 * c.roi_px * c.pixel_size_um + o.wavelength_um / o.numerical_aperture, 2),
            "min_snr": float(settings.loop.min_snr), "gain_adu_per_electron": float(c.gain_adu_per_electron),
            "saturation_adu": float(2 ** int(c.bit_depth) - 1),
        }
        kw.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**kw)

    @property
    def psf_um(self) -> float:
        return self.wavelength_um / self.numerical_aperture

    @property
    def window_um(self) -> float:
        return 1.1 * self.psf_um if self.window_radius_um is None else float(self.window_radius_um)

    @property
    def edge_um(self) -> float:
        return self.window_um if self.edge_margin_um is None else float(self.edge_margin_um)

    @property
    def merge_radius_um(self) -> float:
        return 0.25 * self.psf_um if self.merge_um is None else float(self.merge_um)


@dataclass
class BeadCandidate:
    """One object found in the overview. ``kind``: ``bead``, ``lobe`` (a feature of a brighter
    bead's PSF, ``parent``) or ``hot pixel``; ``reasons``: why it was rejected, in words (empty
    when accepted)."""

    index: int
    kind: str
    x_um: float
    y_um: float
    row: float
    col: float
    accepted: bool = False
    chosen: bool = False
    reasons: list[str] = field(default_factory=list)
    snr: float = math.nan
    peak_adu: float = math.nan        # above the background (smoothed by one pixel)
    signal_adu: float = math.nan      # summed above the background in the centroid disc
    relative_signal: float = math.nan  # signal / the median bead's
    nearest_um: float = math.inf      # to the nearest other bead candidate
    edge_um: float = math.nan         # to the image border
    blobs: int = 1                    # blobs merged into it (lobes of one PSF, or unresolved beads)
    hot_pixels_in_window: int = 0
    parent: "BeadCandidate | None" = field(default=None, repr=False, compare=False)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else ("chosen" if self.chosen else "accepted")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "parent"}
        d["reasons"] = list(self.reasons)
        d["reason"] = self.reason
        d["parent"] = None if self.parent is None else self.parent.index
        return d


@dataclass
class OverviewResult:
    """The beads of one overview (see the module docstring)."""

    candidates: list[BeadCandidate]
    pixel_size_um: float
    centre_um: tuple[float, float]
    shape: tuple[int, int]
    background_adu: float
    noise_adu: float
    options: OverviewOptions
    median_signal_adu: float = math.nan
    notes: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def beads(self) -> list[BeadCandidate]:
        return [c for c in self.candidates if c.kind == "bead"]

    @property
    def accepted(self) -> list[BeadCandidate]:
        return [c for c in self.candidates if c.accepted]

    @property
    def rejected(self) -> list[BeadCandidate]:
        return [c for c in self.candidates if c.kind == "bead" and not c.accepted]

    @property
    def lobes(self) -> list[BeadCandidate]:
        return [c for c in self.candidates if c.kind == "lobe"]

    @property
    def hot_pixels(self) -> list[BeadCandidate]:
        return [c for c in self.candidates if c.kind == "hot pixel"]

    @property
    def chosen(self) -> BeadCandidate | None:
        return next((c for c in self.candidates if c.chosen), None)

    def ranked(self, exclude: tuple[int, ...] = ()) -> list[BeadCandidate]:
        """The accepted beads, best first (the first is the chosen one): the most isolated
        (nearest neighbour, capped at twice ``min_distance_um``), then the most typical signal,
        then the nearest to the overview's centre. ``exclude``: indices already used (the bead
        walk's next bead is ``ranked(exclude=used)[0]``)."""
        cap = 2.0 * self.options.min_distance_um
        cy, cx = self.shape[0] // 2, self.shape[1] // 2

        def score(b: BeadCandidate) -> tuple[float, float, float]:
            rel = b.relative_signal
            typical_dev = abs(math.log(rel)) if math.isfinite(rel) and rel > 0 else 0.0
            return (-min(b.nearest_um, cap), round(typical_dev, 2), math.hypot(b.row - cy, b.col - cx))

        return sorted((b for b in self.accepted if b.index not in exclude), key=score)

    def summary(self) -> str:
        ch = self.chosen
        where = (f"; chosen: bead {ch.index} at ({ch.x_um:+.3f}, {ch.y_um:+.3f}) µm, nearest neighbour "
                 + (f"{ch.nearest_um:.2f} µm" if math.isfinite(ch.nearest_um) else "none") + f", SNR {ch.snr:.0f}"
                 if ch else "; no bead to align on")
        return (f"{len(self.beads)} bead(s) found: {len(self.accepted)} accepted, {len(self.rejected)} rejected; "
                + (f"{len(self.lobes)} PSF lobe(s), " if self.lobes else "")
                + f"{len(self.hot_pixels)} hot pixel(s) ignored" + where)

    def table(self, hot_pixels: bool = False) -> list[str]:
        """The beads as text lines (hot pixels too with ``hot_pixels``)."""
        lines = [f"{'#':>3} {'x um':>8} {'y um':>8} {'SNR':>7} {'signal':>7} {'nearest':>8}  verdict"]
        for c in self.candidates:
            if c.kind == "hot pixel" and not hot_pixels:
                continue
            near = f"{c.nearest_um:.2f}" if math.isfinite(c.nearest_um) else "-"
            rel = f"{c.relative_signal:.2f}x" if math.isfinite(c.relative_signal) else "-"
            verdict = ("CHOSEN" if c.chosen else "ok") if c.accepted else "rejected: " + c.reason
            if c.kind != "bead":
                verdict = f"{c.kind}: " + c.reason
            lines.append(f"{c.index:>3} {c.x_um:>+8.3f} {c.y_um:>+8.3f} {c.snr:>7.1f} {rel:>7} {near:>8}  {verdict}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        def finite(v: Any) -> Any:
            if isinstance(v, float):
                return v if math.isfinite(v) else None
            if isinstance(v, dict):
                return {k: finite(x) for k, x in v.items()}
            if isinstance(v, (list, tuple)):
                return [finite(x) for x in v]
            return v

        ch = self.chosen
        return finite({
            "format": OVERVIEW_FORMAT, "format_version": 1, "source": self.source,
            "pixel_size_um": self.pixel_size_um, "centre_um": list(self.centre_um), "shape": list(self.shape),
            "background_adu": self.background_adu, "noise_adu": self.noise_adu,
            "median_signal_adu": self.median_signal_adu, "options": asdict(self.options),
            "counts": {"beads": len(self.beads), "accepted": len(self.accepted), "rejected": len(self.rejected),
                       "lobes": len(self.lobes), "hot_pixels": len(self.hot_pixels)},
            "chosen": None if ch is None else ch.to_dict(), "summary": self.summary(), "notes": list(self.notes),
            "beads": [c.to_dict() for c in self.beads],
            "lobes": [c.to_dict() for c in self.lobes],
            "hot_pixels": [[c.row, c.col] for c in self.hot_pixels],
        })

    def save_json(self, path: str | Path) -> Path:
        from autoalign.files import atomic_write_text

        p = Path(path)
        atomic_write_text(p, json.dumps(self.to_dict(), indent=1))
        return p


# ----------------------------------------------------------------------------- detection
def _blobs(det: np.ndarray, sigma_lo: float, sigma_hi: float, threshold: float) -> np.ndarray:
    from skimage.feature import blob_log  # scikit-image: a declared dependency

    b = blob_log(det, min_sigma=sigma_lo, max_sigma=sigma_hi, num_sigma=6, threshold=threshold, overlap=1.0,
                 exclude_border=False)
    return np.asarray(b, dtype=float).reshape(-1, 3)


def _walk(signal: np.ndarray, start: tuple[float, float], radius_px: float,
          max_walk_px: float) -> tuple[tuple[float, float] | None, bool]:
    """The disc centroid iterated from ``start``; ``pulled`` when it would walk further than
    ``max_walk_px`` (then the last position within reach is returned)."""
    pos = start
    for _ in range(30):
        try:
            new = centre_of_mass(signal, pos, radius_px, 0.0, iterations=1)
        except ValueError:
            return None, False
        if math.hypot(new[0] - start[0], new[1] - start[1]) > max_walk_px:
            return pos, True
        moved = math.hypot(new[0] - pos[0], new[1] - pos[1])
        pos = new
        if moved < 0.002:
            break
    return pos, False


def _find_lobes(beads: list[BeadCandidate], signal: np.ndarray, window_px: float, range_px: int,
                min_snr: float, explained: float, max_fraction: float) -> dict[int, tuple[BeadCandidate, float]]:
    """{index of a candidate: (the bead whose PSF puts most light there, the fraction of the
    candidate's signal the other beads' PSFs explain)} for the candidates whose light is at least
    ``explained`` of what the beads' PSF (the median of the registered patches of the
    well-measured beads, each over its own signal) puts into their disc from the other beads
    within ``range_px``, and at most ``max_fraction`` of that bead's signal. Needs three
    well-measured beads (else {})."""
    good = [b for b in beads if b.snr >= min_snr and b.signal_adu > 0]
    if len(good) < 3:
        return {}
    bright = float(np.percentile([b.signal_adu for b in good], 90))
    good = [b for b in good if b.signal_adu >= 0.3 * bright]   # not the faint ones: lobes among them
    if len(good) < 3:
        return {}
    h = int(range_px) + int(math.ceil(window_px)) + 1
    padded = np.pad(signal, h, mode="constant", constant_values=np.nan)
    patches = []
    for b in good:  # registered to the sub-pixel centroid (bilinear), over the bead's own signal
        r, c = int(round(b.row)), int(round(b.col))
        patch = padded[r:r + 2 * h + 1, c:c + 2 * h + 1] / b.signal_adu
        patches.append(ndimage.shift(patch, (r - b.row, c - b.col), order=1, mode="constant", cval=np.nan))
    # the median over the patches (a neighbour adds light to a few of them, the PSF is in every
    # one), where at least half of them (and three) see the pixel; NaN (outside the image) sorts last
    ordered = np.sort(np.stack(patches), axis=0)
    seen = np.count_nonzero(np.isfinite(ordered), axis=0)
    lo = np.clip((seen - 1) // 2, 0, None)[None]
    hi = np.clip(seen // 2, 0, None)[None]
    psf = 0.5 * (np.take_along_axis(ordered, lo, 0)[0] + np.take_along_axis(ordered, hi, 0)[0])
    psf = np.nan_to_num(np.where(seen >= max(3, len(good) // 2), psf, 0.0), nan=0.0)
    rr, cc = np.mgrid[-int(math.ceil(window_px)):int(math.ceil(window_px)) + 1,
                      -int(math.ceil(window_px)):int(math.ceil(window_px)) + 1]
    disc = (rr**2 + cc**2 <= window_px**2).astype(float)
    in_disc = ndimage.convolve(psf, disc, mode="constant", cval=0.0)   # light of a bead in a disc at an offset
    out: dict[int, tuple[BeadCandidate, float]] = {}
    for i, f in enumerate(beads):
        total, best, parent = 0.0, 0.0, None
        for b in beads:
            if b is f:
                continue
            dr, dc = f.row - b.row, f.col - b.col
            if max(abs(dr), abs(dc)) > range_px or math.hypot(dr, dc) <= window_px:
                continue
            e = b.signal_adu * float(ndimage.map_coordinates(in_disc, [[h + dr], [h + dc]], order=1)[0])
            total += e
            if e > best:
                best, parent = e, b
        if (parent is not None and 0 < f.signal_adu <= max_fraction * parent.signal_adu
                and total >= explained * f.signal_adu):
            out[i] = (parent, total / f.signal_adu)
    return out


def detect_beads(image: np.ndarray, pixel_size_um: float, options: OverviewOptions | None = None,
                 centre_um: tuple[float, float] = (0.0, 0.0), defects: np.ndarray | None = None,
                 source: str = "") -> OverviewResult:
    """Beads in a 2-D overview ``image`` (ADU or counts) of square pixels ``pixel_size_um``
    (see the module docstring). ``defects``: a boolean mask of known defect pixels (a
    :class:`~autoalign.calibration.camera_defects.DefectMap` window), repaired first."""
    opt = options or OverviewOptions()
    a = np.asarray(image, dtype=float)
    if a.ndim != 2 or min(a.shape) < 8:
        raise ValueError(f"detect_beads: expected a 2-D overview of at least 8 x 8 pixels, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("detect_beads: the overview contains NaN or infinity")
    px = float(pixel_size_um)
    if not (px > 0 and math.isfinite(px)):
        raise ValueError(f"detect_beads: pixel_size_um = {pixel_size_um!r}, expected a size > 0 µm")
    notes: list[str] = []
    ny, nx = a.shape
    window_px = opt.window_um / px
    if opt.psf_um / px < 3.0:
        notes.append(f"the PSF spans only {opt.psf_um / px:.1f} pixels (lambda/NA): hot pixels cannot be told from "
                     "beads by their shape; use a defect map (autoalign calibrate camera)")
    known = np.zeros(a.shape, bool) if defects is None else np.asarray(defects, dtype=bool)
    if known.shape != a.shape:
        raise ValueError(f"detect_beads: a defect mask of {known.shape} for an overview of {a.shape}")
    if known.any():
        a = replace_pixels(a, known)
        notes.append(f"{int(known.sum())} pixel(s) of the defect map repaired")
    bg_map = background_level(a, block_px=max(16, int(round(4 * window_px))))
    sigma0 = noise_sigma(a)
    spikes = find_spikes(a, opt.spike_k, bg_map, sigma0, opt.gain_adu_per_electron)
    clean = replace_pixels(a, spikes)
    signal = clean - bg_map
    det = np.clip(ndimage.median_filter(signal, size=3, mode="nearest") / sigma0, 0.0, None)
    smooth = ndimage.gaussian_filter(signal, 1.0, mode="nearest")
    psf_px = opt.psf_um / px
    # a blob of amplitude A (in noise sigmas) gives a scale-normalised LoG response of about A / 2
    blobs = _blobs(det, 0.5 * psf_px, 1.0 * psf_px, 0.25 * opt.detect_snr)

    # centroids from every blob; lobes of one PSF converge together. A centroid that walks further
    # than 0.8 disc radii from its blob is pulled by a neighbour or cut by the border: that blob
    # is its own object, centred with a disc of 0.4 radii that may not leave it.
    found: list[list[float]] = []   # row, col, blobs, pulled
    for r, c, _s in blobs:
        rc, pulled = _walk(signal, (float(r), float(c)), window_px, 0.8 * window_px)
        if pulled:
            rc, _ = _walk(signal, (float(r), float(c)), 0.4 * window_px, 0.4 * window_px)
        if rc is None or not (0 <= rc[0] <= ny - 1 and 0 <= rc[1] <= nx - 1):
            continue
        for f in found:
            if math.hypot(f[0] - rc[0], f[1] - rc[1]) * px < opt.merge_radius_um:
                f[2] += 1
                f[3] = f[3] or pulled
                break
        else:
            found.append([rc[0], rc[1], 1, pulled])
    rows, cols = np.indices(a.shape)
    sat_level = None if opt.saturation_adu is None else float(opt.saturation_adu) - 0.5
    spike_rc = np.argwhere(spikes)
    beads: list[BeadCandidate] = []
    for r, c, nb, _pulled in found:
        disc = (rows - r) ** 2 + (cols - c) ** 2 <= window_px**2
        peak = float(smooth[disc].max())
        snr = peak / sigma0
        if snr < opt.detect_snr:
            continue
        cand = BeadCandidate(index=0, kind="bead", x_um=centre_um[0] + (c - nx // 2) * px,
                             y_um=centre_um[1] + (r - ny // 2) * px, row=float(r), col=float(c), snr=float(snr),
                             peak_adu=peak, signal_adu=float(signal[disc].sum()), blobs=int(nb),
                             edge_um=float(min(r, c, ny - 1 - r, nx - 1 - c) * px))
        cand.hot_pixels_in_window = int(np.count_nonzero(spikes[disc]))
        if sat_level is not None:
            n_sat = int(np.count_nonzero(clean[disc] >= sat_level))
            if n_sat:
                cand.reasons.append(f"saturated ({n_sat} pixel(s) at full scale)")
        beads.append(cand)
    # lobes: a faint object at the same offset from two or more brighter beads is a feature of the
    # (field-constant) PSF, not a bead: neither a candidate nor anyone's neighbour
    lobes = _find_lobes(beads, signal, window_px, int(round(opt.lobe_range_psf * psf_px)), opt.min_snr,
                        opt.lobe_explained, opt.lobe_max_fraction)
    for i, (parent, frac) in lobes.items():
        b = beads[i]
        b.kind = "lobe"
        b.reasons = [f"a lobe of a bead's PSF: the beads' PSF puts {100 * frac:.0f} % of its light there "
                     f"({math.hypot(b.x_um - parent.x_um, b.y_um - parent.y_um):.2f} µm from that bead)"]
        b.parent = parent
    lobe_list = [b for b in beads if b.kind == "lobe"]
    beads = [b for b in beads if b.kind == "bead"]
    # nearest neighbours between beads
    if len(beads) > 1:
        xy = np.array([[b.x_um, b.y_um] for b in beads])
        dist = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
        np.fill_diagonal(dist, np.inf)
        for i, b in enumerate(beads):
            b.nearest_um = float(dist[i].min())
    else:
        dist = np.full((len(beads), len(beads)), np.inf)
    # the median bead: well measured, single-looking ones
    typical = [b.signal_adu for i, b in enumerate(beads)
               if b.snr >= opt.min_snr and b.edge_um >= opt.edge_um and not b.reasons and b.nearest_um >= opt.min_distance_um]
    if len(typical) < 3:
        typical = [b.signal_adu for b in beads if b.snr >= opt.min_snr and not b.reasons]
    median_signal = float(np.median(typical)) if len(typical) >= 3 else math.nan
    if not math.isfinite(median_signal) and beads:
        notes.append(f"{len(typical)} well-measured bead(s): too few for a median bead, so dim and clustered beads "
                     "are judged by SNR and neighbours only")
    for i, b in enumerate(beads):
        if b.edge_um < opt.edge_um:
            b.reasons.insert(0, f"at the edge ({b.edge_um:.2f} µm from the border < {opt.edge_um:.2f} µm)")
        if b.snr < opt.min_snr:
            b.reasons.append(f"too dim (SNR {b.snr:.1f} < {opt.min_snr:g})")
        if math.isfinite(median_signal) and median_signal > 0:
            b.relative_signal = b.signal_adu / median_signal
            if b.relative_signal < opt.min_relative_signal:
                b.reasons.append(f"too dim ({b.relative_signal:.2f} x the median bead's signal < "
                                 f"{opt.min_relative_signal:g})")
            elif b.relative_signal > opt.cluster_signal_factor:
                b.reasons.append(f"cluster ({b.relative_signal:.1f} x the median bead's signal > "
                                 f"{opt.cluster_signal_factor:g}: beads closer than the resolution)")
        close = np.nonzero(dist[i] < opt.min_distance_um)[0] if len(beads) > 1 else np.zeros(0, int)
        if len(close) == 1:
            b.reasons.append(f"neighbour {b.nearest_um:.2f} µm away (< {opt.min_distance_um:g} µm)")
        elif len(close) > 1:
            b.reasons.append(f"cluster of {len(close) + 1} beads within {opt.min_distance_um:g} µm (nearest "
                             f"{b.nearest_um:.2f} µm)")
        b.accepted = not b.reasons
    # order: by position (rows, then columns) for a stable table
    beads.sort(key=lambda b: (round(b.y_um, 1), b.x_um))
    hot = []
    med3 = ndimage.median_filter(a, size=3, mode="nearest")
    for r, c in spike_rc:
        v = float(a[r, c] - bg_map[r, c])
        hot.append(BeadCandidate(index=0, kind="hot pixel", x_um=centre_um[0] + (c - nx // 2) * px,
                                 y_um=centre_um[1] + (r - ny // 2) * px, row=float(r), col=float(c),
                                 snr=v / sigma0, peak_adu=v,
                                 reasons=[f"one-pixel spike, {v:+.0f} ADU from the background, its 3x3 median "
                                          f"{float(med3[r, c] - bg_map[r, c]):+.0f}"]))
    candidates = beads + lobe_list + hot
    for k, cand in enumerate(candidates):
        cand.index = k
    for cand in lobe_list:
        if cand.parent is not None:
            cand.reasons[0] = cand.reasons[0].replace("a bead's PSF", f"bead {cand.parent.index}'s PSF")
    result = OverviewResult(candidates=candidates, pixel_size_um=px, centre_um=(float(centre_um[0]), float(centre_um[1])),
                            shape=(ny, nx), background_adu=float(np.median(bg_map)), noise_adu=float(sigma0),
                            options=opt, median_signal_adu=median_signal, notes=notes, source=source)
    ranked = result.ranked()
    if ranked:
        ranked[0].chosen = True
    elif beads:
        notes.append("no bead passed every test: none chosen (see the reasons)")
    return result




# ----------------------------------------------------------------------------- figure
def _short(reason: str) -> str:
    for word in ("edge", "saturated", "cluster of", "cluster", "neighbour", "too dim"):
        if reason.startswith(word) or reason.startswith("at the " + word):
            return {"cluster of": "cluster"}.get(word, word)
    return reason.split(" ")[0]


def plot_overview(image: np.ndarray, result: OverviewResult, path: str | Path, title: str = "") -> Path:
    """PNG of the overview with the beads marked: accepted (green), rejected (red, labelled with
    the reason), the chosen one (yellow), hot pixels (small cyan crosses). Written atomically, with
    the ``Software`` chunk ``autoalign overview``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from autoalign.files import atomic_writer

    a = np.asarray(image, dtype=float)
    ny, nx = a.shape
    px = result.pixel_size_um
    cx, cy = result.centre_um
    extent = (cx + (-0.5 - nx // 2) * px, cx + (nx - 0.5 - nx // 2) * px,
              cy + (ny - 0.5 - ny // 2) * px, cy + (-0.5 - ny // 2) * px)
    shown = replace_pixels(a, _spike_mask(result, a.shape)) - result.background_adu
    lo, hi = np.percentile(shown, [1.0, 99.9])
    hi = max(hi, lo + 1e-9)
    disp = np.sqrt(np.clip((shown - lo) / (hi - lo), 0, 1))
    size = 9.0
    fig, ax = plt.subplots(figsize=(size, size * ny / nx + 0.6))
    ax.imshow(disp, cmap="gray", extent=extent, interpolation="nearest")
    r_um = result.options.window_um
    for c in result.hot_pixels:
        ax.plot(c.x_um, c.y_um, "x", color="c", ms=3, mew=0.6, alpha=0.7)
    for c in result.lobes:
        ax.add_patch(plt.Circle((c.x_um, c.y_um), 0.6 * r_um, fill=False, color="0.6", lw=0.8, ls="--"))
        ax.text(c.x_um + 0.65 * r_um, c.y_um, f"{c.index}: lobe of {c.parent.index if c.parent else '?'}",
                color="0.7", fontsize=6, va="center")
    for c in result.beads:
        colour = "yellow" if c.chosen else ("lime" if c.accepted else "red")
        ax.add_patch(plt.Circle((c.x_um, c.y_um), r_um, fill=False, color=colour, lw=1.6 if c.chosen else 1.0))
        label = f"{c.index}" + (" chosen" if c.chosen else "" if c.accepted else ": " + ", ".join(
            dict.fromkeys(_short(r) for r in c.reasons)))
        ax.text(c.x_um + 1.05 * r_um, c.y_um - 0.2 * r_um, label, color=colour, fontsize=7, va="center")
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_title((title + "\n" if title else "") + result.summary(), fontsize=8)
    fig.tight_layout()
    p = Path(path)
    with atomic_writer(p, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110, metadata={"Software": "autoalign overview"})
    plt.close(fig)
    return p


def _spike_mask(result: OverviewResult, shape: tuple[int, int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    for c in result.hot_pixels:
        m[int(c.row), int(c.col)] = True
    return m
