"""Model-based refinement: fit the differentiable vectorial simulator to a measured z-stack.

After a fast estimate (the network's), a Poisson maximum-likelihood fit of
:class:`simulation.vectorial.PSFSimulator` to a few xy planes of the measured stack refines the
estimate and says how much to trust it. Planes rather than ortho-sections: the bead blurs the
intensity in x AND y, which an xz section alone cannot model exactly; full planes are blurred
exactly by a 2-D convolution with the bead's projected profile.

Forward model (units: µm, radians, pupil radii, photons, electrons)
-------------------------------------------------------------------
Pupil phase at pupil point ``u`` (the beam's frame):

    phi(u) = s * wrap(V(w) + C(w / max(1, |w|))) * [|w| <= 1 + g] + A(u) + tilt(bead x, y),
    w = u - o - c_s

* ``V``: the vortex of ``optics.vortex_charge``; ``C``: the Zernike correction the SLM is
  commanded to show (known; {Noll: rad}, tip/tilt/defocus included) and ``c_s`` the commanded
  shift of the whole pattern on the SLM (pupil radii; ``SLM.show(phase, shift)``);
* ``o``: the SLM's misregistration (mask offset, fitted); the pattern shown is seen shifted by ``o``,
  and the SLM's pattern disc with it: it reaches ``1 + g`` pupil radii (``g = slm.pupil_margin``;
  the ring beyond 1 carries the pupil edge's value in its direction), outside it the SLM shows
  phase 0 (a crescent of the pupil sees the flat SLM when ``|o + c_s| > g``; a smooth edge 0.003
  pupil radii wide keeps the gradient);
* ``s``: the SLM's phase stroke (fitted when ``fit_slm_scale``: the SLM delivers ``s`` x the
  commanded phase, wrapped to [0, 2 pi) as the grey levels are; else 1 and no wrap);
* ``A``: the hidden aberration (Zernike ``modes``, fitted);
* the bead's lateral offset ``(x, y)`` from the crop centre as tip/tilt ``pi NA d / lambda``.

Input polarisation: ``sqrt(1 - f) e_right + sqrt(f) e^{i psi} e_wrong`` (``f`` the wrong-hand
intensity fraction, fitted). Planes at focus ``z_k - z_bead``; intensity blurred by the bead of
diameter ``d`` (fixed or fitted); expected electrons per pixel
``mu = QE (N I + b)`` with ``N`` the photons at the unaberrated peak and ``b`` the background
per pixel. Likelihood: Poisson with Gaussian read noise ``sigma`` by the shifted-Poisson
approximation, ``e + sigma^2 ~ Poisson(mu + sigma^2)`` with ``e = (ADU - offset) / gain``.

Outputs (:class:`RefineResult`): the estimate (the Zernike aberration PRESENT in the beam, as the
network reports it: ``s C + A``; apply minus it), the mask offset present (``o + c_s``), every
fitted parameter with a 1-sigma uncertainty from the inverse Fisher information (the Laplace
approximation: Gauss-Newton Hessian of the negative log-likelihood at the optimum, expected
counts), the Cramér–Rao bound of the residual RMS at the photons collected, and the goodness of
fit (Poisson deviance and Pearson chi^2 per degree of freedom, and a structured-residual test).
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from autoalign.simulation.noise import CameraModel
from autoalign.simulation.vectorial import PSFSimulator
from autoalign.simulation.zernike import noll_to_nm

if TYPE_CHECKING:  # pragma: no cover
    from autoalign.settings import Settings

__all__ = ["STRUCTURE_P", "CHI2_MAX", "RefineOptions", "RefineStart", "RefineResult", "refine", "zernike_torch",
           "structure_test", "fisher_information"]

TWO_PI = 2 * math.pi
STRUCTURE_P = 1e-4
"""A fit whose structured-residual p-value is below this does not explain the data (a clean fit
of the simulated microscope gives p of 1e-3..0.5: the 8-bit pixelated SLM and the 32-node
quadrature are not exactly the model; a missing mode or fault gives p < 1e-10)."""
CHI2_MAX = 1.5
"""A fit with Pearson chi^2 per degree of freedom above this does not explain the data."""


# ============================================================================ small helpers
def zernike_torch(j: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """RMS-normalised Noll Zernike ``Z_j`` at Cartesian pupil points (differentiable; the
    polynomial's continuation outside the unit disk), as :func:`simulation.zernike.zernike`."""
    n, m = noll_to_nm(j)
    rho = torch.sqrt(u * u + v * v + 1e-30)
    theta = torch.atan2(v, u)
    r = torch.zeros_like(rho)
    am = abs(m)
    for k in range((n - am) // 2 + 1):
        c = (-1) ** k * math.factorial(n - k) / (
            math.factorial(k) * math.factorial((n + am) // 2 - k) * math.factorial((n - am) // 2 - k))
        r = r + c * rho ** (n - 2 * k)
    if m == 0:
        return math.sqrt(n + 1) * r
    norm = math.sqrt(2 * (n + 1))
    return norm * r * (torch.cos(m * theta) if m > 0 else torch.sin(-m * theta))


def _bead_kernel_torch(diameter_um: torch.Tensor, pixel_um: float, half: int) -> torch.Tensor:
    """The sphere's projected chord profile on a (2 half + 1)^2 pixel grid, 5 x 5 sub-samples
    per pixel, normalised (as :func:`simulation.noise.bead_kernel`); differentiable in the
    diameter."""
    radius_px = 0.5 * diameter_um / pixel_um
    sub = (torch.arange(5, dtype=diameter_um.dtype) + 0.5) / 5 - 0.5
    grid = torch.arange(-half, half + 1, dtype=diameter_um.dtype)
    yy = (grid[:, None, None, None] + sub[None, None, :, None]) / radius_px
    xx = (grid[None, :, None, None] + sub[None, None, None, :]) / radius_px
    chord = torch.sqrt(torch.clamp(1 - xx**2 - yy**2, min=1e-12)) * ((xx**2 + yy**2) < 1)
    chord = chord.mean(dim=(2, 3))
    return chord / chord.sum()


def structure_test(pearson: np.ndarray, blocks: Sequence[int] = (2, 4, 8)) -> tuple[float, int]:
    """Is there structure left in the residuals? ``pearson`` (K, n, n): Pearson residuals
    ``(data - model) / sqrt(model)``, ~N(0, 1) and independent for a model that explains the data.
    For each block size b, the sums over b x b blocks divided by b are N(0, 1) under that
    hypothesis; their sum of squares is chi^2 with one degree of freedom per block. Returns the
    smallest p-value over the block sizes (Bonferroni-corrected) and the block size that gave it.
    A model missing a smooth feature (a mode outside the fit, a wrong polarisation) fails at some
    block size while pixel noise alone passes."""
    from scipy import stats

    r = np.asarray(pearson, dtype=float)
    best_p, best_b = 1.0, 0
    for b in blocks:
        k, ny, nx = r.shape
        my, mx = ny // b, nx // b
        if my < 1 or mx < 1:
            continue
        s = r[:, : my * b, : mx * b].reshape(k, my, b, mx, b).sum(axis=(2, 4)) / b
        stat = float(np.sum(s**2))
        p = float(stats.chi2.sf(stat, s.size)) * len(blocks)
        if p < best_p:
            best_p, best_b = p, b
    return min(best_p, 1.0), best_b


def fisher_information(jacobian: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Fisher information ``J^T diag(1 / mu) J`` of independent Poisson counts with means
    ``expected`` (N,) and Jacobian ``d mu / d theta`` (N, P)."""
    w = 1.0 / np.clip(np.asarray(expected, dtype=float), 1e-9, None)
    j = np.asarray(jacobian, dtype=float)
    return j.T @ (j * w[:, None])


# ============================================================================ API types
@dataclass(frozen=True)
class RefineOptions:
    """What to fit and how (defaults: a fit that takes well under a second on one core).

    modes : Noll indices of the aberration fitted (None: ``settings.model.modes``)
    plane_offsets_um : focus offsets of the planes used, from the stack's centroid plane
    crop_px : square crop around the bead (pixels)
    pupil_samples : Gauss-Legendre pupil nodes per axis of the fit's simulator (32: ~1e-3 of
        the peak; the microscope renders with 64)
    fit_offset, fit_polarisation, fit_slm_scale, fit_bead_diameter : which optional parameters
        are free (the others stay at their start values)
    max_iterations : L-BFGS iterations of the full fit (a short photometric fit precedes it)
    uncertainties : compute the Fisher information (2 forward passes per parameter)
    dtype : torch.float64 (default; the log-likelihood of ~10^6 counts needs it) or float32
    """

    modes: tuple[int, ...] | None = None
    plane_offsets_um: tuple[float, ...] = (-0.6, -0.3, 0.0, 0.3, 0.6)
    crop_px: int = 32
    pupil_samples: int = 32
    fit_offset: bool = True
    fit_polarisation: bool = True
    fit_slm_scale: bool = False
    fit_bead_diameter: bool = False
    max_iterations: int = 100
    uncertainties: bool = True
    dtype: torch.dtype = torch.float64


@dataclass(frozen=True)
class RefineStart:
    """Warm start: the aberration PRESENT ({Noll: rad}, e.g. the network's prediction) and the mask
    offset present (pupil radii), plus optional starts of the other parameters."""

    coefficients: Mapping[int, float] = field(default_factory=dict)
    mask_offset: tuple[float, float] = (0.0, 0.0)
    wrong_hand_fraction: float = 0.003
    wrong_hand_phase_rad: float = 0.0
    slm_phase_scale: float = 1.0
    bead_diameter_um: float | None = None


@dataclass
class RefineResult:
    """The refined estimate (see the module docstring for the model)."""

    coefficients: dict[int, float]          # aberration present, s C + A ({Noll: rad}); apply minus it
    aberration: dict[int, float]            # A: the hidden aberration, pupil frame
    mask_offset: tuple[float, float]        # offset present o + c_s (pupil radii)
    misregistration: tuple[float, float]    # o: the SLM's misregistration (pupil radii)
    bead_um: tuple[float, float, float]     # bead (x, y) from the ROI centre, z in stage coordinates
    peak_photons: float
    background_photons: float
    wrong_hand_fraction: float
    wrong_hand_phase_rad: float
    slm_phase_scale: float
    bead_diameter_um: float
    uncertainty: dict[str, float]           # 1 sigma per parameter name (see ``parameter_names``)
    covariance: np.ndarray                  # inverse Fisher information (physical units)
    parameter_names: list[str]
    crb_residual_rms: float                 # Cramér–Rao bound of the residual RMS (fitted modes >= 5), rad
    deviance_per_dof: float                 # Poisson deviance / (pixels - parameters); ~1 when the model fits
    chi2_per_dof: float                     # Pearson chi^2 / (pixels - parameters)
    structure_p: float                      # p-value of the structured-residual test (small: structure left)
    structure_block_px: int
    n_pixels: int
    nll: float
    iterations: int
    elapsed_s: float
    valid: bool
    reason: str                             # "" when valid
    model_planes: np.ndarray | None = None  # expected electrons (K, crop, crop)
    data_planes: np.ndarray | None = None   # measured electrons (K, crop, crop)

    def sigma(self, noll: int) -> float:
        """1-sigma uncertainty of the coefficient of Noll ``noll`` (radians)."""
        return float(self.uncertainty.get(f"Z{noll}", float("nan")))


# ============================================================================ the fit
_SIMS: dict[tuple, PSFSimulator] = {}


def _simulator(settings: "Settings", crop: int, pupil_samples: int, n_modes: int, dtype: torch.dtype) -> PSFSimulator:
    o, c = settings.optics, settings.camera
    key = (o.numerical_aperture, o.immersion_index, o.wavelength_um, o.beam, o.vortex_charge,
           o.polarisation, c.pixel_size_um, crop, pupil_samples, n_modes, dtype)
    sim = _SIMS.get(key)
    if sim is None:
        if len(_SIMS) > 6:
            _SIMS.clear()
        sim = _SIMS[key] = PSFSimulator.from_settings(settings, n_px=crop, z_um=[0.0], pupil_samples=pupil_samples,
                                                      n_modes=n_modes, dtype=dtype)
    return sim


class _Model:
    """The forward model on a fixed crop and set of planes; parameters as one physical vector."""

    def __init__(self, settings: "Settings", options: RefineOptions, modes: list[int], z_planes_um: np.ndarray,
                 commanded: np.ndarray, commanded_shift: tuple[float, float], fixed: dict[str, float]) -> None:
        o = settings.optics
        self.settings, self.options, self.modes = settings, options, modes
        self.n_modes = max(22, max(modes), len(commanded))
        self.sim = _simulator(settings, options.crop_px, options.pupil_samples, self.n_modes, options.dtype)
        self.dtype = options.dtype
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=float), dtype=self.dtype)  # noqa: E731
        self.z_planes = t(z_planes_um)
        u, v = self.sim.pupil_coordinates()
        self.u, self.v = t(u), t(v)
        self.commanded = np.zeros(self.n_modes)
        self.commanded[: len(commanded)] = commanded
        self.c_modes = [j + 1 for j in np.flatnonzero(self.commanded)]
        self.c_values = [float(self.commanded[j - 1]) for j in self.c_modes]
        self.shift = commanded_shift
        self.margin = float(getattr(settings.slm, "pupil_margin", 0.0))
        self.charge = int(o.vortex_charge) if o.beam == "vortex" else 0
        self.tilt_scale = math.pi * o.numerical_aperture / o.wavelength_um
        cm = CameraModel.from_settings(settings)
        self.qe, self.read_var = cm.quantum_efficiency, cm.read_noise_electrons**2
        self.pixel_um = float(settings.camera.pixel_size_um)
        self.fixed = fixed
        # parameter layout: names, physical start, optimiser scale
        self.names: list[str] = [f"Z{j}" for j in modes] + ["bead_x_um", "bead_y_um", "bead_z_um",
                                                             "log_photons", "log_background"]
        if options.fit_offset:
            self.names += ["offset_x", "offset_y"]
        if options.fit_polarisation:
            self.names += ["wrong_hand_fraction", "wrong_hand_phase_rad"]
        if options.fit_slm_scale:
            self.names += ["slm_phase_scale"]
        if options.fit_bead_diameter:
            self.names += ["bead_diameter_um"]
        scales = {"bead_x_um": 0.02, "bead_y_um": 0.02, "bead_z_um": 0.05, "log_photons": 0.05,
                  "log_background": 0.1, "offset_x": 0.02, "offset_y": 0.02, "wrong_hand_fraction": 0.005,
                  "wrong_hand_phase_rad": 0.5, "slm_phase_scale": 0.02, "bead_diameter_um": 0.01}
        self.scales = np.array([scales.get(n, 0.1) for n in self.names])
        d_max = max(fixed["bead_diameter_um"], 0.0) * (2.0 if options.fit_bead_diameter else 1.0)
        self.half = int(math.ceil(0.5 * d_max / self.pixel_um + 0.5)) if d_max > 0 else 0

    def value(self, theta: torch.Tensor, name: str) -> torch.Tensor:
        if name in self.names:
            return theta[self.names.index(name)]
        return torch.as_tensor(self.fixed[name], dtype=self.dtype)

    def expected(self, theta: torch.Tensor) -> torch.Tensor:
        """Expected electrons (K, n, n) for the physical parameter vector ``theta``."""
        k = len(self.modes)
        coef = torch.zeros(self.n_modes, dtype=self.dtype)
        coef = coef.index_put((torch.as_tensor([m - 1 for m in self.modes]),), theta[:k])
        bx, by, bz = self.value(theta, "bead_x_um"), self.value(theta, "bead_y_um"), self.value(theta, "bead_z_um")
        tilt = torch.zeros(self.n_modes, dtype=self.dtype)
        tilt = tilt.index_put((torch.tensor([1, 2]),), torch.stack([bx, by]) * self.tilt_scale)
        coef = coef + tilt
        ox, oy = self.value(theta, "offset_x"), self.value(theta, "offset_y")
        # w: the beam's pupil point in the SLM pattern's own frame (misregistration and commanded shift)
        us, vs = self.u - ox - self.shift[0], self.v - oy - self.shift[1]
        rho = torch.sqrt(us * us + vs * vs)
        phase = self.charge * torch.atan2(vs, us) if self.charge else 0 * us
        if self.c_modes:
            clamp = 1.0 / torch.clamp(rho, min=1.0)  # the margin ring carries the edge value in its direction
            for j, c in zip(self.c_modes, self.c_values):
                phase = phase + c * zernike_torch(j, us * clamp, vs * clamp)
        if self.options.fit_slm_scale or self.fixed.get("slm_phase_scale", 1.0) != 1.0:
            phase = self.value(theta, "slm_phase_scale") * torch.remainder(phase, TWO_PI)
        # the SLM writes its pattern only inside its disc of 1 + margin (phase 0 outside): beyond the
        # margin, a crescent of the pupil sees the flat SLM (smooth edge: gradients)
        edge = torch.sigmoid((1.0 + self.margin - rho) / 0.003)
        phase = phase * edge
        f = torch.clamp(self.value(theta, "wrong_hand_fraction"), 0.0, 1.0)
        field_ = self.sim.pupil_field(f, self.value(theta, "wrong_hand_phase_rad")) if (
            self.options.fit_polarisation or self.fixed.get("wrong_hand_fraction", 0.0) > 0) else None
        inten = self.sim.stack_torch(coef[None], torch.zeros(1, 2, dtype=self.dtype), z_um=self.z_planes - bz,
                                     pupil_phase=phase[None], include_mask=False, pupil_field=field_)[0]
        if self.half > 0:
            kern = _bead_kernel_torch(self.value(theta, "bead_diameter_um"), self.pixel_um, self.half)
            padded = torch.nn.functional.pad(inten[:, None], (self.half,) * 4, mode="replicate")
            inten = torch.nn.functional.conv2d(padded, kern[None, None])[:, 0]
        photons = torch.exp(self.value(theta, "log_photons"))
        background = torch.exp(self.value(theta, "log_background"))
        return self.qe * (photons * inten + background)


def _align_bead(model: _Model, start_vec: np.ndarray, signal: np.ndarray,
                dz_um: Sequence[float] = (-0.2, -0.1, 0.0, 0.1, 0.2)) -> None:
    """Start the bead position where the model at the start aberration best matches the data:
    the intensity centroid is pulled aside by coma (by several pixels at 0.7 rad), a local
    minimum for the fit. For a few focus offsets, the FFT cross-correlation of model and data
    planes (summed over planes) gives the lateral shift (parabolic sub-pixel peak); the focus
    with the best normalised correlation wins. Updates ``start_vec`` in place."""
    names = model.names
    ix, iy, iz = names.index("bead_x_um"), names.index("bead_y_um"), names.index("bead_z_um")
    best = (-np.inf, 0.0, 0.0, 0.0)
    fd = np.fft.rfft2(signal - signal.mean(axis=(1, 2), keepdims=True))
    n = signal.shape[-1]
    with torch.no_grad():
        for dz in dz_um:
            trial = start_vec.copy()
            trial[ix] = trial[iy] = 0.0
            trial[iz] += dz
            mod = model.expected(torch.as_tensor(trial, dtype=model.dtype)).numpy()
            fm = np.fft.rfft2(mod - mod.mean(axis=(1, 2), keepdims=True))
            cc = np.fft.irfft2((fd * np.conj(fm)).sum(axis=0), s=signal.shape[-2:])
            peak = float(cc.max()) / (np.linalg.norm(mod - mod.mean()) + 1e-12)
            if peak > best[0]:
                ky, kx = np.unravel_index(int(np.argmax(cc)), cc.shape)
                sub = []
                for k, axis in ((ky, 0), (kx, 1)):
                    line = np.roll(cc, -k + 1, axis=axis)
                    a, b, c = (line[0, 0], line[1, 0], line[2, 0]) if axis == 0 else (line[0, 0], line[0, 1], line[0, 2])
                    den = a - 2 * b + c
                    sub.append(0.5 * (a - c) / den if den < 0 else 0.0)
                sy = ((ky + n // 2) % n - n // 2) + sub[0]
                sx = ((kx + n // 2) % n - n // 2) + sub[1]
                best = (peak, sx * model.pixel_um, sy * model.pixel_um, dz)
    start_vec[ix], start_vec[iy] = best[1], best[2]
    start_vec[iz] += best[3]


def _offset_search(model: _Model, nll_of: Any, base: torch.Tensor, scales: torch.Tensor, x: torch.Tensor,
                   radii: Sequence[float] = (0.05, 0.1, 0.15), directions: int = 8) -> None:
    """Coarse search of the mask offset before the gradient fit (the likelihood has local minima
    for offsets beyond ~0.05 pupil radii): the best of the current offset and rings of
    ``radii`` x ``directions`` candidates around it, other parameters fixed; updates ``x``."""
    ix, iy = model.names.index("offset_x"), model.names.index("offset_y")
    with torch.no_grad():
        current = base + scales * x
        best_val, best = float(nll_of(current)), (0.0, 0.0)
        for r in radii:
            for k in range(directions):
                a = 2 * math.pi * k / directions
                trial = current.clone()
                trial[ix] += r * math.cos(a)
                trial[iy] += r * math.sin(a)
                val = float(nll_of(trial))
                if val < best_val:
                    best_val, best = val, (r * math.cos(a), r * math.sin(a))
        x[ix] += best[0] / float(scales[ix])
        x[iy] += best[1] / float(scales[iy])


def _crop_planes(stack: np.ndarray, z_positions: np.ndarray, options: RefineOptions,
                 ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], tuple[int, int]]:
    """Planes (K, crop, crop) around the bead, their focus positions, the centroid (z, y, x) and
    the crop's centre pixel (y, x) in the stack."""
    from autoalign.calibration.centroid import robust_stack_centroid

    zc, yc, xc = robust_stack_centroid(stack)
    nz, ny, nx = stack.shape
    dz = float(np.median(np.diff(z_positions))) if nz > 1 else 1.0
    idx = sorted({int(np.clip(round(zc + off / dz), 0, nz - 1)) for off in options.plane_offsets_um})
    crop = options.crop_px
    if crop > min(ny, nx):
        raise ValueError(f"refine: crop_px = {crop} is larger than the stack's planes ({ny} x {nx})")
    h = crop // 2
    # the crop lies inside the stack (an aberrated donut's centroid may sit near the edge)
    cy = int(np.clip(round(yc), h, ny - crop + h))
    cx = int(np.clip(round(xc), h, nx - crop + h))
    planes = stack[idx][:, cy - h: cy - h + crop, cx - h: cx - h + crop]
    return planes, np.asarray(z_positions, dtype=float)[idx], (zc, yc, xc), (cy, cx)


def refine(
    stack_adu: np.ndarray,
    z_positions_um: Sequence[float],
    settings: "Settings",
    start: RefineStart | None = None,
    commanded: Mapping[int, float] | np.ndarray | None = None,
    commanded_shift: tuple[float, float] = (0.0, 0.0),
    options: RefineOptions | None = None,
) -> RefineResult:
    """Fit the vectorial model to a measured stack (ADU, (nz, ny, nx), focus positions in µm).

    ``start``: warm start (the network's estimate of the aberration present and mask offset);
    ``commanded``: the Zernike correction the SLM shows now ({Noll: rad} or array, tip/tilt/
    defocus included) and ``commanded_shift`` the vortex shift it shows (pupil radii); the fit
    separates them from the system's own aberration. ``options``: see :class:`RefineOptions`.
    Raises ``ValueError`` for a stack without signal or with NaN. The fit runs in one torch thread.
    """
    from autoalign.simulation.zernike import coefficients_to_array

    t0 = time.perf_counter()
    options = options or RefineOptions()
    start = start or RefineStart()
    stack = np.asarray(stack_adu, dtype=float)
    if stack.ndim != 3 or not np.all(np.isfinite(stack)):
        raise ValueError(f"refine: expected a finite stack (nz, ny, nx) in ADU, got shape {stack.shape}")
    z_positions = np.asarray(z_positions_um, dtype=float).ravel()
    if len(z_positions) != stack.shape[0]:
        raise ValueError(f"refine: {len(z_positions)} focus positions for {stack.shape[0]} planes")
    modes = list(options.modes) if options.modes is not None else [int(m) for m in settings.model.modes]
    cmd = coefficients_to_array(commanded, None) if commanded is not None else np.zeros(1)
    cmd = np.asarray(cmd, dtype=float).ravel()
    planes, z_planes, (zc, yc, xc), (cy, cx) = _crop_planes(stack, z_positions, options)
    cm = CameraModel.from_settings(settings)
    electrons = (planes - cm.offset_adu) / cm.gain_adu_per_electron
    bead_d = float(settings.camera.bead_diameter_um if start.bead_diameter_um is None else start.bead_diameter_um)
    fixed = {"offset_x": start.mask_offset[0] - commanded_shift[0], "offset_y": start.mask_offset[1] - commanded_shift[1],
             "wrong_hand_fraction": 0.0 if not options.fit_polarisation else start.wrong_hand_fraction,
             "wrong_hand_phase_rad": start.wrong_hand_phase_rad, "slm_phase_scale": start.slm_phase_scale,
             "bead_diameter_um": bead_d}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _Model(settings, options, modes, z_planes, cmd, commanded_shift, fixed)
        # ---- start values (physical)
        present = coefficients_to_array(dict(start.coefficients) if start.coefficients else {}, model.n_modes)
        aberr0 = present - start.slm_phase_scale * model.commanded
        zc_um = float(np.interp(zc, np.arange(len(z_positions)), z_positions))
        p = model.pixel_um
        border = np.concatenate([electrons[:, :2].ravel(), electrons[:, -2:].ravel()])
        bg0 = max(float(np.median(border)) / model.qe, 0.05)
        theta0 = {f"Z{j}": aberr0[j - 1] for j in modes}
        theta0.update({"bead_x_um": (xc - cx) * p, "bead_y_um": (yc - cy) * p, "bead_z_um": zc_um,
                       "log_photons": 0.0, "log_background": math.log(bg0)})
        theta0.update({k: fixed[k] for k in ("offset_x", "offset_y", "wrong_hand_fraction",
                                              "wrong_hand_phase_rad", "slm_phase_scale", "bead_diameter_um")})
        start_vec = np.array([theta0[n] for n in model.names], dtype=float)
        t = lambda a: torch.as_tensor(a, dtype=model.dtype)  # noqa: E731
        with torch.no_grad():  # photons: match the total signal
            unit = model.expected(t(start_vec)) / model.qe - bg0
            signal = float((electrons / model.qe - bg0).sum())
            start_vec[model.names.index("log_photons")] = math.log(max(signal, 1.0) / max(float(unit.sum()), 1e-9))
        _align_bead(model, start_vec, electrons / model.qe - bg0)
        data = t(np.clip(electrons + model.read_var, 0, None))
        scales = t(model.scales)
        base = t(start_vec)

        def nll_of(theta: torch.Tensor) -> torch.Tensor:
            mu = model.expected(theta) + model.read_var
            return torch.sum(mu - data * torch.log(mu))

        free_all = torch.ones(len(model.names), dtype=torch.bool)
        photometric = torch.tensor([n in ("bead_x_um", "bead_y_um", "bead_z_um", "log_photons", "log_background")
                                    for n in model.names])
        x = torch.zeros(len(model.names), dtype=model.dtype, requires_grad=True)
        iterations = 0
        nll0 = float(nll_of(base).detach())
        for stage, (free, iters) in enumerate(((photometric, 15), (free_all, options.max_iterations))):
            if stage == 1 and options.fit_offset:
                _offset_search(model, nll_of, base, scales, x)
            opt = torch.optim.LBFGS([x], lr=1.0, max_iter=iters, history_size=20,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
            mask = free.to(model.dtype)

            def closure() -> torch.Tensor:  # used by opt.step() within this iteration only
                nonlocal iterations
                iterations += 1
                opt.zero_grad()  # noqa: B023 - the closure runs inside this iteration's opt.step()
                loss = (nll_of(base + scales * x * mask) - nll0)  # noqa: B023 / max(abs(nll0), 1.0) * 1e4
                loss.backward()
                return loss

            opt.step(closure)
            with torch.no_grad():
                x.mul_(mask)  # frozen parameters stay at their start
        theta = (base + scales * x).detach()
        names = model.names
        if "wrong_hand_fraction" in names:  # the physical range
            i = names.index("wrong_hand_fraction")
            theta[i] = theta[i].clamp(0.0, 1.0)
        with torch.no_grad():
            mu = (model.expected(theta) + model.read_var).numpy()
            nll = float(torch.sum(t(mu) - data * torch.log(t(mu))))
        d = data.numpy()
        n_pix, n_par = d.size, len(names)
        dof = max(n_pix - n_par, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            dev_terms = np.where(d > 0, d * np.log(d / mu), 0.0) - (d - mu)
        deviance = 2 * float(dev_terms.sum()) / dof
        pearson = (d - mu) / np.sqrt(mu)
        chi2 = float(np.sum(pearson**2)) / dof
        p_struct, block = structure_test(pearson)
        # ---- Fisher information (central differences of the expected counts)
        cov = np.full((n_par, n_par), np.nan)
        sig = {n: float("nan") for n in names}
        if options.uncertainties:
            jac = np.empty((n_pix, n_par))
            with torch.no_grad():
                for i in range(n_par):
                    h = 1e-3 * model.scales[i]
                    hi, lo = theta.clone(), theta.clone()
                    hi[i] += h
                    lo[i] -= h
                    if names[i] == "wrong_hand_fraction" and lo[i] < 0:
                        lo[i] = 0.0
                    step = float(hi[i] - lo[i])
                    jac[:, i] = ((model.expected(hi) - model.expected(lo)).numpy().ravel()) / step
            fisher = fisher_information(jac, mu.ravel())
            cov = np.linalg.pinv(fisher, rcond=1e-12, hermitian=True)
            sig = {n: float(math.sqrt(max(cov[i, i], 0.0))) for i, n in enumerate(names)}
        crb = math.sqrt(sum(max(cov[names.index(f"Z{j}"), names.index(f"Z{j}")], 0.0)
                            for j in modes if j >= 5)) if options.uncertainties else float("nan")
    finally:
        torch.set_num_threads(threads)
    th = {n: float(theta[i]) for i, n in enumerate(names)}
    val = lambda n: th.get(n, fixed.get(n, 0.0))  # noqa: E731
    s_scale = val("slm_phase_scale")
    aberration = {j: th[f"Z{j}"] for j in modes}
    present_out = {j: aberration[j] + s_scale * float(model.commanded[j - 1]) for j in modes}
    off = (val("offset_x"), val("offset_y"))
    reasons = []
    if not np.isfinite(nll):
        reasons.append("the fit diverged (non-finite likelihood)")
    if chi2 > CHI2_MAX:
        reasons.append(f"the model does not explain the data (chi^2/dof = {chi2:.2f})")
    if p_struct < STRUCTURE_P:
        reasons.append(f"structured residual (p = {p_struct:.1e} at {block}x{block} px blocks)")
    if sig and any(not math.isfinite(v) for k, v in sig.items() if k.startswith("Z")) and options.uncertainties:
        reasons.append("the Fisher information is singular")
    return RefineResult(
        coefficients=present_out, aberration=aberration,
        mask_offset=(off[0] + commanded_shift[0], off[1] + commanded_shift[1]), misregistration=off,
        bead_um=(th["bead_x_um"] + (cx - stack.shape[2] // 2) * model.pixel_um,
                 th["bead_y_um"] + (cy - stack.shape[1] // 2) * model.pixel_um, th["bead_z_um"]),
        peak_photons=math.exp(th["log_photons"]), background_photons=math.exp(th["log_background"]),
        wrong_hand_fraction=val("wrong_hand_fraction"), wrong_hand_phase_rad=val("wrong_hand_phase_rad"),
        slm_phase_scale=s_scale, bead_diameter_um=val("bead_diameter_um"),
        uncertainty=sig, covariance=cov, parameter_names=names, crb_residual_rms=crb,
        deviance_per_dof=deviance, chi2_per_dof=chi2, structure_p=p_struct, structure_block_px=block,
        n_pixels=n_pix, nll=nll, iterations=iterations, elapsed_s=time.perf_counter() - t0,
        valid=not reasons, reason="; ".join(reasons),
        model_planes=mu - model.read_var, data_planes=d - model.read_var,
    )
