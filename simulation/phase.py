"""Pupil phases on a square pupil grid: the float phases (radians) that ``hardware.SLM.show`` takes.

Grid convention (shared with :class:`hardware.slm.convert.PhaseToGrey`)
-----------------------------------------------------------------------
An ``m x m`` grid spans the pupil diameter: pupil coordinates ``u`` (x) and ``v`` (y) in pupil
radii, cell centres at ``-1 + (i + 0.5) * 2 / m``, arrays indexed ``[v, u]`` (row = y). A cell is
inside the pupil when its centre has ``u^2 + v^2 <= 1``. Every function returns ``0`` outside the
pupil. Phases are float radians, *not* wrapped (wrapping happens once, at the SLM's edge).

Zernikes are the RMS-normalised Noll polynomials of :mod:`simulation.zernike`; coefficients are a
dict ``{Noll: rad}`` or an array whose column ``k`` is Noll ``k + 1``. The vortex is
``charge * atan2(v - oy, u - ox)`` (values in ``(-pi |l|, pi |l|]``), the top-hat ``pi`` inside a
disc, exactly as :func:`simulation.pupil.beam_phase` (so the SLM shows what the simulator models).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from autoalign.simulation.zernike import CoefficientsLike, coefficients_to_array, zernike, zernike_basis

__all__ = [
    "pupil_grid",
    "zernike_phase",
    "vortex_phase",
    "tophat_phase",
    "mask_phase",
    "total_phase",
    "fit_zernike",
]


def _check_m(m: int) -> int:
    if isinstance(m, bool) or int(m) != m or m < 1:
        raise ValueError(f"pupil grid size m = {m!r}: expected an integer >= 1")
    return int(m)


def pupil_grid(m: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell centres of the ``m x m`` pupil grid.

    Returns ``(u, v, inside)``, each ``(m, m)`` indexed ``[v, u]``: ``u`` and ``v`` in pupil radii
    (``u[i, j] = v[j, i] = -1 + (j + 0.5) * 2 / m``) and the boolean ``inside = u^2 + v^2 <= 1``."""
    m = _check_m(m)
    centres = -1.0 + (np.arange(m) + 0.5) * (2.0 / m)
    u, v = np.meshgrid(centres, centres, indexing="xy")
    return u, v, (u * u + v * v) <= 1.0


def zernike_phase(coefficients: CoefficientsLike, m: int) -> np.ndarray:
    """Sum of ``c_j Z_j`` (radians) on the ``m x m`` pupil grid, 0 outside the pupil.

    ``coefficients``: dict ``{Noll: rad}`` or 1-D array (column ``k`` = Noll ``k + 1``); piston
    included if given. Raises ``ValueError`` for NaN/inf or invalid Noll indices."""
    u, v, inside = pupil_grid(m)
    arr = coefficients_to_array(coefficients)
    if arr.ndim != 1:
        raise ValueError(f"expected one set of Zernike coefficients, got shape {arr.shape}")
    out = np.zeros((m, m))
    nz = np.flatnonzero(arr)
    if nz.size == 0:
        return out
    rho = np.hypot(u[inside], v[inside])
    theta = np.arctan2(v[inside], u[inside])
    vals = np.zeros(rho.shape)
    for k in nz:
        vals += arr[k] * zernike(int(k) + 1, rho, theta)
    out[inside] = vals
    return out


def vortex_phase(charge: int, m: int, offset: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """Vortex ``charge * atan2(v - oy, u - ox)`` (radians) on the grid, 0 outside the pupil.

    ``offset`` ``(ox, oy)``: the singularity's position in pupil radii (a shifted vortex mask)."""
    u, v, inside = pupil_grid(m)
    ox, oy = _offset(offset)
    out = float(charge) * np.arctan2(v - oy, u - ox)
    return np.where(inside, out, 0.0)


def tophat_phase(
    m: int, radius: float = 1 / math.sqrt(2), offset: Sequence[float] = (0.0, 0.0)
) -> np.ndarray:
    """Top-hat (z-STED) mask: ``pi`` inside a disc of ``radius`` pupil radii centred at
    ``offset`` (strictly inside, as :func:`simulation.pupil.beam_phase`), 0 elsewhere."""
    if not 0 < radius:
        raise ValueError(f"top-hat radius = {radius!r}: expected > 0 (pupil radii)")
    u, v, inside = pupil_grid(m)
    ox, oy = _offset(offset)
    disc = (u - ox) ** 2 + (v - oy) ** 2 < radius**2
    return np.where(inside & disc, math.pi, 0.0)


def _offset(offset: Sequence[float]) -> tuple[float, float]:
    try:
        ox, oy = (float(o) for o in offset)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"mask offset = {offset!r}: expected two numbers (x, y) in pupil radii") from exc
    if not (math.isfinite(ox) and math.isfinite(oy)):
        raise ValueError(f"mask offset = {offset!r}: expected finite numbers")
    return ox, oy


