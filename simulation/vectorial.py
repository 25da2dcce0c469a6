"""Vectorial Debye (Richards-Wolf) focusing of the STED beam, batched and differentiable (torch).

The focal field is the Debye integral over the pupil, written in Cartesian pupil coordinates
``(u, v)`` (unit radius at the NA) so that on an arbitrary output grid it factorises into matrix
Fourier transforms (one complex matrix product per axis, Soummer et al. 2007):

    E(x, y, z) = sum_{u, v} w(u, v) P(u, v) exp(i (kz(u, v) z - kx(u) x - ky(v) y))

with ``kx = 2 pi NA u / lambda``, ``kz = 2 pi sqrt(n^2 - NA^2 rho^2) / lambda`` and ``w`` the
fraction of each pupil cell inside the unit disk. Sampling of the output (pixel size, pixel count,
z positions) is chosen freely; no FFT grid is imposed.

Conventions: arrays in (z, y, x) order; ortho-sections (3, n, n) as xy[y, x] (at z = 0),
xz[z, x] (at y = 0) and yz[z, y] (at x = 0). The output frame is oriented so that positive tip
(Noll 2) moves the focus to +x, positive tilt (Noll 3) to +y and positive defocus (Noll 4)
towards +z; by the optics, ``c`` radians of tip shift the focus by ``c lambda / (pi NA)``.
Intensities are normalised to the peak intensity of the unaberrated beam of the same type (the
donut's ring for a vortex, the axial lobes for a top-hat, the focus for no mask).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from simulation.pupil import Beam, Polarisation, beam_mask, beam_phase, debye_pupil_field, input_jones
from simulation.zernike import CoefficientsLike, coefficients_to_array, zernike_basis

if TYPE_CHECKING:  # pragma: no cover
    from app.settings import Settings


def _disk_cell_fractions(centres: np.ndarray, half_width: float, subsamples: int = 32) -> np.ndarray:
    """Fraction of each square pupil cell (centres along one axis) inside the unit disk, (Np, Np).

    The pupil function is taken at the cell centre and weighted by this fraction (midpoint rule
    with an area-weighted boundary: error ~ 1/Np^2, dominated by the disk's edge)."""
    uu, vv = np.meshgrid(centres, centres, indexing="xy")
    r_near = np.hypot(np.maximum(np.abs(uu) - half_width, 0), np.maximum(np.abs(vv) - half_width, 0))
    r_far = np.hypot(np.abs(uu) + half_width, np.abs(vv) + half_width)
    frac = np.where(r_far <= 1.0, 1.0, 0.0)
    edge = (r_near < 1.0) & (r_far > 1.0)
    offs = (np.arange(subsamples) + 0.5) / subsamples * 2 * half_width - half_width
    su, sv = np.meshgrid(offs, offs, indexing="xy")
    for iy, ix in zip(*np.nonzero(edge)):
        frac[iy, ix] = np.mean((uu[iy, ix] + su) ** 2 + (vv[iy, ix] + sv) ** 2 <= 1.0)
    return frac


@dataclass(frozen=True)
class Optics:
    """The optical parameters of the simulator (lengths in micrometres)."""

    numerical_aperture: float = 1.4
    immersion_index: float = 1.518
    wavelength_um: float = 0.775
    beam: Beam = "vortex"
    vortex_charge: int = 1
    tophat_radius: float = 1 / math.sqrt(2)
    polarisation: Polarisation = "circular_plus"
    linear_angle_deg: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.numerical_aperture < self.immersion_index:
            raise ValueError(
                f"numerical_aperture = {self.numerical_aperture}: expected 0 < NA < immersion index "
                f"({self.immersion_index})"
            )
        if self.wavelength_um <= 0:
            raise ValueError(f"wavelength_um = {self.wavelength_um}: expected > 0")


class PSFSimulator:
    """Vectorial PSF simulator on a fixed output grid.

    Parameters
    ----------
    optics : Optics
    pixel_size_um : lateral pixel size of the output (sample space), micrometres
    n_px : output sections are ``n_px x n_px`` (xy) and ``len(z_um) x n_px`` (xz, yz)
    z_um : focus positions of the planes of xz/yz sections and stacks, micrometres
    pupil_samples : pupil cells across the diameter
    n_modes : coefficient arrays cover Noll 1..n_modes
    device, dtype : torch device and real dtype (float32 default; complex matches)
    """

    def __init__(
        self,
        optics: Optics,
        pixel_size_um: float,
        n_px: int,
        z_um: Sequence[float] | np.ndarray,
        pupil_samples: int = 64,
        n_modes: int = 22,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if pixel_size_um <= 0 or n_px < 1 or pupil_samples < 4 or pupil_samples % 2:
            raise ValueError("pixel_size_um > 0, n_px >= 1 and an even pupil_samples >= 4 are required")
        self.optics = optics
        self.pixel_size_um = float(pixel_size_um)
        self.n_px = int(n_px)
        self.z_um = np.asarray(z_um, dtype=float).ravel()
        self.pupil_samples = int(pupil_samples)
        self.n_modes = int(n_modes)
        self.device = torch.device(device)
        self.rdtype = dtype
        self.cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128

        # --- pupil grid: cell centres, in-disk fractions, only rows/cols touching the disk
        h = 1.0 / self.pupil_samples
        centres = -1 + (np.arange(self.pupil_samples) + 0.5) * 2 * h
        frac = _disk_cell_fractions(centres, h)
        uu, vv = np.meshgrid(centres, centres, indexing="xy")
        cell_area = (2 * h) ** 2
        self._u_np, self._v_np = uu, vv
        self._weights_np = frac * cell_area
        rho = np.hypot(uu, vv)
        theta = np.arctan2(vv, uu)
        basis = zernike_basis(self.n_modes, np.minimum(rho, 1.0), theta)  # (J, Np, Np)
        t = lambda a: torch.as_tensor(a, dtype=self.rdtype, device=self.device)  # noqa: E731
        self._u, self._v, self._weights = t(uu), t(vv), t(self._weights_np)
        self._basis = t(basis.reshape(self.n_modes, -1))  # (J, Np*Np)

        na, n, lam = optics.numerical_aperture, optics.immersion_index, optics.wavelength_um
        jones = input_jones(self._u, self._v, optics.polarisation, math.radians(optics.linear_angle_deg))
        field = debye_pupil_field(self._u, self._v, na, n, jones)  # (3, Np, Np) complex
        self._pupil_field = (field * self._weights).to(self.cdtype)
        self._pupil_field = torch.where(self._weights > 0, self._pupil_field, 0)
        self._field_u3v = self._pupil_field.permute(2, 0, 1).contiguous()  # (u, 3, v)
        self._field_v3u = self._pupil_field.permute(1, 0, 2).contiguous()  # (v, 3, u)

        # --- transform kernels
        coords = (np.arange(self.n_px) - self.n_px // 2) * self.pixel_size_um  # centre pixel n//2
        self.coords_um = coords
        kx = 2 * np.pi * na / lam * centres  # rad / µm, per pupil sample
        kz = 2 * np.pi / lam * np.sqrt(np.maximum(n**2 - (na * rho) ** 2, 0))  # (Np, Np)
        c = lambda a: torch.as_tensor(a, dtype=self.cdtype, device=self.device)  # noqa: E731
        self._fx = c(np.exp(-1j * np.outer(coords, kx)))  # (n, Np): [x, u]
        self._fx_t = self._fx.T.contiguous()
        self._kz_np = kz
        self._kz_planes = self._z_kernels(self.z_um)  # (nz, Np[v], Np[u])
        self._kz_uvz = self._kz_planes.permute(2, 1, 0).contiguous()  # (u, v, z)
        self._centred_mask_phase = beam_phase(
            self._u, self._v, optics.beam, optics.vortex_charge, optics.tophat_radius
        )
        self._peak = 1.0
        self._peak = self._unaberrated_peak()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_settings(cls, settings: "str | Settings | None" = None, **overrides: Any) -> "PSFSimulator":
        """Build from a settings file or object. Keyword overrides: any ``Optics`` field
        (e.g. ``beam='tophat'``, ``polarisation='linear'``) and ``pixel_size_um``, ``n_px``,
        ``z_um``, ``pupil_samples``, ``n_modes``, ``device``, ``dtype``."""
        from app.settings import load_settings

        s = load_settings(settings)
        o = s.optics
        optics_kwargs = dict(
            numerical_aperture=o.numerical_aperture,
            immersion_index=o.immersion_index,
            wavelength_um=o.wavelength_um,
            beam=o.beam,
            vortex_charge=o.vortex_charge,
            tophat_radius=o.tophat_radius,
            polarisation=o.polarisation,
            linear_angle_deg=o.linear_angle_deg,
        )
        for key in list(overrides):
            if key in optics_kwargs:
                optics_kwargs[key] = overrides.pop(key)
        planes, dz = s.stack.planes, s.stack.z_step_um
        kwargs: dict[str, Any] = dict(
            pixel_size_um=s.camera.pixel_size_um,
            n_px=s.camera.roi_px,
            z_um=(np.arange(planes) - planes // 2) * dz,
            pupil_samples=o.pupil_samples,
        )
        kwargs.update(overrides)
        return cls(Optics(**optics_kwargs), **kwargs)

    # ------------------------------------------------------------------ pupil
    def _as_tensor_coefficients(self, coefficients: Any) -> torch.Tensor:
        if isinstance(coefficients, torch.Tensor):
            arr = coefficients.to(device=self.device, dtype=self.rdtype)
            if arr.shape[-1] < self.n_modes:
                arr = torch.nn.functional.pad(arr, (0, self.n_modes - arr.shape[-1]))
            elif arr.shape[-1] > self.n_modes:
                arr = arr[..., : self.n_modes]
            return arr
        return torch.as_tensor(
            coefficients_to_array(coefficients, self.n_modes), dtype=self.rdtype, device=self.device
        )

    def pupil_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        """Pupil cell centres (u, v), each (Np, Np) indexed [v, u], in pupil radii. A
        ``pupil_phase`` map passed to the simulator is sampled at these points."""
        return self._u_np.copy(), self._v_np.copy()

    def scalar_pupil(
        self,
        coefficients: torch.Tensor,
        mask_offsets: torch.Tensor,
        pupil_phase: torch.Tensor | None = None,
        include_mask: bool = True,
    ) -> torch.Tensor:
        """Scalar pupil factor (B, Np, Np): exp(i (mask + aberration + pupil_phase)).

        ``coefficients`` (B, n_modes) radians (column k = Noll k+1); ``mask_offsets`` (B, 2)
        pupil radii (x, y). The mask is a phase (vortex: l atan2; top-hat: pi inside its disc),
        recomputed only when an offset is non-zero or a gradient with respect to it is wanted.
        ``pupil_phase`` (Np, Np) or (B, Np, Np) radians at :meth:`pupil_coordinates` is added;
        ``include_mask=False`` leaves the beam's own mask out (when ``pupil_phase`` carries it,
        e.g. decoded from an SLM)."""
        b = coefficients.shape[0]
        npup = self.pupil_samples
        phase = (coefficients @ self._basis).reshape(b, npup, npup)
        if pupil_phase is not None:
            phase = phase + torch.as_tensor(pupil_phase, dtype=self.rdtype, device=self.device)
        if not include_mask:
            pass
        elif mask_offsets.requires_grad or bool(torch.any(mask_offsets != 0)):
            o = self.optics
            phase = phase + beam_phase(
                self._u, self._v, o.beam, o.vortex_charge, o.tophat_radius,
                mask_offsets[:, 0, None, None], mask_offsets[:, 1, None, None],
            )
        else:
            phase = phase + self._centred_mask_phase
        return torch.polar(torch.ones_like(phase), phase)  # (B, Np, Np) scalar pupil

    def pupil(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Full vector pupil (B, 3, Np, Np) = :meth:`scalar_pupil` x the apodised polarisation."""
        return self.scalar_pupil(*args, **kwargs)[:, None] * self._pupil_field[None]

    # ------------------------------------------------------------------ transforms
    def _fields_xy(self, pupil: torch.Tensor, z_planes: torch.Tensor | None = None) -> torch.Tensor:
        """Fields (B, 3, [nz,] n, n) in xy planes; ``z_planes`` (nz, Np, Np) axial kernels."""
        if z_planes is not None:
            pupil = pupil[:, :, None] * z_planes[None, None]  # (B, 3, nz, Np, Np)
        t = pupil @ self._fx_t  # [..., v, x]
        return self._fx @ t  # [..., y, x]  (the output grid is square: y kernel == x kernel)

    def _intensity_xz_yz(self, scalar: torch.Tensor) -> torch.Tensor:
        """Intensities (2, B, nz, n) on the xz (y = 0) and yz (x = 0) sections.

        For xz the v sum carries the axial kernel kz(u, v) z, so it is done per u as a batched
        matrix product with the pupil laid out (u, B, 3, v); yz is the same with u and v swapped
        (kz is symmetric). Then one matrix product with the lateral kernel."""
        b = scalar.shape[0]
        npup = self.pupil_samples
        a_xz = scalar.permute(2, 0, 1)[:, :, None, :] * self._field_u3v[:, None]  # (u, B, 3, v)
        a_yz = scalar.permute(1, 0, 2)[:, :, None, :] * self._field_v3u[:, None]  # (v, B, 3, u)
        both = torch.cat([a_xz, a_yz], dim=1).reshape(npup, 2 * b * 3, npup)
        d = torch.bmm(both, self._kz_uvz)  # (u, 2B3, z)
        f = self._fx @ d.reshape(npup, -1)  # (x, 2B3 z)
        inten = (f.real**2 + f.imag**2).reshape(self.n_px, 2, b, 3, -1).sum(dim=3)  # (x, 2, B, z)
        return inten.permute(1, 2, 3, 0)

    @staticmethod
    def _intensity(field: torch.Tensor) -> torch.Tensor:
        return (field.real**2 + field.imag**2).sum(dim=1)

    def _prepare(self, coefficients: Any, mask_offsets: Any, batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._as_tensor_coefficients(coefficients)
        if not batch:
            if c.ndim != 1:
                raise ValueError(f"expected one set of coefficients, got shape {tuple(c.shape)}")
            c = c[None]
        elif c.ndim != 2:
            raise ValueError(f"expected coefficients of shape (B, modes), got {tuple(c.shape)}")
        if mask_offsets is None:
            o = torch.zeros(c.shape[0], 2, dtype=self.rdtype, device=self.device)
        else:
            o = torch.as_tensor(mask_offsets, dtype=self.rdtype, device=self.device).reshape(-1, 2)
            if o.shape[0] == 1 and c.shape[0] > 1:
                o = o.expand(c.shape[0], 2)
            if o.shape[0] != c.shape[0]:
                raise ValueError(f"{o.shape[0]} mask offsets for {c.shape[0]} coefficient sets")
        if not torch.all(torch.isfinite(o)):
            raise ValueError("mask offsets contain NaN or infinity")
        return c, o

    # ------------------------------------------------------------------ public torch API
    def orthosections_torch(
        self, coefficients: torch.Tensor, mask_offsets: torch.Tensor, pupil_phase: Any = None,
        include_mask: bool = True,
    ) -> torch.Tensor:
        """Differentiable ortho-sections (B, 3, n, n): xy (z = 0), xz (y = 0), yz (x = 0).

        Needs ``len(z_um) == n_px``. See :meth:`pupil` for ``pupil_phase``/``include_mask``."""
        if len(self.z_um) != self.n_px:
            raise ValueError("ortho-sections need as many z planes as pixels; use stack() instead")
        c, o = self._prepare(coefficients, mask_offsets, batch=True)
        scalar = self.scalar_pupil(c, o, pupil_phase, include_mask)
        xy = self._intensity(self._fields_xy(scalar[:, None] * self._pupil_field[None]))
        xz, yz = self._intensity_xz_yz(scalar)
        return torch.stack([xy, xz, yz], dim=1) / self._peak

    def stack_torch(
        self, coefficients: torch.Tensor, mask_offsets: torch.Tensor, z_um: Any = None,
        pupil_phase: Any = None, include_mask: bool = True,
    ) -> torch.Tensor:
        """Differentiable stacks (B, nz, n, n) at ``z_um`` (default: the simulator's planes).

        A bead (or sample) displaced by (dx, dy) from the grid centre is imaged exactly by adding
        tip/tilt ``pi NA d / lambda`` (Fourier shift); a focus offset by shifting ``z_um``."""
        c, o = self._prepare(coefficients, mask_offsets, batch=True)
        kz = self._kz_planes if z_um is None else self._z_kernels(z_um)
        pupil = self.pupil(c, o, pupil_phase, include_mask)
        out = []
        for start in range(0, kz.shape[0], 8):  # 8 planes at a time bounds memory
            out.append(self._intensity(self._fields_xy(pupil, kz[start : start + 8])))
        return torch.cat(out, dim=1) / self._peak

    def _z_kernels(self, z_um: Any) -> torch.Tensor:
        """Axial kernels exp(i kz z), (nz, Np[v], Np[u]) complex."""
        z = np.asarray(z_um, dtype=float).ravel()
        return torch.as_tensor(
            np.exp(1j * z[:, None, None] * self._kz_np[None]), dtype=self.cdtype, device=self.device
        )

    # ------------------------------------------------------------------ public numpy API
    def orthosections(
        self, coefficients: CoefficientsLike, mask_offset: Sequence[float] = (0.0, 0.0),
        pupil_phase: Any = None, include_mask: bool = True,
    ) -> np.ndarray:
        """Ortho-sections (3, n, n) float: xy[y, x], xz[z, x], yz[z, y], normalised to the
        unaberrated beam's peak. ``coefficients``: {Noll: rad} or array (column k = Noll k+1)."""
        c, o = self._prepare(coefficients, mask_offset, batch=False)
        with torch.no_grad():
            return self.orthosections_torch(c, o, pupil_phase, include_mask)[0].cpu().numpy()

    def orthosections_batch(
        self, coefficients: np.ndarray, mask_offsets: np.ndarray | None = None, chunk: int = 256
    ) -> np.ndarray:
        """Ortho-sections for a batch: coefficients (B, J), mask_offsets (B, 2) -> (B, 3, n, n)."""
        c, o = self._prepare(coefficients, mask_offsets, batch=True)
        out = []
        with torch.no_grad():
            for start in range(0, c.shape[0], chunk):
                sl = slice(start, start + chunk)
                out.append(self.orthosections_torch(c[sl], o[sl]).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 3, self.n_px, self.n_px), np.float32)

    def stack(
        self, coefficients: CoefficientsLike, mask_offset: Sequence[float] = (0.0, 0.0), z_um: Any = None,
        pupil_phase: Any = None, include_mask: bool = True,
    ) -> np.ndarray:
        """Intensity stack (nz, n, n) at ``z_um`` (default: the simulator's planes), normalised to
        the unaberrated beam's peak. See :meth:`stack_torch`."""
        c, o = self._prepare(coefficients, mask_offset, batch=False)
        with torch.no_grad():
            return self.stack_torch(c, o, z_um, pupil_phase, include_mask)[0].cpu().numpy()

    def field(self, coefficients: CoefficientsLike, mask_offset: Sequence[float] = (0.0, 0.0), z_um: float = 0.0) -> np.ndarray:
        """Complex focal field (3, n, n) (components x, y, z) in the plane ``z_um``,
        in units where the unaberrated peak intensity is 1."""
        c, o = self._prepare(coefficients, mask_offset, batch=False)
        with torch.no_grad():
            f = self._fields_xy(self.pupil(c, o), self._z_kernels([z_um]))[0, :, 0]
        return (f / math.sqrt(self._peak)).cpu().numpy()

    # ------------------------------------------------------------------ normalisation
    def _unaberrated_peak(self) -> float:
        """Peak intensity of the unaberrated beam, found on a fine grid around the focus
        (xy plane, and the xz/yz sections through the axis for beams that peak off-plane)."""
        lam_na = self.optics.wavelength_um / self.optics.numerical_aperture
        fine = PSFSimulator.__new__(PSFSimulator)
        fine.__dict__.update(self.__dict__)
        fine._peak = 1.0
        step = lam_na / 40
        coords = (np.arange(97) - 48) * step
        kx = 2 * np.pi * self.optics.numerical_aperture / self.optics.wavelength_um * (
            -1 + (np.arange(self.pupil_samples) + 0.5) * 2 / self.pupil_samples
        )
        fine._fx = torch.as_tensor(np.exp(-1j * np.outer(coords, kx)), dtype=self.cdtype, device=self.device)
        fine._fx_t = fine._fx.T.contiguous()
        fine.n_px = coords.size
        z = (np.arange(97) - 48) * (4 * lam_na / 96)
        fine._kz_planes = fine._z_kernels(z)
        fine._kz_uvz = fine._kz_planes.permute(2, 1, 0).contiguous()
        c = torch.zeros(1, self.n_modes, dtype=self.rdtype, device=self.device)
        o = torch.zeros(1, 2, dtype=self.rdtype, device=self.device)
        with torch.no_grad():
            scalar = fine.scalar_pupil(c, o)
            xy = self._intensity(fine._fields_xy(scalar[:, None] * self._pupil_field[None]))
            peak = max(float(xy.max()), float(fine._intensity_xz_yz(scalar).max()))
        return peak


def debye_quadrature(
    optics: Optics,
    x_um: np.ndarray,
    y_um: np.ndarray,
    z_um: np.ndarray,
    coefficients: CoefficientsLike | None = None,
    mask_offset: Sequence[float] = (0.0, 0.0),
    n_rho: int = 200,
    n_phi: int = 256,
) -> np.ndarray:
    """Brute-force reference: the Debye integral evaluated point by point in polar pupil
    coordinates (Gauss-Legendre in rho, trapezoid in phi), float64. Returns the complex field
    (3, *x_um.shape) at the points (x, y, z) in the same frame and units as :class:`PSFSimulator`
    (not normalised). Slow; used by tests and the benchmark as the accuracy reference."""
    nodes, wts = np.polynomial.legendre.leggauss(n_rho)
    rho = 0.5 * (nodes + 1)
    w_rho = 0.5 * wts * rho  # area element rho d rho
    phi = np.arange(n_phi) * 2 * np.pi / n_phi
    w_phi = 2 * np.pi / n_phi
    rr, pp = np.meshgrid(rho, phi, indexing="ij")
    u, v = rr * np.cos(pp), rr * np.sin(pp)
    weights = (w_rho[:, None] * w_phi) * np.ones_like(rr)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    tu, tv = t(u), t(v)
    jones = input_jones(tu, tv, optics.polarisation, math.radians(optics.linear_angle_deg))
    field = debye_pupil_field(tu, tv, optics.numerical_aperture, optics.immersion_index, jones)
    mask = beam_mask(tu, tv, optics.beam, optics.vortex_charge, optics.tophat_radius, *mask_offset)
    phase = np.zeros_like(rr)
    if coefficients is not None:
        arr = coefficients_to_array(coefficients)
        basis = zernike_basis(arr.size, rr, pp)
        phase = np.tensordot(arr, basis, axes=1)
    pup = (field * mask * torch.polar(torch.ones_like(tu), t(phase)) * t(weights)).reshape(3, -1).numpy()
    na, n, lam = optics.numerical_aperture, optics.immersion_index, optics.wavelength_um
    kx = (2 * np.pi * na / lam * u).ravel()
    ky = (2 * np.pi * na / lam * v).ravel()
    kz = (2 * np.pi / lam * np.sqrt(n**2 - (na * rr) ** 2)).ravel()
    x, y, z = (np.asarray(a, dtype=float) for a in np.broadcast_arrays(x_um, y_um, z_um))
    pts = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    out = np.empty((3, pts.shape[0]), dtype=complex)
    for start in range(0, pts.shape[0], 256):
        p = pts[start : start + 256]
        kern = np.exp(1j * (np.outer(p[:, 2], kz) - np.outer(p[:, 0], kx) - np.outer(p[:, 1], ky)))
        out[:, start : start + 256] = pup @ kern.T
    # The Cartesian simulator integrates over the unit disk in (u, v); polar area element matches.
    return out.reshape((3,) + x.shape)
