"""Anti-aliased resampling of recorded measurements onto a network's grid of ortho-sections.

``sections_from_stack(stack, pixel_um, n_px, z_step_um, centre_zyx_um=None)`` and
``sections_from_scans(scans, pixel_um, n_px, z_step_um, centre_zyx_um=None)`` return the
ortho-sections (3, n, n): xy[y, x], xz[z, x], yz[z, y] through the bead, on the network's grid:
output pixel ``k`` of every axis at ``centre + (k - n // 2) * step`` (``pixel_um`` laterally,
``z_step_um`` along z). :func:`resample_stack` / :func:`resample_scans` return the same with what
was done (:class:`Resampled`: the centre, the background, the fraction of each section outside
the measured data, the counts' scale).

Method: separable resampling matrices, one per axis, with a Lanczos kernel (``lobes`` = 4) scaled
to the coarser of the two grids: ``h(t) = sinc(t / s) sinc(t / (lobes s))``, ``t`` in input pixels,
``s = max(1, output step / input step)``. Downsampling (``s > 1``) is therefore a low-pass at the
output's Nyquist frequency before sampling (amplitude response 1 to about 0.3 cycles per output
pixel, 0.5 at 0.5, below 0.11 beyond 0.6, below 0.02 beyond 0.7): what lies above the new Nyquist
limit does not alias back; upsampling (``s = 1``) is Lanczos interpolation. Each output pixel's
weights are normalised to sum 1 over the input lattice (a flat field stays flat); taps that fall
outside the data take the background.

Photometry: counts scale with the output pixel's area, so the total signal over any region is
preserved (and binned Poisson counts stay Poisson counts). A z-stack is a series of camera frames:
it is resampled as a volume, every plane laterally (counts x the lateral area ratio) and
interpolated / low-passed along z without a z factor (a plane's counts do not depend on the plane
spacing); all three sections take that one scale, so they stay cuts through one volume. Section
scans are independent 2-D scans: each is resampled in its own plane and its counts scaled by its
own area ratio (rows x columns); each is taken as the section through the centre (where its plane
lies across it, its ``centre_um`` on the third axis, is not checked).

Outside the data: output pixels whose centre lies outside the measured grid (beyond half an input
pixel past the first or last pixel centre, on any axis involved, the section's own plane
included) take the data's background, the median of its border (the outer faces of a stack, the
outer rows and columns of a scan), in the output's scale; :attr:`Resampled.outside_fraction`
reports the fraction per section.

Default centre: a robust intensity centroid (:func:`calibration.centroid.robust_stack_centroid` of
a stack; of section scans, :func:`calibration.centroid.image_centroid` of each scan, x from the xy
and xz scans, y from xy and yz, z from xz and yz). Frames: for a :class:`ZStack`, ``z`` in the
stack's focus coordinate (``z_um``) and ``y, x`` from the centre of pixel [0, 0]
(``index * pixel``); for :class:`SectionScans`, the scanner's frame (``SectionScan.axis_um``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from autoalign.calibration.centroid import image_centroid, robust_stack_centroid
from autoalign.recording import SectionScan, SectionScans, ZStack

log = logging.getLogger(__name__)

__all__ = ["Resampled", "resample_stack", "resample_scans", "sections_from_stack", "sections_from_scans",
           "resampling_matrix", "LOBES"]

#: Lanczos lobes of the resampling kernel
LOBES = 4


@dataclass(frozen=True)
class Resampled:
    """Ortho-sections on the network's grid and how they were made.

    sections : (3, n, n) xy[y, x], xz[z, x], yz[z, y], counts in the output pixels' scale
    centre_zyx_um : the centre used (see the module docstring for the frame)
    background : the data's background in the output's scale (per section, xy, xz, yz)
    outside_fraction : fraction of each section's pixels outside the measured data (xy, xz, yz)
    scale : the counts' factor of each section (output / input pixel area)
    """

    sections: np.ndarray
    centre_zyx_um: tuple[float, float, float]
    background: tuple[float, float, float]
    outside_fraction: tuple[float, float, float]
    scale: tuple[float, float, float]

    @property
    def outside(self) -> float:
        """Fraction of all output pixels outside the measured data."""
        return float(np.mean(self.outside_fraction))


def _kernel(t: np.ndarray, s: float, lobes: int) -> np.ndarray:
    h = np.sinc(t / s) * np.sinc(t / (lobes * s))
    return np.where(np.abs(t) < lobes * s, h, 0.0)


def resampling_matrix(n_in: int, positions_px: np.ndarray, ratio: float,
                      lobes: int = LOBES) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``W`` (n_out, n_in) that sample a 1-D signal of ``n_in`` pixels at fractional
    input-pixel positions ``positions_px`` with the kernel scaled by ``s = max(1, ratio)`` (``ratio``
    = output step / input step), rows normalised to 1 over the whole input lattice (taps outside
    ``0..n_in-1`` keep their weight out of ``W``: ``1 - W.sum(1)`` is the background's share); and
    ``inside`` (n_out,) bool, the output pixel's centre lies on the data (-0.5 .. n_in - 0.5)."""
    pos = np.asarray(positions_px, dtype=float).ravel()
    s = max(1.0, float(ratio))
    reach = int(np.ceil(lobes * s)) + 1
    lo = np.floor(pos).astype(int) - reach
    # taps near each output position only (the kernel's support), then scattered into the lattice
    offsets = np.arange(2 * reach + 2)
    idx = lo[:, None] + offsets[None, :]
    h = _kernel(idx - pos[:, None], s, lobes)
    total = h.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    h = h / total
    valid = (idx >= 0) & (idx < n_in)
    w = np.zeros((len(pos), n_in))
    rows = np.broadcast_to(np.arange(len(pos))[:, None], idx.shape)
    np.add.at(w, (rows[valid], idx[valid]), h[valid])
    inside = (pos >= -0.5) & (pos <= n_in - 0.5)
    return w, inside


