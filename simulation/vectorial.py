"""Vectorial Debye (Richards-Wolf) focusing of the STED beam, batched and differentiable (torch).

The focal field is the Debye integral over the pupil, in Cartesian pupil coordinates ``(u, v)``
(unit radius at the NA):

    E(x, y, z) = integral_disk P(u, v) exp(i (kz(u, v) z - kx(u) x - ky(v) y)) du dv

with ``kx = 2 pi NA u / lambda``, ``kz = 2 pi sqrt(n^2 - NA^2 rho^2) / lambda``. The disk is
integrated with a chord-adapted Gauss-Legendre rule: ``u = sin(alpha)`` (Gauss-Legendre in alpha)
and, on each chord, ``v = cos(alpha) t`` (Gauss-Legendre in t), so the nodes follow the pupil's
edge and the rule converges spectrally instead of the ~1/N^2 of a square grid cut by a circle.
Because the u nodes are shared by every chord, each section is a batched matrix product over the
chord (t) followed by one matrix product over u onto an arbitrary output grid (pixel size, pixel
count and z positions are chosen, not imposed by an FFT). The yz section uses the same rule with
u and v swapped.

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
from typing import Any

import numpy as np
import torch

from autoalign.settings import Settings, load_settings
from autoalign.simulation.pupil import Beam, Polarisation, beam_mask, beam_phase, debye_pupil_field, input_jones
from autoalign.simulation.zernike import CoefficientsLike, coefficients_to_array, zernike_basis


def chord_quadrature(n_alpha: int, n_chord: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nodes and weights of the chord-adapted Gauss-Legendre rule on the unit disk.

    Returns ``u`` (n_alpha,), ``v`` (n_alpha, n_chord) and ``w`` (n_alpha, n_chord) with
    ``sum(w f(u, v))`` approximating the integral of f over the disk (du dv): u = sin(alpha),
    v = cos(alpha) t, du dv = cos(alpha)^2 dalpha dt."""
    a, wa = np.polynomial.legendre.leggauss(n_alpha)
    t, wt = np.polynomial.legendre.leggauss(n_chord)
    alpha = 0.5 * np.pi * a
    u = np.sin(alpha)
    v = np.cos(alpha)[:, None] * t[None, :]
    w = (0.5 * np.pi * wa * np.cos(alpha) ** 2)[:, None] * wt[None, :]
    return u, v, w


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
        na, n, lam = optics.numerical_aperture, optics.immersion_index, optics.wavelength_um
        self._kappa = 2 * np.pi * na / lam  # rad/µm per unit of pupil coordinate

        # --- pupil nodes: set 0 (u_i, v_ij) for xy, xz and stacks; set 1 swapped (v_ij, u_i) for yz
        n_alpha = n_chord = self.pupil_samples
        u1, v2, w2 = chord_quadrature(n_alpha, n_chord)
        u2 = np.broadcast_to(u1[:, None], v2.shape)
        self._u_nodes = u1
        self._v_nodes = v2
        u_sets = np.stack([u2, v2])  # (2, Na, Nc)
        v_sets = np.stack([v2, u2])
        self._u_np, self._v_np = u_sets, v_sets
        rho = np.hypot(u_sets, v_sets)
        theta = np.arctan2(v_sets, u_sets)
        basis = zernike_basis(self.n_modes, rho, theta)  # (J, 2, Na, Nc)
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=self.rdtype, device=self.device)  # noqa: E731
        self._u, self._v = t(u_sets), t(v_sets)
        self._basis = t(basis.reshape(self.n_modes, -1))  # (J, 2 Na Nc)
        jones = input_jones(self._u, self._v, optics.polarisation, math.radians(optics.linear_angle_deg))
        field = debye_pupil_field(self._u, self._v, na, n, jones) * t(w2)  # (3, 2, Na, Nc)
        self._pupil_field = field.to(self.cdtype).permute(1, 2, 0, 3).contiguous()  # (2, Na, 3, Nc)
        self._w2 = t(w2)
        self._other_hand_field: torch.Tensor | None = None
        self._kz_np = 2 * np.pi / lam * np.sqrt(n**2 - (na * rho[0]) ** 2)  # (Na, Nc), same for set 1
        self._kz_t = t(self._kz_np)
        self._centred_mask_phase = beam_phase(
            self._u, self._v, optics.beam, optics.vortex_charge, optics.tophat_radius
        )

        # --- output grid kernels
        self.coords_um = (np.arange(self.n_px) - self.n_px // 2) * self.pixel_size_um  # centre n//2
        self._grid = self._make_grid(self.coords_um, self.z_um)
        self._peak = 1.0
        self._peak = self._unaberrated_peak()

    def _make_grid(self, coords_um: np.ndarray, z_um: np.ndarray) -> dict[str, torch.Tensor]:
        """Kernels for an output grid: ``fx`` (n, Na) = exp(-i kx(u_i) x); ``chord`` (Na, Nc, n + nz):
        exp(-i ky(v_ij) y) for the xy section followed by exp(i kz_ij z) for the xz/yz sections."""
        c = lambda a: torch.as_tensor(a, dtype=self.cdtype, device=self.device)  # noqa: E731
        fx = np.exp(-1j * self._kappa * np.outer(coords_um, self._u_nodes))
        ky = np.exp(-1j * self._kappa * self._v_nodes[..., None] * coords_um)
        kz = np.exp(1j * self._kz_np[..., None] * np.asarray(z_um, dtype=float))
        return {"fx": c(fx), "chord": c(np.concatenate([ky, kz], axis=-1)), "n": len(coords_um), "nz": len(z_um)}

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_settings(cls, settings: "str | Settings | None" = None, **overrides: Any) -> "PSFSimulator":
        """Build from a settings file or object. Keyword overrides: any ``Optics`` field
        (e.g. ``beam='tophat'``, ``polarisation='linear'``) and ``pixel_size_um``, ``n_px``,
        ``z_um``, ``pupil_samples``, ``n_modes``, ``device``, ``dtype``."""
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
        """Pupil quadrature nodes (u, v) in pupil radii, each of shape (2, Na, Nc): set 0 is used
        for the xy and xz sections and stacks, set 1 (u and v swapped) for the yz section. A
        ``pupil_phase`` passed to the simulator must be sampled at these points (same shape)."""
        return self._u_np.copy(), self._v_np.copy()

    def scalar_pupil(
        self,
        coefficients: torch.Tensor,
        mask_offsets: torch.Tensor,
        pupil_phase: torch.Tensor | None = None,
        include_mask: bool = True,
    ) -> torch.Tensor:
        """Scalar pupil factor (B, 2, Na, Nc) at the nodes: exp(i (mask + aberration + pupil_phase)).

        ``coefficients`` (B, n_modes) radians (column k = Noll k+1); ``mask_offsets`` (B, 2)
        pupil radii (x, y). The mask is a phase (vortex: l atan2; top-hat: pi inside its disc),
        recomputed only when an offset is non-zero or a gradient with respect to it is wanted.
        ``pupil_phase`` (2, Na, Nc) or (B, 2, Na, Nc) radians at :meth:`pupil_coordinates` is added;
        ``include_mask=False`` leaves the beam's own mask out (when ``pupil_phase`` carries it,
        e.g. decoded from an SLM)."""
        b = coefficients.shape[0]
        phase = (coefficients @ self._basis).reshape((b,) + self._u.shape)
        if pupil_phase is not None:
            phase = phase + torch.as_tensor(pupil_phase, dtype=self.rdtype, device=self.device)
        if not include_mask:
            pass
        elif mask_offsets.requires_grad or bool(torch.any(mask_offsets != 0)):
            o = self.optics
            phase = phase + beam_phase(
                self._u, self._v, o.beam, o.vortex_charge, o.tophat_radius,
                mask_offsets[:, 0, None, None, None], mask_offsets[:, 1, None, None, None],
            )
        else:
            phase = phase + self._centred_mask_phase
        return torch.polar(torch.ones_like(phase), phase)  # (B, 2, Na, Nc) scalar pupil

    # ------------------------------------------------------------------ transforms
    # ------------------------------------------------------------------ polarisation
    def _opposite_hand_field(self) -> torch.Tensor:
        """Vector pupil field (2, Na, 3, Nc) of the opposite circular hand (weights included)."""
        if self._other_hand_field is None:
            pol = self.optics.polarisation
            if pol not in ("circular_plus", "circular_minus"):
                raise ValueError(
                    f"a wrong-hand polarisation fraction needs circular polarisation, not {pol!r}")
            other = "circular_minus" if pol == "circular_plus" else "circular_plus"
            o = self.optics
            jones = input_jones(self._u, self._v, other)
            field = debye_pupil_field(self._u, self._v, o.numerical_aperture, o.immersion_index, jones) * self._w2
            self._other_hand_field = field.to(self.cdtype).permute(1, 2, 0, 3).contiguous()
        return self._other_hand_field

    def pupil_field(self, wrong_hand_fraction: Any = 0.0, wrong_hand_phase_rad: Any = 0.0) -> torch.Tensor:
        """Vector pupil field (2, Na, 3, Nc) of an impure circular input polarisation.

        The input Jones vector is ``sqrt(1 - f) e_right + sqrt(f) exp(i phi) e_wrong`` with
        ``e_right`` the configured circular hand (``optics.polarisation``), ``e_wrong`` the
        opposite one, ``f = wrong_hand_fraction`` the fraction of the INTENSITY in the wrong hand
        (0..1) and ``phi = wrong_hand_phase_rad`` their relative phase (a coherent mixture: an
        elliptical polarisation whose ellipse azimuth is ``phi / 2``). ``f`` and ``phi`` may be
        torch scalars (differentiable). ``f = 0`` returns the pure field. For a charge +1 vortex
        the wrong hand fills the centre: the on-axis intensity is ``f`` times the opposite-hand
        beam's, about ``f`` of the donut's ring peak."""
        f = torch.as_tensor(wrong_hand_fraction, dtype=self.rdtype, device=self.device)
        if not f.requires_grad and float(f) == 0.0:
            return self._pupil_field
        if not bool(torch.all((f >= 0) & (f <= 1))):
            raise ValueError(f"wrong_hand_fraction = {float(f)!r}: expected 0..1 (fraction of the intensity)")
        phi = torch.as_tensor(wrong_hand_phase_rad, dtype=self.rdtype, device=self.device)
        a = torch.sqrt(1 - f).to(self.cdtype)
        b = torch.polar(torch.sqrt(f), phi).to(self.cdtype)
        return a * self._pupil_field + b * self._opposite_hand_field()

    # ------------------------------------------------------------------ transforms
    def _chord_sums(self, scalar: torch.Tensor, node_set: int, chord: torch.Tensor,
                    pupil_field: torch.Tensor | None = None) -> torch.Tensor:
        """sum_j P(u_i, v_ij) K[i, j, k] for each u node: (Na, B 3, k).

        ``scalar`` (B, Na, Nc) on node set ``node_set``; the vector pupil is laid out
        (Na, B 3, Nc) so the chord sums are one batched matrix product over the Na nodes."""
        b, n_a, n_c = scalar.shape
        field = self._pupil_field if pupil_field is None else pupil_field
        vec = scalar.transpose(0, 1)[:, :, None, :] * field[node_set][:, None]
        return torch.bmm(vec.reshape(n_a, b * 3, n_c), chord)

    def _sections(self, scalar: torch.Tensor, grid: dict[str, Any],
                  pupil_field: torch.Tensor | None = None) -> torch.Tensor:
        """Intensities (B, 3, n|nz, n): xy[y, x], xz[z, x], yz[z, y] on ``grid``."""
        b = scalar.shape[0]
        n, nz = grid["n"], grid["nz"]
        n_a = scalar.shape[2]
        d0 = self._chord_sums(scalar[:, 0], 0, grid["chord"], pupil_field)  # xy and xz: (Na, B 3, n + nz)
        d1 = self._chord_sums(scalar[:, 1], 1, grid["chord"][..., n:], pupil_field)  # yz: (Na, B 3, nz)
        f = grid["fx"] @ torch.cat([d0.reshape(n_a, -1), d1.reshape(n_a, -1)], dim=1)
        power = f.real**2 + f.imag**2  # |E|^2 without the square root of abs()
        i0 = power[:, : d0[0].numel()].reshape(n, b, 3, n + nz).sum(dim=2)  # (x, B, k)
        i1 = power[:, d0[0].numel() :].reshape(n, b, 3, nz).sum(dim=2)
        xy = i0[..., :n].permute(1, 2, 0)  # (B, y, x)
        xz = i0[..., n:].permute(1, 2, 0)  # (B, z, x)
        yz = i1.permute(1, 2, 0)  # (B, z, y)
        if n != nz:
            return xy, xz, yz  # type: ignore[return-value]
        return torch.stack([xy, xz, yz], dim=1)

    def _plane_fields(self, scalar: torch.Tensor, z_um: np.ndarray,
                      pupil_field: torch.Tensor | None = None, grid: dict[str, Any] | None = None) -> torch.Tensor:
        """Complex fields (B, 3, nz, n, n) in xy planes at ``z_um`` (node set 0): the axial phase
        kz z joins the scalar pupil, so every plane is one more batch entry of the chord sums."""
        b = scalar.shape[0]
        grid = self._grid if grid is None else grid
        n = grid["n"]
        z = torch.as_tensor(np.asarray(z_um, dtype=float).ravel(), dtype=self.rdtype, device=self.device)
        defocus = torch.polar(torch.ones((), dtype=self.rdtype, device=self.device), z[:, None, None] * self._kz_t)
        planes = (scalar[:, None, 0] * defocus[None]).reshape(-1, *self._kz_t.shape)  # (B nz, Na, Nc)
        d = self._chord_sums(planes, 0, grid["chord"][..., :n], pupil_field)  # (Na, B nz 3, y)
        f = grid["fx"] @ d.reshape(d.shape[0], -1)  # (x, B nz 3 y)
        return f.reshape(n, b, len(z), 3, n).permute(1, 3, 2, 4, 0)  # (B, 3, z, y, x)

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
        include_mask: bool = True, pupil_field: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Differentiable ortho-sections (B, 3, n, n): xy (z = 0), xz (y = 0), yz (x = 0).

        Needs ``len(z_um) == n_px``. See :meth:`scalar_pupil` for ``pupil_phase``/``include_mask``;
        ``pupil_field`` (from :meth:`pupil_field`) replaces the pure input polarisation."""
        if len(self.z_um) != self.n_px:
            raise ValueError("ortho-sections need as many z planes as pixels; use stack() instead")
        c, o = self._prepare(coefficients, mask_offsets, batch=True)
        scalar = self.scalar_pupil(c, o, pupil_phase, include_mask)
        return self._sections(scalar, self._grid, pupil_field) / self._peak

    def stack_torch(
        self, coefficients: torch.Tensor, mask_offsets: torch.Tensor, z_um: Any = None,
        pupil_phase: Any = None, include_mask: bool = True, pupil_field: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Differentiable stacks (B, nz, n, n) at ``z_um`` (default: the simulator's planes).

        A bead (or sample) displaced by (dx, dy) from the grid centre is imaged exactly by adding
        tip/tilt ``pi NA d / lambda`` (Fourier shift); a focus offset by shifting ``z_um``.
        ``pupil_field`` (from :meth:`pupil_field`) replaces the pure input polarisation."""
        c, o = self._prepare(coefficients, mask_offsets, batch=True)
        z = self.z_um if z_um is None else np.asarray(z_um, dtype=float).ravel()
        scalar = self.scalar_pupil(c, o, pupil_phase, include_mask)
        out = [self._intensity(self._plane_fields(scalar, z[i : i + 32], pupil_field))
               for i in range(0, len(z), 32)]
        return torch.cat(out, dim=1) / self._peak

    def intensity_at(
        self, x_um: Any, y_um: Any, z_um: float, coefficients: CoefficientsLike | None = None,
        pupil_phase: Any = None, include_mask: bool = True, pupil_field: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Exact (quadrature) intensity on an arbitrary separable grid: ``y_um`` x ``x_um`` points
        (1-D arrays, µm) in the plane ``z_um``; returns (ny, nx) normalised to the unaberrated
        peak. No interpolation: each point is its own Debye integral (used for the sub-nm
        null search of :meth:`simulation.microscope.SimulatedMicroscope.true_null_depth`).
        Needs ``len(x_um) == len(y_um)``."""
        x = np.asarray(x_um, dtype=float).ravel()
        y = np.asarray(y_um, dtype=float).ravel()
        if len(x) != len(y):
            raise ValueError("intensity_at needs as many x as y points")
        c, o = self._prepare({} if coefficients is None else coefficients, (0.0, 0.0), batch=False)
        scalar = self.scalar_pupil(c, o, pupil_phase, include_mask)
        # a grid whose lateral kernels use x for fx and y for the chord (ky)
        cd = lambda a: torch.as_tensor(a, dtype=self.cdtype, device=self.device)  # noqa: E731
        grid = {"fx": cd(np.exp(-1j * self._kappa * np.outer(x, self._u_nodes))),
                "chord": cd(np.exp(-1j * self._kappa * self._v_nodes[..., None] * y)), "n": len(x), "nz": 0}
        with torch.no_grad():
            f = self._plane_fields(scalar, np.array([z_um]), pupil_field, grid)
        return (self._intensity(f)[0, 0] / self._peak).cpu().numpy()

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
        pupil_phase: Any = None, include_mask: bool = True, pupil_field: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Intensity stack (nz, n, n) at ``z_um`` (default: the simulator's planes), normalised to
        the unaberrated beam's peak. See :meth:`stack_torch`."""
        c, o = self._prepare(coefficients, mask_offset, batch=False)
        with torch.no_grad():
            return self.stack_torch(c, o, z_um, pupil_phase, include_mask, pupil_field)[0].cpu().numpy()

    def field(self, coefficients: CoefficientsLike, mask_offset: Sequence[float] = (0.0, 0.0), z_um: float = 0.0) -> np.ndarray:
        """Complex focal field (3, n, n) (components x, y, z) in the plane ``z_um``,
        in units where the unaberrated peak intensity is 1."""
        c, o = self._prepare(coefficients, mask_offset, batch=False)
        with torch.no_grad():
            f = self._plane_fields(self.scalar_pupil(c, o), np.array([z_um]))[0, :, 0]
        return (f / math.sqrt(self._peak)).cpu().numpy()

    # ------------------------------------------------------------------ normalisation
    def _unaberrated_peak(self) -> float:
        """Peak intensity of the unaberrated beam, found on a fine grid around the focus
        (xy plane, and the xz/yz sections through the axis for beams that peak off-plane)."""
        lam_na = self.optics.wavelength_um / self.optics.numerical_aperture
        coords = (np.arange(97) - 48) * (lam_na / 40)
        z = (np.arange(97) - 48) * (4 * lam_na / 96)
        grid = self._make_grid(coords, z)
        c = torch.zeros(1, self.n_modes, dtype=self.rdtype, device=self.device)
        o = torch.zeros(1, 2, dtype=self.rdtype, device=self.device)
        with torch.no_grad():
            sections = self._sections(self.scalar_pupil(c, o), grid)
        return float(max(s.max() for s in sections))


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
