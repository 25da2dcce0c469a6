"""Conversions between focus displacement and the Zernike tip, tilt and defocus that cause it.

Frame (the simulator's and the loop's): positive tip (Noll 2) moves the focus to +x, positive
tilt (Noll 3) to +y, positive defocus (Noll 4) towards +z. Coefficients in radians of
RMS-normalised Zernikes; displacements in micrometres.

* Lateral, exact for the Debye integral: ``dx = c2 lambda / (pi NA)``.
* Axial: a displacement ``dz`` adds the phase ``k dz sqrt(n^2 - NA^2 rho^2)`` over the pupil; its
  least-squares projection on Z4 over the unit disk gives the Noll-4 coefficient per micrometre
  (at high NA a defocus Zernike is not a pure shift, so the empirical poke calibration in
  :mod:`calibration.poke` should be preferred when it exists).

Shared by the physics floor (the data-set writer's centring, :mod:`simulation.dataset`) and the
analysis above it (``calibration.measurement``, ``calibration.poke``; ``calibration.optics``
re-exports these names); imports nothing of the project.
"""
from __future__ import annotations

import math

from scipy import integrate


def tip_tilt_per_um(numerical_aperture: float, wavelength_um: float) -> float:
    """Noll-2/3 coefficient (rad) per micrometre of lateral focus shift: pi NA / lambda."""
    return math.pi * numerical_aperture / wavelength_um


def defocus_per_um(numerical_aperture: float, immersion_index: float, wavelength_um: float) -> float:
    """Noll-4 coefficient (rad) per micrometre of axial focus shift (projection of the exact
    high-NA defocus phase on Z4 = sqrt(3) (2 rho^2 - 1)); paraxially ``pi NA^2 / (2 sqrt3 n lambda)``."""
    k = 2 * math.pi / wavelength_um

    def integrand(rho: float) -> float:
        phase = k * math.sqrt(immersion_index**2 - (numerical_aperture * rho) ** 2)
        return phase * math.sqrt(3) * (2 * rho**2 - 1) * 2 * rho  # mean over the disk: 2 rho drho

    value, _ = integrate.quad(integrand, 0.0, 1.0)
    # the Z4 coefficient of phase(rho) is <phase, Z4>; a positive kz dz decreases towards the
    # edge, so the projection is negative; +z (away from the objective) needs +c4 in our frame.
    return -value


def shift_to_zernike(
    dx_um: float, dy_um: float, dz_um: float, numerical_aperture: float, immersion_index: float,
    wavelength_um: float,
) -> dict[int, float]:
    """Tip, tilt and defocus {2, 3, 4: rad} that move the focus by (dx, dy, dz) micrometres."""
    lateral = tip_tilt_per_um(numerical_aperture, wavelength_um)
    axial = defocus_per_um(numerical_aperture, immersion_index, wavelength_um)
    return {2: lateral * dx_um, 3: lateral * dy_um, 4: axial * dz_um}


def zernike_to_shift(
    coefficients: dict[int, float], numerical_aperture: float, immersion_index: float, wavelength_um: float
) -> tuple[float, float, float]:
    """Inverse of :func:`shift_to_zernike`: (dx, dy, dz) micrometres from {2, 3, 4: rad}."""
    lateral = tip_tilt_per_um(numerical_aperture, wavelength_um)
    axial = defocus_per_um(numerical_aperture, immersion_index, wavelength_um)
    return (
        coefficients.get(2, 0.0) / lateral,
        coefficients.get(3, 0.0) / lateral,
        coefficients.get(4, 0.0) / axial,
    )


def paraxial_defocus_per_um(numerical_aperture: float, immersion_index: float, wavelength_um: float) -> float:
    """Low-NA limit of :func:`defocus_per_um`, for reference."""
    return math.pi * numerical_aperture**2 / (2 * math.sqrt(3) * immersion_index * wavelength_um)


__all__ = [
    "tip_tilt_per_um",
    "defocus_per_um",
    "shift_to_zernike",
    "zernike_to_shift",
    "paraxial_defocus_per_um",
]
