"""Fit the instrument model to one bead's section scans (xy, xz, yz of a scanning microscope).

A scanning STED / confocal microscope records a bead as three section scans, each with its own
pixel sizes, its own position and its own background (:class:`autoalign.recording.SectionScans`).
Sections are binned to at most ``max_px`` pixels a side (counts summed: Poisson is kept) and
fitted on those pixels by Poisson maximum likelihood.

Expected counts of section ``k`` at the scan position ``s`` (lengths in µm, the scanner's frame)::

    mu_k(s) = N_k  sum_{pixel samples, bead} [ I_ill(q) D(q) ]  + b_k,   q = sign (s + r' - r_b)

* ``I_ill``: the point intensity of :class:`simulation.instrument.InstrumentPSF` (``intensity_on``)
  for the beam (``none``: a focus; ``vortex`` / ``tophat`` with the mask offset), the aberration
  and the instrument's pupil, at the scan point relative to the bead ``r_b``; the section's own
  plane (the xy scan's focus position, the xz scan's y, the yz scan's x) is used, so a section
  that does not pass through the bead is modelled as recorded. ``sign`` is the orientation
  (:data:`ORIENTATIONS`): +1 when the pixels show the focus as the simulator draws it, -1 for a
  focus scanned over a fixed bead (the image is the focus point-reflected about the bead);
* ``D``: 1 for direct detection; for confocal detection the detection PSF (the unaberrated
  focus of the same pupil at the same wavelength, no mask, unpolarised) integrated over the
  pinhole, a disc of ``Instrument.pinhole_au`` Airy units (1 AU = 1.22 lambda / NA) in the
  sample's frame, centred on the scan point (a point detector behind a descanned pinhole). The
  disc integral is the exact lateral 2-D integral (area-weighted cells of at most
  ``pinhole_step_um``), also for the axial sections (the detection PSF is evaluated across the
  disc at the section's plane: no chord-length approximation); ``D`` is normalised to 1 at the
  bead, evaluated at every sample point below, and held during the fit as its first-order
  expansion in the bead position (re-expanded as the bead moves, and at the end);
* the sum over a binned pixel's point samples and the bead (a uniform sphere of
  ``Instrument.bead_diameter_um``, modelled as the product of its marginals along x, y and z:
  exact second and pure fourth moments): along each lateral axis a symmetric 3-point rule with
  the variance and fourth moment of (sample position + bead) (exact to the fifth moment); along
  z of the axial sections ``I + v/2 I'' + m4/24 I''''`` by 5-point differences (the intensity is
  smooth along z); across the plane the bead's 3-point rule. No FFT: every sample is computed
  at its own position, so the sections' edges are as exact as their centres;
* ``N_k`` photons and ``b_k`` background per pixel, per section.

Fitted: the aberration (Noll ``modes``), the mask offset (beams with a mask), the bead's 3-D
position, photons and background per section. The vortex's phase singularity is integrated by a
pupil rule split at the fitted mask offset (:class:`SplitPupilPSF`; the plain chord rule needs
five times the nodes for a vortex 0.03 pupil radii off centre), re-split while the offset moves;
the node count starts from the geometry and is raised until a rule with 1.5x the nodes changes
the model by a chi^2 distance below :data:`QUADRATURE_CHI2`. Goodness of fit, uncertainties (the
larger of the inverse Fisher and the 4 x 4 px block sandwich) and the validity verdict
(:data:`calibration.psf_fit.DEVIANCE_MAX`, :data:`calibration.psf_fit.STRUCTURE_P_MIN`) as in
:mod:`calibration.psf_fit`.

Conventions: Noll modes RMS-normalised, radians of the aberration present; the mask offset in
pupil radii; sections xy[y, x], xz[z, x], yz[z, y].
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from autoalign.calibration.psf_fit import (
    _MODE_SCALE, DEVIANCE_MAX, STRUCTURE_P_MIN, block_sums, goodness_of_fit, jacobian, minimise)
from autoalign.calibration.refine import fisher_information, structure_test
from autoalign.simulation.instrument import Instrument, InstrumentPSF

__all__ = ["SectionFit", "fit_sections", "pupil_samples_needed", "pinhole_radius_um", "PINHOLE_STEP_UM",
           "SplitPupilPSF", "split_chord_rule", "QUADRATURE_CHI2", "ORIENTATIONS"]

F64 = torch.float64
PINHOLE_STEP_UM = 0.02
"""Largest cell of the pinhole's disc integral (µm): the detection PSF is sampled at the section's
lateral pixel divided by the smallest integer that makes the cell at most this (measured: 20 nm
cells change the detection by < 0.1 % of its peak against 5 nm cells at NA 1.4, 775 nm)."""
DETECTION_TOLERANCE_UM = 0.002
"""The confocal detection is re-expanded about the bead, and the fit polished, while the bead has
moved more than this (µm) from the expansion's centre."""
SPLIT_TOLERANCE = 0.002
"""The fit re-splits the pupil rule at the fitted vortex centre and polishes while the two differ by
more than this (pupil radii): 3.6e-3 off gives a chi^2 distance of 0.03 at 24 nodes (measured)."""
ORIENTATIONS = ("focus", "mirrored")
"""How a section's pixels map onto the focus: ``focus``: the value at scan position ``s`` is the
focal intensity at ``s - bead`` (the focus as the simulator draws it: a sample scanned through a
fixed focus, and the project's own sections); ``mirrored``: at ``bead - s`` (a focus scanned over
a fixed bead: the image is the focus point-reflected about the bead, which for the same data
negates every Zernike coefficient and flips the vortex's and the polarisation's handedness)."""
MAX_PUPIL_NODES = 64
"""The node count the quadrature check may raise the rule to (or twice the geometric choice): the
split rule needs 24-40 for 2 µm sections of an aberrated donut (measured)."""
QUADRATURE_CHI2 = 0.05
"""The pupil rule is refined until one with 1.5x the nodes changes the model by a chi^2 distance
``sum (mu_a - mu_b)^2 / mu_b`` below this over all sections: a bias of at most ~0.2 sigma in any
parameter (a per-pixel criterion is not enough: 0.1 sigma per pixel, coherent over 7500 pixels,
was measured to bias a mask offset by 6 sigma)."""