def _grid(n: int, step: float) -> np.ndarray:
    return (np.arange(int(n)) - int(n) // 2) * float(step)


def _check_grid(pixel_um: float, n_px: int, z_step_um: float) -> None:
    if not (pixel_um > 0 and np.isfinite(pixel_um)):
        raise ValueError(f"pixel_um = {pixel_um!r}: expected a finite size > 0 µm")
    if not (z_step_um > 0 and np.isfinite(z_step_um)):
        raise ValueError(f"z_step_um = {z_step_um!r}: expected a finite step > 0 µm")
    if int(n_px) != n_px or n_px < 1:
        raise ValueError(f"n_px = {n_px!r}: expected an integer >= 1")


def _border_median_3d(data: np.ndarray) -> float:
    faces = [data[0], data[-1], data[:, 0, :], data[:, -1, :], data[:, :, 0], data[:, :, -1]]
    return float(np.median(np.concatenate([f.ravel() for f in faces])))


def _border_median_2d(image: np.ndarray) -> float:
    return float(np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])))


def _apply(rows: np.ndarray, plane: np.ndarray, cols: np.ndarray, bg: float) -> np.ndarray:
    """``rows @ plane @ cols.T`` with the taps outside the data filled by ``bg``."""
    inner = rows @ plane @ cols.T
    share = np.outer(rows.sum(axis=1), cols.sum(axis=1))
    return inner + bg * (1.0 - share)


