"""From a raw z-stack to a checked :class:`Measurement`, and from a measured bead offset to the
centring it asks for.

* :func:`analyse_stack`: the stack quality checks (the refusal reasons: bad shape, NaN, saturated,
  no bead, too few photons, bead at the edge) and the re-centred ortho-sections in photons.
* :func:`to_photons`: camera ADU to photons (``camera`` settings).
* :func:`plan_centring`: stage move (beyond ``stage.recentre_threshold_um``) or SLM
  tip/tilt/defocus that re-centres a bead; :func:`ttd_from_offset`, :func:`stage_sign`.
* :func:`locate_signal`, :func:`plan_capture`: where the light of a refused stack (bead at the
  edge, or beyond it) lies, and the step-limited stage move toward it (the capture range).

Conventions: arrays z, y, x; sections xy[y, x], xz[z, x], yz[z, y]; offsets in micrometres
(x, y, z) of the bead from the ROI centre; Zernike Noll index from 1, radians.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from autoalign.calibration import centroid as cen
from autoalign.calibration import optics as opt
from autoalign.correction import Correction
from autoalign.estimator import Estimate
from autoalign.hardware.base import Stack
from autoalign.settings import CameraSettings, Settings

#: the modes the bead's centroid owns (tip, tilt, defocus); an estimator's reading of them is
#: replaced by the centring's
TTD_MODES = (2, 3, 4)


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


def to_photons(adu: np.ndarray, camera: CameraSettings) -> np.ndarray:
    """Camera counts (ADU) to detected photons: ``(adu - offset) / (gain * QE)``."""
    return (np.asarray(adu, dtype=float) - camera.offset_adu) / (
        camera.gain_adu_per_electron * camera.quantum_efficiency)


def edge_signal(photons: np.ndarray, bg: float, margin: int) -> float:
    """Brightest signal within ``margin`` pixels of the ROI's lateral edges, over the brightest
    overall (3 x 3 mean per plane so single hot pixels do not count). Axially only the
    centroid's margin is checked: a donut is long in z and legitimately fills the stack."""
    if margin <= 0:
        return 0.0
    sm = ndimage.uniform_filter(photons - bg, size=(1, 3, 3), mode="nearest")
    peak = float(sm.max())
    if peak <= 0:
        return 0.0
    inner = sm[:, margin:-margin, margin:-margin]
    outer = sm.copy()
    outer[:, margin:-margin, margin:-margin] = -np.inf
    return float(max(outer.max(), 0.0) / peak) if inner.size else 1.0