@dataclass
class SectionFit:
    """The fit of one bead's section scans (xy, xz, yz of a scanning microscope)."""

    coefficients: dict[int, float]
    sigma: dict[int, float]
    mask_offset: tuple[float, float]              # pupil radii (vortex / top-hat), (0, 0) for no mask
    mask_offset_sigma: tuple[float, float]
    bead_um: tuple[float, float, float]           # x, y, z in the scanner's frame
    bead_sigma_um: tuple[float, float, float]
    photons: dict[str, float]                     # per section: photons at the model's unit intensity
    background: dict[str, float]                  # per section: counts per (binned) pixel
    deviance_per_dof: float
    chi2_per_dof: float
    structure_p: dict[int, float]
    model_error_fraction: float
    valid: bool
    reasons: list[str]
    data: dict[str, np.ndarray]                   # binned counts per section
    model: dict[str, np.ndarray]
    pixel_um: dict[str, tuple[float, float]]      # binned pixel sizes (rows, columns)
    bin_factor: dict[str, int]
    confocal: bool
    elapsed_s: float
    beam: str = "vortex"
    orientation: str = "focus"
    axes_um: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # binned (rows, columns)
    plane_offset_um: dict[str, float] = field(default_factory=dict)  # section plane - bead, across the plane
    detection_effect: dict[str, float] = field(default_factory=dict)
    """per section: the largest difference between the model with and without confocal detection
    (both at the fitted parameters, the other one's photons by least squares), fraction of the
    section's model peak above background"""
    pinhole_au: float = 1.0
    pupil_samples: int = 0
    quadrature_chi2: float = float("nan")         # chi^2 distance to a rule with 1.5x the nodes
    evaluations: int = 0
    sigma_fisher: dict[int, float] = field(default_factory=dict)
    sigma_sandwich: dict[int, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        fit = (f"deviance/dof {self.deviance_per_dof:.3f} (limit {DEVIANCE_MAX}), structure p = "
               f"{self.structure_p.get(4, float('nan')):.1e} at 4x4 px (limit {STRUCTURE_P_MIN}), chi^2/dof "
               f"{self.chi2_per_dof:.3f}, model error {100 * self.model_error_fraction:.1f} % of the local intensity")
        if self.valid:
            return "the model explains the sections: " + fit
        return "the model does NOT explain the sections (" + "; ".join(self.reasons) + "): " + fit


@contextmanager
def _one_thread() -> Iterator[None]:
    """One torch thread: the sections' tensors are small, and two OpenMP threads on a shared
    2-core machine are measured 40x slower (0.8 s instead of 0.02 s per model evaluation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _bin2d(img: np.ndarray, fr: int, fc: int) -> np.ndarray:
    r, c = img.shape[0] // fr, img.shape[1] // fc
    return img[: r * fr, : c * fc].reshape(r, fr, c, fc).sum(axis=(1, 3))


def split_chord_rule(n: int, split: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes ``u`` (n, n), ``v`` (n, n) and weights ``w`` of a chord-adapted Gauss-Legendre rule on
    the unit disc split at the point ``split`` = (u0, v0): the rows (``u = sin alpha``, one value per
    row as :class:`simulation.instrument.InstrumentPSF` needs) split at ``u0``, every chord at
    ``v0``, ``n / 2`` nodes on each side. A vortex mask's phase singularity at ``split`` then sits
    on a corner of four sub-rules instead of inside one: measured for a vortex 0.036 pupil radii
    off centre (NA 1.4, 2 µm sections), 24 nodes of this rule agree with 256 to a chi^2 distance
    of 1e-4 at 300 photons per pixel, where the unsplit rule needs more than 120 nodes for 0.2."""
    half = max(2, n // 2)
    a, wa = np.polynomial.legendre.leggauss(half)
    t, wt = np.polynomial.legendre.leggauss(half)
    t2, wt2 = np.polynomial.legendre.leggauss(2 * half)
    u0, v0 = (float(np.clip(c, -0.95, 0.95)) for c in split)
    a0 = math.asin(u0)
    us, vs, ws = [], [], []
    for lo, hi in ((-0.5 * math.pi, a0), (a0, 0.5 * math.pi)):
        h = 0.5 * (hi - lo)
        alpha = 0.5 * (hi + lo) + h * a
        for al, wal in zip(alpha, wa):
            c = math.cos(al)
            ts = v0 / c if c > abs(v0) + 1e-9 else None
            if ts is None:                      # a chord that does not reach v0: unsplit
                vv, ww = c * t2, wt2
            else:
                vv = c * np.concatenate([0.5 * (ts - 1) + 0.5 * (ts + 1) * t, 0.5 * (ts + 1) + 0.5 * (1 - ts) * t])
                ww = np.concatenate([0.5 * (ts + 1) * wt, 0.5 * (1 - ts) * wt])
            us.append(np.full(2 * half, math.sin(al)))
            vs.append(vv)
            ws.append(h * wal * c * c * ww)     # d alpha x chord length x du / d alpha
    return np.array(us), np.array(vs), np.array(ws)


class SplitPupilPSF(InstrumentPSF):
    """:class:`simulation.instrument.InstrumentPSF` with the pupil rule split at a point
    (:func:`split_chord_rule`): for a vortex whose centre (the mask offset) is off the pupil's
    centre. :meth:`set_split` moves the split (the fit puts it at its current mask offset)."""

    def __init__(self, *args: Any, split: tuple[float, float] = (0.0, 0.0), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.split = (0.0, 0.0)
        self.set_split(split)

    def set_split(self, split: tuple[float, float]) -> None:
        from autoalign.simulation.zernike import zernike_basis

        nu, nv, nw = split_chord_rule(self.pupil_samples, split)
        shape = (self.pupil_samples, self.pupil_samples)   # InstrumentPSF's chord rule (n, n)
        if nu.shape != shape:
            raise ValueError(f"SplitPupilPSF: rule {nu.shape} for {shape} nodes")
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=self.dtype)  # noqa: E731
        rho = np.hypot(nu, nv)
        self.u, self.v, self.w, self.rho = t(nu), t(nv), t(nw), t(rho)
        self.basis = t(zernike_basis(self.n_modes, rho, np.arctan2(nv, nu)))
        self.split = (float(split[0]), float(split[1]))


def pinhole_radius_um(instrument: Instrument) -> float:
    """Radius of the pinhole in the sample's frame, µm (``pinhole_au`` x 1.22 lambda / NA, halved)."""
    return 0.5 * instrument.pinhole_au * 1.22 * instrument.wavelength_um / instrument.numerical_aperture


def _disc_weights(radius: float, step_a: float, step_b: float, sub: int = 8) -> np.ndarray:
    """Area fraction inside a disc of ``radius`` of each cell of a (step_a x step_b) lattice
    centred on the disc, (2 m_a + 1, 2 m_b + 1); ``sub`` x ``sub`` sub-samples per cell."""
    ma, mb = int(math.ceil(radius / step_a + 0.5)), int(math.ceil(radius / step_b + 0.5))
    o = (np.arange(sub) + 0.5) / sub - 0.5
    a = (np.arange(-ma, ma + 1)[:, None] + o[None, :]) * step_a            # (2ma+1, sub)
    b = (np.arange(-mb, mb + 1)[:, None] + o[None, :]) * step_b
    inside = (a[:, None, :, None] ** 2 + b[None, :, None, :] ** 2) <= radius**2
    return inside.mean(axis=(2, 3))


def _bin_moments(pitch: float, f: int) -> tuple[float, float]:
    """Variance and fourth moment of the positions of a binned pixel's ``f`` point samples."""
    return pitch**2 * (f * f - 1) / 12, pitch**4 * (f * f - 1) * (3 * f * f - 7) / 240


def _sphere_moments(radius: float) -> tuple[float, float]:
    """Variance and fourth moment of a uniform sphere's marginal along one axis."""
    return radius**2 / 5, 3 * radius**4 / 35


def _combined(v_bin: float, m4_bin: float, radius: float) -> tuple[float, float]:
    """Moments of the sum of a pixel's sample position and the bead's (independent, symmetric)."""
    v_s, m4_s = _sphere_moments(radius)
    return v_bin + v_s, m4_bin + 6 * v_bin * v_s + m4_s


def _moment_rule(v_bin: float, m4_bin: float, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """The symmetric 3-point rule (0, +-t) with the variance and fourth moment of a binned
    pixel's samples plus the bead's marginal (exact to the fifth moment; a single point when both
    vanish). Two samples of a 2 x 2 bin and no bead: t = half the native pixel, weights 1/2."""
    v, m4 = _combined(v_bin, m4_bin, radius)
    if v <= 0:
        return np.zeros(1), np.ones(1)
    t, w = math.sqrt(m4 / v), v * v / (2 * m4)
    return np.array([0.0, -t, t]), np.array([1 - 2 * w, w, w])


def _lattice(points: np.ndarray, step: float) -> dict[str, Any]:
    """A regular lattice of ``step`` covering ``points`` with two cells to spare, and the cubic
    (4-point Lagrange) interpolation from it onto the points: ``interp`` (len(points), size);
    ``points(m)``: the lattice extended by ``m`` cells on each side (µm)."""
    lo = float(points.min()) - 2 * step
    size = int(math.ceil((float(points.max()) - float(points.min())) / step)) + 5
    u = (points - lo) / step
    i = np.floor(u).astype(int)
    fr = u - i
    w = np.stack([-fr * (fr - 1) * (fr - 2) / 6, (fr + 1) * (fr - 1) * (fr - 2) / 2,
                  -(fr + 1) * fr * (fr - 2) / 2, (fr + 1) * fr * (fr - 1) / 6], axis=1)
    interp = np.zeros((len(points), size))
    for j in range(4):
        np.add.at(interp, (np.arange(len(points)), i - 1 + j), w[:, j])

    def extended(m: int) -> torch.Tensor:
        return torch.as_tensor(lo + step * np.arange(-m, size + m), dtype=F64)

    return {"step": step, "size": size, "interp": torch.as_tensor(interp, dtype=F64), "points": extended}


@dataclass
class _Grid:
    plane: str
    rows: np.ndarray            # binned row coordinates (µm, scanner frame)
    cols: np.ndarray
    pix: tuple[float, float]    # binned pixel (rows, cols)
    native: tuple[float, float]  # native pixel (rows, cols)
    f: int
    across_um: float            # the plane's coordinate across it: xy -> z, xz -> y, yz -> x
    col_points: torch.Tensor = field(default_factory=lambda: torch.zeros(0))    # evaluation points (µm)
    col_weights: np.ndarray = field(default_factory=lambda: np.ones(1))
    row_points: torch.Tensor = field(default_factory=lambda: torch.zeros(0))    # lateral (xy) or axial rows
    row_weights: np.ndarray = field(default_factory=lambda: np.ones(1))         # xy only
    across_nodes: np.ndarray = field(default_factory=lambda: np.zeros(1))
    across_weights: np.ndarray = field(default_factory=lambda: np.ones(1))
    axial_moments: tuple[float, float] = (0.0, 0.0)  # xz / yz rows: variance, fourth moment


def _axial_sum(s: torch.Tensor, g: _Grid) -> torch.Tensor:
    """The rows of an axial section (z) summed over each binned pixel's samples and the bead:
    ``I + v/2 d2I + m4/24 d4I`` by 5-point differences (the intensity along z is band-limited to
    ``(n - sqrt(n^2 - NA^2)) 2 / lambda``, ~2 cycles/µm, so the expansion is exact to ~1e-4 of the
    peak for 80 nm beads and 40 nm bins); the rows are evaluated with two more on each side."""
    v, m4 = g.axial_moments
    if v <= 0:
        return s
    h = g.pix[0]
    a, b, c, d, e = s[:-4], s[1:-3], s[2:-2], s[3:-1], s[4:]
    d2 = (-a + 16 * b - 30 * c + 16 * d - e) / (12 * h * h)
    d4 = (a - 4 * b + 6 * c - 4 * d + e) / h**4
    return c + 0.5 * v * d2 + m4 / 24 * d4


class _SectionProblem:
    """Parameters and expected counts of the three sections of one bead (a point-scanned image)."""

    def __init__(self, scans: Any, instrument: Instrument, beam: str, modes: list[int], confocal: bool,
                 max_px: int = 64, pupil_samples: int | None = None,
                 pinhole_step_um: float = PINHOLE_STEP_UM, orientation: str = "focus") -> None:
        if beam not in ("none", "vortex", "tophat"):
            raise ValueError(f"fit_sections: beam = {beam!r}, expected none, vortex or tophat")
        bad = [m for m in modes if not 1 <= m <= 120]
        if bad:
            raise ValueError(f"fit_sections: Noll indices {bad} outside 1..120")
        self.modes, self.n_modes = modes, max([22] + modes)
        self.instrument, self.beam, self.confocal = instrument, beam, confocal
        if orientation not in ORIENTATIONS:
            raise ValueError(f"fit_sections: orientation = {orientation!r}, expected one of {', '.join(ORIENTATIONS)}")
        self.orientation = orientation
        self.sign = -1.0 if orientation == "mirrored" else 1.0   # the intensity at sign * (scan - bead)
        self.pinhole_step_um = float(pinhole_step_um)
        self.keys: list[str] = []
        self.data: list[torch.Tensor] = []
        self.grids: list[_Grid] = []
        raw: dict[str, np.ndarray] = {}
        self.bead_radius_um = 0.5 * float(instrument.bead_diameter_um)
        radius = self.bead_radius_um
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=float), dtype=F64)  # noqa: E731
        for sec in scans.sections():
            img = np.asarray(sec.image, dtype=float)
            label = sec.name or sec.plane
            if not np.all(np.isfinite(img)):
                raise ValueError(f"section {label!r}: contains NaN or infinite values")
            if sec.plane in self.keys:
                raise ValueError(f"section {label!r}: a second {sec.plane} scan in one set of sections")
            if min(img.shape) < 8:
                raise ValueError(f"section {label!r}: {img.shape[0]} x {img.shape[1]} px, expected at least 8 x 8")
            f = max(1, int(math.ceil(max(img.shape) / max_px)))
            b = _bin2d(img, f, f)
            rows = sec.axis_um(0)[: b.shape[0] * f].reshape(-1, f).mean(axis=1)
            cols = sec.axis_um(1)[: b.shape[1] * f].reshape(-1, f).mean(axis=1)
            native = (float(sec.pixel_um[0]), float(sec.pixel_um[1]))
            x, y, z = (float(v) for v in sec.centre_um)
            across = {"xy": z, "xz": y, "yz": x}[sec.plane]
            g = _Grid(sec.plane, rows, cols, (native[0] * f, native[1] * f), native, f, across)
            nodes, weights = _moment_rule(*_bin_moments(native[1], f), radius)
            g.col_points, g.col_weights = t((cols[:, None] + nodes[None, :]).ravel()), weights
            if sec.plane == "xy":
                nodes, weights = _moment_rule(*_bin_moments(native[0], f), radius)
                g.row_points, g.row_weights = t((rows[:, None] + nodes[None, :]).ravel()), weights
            else:
                g.axial_moments = _combined(*_bin_moments(native[0], f), radius)
                h = native[0] * f
                ext = np.concatenate([rows[0] - h * np.array([2.0, 1.0]), rows, rows[-1] + h * np.array([1.0, 2.0])])
                g.row_points = t(ext if g.axial_moments[0] > 0 else rows)
            g.across_nodes, g.across_weights = _moment_rule(0.0, 0.0, radius)
            self.keys.append(sec.plane)
            self.data.append(torch.as_tensor(np.clip(b, 0, None)))
            self.grids.append(g)
            raw[sec.plane] = b
        if not self.keys:
            raise ValueError("fit_sections: the scans hold no section")
        self.raw = raw
        names = [f"Z{j}" for j in modes] + ["bead_x_um", "bead_y_um", "bead_z_um"]
        scales = [_MODE_SCALE] * len(modes) + [0.005, 0.005, 0.01]
        if beam != "none":
            names += ["mask_offset_x", "mask_offset_y"]
            scales += [0.005, 0.005]
        for key in self.keys:
            names += [f"{key}.log_photons", f"{key}.background"]
            scales += [0.01, 0.02 * max(_border(raw[key]), 0.5)]
        self.names, self.scales = names, np.asarray(scales)
        self.index = {n: i for i, n in enumerate(names)}
        self._mode_rows = torch.as_tensor([j - 1 for j in modes], dtype=torch.long)
        self._mode_cols = torch.as_tensor([self.index[f"Z{j}"] for j in modes], dtype=torch.long)
        span = max(max(float(np.ptp(g.rows)), float(np.ptp(g.cols))) for g in self.grids)
        self.half_width_um, self.max_defocus_um = 0.5 * span + 0.15, 0.5 * span + 0.3
        n_nodes = pupil_samples or pupil_samples_needed(instrument, self.half_width_um, self.max_defocus_um)
        self.model = self._make_model(n_nodes, (0.0, 0.0))
        self._detection: tuple[InstrumentPSF, list[dict[str, Any]]] | None = None
        self._linear: tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def _make_model(self, nodes: int, split: tuple[float, float]) -> InstrumentPSF:
        if self.beam == "vortex":
            return SplitPupilPSF(self.instrument, 0.05, 8, self.n_modes, beam=self.beam, pupil_samples=nodes,
                                 split=split)
        return InstrumentPSF(self.instrument, 0.05, 8, self.n_modes, beam=self.beam, pupil_samples=nodes)

    def mask_offset(self, theta: np.ndarray) -> tuple[float, float]:
        ix = self.index
        if "mask_offset_x" not in ix:
            return (0.0, 0.0)
        return (float(theta[ix["mask_offset_x"]]), float(theta[ix["mask_offset_y"]]))

    def split_at(self, split: tuple[float, float]) -> None:
        """Split the pupil rule at ``split`` (the vortex's centre; other beams: nothing)."""
        if isinstance(self.model, SplitPupilPSF):
            self.model.set_split(split)

    # ------------------------------------------------------------------ geometry
    def _bead(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ix = self.index
        return theta[ix["bead_x_um"]], theta[ix["bead_y_um"]], theta[ix["bead_z_um"]]

    def _across(self) -> tuple[np.ndarray, np.ndarray]:
        """Offsets (µm) and weights of the bead's marginal across a section's plane."""
        return _moment_rule(0.0, 0.0, self.bead_radius_um)

    def coefficients(self, theta: torch.Tensor) -> torch.Tensor:
        coef = torch.zeros(self.n_modes, dtype=F64)
        if not self.modes:
            return coef
        return coef.index_put((self._mode_rows,), theta[self._mode_cols])

    def _beam_params(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        if "mask_offset_x" not in self.index:
            return {}
        return {"mask_offset_x": theta[self.index["mask_offset_x"]], "mask_offset_y": theta[self.index["mask_offset_y"]]}

    # ------------------------------------------------------------------ illumination and detection
    def _raw(self, theta: torch.Tensor, k: int, detection: bool) -> torch.Tensor:
        """Illumination (times detection) at the section's evaluation points: xy (across, Ey, Ex),
        xz (Kz, across, Ex), yz (Kz, Ey, across)."""
        g = self.grids[k]
        bx, by, bz = self._bead(theta)
        coef = self.coefficients(theta)
        p = self._beam_params(theta)
        o = torch.as_tensor(g.across_nodes, dtype=F64)
        sg = self.sign
        f = self.model.intensity_on
        if g.plane == "xy":
            img = f(p, sg * (g.across_um - bz) + o, coef, sg * (g.col_points - bx), sg * (g.row_points - by))
        elif g.plane == "xz":
            img = f(p, sg * (g.row_points - bz), coef, sg * (g.col_points - bx), sg * (g.across_um - by) + o)
        else:
            img = f(p, sg * (g.row_points - bz), coef, sg * (g.across_um - bx) + o, sg * (g.col_points - by))
        if detection:
            img = img * self.detection(theta, k)
        return img

    def intensity(self, theta: torch.Tensor, k: int, detection: bool | None = None) -> torch.Tensor:
        """The signal of section ``k`` per unit photons at its binned pixels (rows, columns): the
        illumination (times the confocal detection; ``detection`` None: this problem's) summed over
        the bead and each binned pixel's point samples by moment rules (see the module docstring)."""
        g = self.grids[k]
        img = self._raw(theta, k, self.confocal if detection is None else detection)
        wa = torch.as_tensor(g.across_weights, dtype=F64)
        wc = torch.as_tensor(g.col_weights, dtype=F64)
        nc = len(g.cols)
        if g.plane == "xy":
            wr = torch.as_tensor(g.row_weights, dtype=F64)
            s = torch.tensordot(wa, img, dims=1)                                     # (Ey, Ex)
            s = s.reshape(len(g.rows), len(wr), nc, len(wc))
            return torch.einsum("aibj,i,j->ab", s, wr, wc)
        if g.plane == "xz":
            s = torch.einsum("zoe,o->ze", img, wa)                                   # (Kz, Ex)
        else:
            s = torch.einsum("zeo,o->ze", img, wa)
        s = torch.einsum("zbj,j->zb", s.reshape(s.shape[0], nc, len(wc)), wc)        # (Kz, columns)
        return _axial_sum(s, g)

    def point_signal(self, theta: torch.Tensor, k: int, detection: bool | None = None) -> torch.Tensor:
        """:meth:`intensity` (kept for callers of the first version)."""
        return self.intensity(theta, k, detection)

    def _detection_setup(self) -> tuple[InstrumentPSF, list[dict[str, Any]]]:
        """The detection model and, per section, the pinhole's cell weights (a conv2d kernel), the
        fine lattices of its lateral axes with their interpolation onto the evaluation points, and
        the normalisation (the pinhole integral at the bead)."""
        if self._detection is None:
            ins = replace(self.instrument, polarisation="unpolarised")
            radius = pinhole_radius_um(ins)
            model = InstrumentPSF(ins, 0.05, 8, 4, beam="none", pupil_samples=pupil_samples_needed(
                ins, self.half_width_um + radius, self.max_defocus_um))
            zero = torch.zeros(4, dtype=F64)
            setups: list[dict[str, Any]] = []
            for g in self.grids:
                lat = {}
                for name, points, pitch in (("cols", g.col_points, g.pix[1]), ("rows", g.row_points, g.pix[0])):
                    if name == "rows" and g.plane != "xy":
                        continue
                    s = max(1, int(math.ceil(pitch / self.pinhole_step_um - 1e-9)))
                    lat[name] = _lattice(points.numpy(), pitch / s)
                h_c = lat["cols"]["step"]
                h_r = lat["rows"]["step"] if g.plane == "xy" else h_c    # across the plane: the same cell
                wgt = _disc_weights(radius, h_r, h_c)
                ma, mb = (wgt.shape[0] - 1) // 2, (wgt.shape[1] - 1) // 2
                ker = torch.as_tensor(wgt, dtype=F64)[None, None]
                with torch.no_grad():
                    at = model.intensity_on({}, torch.zeros(1, dtype=F64), zero,
                                            torch.as_tensor(np.arange(-mb, mb + 1) * h_c, dtype=F64),
                                            torch.as_tensor(np.arange(-ma, ma + 1) * h_r, dtype=F64))[0]
                setups.append({"ker": ker, "ma": ma, "mb": mb, "h_r": h_r, "h_c": h_c, "lat": lat,
                               "norm": float((at * ker[0, 0]).sum())})
            self._detection = (model, setups)
        return self._detection

    def linearise_detection(self, theta: np.ndarray) -> None:
        """Hold the detection as its first-order expansion in the bead's position about ``theta``'s
        (``D0 + dD/db (b - b0)``, central differences of 1 nm): the detection does not depend on the
        aberration, and is smooth (its second-order term is ~1e-4 of its peak 2 nm away), so the fit
        re-expands it when the bead has moved (:data:`DETECTION_TOLERANCE_UM`) and at the end."""
        self._linear = None
        th = torch.as_tensor(np.asarray(theta, dtype=float))
        ib = [self.index[f"bead_{a}_um"] for a in "xyz"]
        parts = []
        h = 1e-3
        with torch.no_grad():
            for k in range(len(self.keys)):
                d0 = self.detection(th, k)
                grads = []
                for i in ib:
                    hi, lo = th.clone(), th.clone()
                    hi[i] += h
                    lo[i] -= h
                    grads.append((self.detection(hi, k) - self.detection(lo, k)) / (2 * h))
                parts.append((d0, torch.stack(grads)))
        self._linear = (np.asarray(theta, dtype=float)[ib].copy(), parts)

    def exact_detection(self) -> None:
        """Drop the expansion: :meth:`detection` evaluates the pinhole integral at every call."""
        self._linear = None

    def detection_centre(self) -> np.ndarray | None:
        """The bead position (x, y, z) the detection is expanded about (None: exact)."""
        return None if self._linear is None else self._linear[0]

    def detection(self, theta: torch.Tensor, k: int) -> torch.Tensor:
        """The confocal detection ``D`` (1 at the bead) at section ``k``'s evaluation points (the
        shapes of :meth:`_raw`): the unaberrated detection PSF integrated over the pinhole disc
        centred on each scan point, on a fine lattice of each lateral axis (a stride-1 convolution
        with the disc's cell weights) and interpolated (cubic) onto the points."""
        bx, by, bz = self._bead(theta)
        if self._linear is not None:
            b0, parts = self._linear
            d0, grad = parts[k]
            db = torch.stack([bx - float(b0[0]), by - float(b0[1]), bz - float(b0[2])])
            return d0 + torch.tensordot(db, grad, dims=1)
        model, setups = self._detection_setup()
        st = setups[k]
        g = self.grids[k]
        ker, ma, mb, h = st["ker"], st["ma"], st["mb"], st["h_c"]
        zero = torch.zeros(4, dtype=F64)
        lat_c = st["lat"]["cols"]
        o = torch.as_tensor(g.across_nodes, dtype=F64)
        n_o = len(g.across_nodes)
        xs_c = lat_c["points"](mb)
        sg = self.sign
        if g.plane == "xy":
            lat_r = st["lat"]["rows"]
            img = model.intensity_on({}, sg * (g.across_um - bz) + o, zero, sg * (xs_c - bx), sg * (lat_r["points"](ma) - by))
            out = torch.nn.functional.conv2d(img[:, None], ker)[:, 0]                                     # (o, Ly, Lx)
            return torch.einsum("ey,oyx,fx->oef", lat_r["interp"], out, lat_c["interp"]) / st["norm"]
        across = (torch.as_tensor(np.arange(-ma, ma + 1) * h, dtype=F64)[None, :] + o[:, None]).reshape(-1)
        if g.plane == "xz":
            img = model.intensity_on({}, sg * (g.row_points - bz), zero, sg * (xs_c - bx), sg * (g.across_um - by) + across)
            img = img.reshape(img.shape[0] * n_o, 1, 2 * ma + 1, img.shape[-1])
        else:
            img = model.intensity_on({}, sg * (g.row_points - bz), zero, sg * (g.across_um - bx) + across, sg * (xs_c - by))
            img = img.transpose(1, 2).reshape(img.shape[0] * n_o, 1, 2 * ma + 1, img.shape[1])
        out = torch.nn.functional.conv2d(img, ker)[:, 0, 0].reshape(-1, n_o, lat_c["size"])             # (Kz, o, L)
        out = torch.einsum("zol,el->zoe", out, lat_c["interp"]) / st["norm"]
        return out if g.plane == "xz" else out.transpose(1, 2)

    def expected(self, theta: torch.Tensor, k: int) -> torch.Tensor:
        key = self.keys[k]
        return (torch.exp(theta[self.index[f"{key}.log_photons"]]) * self.intensity(theta, k)
                + theta[self.index[f"{key}.background"]])

    def nll(self, theta: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=F64)
        for k, d in enumerate(self.data):
            m = self.expected(theta, k)
            mu = 0.5 * (m + torch.sqrt(m * m + 4e-4))  # a smooth floor (~0.01 counts): a negative mean keeps its gradient
            total = total + torch.sum(mu - d * torch.log(mu))
        return total

    def with_nodes(self, nodes: int) -> "_SectionProblem":
        """The same problem with ``nodes`` pupil nodes (the data and parameters shared)."""
        other = object.__new__(_SectionProblem)
        other.__dict__.update(self.__dict__)
        split = self.model.split if isinstance(self.model, SplitPupilPSF) else (0.0, 0.0)
        other.model = self._make_model(nodes, split)
        return other


def _border(img: np.ndarray) -> float:
    return float(np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])))