# ----------------------------------------------------------------------------- z-stacks
def resample_stack(stack: ZStack, pixel_um: float, n_px: int, z_step_um: float,
                   centre_zyx_um: tuple[float, float, float] | None = None, lobes: int = LOBES) -> Resampled:
    """Ortho-sections of a z-stack on the network's grid (see the module docstring)."""
    _check_grid(pixel_um, n_px, z_step_um)
    data = np.asarray(stack.data, dtype=float)
    nz, ny, nx = data.shape
    z_in = np.asarray(stack.z_um, dtype=float)
    dz_in = stack.z_step_um if nz > 1 else float(z_step_um)
    if centre_zyx_um is None:
        cz, cy, cx = robust_stack_centroid(data)
        centre_zyx_um = (float(np.interp(cz, np.arange(nz), z_in)) if nz > 1 else float(z_in[0]),
                         cy * stack.pixel_y_um, cx * stack.pixel_x_um)
    zc, yc, xc = (float(v) for v in centre_zyx_um)
    # output coordinates -> fractional input indices
    x_idx = (xc + _grid(n_px, pixel_um)) / stack.pixel_x_um
    y_idx = (yc + _grid(n_px, pixel_um)) / stack.pixel_y_um
    z_out = zc + _grid(n_px, z_step_um)
    z_idx = _z_index(z_out, z_in, dz_in)
    zc_idx = _z_index(np.array([zc]), z_in, dz_in)
    yc_idx = np.array([yc / stack.pixel_y_um])
    xc_idx = np.array([xc / stack.pixel_x_um])
    wx, in_x = resampling_matrix(nx, x_idx, pixel_um / stack.pixel_x_um, lobes)
    wy, in_y = resampling_matrix(ny, y_idx, pixel_um / stack.pixel_y_um, lobes)
    wz, in_z = resampling_matrix(nz, z_idx, z_step_um / dz_in, lobes)
    wz0, in_z0 = resampling_matrix(nz, zc_idx, z_step_um / dz_in, lobes)
    wy0, in_y0 = resampling_matrix(ny, yc_idx, pixel_um / stack.pixel_y_um, lobes)
    wx0, in_x0 = resampling_matrix(nx, xc_idx, pixel_um / stack.pixel_x_um, lobes)
    bg_in = _border_median_3d(data)
    # collapse the section's own axis first (one weighted plane), then the two in-plane axes
    plane_xy = np.tensordot(wz0[0], data, axes=(0, 0))           # (ny, nx)
    plane_xz = np.tensordot(wy0[0], data, axes=(0, 1))           # (nz, nx)
    plane_yz = np.tensordot(wx0[0], data, axes=(0, 2))           # (nz, ny)
    # taps of the collapsed axis outside the data are background too
    plane_xy = plane_xy + bg_in * (1.0 - wz0[0].sum())
    plane_xz = plane_xz + bg_in * (1.0 - wy0[0].sum())
    plane_yz = plane_yz + bg_in * (1.0 - wx0[0].sum())
    xy = _apply(wy, plane_xy, wx, bg_in)
    xz = _apply(wz, plane_xz, wx, bg_in)
    yz = _apply(wz, plane_yz, wy, bg_in)
    scale = (pixel_um / stack.pixel_x_um) * (pixel_um / stack.pixel_y_um)
    masks = (np.outer(in_y, in_x) & bool(in_z0[0]), np.outer(in_z, in_x) & bool(in_y0[0]),
             np.outer(in_z, in_y) & bool(in_x0[0]))
    out = []
    for sec, inside in zip((xy, xz, yz), masks):
        out.append(np.where(inside, sec, bg_in) * scale)
    fractions = (float(1.0 - masks[0].mean()), float(1.0 - masks[1].mean()), float(1.0 - masks[2].mean()))
    bg = bg_in * scale
    return _result(np.stack(out), (zc, yc, xc), (bg, bg, bg), fractions, (scale, scale, scale), stack.name)


def _z_index(z: np.ndarray, z_in: np.ndarray, dz: float) -> np.ndarray:
    """Fractional plane index of focus positions ``z`` (linear in the planes' positions, extended
    beyond the first and last plane with the median step)."""
    if len(z_in) == 1:
        return (z - z_in[0]) / dz
    idx = np.interp(z, z_in, np.arange(len(z_in), dtype=float))
    below, above = z < z_in[0], z > z_in[-1]
    idx[below] = (z[below] - z_in[0]) / dz
    idx[above] = len(z_in) - 1 + (z[above] - z_in[-1]) / dz
    return idx


# ----------------------------------------------------------------------------- section scans
def _scan_centroid(scan: SectionScan) -> tuple[float, float]:
    """Robust centroid of a scan in its own (rows, columns) coordinates, µm."""
    r, c = image_centroid(scan.image, roi_radius_px=0.35 * min(scan.image.shape))
    rows, cols = scan.axis_um(0), scan.axis_um(1)
    return (float(np.interp(r, np.arange(len(rows)), rows)), float(np.interp(c, np.arange(len(cols)), cols)))


def _scans_centre(scans: SectionScans) -> tuple[float, float, float]:
    xs: list[float] = []
    ys: list[float] = []
    zs: list[float] = []
    if scans.xy is not None:
        y, x = _scan_centroid(scans.xy)
        ys.append(y)
        xs.append(x)
    if scans.xz is not None:
        z, x = _scan_centroid(scans.xz)
        zs.append(z)
        xs.append(x)
    if scans.yz is not None:
        z, y = _scan_centroid(scans.yz)
        zs.append(z)
        ys.append(y)
    present = [s for s in scans.sections()]
    fallback = present[0].centre_um
    return (float(np.mean(zs)) if zs else fallback[2], float(np.mean(ys)) if ys else fallback[1],
            float(np.mean(xs)) if xs else fallback[0])