def analyse_stack(stack: Stack, settings: Settings, saturation_adu: float | None = None) -> Measurement:
    """Validate a stack and extract re-centred ortho-sections (photons).

    ``saturation_adu``: the camera's saturation level (default ``2**camera.bit_depth - 1``).
    Refusal reasons (``Measurement.reason``, ``valid`` False): bad stack shape, NaN/inf,
    saturated beyond ``loop.saturation_fraction``, no bead (no centroid, or peak SNR below
    ``loop.min_snr``), too few photons (``loop.min_photons``), bead at the edge
    (``loop.edge_margin_px``, ``loop.max_edge_fraction``)."""
    t0 = time.perf_counter()
    lp = settings.loop
    if saturation_adu is None:
        saturation_adu = float(2 ** settings.camera.bit_depth - 1)
    data = np.asarray(stack.data, dtype=float)
    n = data.shape[-1]

    def invalid(reason: str, **kw: Any) -> Measurement:
        sections = np.zeros((3, n, n))
        if data.ndim == 3 and data.shape[0] == data.shape[1] == data.shape[2]:
            mid = data.shape[0] // 2
            sections = to_photons(cen.centred_sections(data, (mid, mid, mid)), settings.camera)
        return Measurement(stack, sections, kw.pop("centroid", None), False, reason,
                           kw.pop("photons", 0.0), timestamp=time.time(),
                           elapsed_s=time.perf_counter() - t0, **kw)

    if data.ndim != 3 or not data.shape[0] == data.shape[1] == data.shape[2]:
        return invalid(f"bad stack shape {data.shape} (expected a cube)")
    if not np.all(np.isfinite(data)):
        return invalid("stack contains NaN or infinity")
    sat = float(np.mean(data >= saturation_adu))
    if sat > lp.saturation_fraction:
        return invalid(f"saturated ({100 * sat:.2f} % of the pixels)", saturated_fraction=sat)
    photons = to_photons(data, settings.camera)
    bg, sigma = cen.background_and_noise(photons)
    try:
        centre = cen.robust_stack_centroid(photons)
    except ValueError:
        return invalid("no bead", background_photons=bg, saturated_fraction=sat)
    h = n // 2
    centroid = cen.Centroid(centre[2] - h, centre[1] - h, centre[0] - h)
    sections = cen.centred_sections(photons, centre, fill=bg)
    mean3 = ndimage.uniform_filter(sections[0] - bg, 3, mode="nearest")
    peak = float(mean3.max())
    snr = peak / (sigma / 3.0)  # noise of a 3 x 3 mean
    total = float(np.sum(sections[0] - bg))
    offset = (centroid.x_px * stack.pixel_size_um, centroid.y_px * stack.pixel_size_um,
              centroid.z_px * stack.z_step_um)
    common = dict(centroid=centroid, photons=total, peak_photons=peak, background_photons=bg,
                  saturated_fraction=sat, offset_um=offset, centre_zyx=centre)
    if snr < lp.min_snr:
        return invalid(f"no bead (peak signal-to-noise {snr:.1f} < {lp.min_snr:g})", **common)
    if total < lp.min_photons:
        return invalid(f"too few photons ({total:.0f} < loop.min_photons = {lp.min_photons:g})", **common)
    margin = lp.edge_margin_px
    edge_fraction = edge_signal(photons, bg, margin)
    if min(min(c, n - 1 - c) for c in centre) < margin or edge_fraction > lp.max_edge_fraction:
        return invalid(
            f"bead at edge (centre z,y,x = {centre[0]:.1f}, {centre[1]:.1f}, {centre[2]:.1f} px; "
            f"margin {margin} px; {100 * edge_fraction:.0f} % of the peak within it)", **common)
    return Measurement(stack, sections, centroid, True, "", total, peak, bg, sat, offset, centre,
                       timestamp=time.time(), elapsed_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------- centring
def ttd_from_offset(offset_um: tuple[float, float, float], settings: Settings,
                    calibration: Any = None) -> dict[int, float]:
    """Tip/tilt/defocus (rad) that CANCEL a focus displaced by ``offset_um`` (x, y, z): the poke
    calibration's map when given (:class:`autoalign.calibration.poke.PokeCalibration`), else the
    optics formulas."""
    if calibration is not None:
        return calibration.correction_for_shift(offset_um)
    o = settings.optics
    seen = opt.shift_to_zernike(*offset_um, o.numerical_aperture, o.immersion_index, o.wavelength_um)
    return {k: -v for k, v in seen.items()}


def stage_sign(calibration: Any = None) -> tuple[float, float, float]:
    """Sign (per axis) of the stage move that cancels an apparent bead offset: the poke
    calibration's when it measured one, else +1. +1 is the simulated microscope's convention
    (the camera sees ``bead - stage`` and ``bead_z - focus``, so moving the stage/focus by the
    measured offset re-centres) and that of a stage whose axes match the camera's."""
    if calibration is not None and getattr(calibration, "stage_sign", None):
        return tuple(calibration.stage_sign)  # type: ignore[return-value]
    return (1.0, 1.0, 1.0)


def plan_centring(m: Measurement, settings: Settings, calibration: Any = None
                  ) -> tuple[tuple[float, float, float] | None, dict[int, float]]:
    """(stage move in um or None, SLM tip/tilt/defocus delta in rad) that re-centres the bead of
    a valid measurement: the stage when the offset exceeds ``stage.recentre_threshold_um``
    (lateral) or ``stage.recentre_threshold_z_um`` (axial), else tip/tilt/defocus on the SLM
    scaled by ``loop.tip_tilt_defocus_gain``."""
    dx, dy, dz = m.offset_um
    st = settings.stage
    if max(abs(dx), abs(dy)) > st.recentre_threshold_um or abs(dz) > st.recentre_threshold_z_um:
        sx, sy, sz = stage_sign(calibration)
        return (sx * dx, sy * dy, sz * dz), {}
    gain = settings.loop.tip_tilt_defocus_gain
    return None, {k: gain * v for k, v in ttd_from_offset((dx, dy, dz), settings, calibration).items()}


# ---------------------------------------------------------------------------- capture range
#: refusal reasons after which a stage move toward the light can help
CAPTURABLE = ("bead at edge", "no bead")


def locate_signal(stack: Stack, settings: Settings, min_sigmas: float = 12.0
                  ) -> tuple[tuple[float, float, float], tuple[bool, bool, bool]] | None:
    """Where the light of a stack lies: ``((dx, dy, dz) um of its centroid from the ROI centre,
    (at_x_edge, at_y_edge, at_z_edge))``, or None when no region stands out from the noise.

    The stack (photons) is smoothed over 3 planes x 5 x 5 pixels; no signal when its brightest
    voxel is less than ``min_sigmas`` noise sigmas of the smoothed stack above the background.
    The centroid is that of the smoothed signal above half its maximum (the brightest region,
    robust to a dim halo). ``at_*_edge``: that region touches the ROI's border band of
    ``loop.edge_margin_px`` on that axis (the bead is probably beyond it, further than the centroid
    says)."""
    photons = to_photons(np.asarray(stack.data, dtype=float), settings.camera)
    if photons.ndim != 3 or not np.all(np.isfinite(photons)):
        return None
    bg, sigma = cen.background_and_noise(photons)
    sm = ndimage.uniform_filter(photons - bg, size=(3, 5, 5), mode="nearest")
    peak = float(sm.max())
    if peak < min_sigmas * sigma / math.sqrt(75.0):
        return None
    w = np.clip(sm - 0.5 * peak, 0.0, None)
    idx = np.indices(w.shape).reshape(3, -1).astype(float)
    total = float(w.sum())
    cz, cy, cx = (idx @ w.ravel()) / total
    nz, ny, nx = w.shape
    offset = ((cx - nx // 2) * stack.pixel_size_um, (cy - ny // 2) * stack.pixel_size_um,
              (cz - nz // 2) * stack.z_step_um)
    margin = max(int(settings.loop.edge_margin_px), 1)
    lit = np.argwhere(w > 0)
    centroid_px = {2: cx - nx // 2, 1: cy - ny // 2, 0: cz - nz // 2}
    # the bright region touches the border band AND its centroid is in the outer part of the ROI
    # (a centred donut's ring may touch the band of a small ROI without the bead being beyond it)
    at_edge = tuple(bool((np.any(lit[:, a] < margin) or np.any(lit[:, a] >= size - margin))
                         and abs(centroid_px[a]) > size / 2 - 2 * margin)
                    for a, size in ((2, nx), (1, ny), (0, nz)))
    return offset, at_edge  # type: ignore[return-value]


def plan_capture(m: Measurement, settings: Settings, calibration: Any = None
                 ) -> tuple[tuple[float, float, float] | None, str]:
    """The stage move (um, or None) toward the bead of a measurement refused as ``"bead at
    edge"`` or ``"no bead"``, and a description of what the stack showed.

    The direction is the centroid of the stack's brightest region (:func:`locate_signal`); along
    an axis where that region touches the ROI's border the bead is probably beyond it, so the move
    there is at least ``loop.capture_max_step_um``. Each axis is limited to
    ``loop.capture_max_step_um``; the sign is :func:`stage_sign`'s. None when the stack shows no
    light at all or the move would be negligible (< 1 pixel)."""
    if m.stack is None:
        return None, "no stack to look at"
    found = locate_signal(m.stack, settings)
    if found is None:
        return None, "no light above the noise anywhere in the stack"
    offset, at_edge = found
    limit = float(settings.loop.capture_max_step_um)
    move = []
    for d, edge in zip(offset, at_edge):
        d = math.copysign(max(abs(d), limit), d) if edge and d != 0 else d
        move.append(float(np.clip(d, -limit, limit)))
    signs = stage_sign(calibration)
    move = [s_ * d for s_, d in zip(signs, move)]
    what = (f"brightest region at ({offset[0]:+.2f}, {offset[1]:+.2f}, {offset[2]:+.2f}) um from the ROI centre"
            + ("" if not any(at_edge) else " (touching the ROI border)"))
    if max(abs(move[0]), abs(move[1])) < settings.camera.pixel_size_um and abs(move[2]) < settings.stack.z_step_um:
        return None, what + "; no move needed"
    return (move[0], move[1], move[2]), what


def next_correction(before: Correction, estimate: Estimate, ttd: dict[int, float], gain: float) -> Correction:
    """``before`` plus ``-gain`` times the estimate (Noll >= 2 and its mask offset). When the
    centring asks for a tip/tilt/defocus ``ttd`` (rad) on the SLM, the centroid owns those modes:
    ``ttd`` replaces the estimate's Noll 2-4; after a stage move (``ttd`` empty) the estimate's
    own Noll 2-4 apply."""
    delta = {k: -gain * v for k, v in estimate.coefficients.items() if k >= 2 and k not in ttd}
    if ttd:
        delta = {k: v for k, v in delta.items() if k not in TTD_MODES}
        delta.update(ttd)
    off = estimate.mask_offset
    return before.plus(delta, (-gain * off[0], -gain * off[1]) if off is not None else (0.0, 0.0))


__all__ = ["Measurement", "TTD_MODES", "analyse_stack", "to_photons", "edge_signal", "ttd_from_offset",
           "stage_sign", "plan_centring", "next_correction", "locate_signal", "plan_capture", "CAPTURABLE"]