def pupil_samples_needed(instrument: Instrument, half_width_um: float, max_defocus_um: float) -> int:
    """:func:`simulation.instrument.pupil_samples_for` for an instrument (NA with a 5 % margin)."""
    from autoalign.simulation.instrument import pupil_samples_for

    return pupil_samples_for(instrument.numerical_aperture * 1.05, instrument.immersion_index,
                             instrument.wavelength_um, half_width_um, max_defocus_um)


def _choose_nodes(problem: _SectionProblem, theta: np.ndarray, cap: int, limit: float = QUADRATURE_CHI2
                  ) -> tuple[_SectionProblem, float]:
    """Raise the pupil nodes (by 8, at most to ``cap``) until a rule with 1.5x the nodes changes the
    model (at ``theta``) by a chi^2 distance below ``limit`` (:data:`QUADRATURE_CHI2`); returns the
    problem and the distance (above ``limit`` when the cap was reached: a model far from the data
    can need many nodes, and is refused by its deviance anyway)."""
    th = torch.as_tensor(theta)
    dist = float("inf")
    while True:
        n = problem.model.pupil_samples
        finer = problem.with_nodes(2 * ((3 * n + 3) // 4))
        with torch.no_grad():
            dist = 0.0
            for k in range(len(problem.keys)):
                a, b = problem.expected(th, k).numpy(), np.clip(finer.expected(th, k).numpy(), 1e-6, None)
                dist += float(np.sum((a - b) ** 2 / b))
        if dist < limit or n >= cap:
            return problem, dist
        problem = problem.with_nodes(min(n + 8, cap))


def _start(problem: _SectionProblem) -> np.ndarray:
    """Bead from the sections' centroids above background, background from their borders, photons
    by least squares of the unaberrated model."""
    start = np.zeros(len(problem.names))
    ix = problem.index
    xs, ys, zs = [], [], []
    for k, g in enumerate(problem.grids):
        img = problem.data[k].numpy()
        bg = _border(img)
        sig = np.clip(img - bg, 0, None)
        w = sig.sum() + 1e-12
        rc = float((sig.sum(axis=1) * g.rows).sum() / w)
        cc = float((sig.sum(axis=0) * g.cols).sum() / w)
        if g.plane == "xy":
            ys.append(rc)
            xs.append(cc)
        elif g.plane == "xz":
            zs.append(rc)
            xs.append(cc)
        else:
            zs.append(rc)
            ys.append(cc)
        start[ix[f"{g.plane}.background"]] = max(bg, 0.05)
    centre = {"x": [g.across_um for g in problem.grids if g.plane == "yz"],
              "y": [g.across_um for g in problem.grids if g.plane == "xz"],
              "z": [g.across_um for g in problem.grids if g.plane == "xy"]}
    for name, vals in (("x", xs), ("y", ys), ("z", zs)):
        start[ix[f"bead_{name}_um"]] = float(np.mean(vals)) if vals else float(np.mean(centre[name] or [0.0]))
    with torch.no_grad():
        th = torch.as_tensor(start)
        for k, key in enumerate(problem.keys):
            bg = float(start[ix[f"{key}.background"]])
            unit = problem.intensity(th, k).numpy()
            img = problem.data[k].numpy()
            start[ix[f"{key}.log_photons"]] = math.log(max(float(np.clip(img - bg, 0, None).sum()), 1.0)
                                                       / max(float(unit.sum()), 1e-12))
    return start


def fit_sections(scans: Any, instrument: Instrument, beam: str = "vortex", modes: Sequence[int] = tuple(range(5, 23)),
                 confocal: bool = False, max_iterations: int = 150, max_px: int = 64,
                 progress: Callable[[str], None] | None = None, pupil_samples: int | None = None,
                 pinhole_step_um: float = PINHOLE_STEP_UM, orientation: str = "focus") -> SectionFit:
    """Fit the instrument model to one bead's section scans (:class:`autoalign.recording.SectionScans`):
    the aberration (``modes``), the mask offset (beams with a mask), the bead's 3-D position, and
    photons and background per section (see the module docstring). Sections are binned to at most
    ``max_px`` pixels a side. ``confocal``: the recorded signal is the illumination times the
    detection PSF through a pinhole of ``instrument.pinhole_au`` Airy units; else the illumination
    alone (a detector that collects all the light, or data that are the beam's intensity).
    ``pupil_samples`` None: from the geometry, checked against the data's noise. ``orientation``:
    :data:`ORIENTATIONS` (``focus``: the pixels show the focus at scan - bead, as the simulator
    draws it; ``mirrored``: a focus scanned over a fixed bead, the focus at bead - scan)."""
    with _one_thread():
        return _fit_sections(scans, instrument, beam, [int(m) for m in modes], confocal, max_iterations, max_px,
                             progress, pupil_samples, pinhole_step_um, orientation)


def _fit_sections(scans: Any, instrument: Instrument, beam: str, modes: list[int], confocal: bool,
                  max_iterations: int, max_px: int, progress: Callable[[str], None] | None,
                  pupil_samples: int | None, pinhole_step_um: float, orientation: str) -> SectionFit:
    t0 = time.perf_counter()
    problem = _SectionProblem(scans, instrument, beam, modes, confocal, max_px, pupil_samples, pinhole_step_um,
                              orientation)
    start = _start(problem)
    quad = float("nan")
    cap = max(MAX_PUPIL_NODES, 2 * problem.model.pupil_samples)
    if pupil_samples is None:
        problem, quad = _choose_nodes(problem, start, cap)
    names = problem.names
    is_mode = np.array([n.startswith("Z") for n in names])
    theta = start
    total = 0
    stages = [("bead and photons", ~is_mode, 30), ("aberration", np.ones(len(names), bool), max_iterations)]
    stages += [("polish", np.ones(len(names), bool), max(max_iterations // 2, 10))] * 3
    ib = [problem.index[f"bead_{a}_um"] for a in "xyz"]
    for n_stage, (label, free, iters) in enumerate(stages):
        off = problem.mask_offset(theta)
        if n_stage >= 2:  # polish only where the vortex's centre or the bead moved from where the rules are
            split = problem.model.split if isinstance(problem.model, SplitPupilPSF) else off
            centre = problem.detection_centre()
            moved_mask = max(abs(off[0] - split[0]), abs(off[1] - split[1])) > SPLIT_TOLERANCE
            moved_bead = centre is not None and float(np.max(np.abs(theta[ib] - centre))) > DETECTION_TOLERANCE_UM
            if not (moved_mask or moved_bead):
                break
            label = "polish (" + " and ".join(w for w, m in (("vortex centre", moved_mask), ("bead", moved_bead)) if m) \
                + " moved)"
        if n_stage >= 1:  # the pupil rule split at the vortex's centre as fitted so far
            problem.split_at(off)
            if pupil_samples is None:
                problem, quad = _choose_nodes(problem, theta, cap)
        if confocal:
            problem.linearise_detection(theta)
        if progress is not None:
            progress(f"section fit: {label} ({len(problem.keys)} sections, {problem.model.pupil_samples} pupil "
                     f"nodes, {'confocal' if confocal else 'direct'} detection)")
        theta, count = minimise(problem, theta, free, iters, progress, label)
        total += count
    if confocal:  # the model, the deviance and the uncertainties with the detection expanded at the end point
        problem.linearise_detection(theta)
    th = torch.as_tensor(theta)
    # ---- goodness of fit, uncertainties
    n_par = len(names)
    fisher = np.zeros((n_par, n_par))
    meat = np.zeros((n_par, n_par))
    d_all, mu_all = [], []
    data_out, model_out = {}, {}
    with torch.no_grad():
        nll = float(problem.nll(th))
    for k, key in enumerate(problem.keys):
        with torch.no_grad():
            mu = problem.expected(th, k).numpy()
        d = problem.data[k].numpy()
        jac = jacobian(problem, theta, k, list(range(n_par)))
        var = np.clip(mu, 1e-6, None).ravel()
        fisher += fisher_information(jac, var)
        score = jac * ((d.ravel() - var) / var)[:, None]
        sb = block_sums(score, (1, d.shape[0], d.shape[1]), 4)
        meat += sb.T @ sb
        d_all.append(d.ravel())
        mu_all.append(mu.ravel())
        data_out[key], model_out[key] = d, mu
    cov_f = np.linalg.pinv(fisher, rcond=1e-12, hermitian=True)
    sig_f = np.sqrt(np.clip(np.diag(cov_f), 0, None))
    sig_s = np.sqrt(np.clip(np.diag(cov_f @ meat @ cov_f), 0, None))
    sig = np.fmax(sig_f, sig_s)
    d_cat, mu_cat = np.concatenate(d_all), np.clip(np.concatenate(mu_all), 1e-6, None)
    dof = max(d_cat.size - n_par, 1)
    pear = [(data_out[k] - model_out[k]) / np.sqrt(np.clip(model_out[k], 1e-6, None)) for k in problem.keys]
    # Bonferroni over the sections: the smallest p of the sections times their number
    struct = {b: min(1.0, min(structure_test(pp[None], blocks=(b,))[0] for pp in pear) * len(pear)) for b in (2, 4, 8)}
    dev, chi2, eps, reasons = goodness_of_fit(d_cat, mu_cat, dof, struct, 4, nll)
    # ---- how much the confocal detection changes the model (at the fitted parameters)
    effect: dict[str, float] = {}
    with torch.no_grad():
        for k, key in enumerate(problem.keys):
            mine = problem.intensity(th, k).numpy()
            other = problem.intensity(th, k, detection=not confocal).numpy()
            scale = float((mine * other).sum() / max(float((other * other).sum()), 1e-300))
            effect[key] = float(np.abs(mine - scale * other).max() / max(float(mine.max()), 1e-300))
    ix = problem.index
    has_mask = "mask_offset_x" in ix
    off = (float(theta[ix["mask_offset_x"]]), float(theta[ix["mask_offset_y"]])) if has_mask else (0.0, 0.0)
    off_s = (float(sig[ix["mask_offset_x"]]), float(sig[ix["mask_offset_y"]])) if has_mask else (0.0, 0.0)
    bead = (float(theta[ix["bead_x_um"]]), float(theta[ix["bead_y_um"]]), float(theta[ix["bead_z_um"]]))
    across_bead = {"xy": bead[2], "xz": bead[1], "yz": bead[0]}
    return SectionFit(
        coefficients={j: float(theta[ix[f"Z{j}"]]) for j in problem.modes},
        sigma={j: float(sig[ix[f"Z{j}"]]) for j in problem.modes},
        mask_offset=off, mask_offset_sigma=off_s,
        bead_um=bead,
        bead_sigma_um=(float(sig[ix["bead_x_um"]]), float(sig[ix["bead_y_um"]]), float(sig[ix["bead_z_um"]])),
        photons={k: math.exp(theta[ix[f"{k}.log_photons"]]) for k in problem.keys},
        background={k: float(theta[ix[f"{k}.background"]]) for k in problem.keys},
        deviance_per_dof=dev, chi2_per_dof=chi2, structure_p=struct, model_error_fraction=eps,
        valid=not reasons, reasons=reasons, data=data_out, model=model_out,
        pixel_um={g.plane: g.pix for g in problem.grids}, bin_factor={g.plane: g.f for g in problem.grids},
        confocal=confocal, elapsed_s=time.perf_counter() - t0, beam=beam, orientation=orientation,
        axes_um={g.plane: (g.rows, g.cols) for g in problem.grids},
        plane_offset_um={g.plane: g.across_um - across_bead[g.plane] for g in problem.grids},
        detection_effect=effect, pinhole_au=float(instrument.pinhole_au),
        pupil_samples=problem.model.pupil_samples, quadrature_chi2=quad, evaluations=total,
        sigma_fisher={j: float(sig_f[ix[f"Z{j}"]]) for j in problem.modes},
        sigma_sandwich={j: float(sig_s[ix[f"Z{j}"]]) for j in problem.modes})