def _resample_scan(scan: SectionScan, out_rows_um: np.ndarray, out_cols_um: np.ndarray, step_rows: float,
                   step_cols: float, lobes: int) -> tuple[np.ndarray, float, float, float]:
    """(section, background, outside fraction, scale) of one scan on the output coordinates."""
    image = np.asarray(scan.image, dtype=float)
    rows_in, cols_in = scan.axis_um(0), scan.axis_um(1)
    pr, pc = float(scan.pixel_um[0]), float(scan.pixel_um[1])
    r_idx = (out_rows_um - rows_in[0]) / pr
    c_idx = (out_cols_um - cols_in[0]) / pc
    wr, in_r = resampling_matrix(image.shape[0], r_idx, step_rows / pr, lobes)
    wc, in_c = resampling_matrix(image.shape[1], c_idx, step_cols / pc, lobes)
    bg_in = _border_median_2d(image)
    scale = (step_rows / pr) * (step_cols / pc)
    sec = _apply(wr, image, wc, bg_in)
    inside = np.outer(in_r, in_c)
    return np.where(inside, sec, bg_in) * scale, bg_in * scale, float(1.0 - inside.mean()), scale


def resample_scans(scans: SectionScans, pixel_um: float, n_px: int, z_step_um: float,
                   centre_zyx_um: tuple[float, float, float] | None = None, lobes: int = LOBES) -> Resampled:
    """Ortho-sections of section scans on the network's grid (see the module docstring). A
    missing scan gives a section of background (the mean of the present scans'), outside
    fraction 1."""
    _check_grid(pixel_um, n_px, z_step_um)
    present = scans.sections()
    if not present:
        raise ValueError(f"SectionScans {scans.name!r}: no scans to resample")
    if centre_zyx_um is None:
        centre_zyx_um = _scans_centre(scans)
    zc, yc, xc = (float(v) for v in centre_zyx_um)
    gx, gy, gz = xc + _grid(n_px, pixel_um), yc + _grid(n_px, pixel_um), zc + _grid(n_px, z_step_um)
    plan = {"xy": (gy, gx, pixel_um, pixel_um), "xz": (gz, gx, z_step_um, pixel_um), "yz": (gz, gy, z_step_um, pixel_um)}
    results: dict[str, tuple[np.ndarray, float, float, float]] = {}
    for plane in ("xy", "xz", "yz"):
        scan = getattr(scans, plane)
        if scan is not None:
            results[plane] = _resample_scan(scan, *plan[plane], lobes=lobes)
    fill = float(np.mean([r[1] for r in results.values()]))
    parts = [results.get(plane, (np.full((n_px, n_px), fill), fill, 1.0, float("nan"))) for plane in ("xy", "xz", "yz")]
    bgs = (parts[0][1], parts[1][1], parts[2][1])
    fractions = (parts[0][2], parts[1][2], parts[2][2])
    scales = (parts[0][3], parts[1][3], parts[2][3])
    return _result(np.stack([p[0] for p in parts]), (zc, yc, xc), bgs, fractions, scales, scans.name or scans.channel)


def _result(sections: np.ndarray, centre: tuple[float, float, float], bg: tuple[float, float, float],
            fractions: tuple[float, float, float], scale: tuple[float, float, float], name: str) -> Resampled:
    if max(fractions) > 0:
        log.info("%s: %s of the sections (xy, xz, yz) lie outside the measured data; filled with the background",
                 name or "measurement", ", ".join(f"{f:.0%}" for f in fractions))
    return Resampled(sections=sections, centre_zyx_um=centre, background=bg, outside_fraction=fractions, scale=scale)


def sections_from_stack(stack: ZStack, pixel_um: float, n_px: int, z_step_um: float,
                        centre_zyx_um: tuple[float, float, float] | None = None) -> np.ndarray:
    """Ortho-sections (3, n_px, n_px) of a z-stack on the network's grid: :func:`resample_stack`'s
    sections."""
    return resample_stack(stack, pixel_um, n_px, z_step_um, centre_zyx_um).sections


def sections_from_scans(scans: SectionScans, pixel_um: float, n_px: int, z_step_um: float,
                        centre_zyx_um: tuple[float, float, float] | None = None) -> np.ndarray:
    """Ortho-sections (3, n_px, n_px) of section scans on the network's grid: :func:`resample_scans`'s
    sections."""
    return resample_scans(scans, pixel_um, n_px, z_step_um, centre_zyx_um).sections