def _optics(beam: Any) -> Any:
    """Accept a Settings (uses ``.optics``), an OpticsSettings/``simulation.vectorial.Optics`` or
    any object with ``beam``, ``vortex_charge`` and ``tophat_radius``."""
    if hasattr(beam, "optics") and not hasattr(beam, "beam"):
        beam = beam.optics
    missing = [a for a in ("beam", "vortex_charge", "tophat_radius") if not hasattr(beam, a)]
    if missing:
        raise TypeError(
            f"expected Settings or optics settings with beam, vortex_charge and tophat_radius; "
            f"{type(beam).__name__} lacks {', '.join(missing)}"
        )
    return beam


def mask_phase(beam: Any, m: int, offset: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """The beam's own mask (radians) on the grid: vortex of ``vortex_charge``, top-hat of
    ``tophat_radius`` or nothing (``beam: none``), centred at ``offset`` (pupil radii).

    ``beam``: :class:`app.settings.Settings`, its ``optics`` section, or
    :class:`simulation.vectorial.Optics`."""
    o = _optics(beam)
    if o.beam == "vortex":
        return vortex_phase(int(o.vortex_charge), m, offset)
    if o.beam == "tophat":
        return tophat_phase(m, float(o.tophat_radius), offset)
    if o.beam == "none":
        _check_m(m)
        _offset(offset)
        return np.zeros((int(m), int(m)))
    raise ValueError(f"optics.beam = {o.beam!r}: expected 'vortex', 'tophat' or 'none'")


def total_phase(
    beam: Any,
    m: int,
    coefficients: CoefficientsLike | None = None,
    mask_offset: Sequence[float] = (0.0, 0.0),
) -> np.ndarray:
    """What the SLM shows for one beam: its mask (shifted by ``mask_offset`` pupil radii) plus the
    Zernike correction ``coefficients`` (radians), on the ``m x m`` grid, 0 outside the pupil.

    ``beam`` as in :func:`mask_phase` (``Settings`` works: ``total_phase(settings, m, ...)``)."""
    phase = mask_phase(beam, m, mask_offset)
    if coefficients is not None:
        phase = phase + zernike_phase(coefficients, m)
    return phase


def fit_zernike(
    phase: np.ndarray, n_modes: int = 22, inside: np.ndarray | None = None
) -> np.ndarray:
    """Least-squares Zernike coefficients (Noll 1..``n_modes``, radians) of a phase on a pupil
    grid (``[v, u]``, square), over the cells inside the pupil (or the given boolean mask).

    The phase must be continuous (not wrapped) for the fit to mean anything. When the grid has
    fewer pupil cells than modes, the modes are limited to what it can resolve (the rest are 0)."""
    phase = np.asarray(phase, dtype=float)
    if phase.ndim != 2 or phase.shape[0] != phase.shape[1]:
        raise ValueError(f"phase of shape {phase.shape}: expected a square 2-D pupil grid")
    u, v, grid_inside = pupil_grid(phase.shape[0])
    inside = grid_inside if inside is None else np.asarray(inside, dtype=bool) & grid_inside
    out = np.zeros(int(n_modes))
    n_fit = min(int(n_modes), int(inside.sum()))
    if n_fit < 1:
        return out
    rho = np.hypot(u[inside], v[inside])
    theta = np.arctan2(v[inside], u[inside])
    basis = zernike_basis(n_fit, rho, theta)  # (J, N)
    coef, *_ = np.linalg.lstsq(basis.T, phase[inside], rcond=None)
    out[:n_fit] = coef
    return out
