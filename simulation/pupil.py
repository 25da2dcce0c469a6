"""Pupil functions of the focused beam: beam masks, their lateral offset, input polarisation, and
the vectorial (Richards-Wolf) pupil field with aplanatic apodisation.

Pupil coordinates ``(u, v)`` are Cartesian, in units of the pupil radius (unit radius at the
objective's NA); ``u`` along x, ``v`` along y. All functions take torch tensors (any shape,
broadcasting) so they are differentiable and run on CPU or CUDA.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

Beam = Literal["vortex", "tophat", "none"]
Polarisation = Literal["circular_plus", "circular_minus", "linear", "radial", "azimuthal"]


def beam_phase(
    u: torch.Tensor,
    v: torch.Tensor,
    beam: Beam,
    vortex_charge: int = 1,
    tophat_radius: float = 1 / math.sqrt(2),
    offset_x: torch.Tensor | float = 0.0,
    offset_y: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Phase (radians) of the beam's mask, centred at ``(offset_x, offset_y)`` pupil radii.

    * ``vortex``: ``l atan2(v - oy, u - ox)`` with charge ``l`` (2D STED donut).
    * ``tophat``: pi inside a disc of ``tophat_radius`` pupil radii, 0 outside (z-STED). Its hard
      edge has no gradient with respect to the offset.
    * ``none``: 0 (Gaussian focus, or the fluorescence PSF).
    Offsets broadcast against ``u, v`` (e.g. shape (B, 1, 1) for a batch).
    """
    du = u - offset_x
    dv = v - offset_y
    if beam == "vortex":
        return vortex_charge * torch.atan2(dv, du)
    if beam == "tophat":
        inside = (du * du + dv * dv) < tophat_radius**2
        return torch.where(inside, math.pi, 0.0) + 0 * du
    if beam == "none":
        return torch.zeros_like(du)
    raise ValueError(f"beam must be 'vortex', 'tophat' or 'none', got {beam!r}")


def beam_mask(
    u: torch.Tensor,
    v: torch.Tensor,
    beam: Beam,
    vortex_charge: int = 1,
    tophat_radius: float = 1 / math.sqrt(2),
    offset_x: torch.Tensor | float = 0.0,
    offset_y: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Complex transmission ``exp(i beam_phase)`` of the mask (see :func:`beam_phase`)."""
    phase = beam_phase(u, v, beam, vortex_charge, tophat_radius, offset_x, offset_y)
    return torch.polar(torch.ones_like(phase), phase)


def input_jones(
    u: torch.Tensor, v: torch.Tensor, polarisation: Polarisation, linear_angle_rad: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Jones vector (Ex, Ey) of the beam entering the objective, unit intensity.

    ``circular_plus`` is (1, +i)/sqrt(2), ``circular_minus`` (1, -i)/sqrt(2) (the field
    convention is ``exp(-i omega t)``; a vortex of charge +1 needs ``circular_plus`` for a dark
    centre). ``radial`` is (cos phi, sin phi), ``azimuthal`` (-sin phi, cos phi).
    """
    zero = torch.zeros_like(u)
    one = torch.ones_like(u)
    s = 1 / math.sqrt(2)
    if polarisation == "circular_plus":
        return torch.complex(one * s, zero), torch.complex(zero, one * s)
    if polarisation == "circular_minus":
        return torch.complex(one * s, zero), torch.complex(zero, -one * s)
    if polarisation == "linear":
        return (
            torch.complex(one * math.cos(linear_angle_rad), zero),
            torch.complex(one * math.sin(linear_angle_rad), zero),
        )
    if polarisation in ("radial", "azimuthal"):
        phi = torch.atan2(v, u)
        c, sn = torch.cos(phi), torch.sin(phi)
        if polarisation == "radial":
            return torch.complex(c, zero), torch.complex(sn, zero)
        return torch.complex(-sn, zero), torch.complex(c, zero)
    raise ValueError(
        "polarisation must be circular_plus, circular_minus, linear, radial or azimuthal, "
        f"got {polarisation!r}"
    )


def debye_pupil_field(
    u: torch.Tensor,
    v: torch.Tensor,
    numerical_aperture: float,
    immersion_index: float,
    jones: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Focal-space field vector in the pupil, per unit area of (sx, sy), shape (3, *u.shape).

    Richards-Wolf with the aplanatic factor ``sqrt(cos theta)`` and the change of variables
    ``dOmega = dsx dsy / cos theta``, so the weight is ``1 / sqrt(cos theta)``, where
    ``sin theta = NA rho / n``. Each input component is rotated onto the meridional (p) and
    azimuthal (s) directions; p is bent by theta onto the converging ray. Components: (x, y, z).
    """
    ex, ey = jones
    rho2 = u * u + v * v
    sin_t = torch.sqrt(rho2) * (numerical_aperture / immersion_index)
    cos_t = torch.sqrt(torch.clamp(1 - sin_t * sin_t, min=1e-12))
    phi = torch.atan2(v, u)
    cp, sp = torch.cos(phi), torch.sin(phi)
    apod = 1 / torch.sqrt(cos_t)
    # radial (p) and azimuthal (s) components of the input field
    e_p = ex * cp + ey * sp
    e_s = -ex * sp + ey * cp
    fx = e_p * (cos_t * cp) - e_s * sp
    fy = e_p * (cos_t * sp) + e_s * cp
    fz = -e_p * sin_t
    return torch.stack([fx, fy, fz]) * apod
