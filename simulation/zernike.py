"""Zernike polynomials: Noll indexing, RMS normalisation over the unit pupil, radians of phase.

Conventions
-----------
* Noll index ``j`` from 1. ``(n, m)``: radial order ``n``, signed azimuthal frequency ``m``;
  ``m > 0`` is the cosine term, ``m < 0`` the sine term (Noll: even ``j`` cosine, odd ``j`` sine).
* RMS-normalised: the mean of ``Z_j**2`` over the unit disk is 1, so a coefficient of ``c`` radians
  contributes ``c`` radians RMS of wavefront phase. ``Z_1 = 1``, ``Z_2 = 2 rho cos(theta)``,
  ``Z_4 = sqrt(3) (2 rho^2 - 1)``.
* ANSI/OSA index ``j_ansi = (n (n + 2) + m) / 2`` from 0, with the same sign convention for ``m``.
* Coefficient arrays: column ``k`` is Noll index ``k + 1``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

CoefficientsLike = Union[Mapping[int, float], Sequence[float], np.ndarray]

MODE_NAMES: dict[int, str] = {
    1: "piston",
    2: "tip (x tilt)",
    3: "tilt (y tilt)",
    4: "defocus",
    5: "oblique astigmatism",
    6: "vertical astigmatism",
    7: "vertical coma",
    8: "horizontal coma",
    9: "vertical trefoil",
    10: "oblique trefoil",
    11: "primary spherical",
    12: "vertical secondary astigmatism",
    13: "oblique secondary astigmatism",
    14: "vertical quadrafoil",
    15: "oblique quadrafoil",
    16: "horizontal secondary coma",
    17: "vertical secondary coma",
    22: "secondary spherical",
}


def mode_name(noll: int) -> str:
    """Human name of a Noll mode (e.g. 7 -> 'vertical coma'); falls back to 'Z_j (n, m)'."""
    if noll in MODE_NAMES:
        return MODE_NAMES[noll]
    n, m = noll_to_nm(noll)
    return f"Z{noll} (n={n}, m={m})"


def noll_to_nm(j: int) -> tuple[int, int]:
    """Noll index (from 1) to radial order n and signed azimuthal frequency m."""
    if int(j) != j or j < 1:
        raise ValueError(f"Noll index must be an integer >= 1, got {j!r}")
    n = 0
    j1 = j - 1
    while j1 > n:
        n += 1
        j1 -= n
    m = (-1) ** j * ((n % 2) + 2 * int((j1 + ((n + 1) % 2)) / 2.0))
    return n, m


def nm_to_noll(n: int, m: int) -> int:
    """Inverse of :func:`noll_to_nm`."""
    if n < 0 or abs(m) > n or (n - abs(m)) % 2:
        raise ValueError(f"invalid Zernike (n, m) = ({n}, {m})")
    j = n * (n + 1) // 2 + 1  # first index of order n
    for jj in range(j, j + n + 1):
        if noll_to_nm(jj) == (n, m):
            return jj
    raise AssertionError("unreachable")  # pragma: no cover


def nm_to_ansi(n: int, m: int) -> int:
    """(n, m) to the ANSI/OSA single index (from 0)."""
    if n < 0 or abs(m) > n or (n - abs(m)) % 2:
        raise ValueError(f"invalid Zernike (n, m) = ({n}, {m})")
    return (n * (n + 2) + m) // 2


def ansi_to_nm(j: int) -> tuple[int, int]:
    """ANSI/OSA index (from 0) to (n, m)."""
    if int(j) != j or j < 0:
        raise ValueError(f"ANSI index must be an integer >= 0, got {j!r}")
    n = int(math.ceil((-3 + math.sqrt(9 + 8 * j)) / 2))
    m = 2 * j - n * (n + 2)
    return n, m


def noll_to_ansi(j: int) -> int:
    return nm_to_ansi(*noll_to_nm(j))


def ansi_to_noll(j: int) -> int:
    return nm_to_noll(*ansi_to_nm(j))


def radial(n: int, m: int, rho: np.ndarray) -> np.ndarray:
    """Radial polynomial R_n^|m|(rho) by its explicit sum."""
    m = abs(m)
    out = np.zeros_like(np.asarray(rho, dtype=float))
    for k in range((n - m) // 2 + 1):
        c = (-1) ** k * math.factorial(n - k) / (
            math.factorial(k) * math.factorial((n + m) // 2 - k) * math.factorial((n - m) // 2 - k)
        )
        out = out + c * rho ** (n - 2 * k)
    return out


def zernike(j: int, rho: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """RMS-normalised Zernike ``Z_j`` at polar pupil coordinates (rho in pupil radii, theta in rad).

    Values outside the unit disk are the polynomial's continuation (callers mask the pupil).
    """
    n, m = noll_to_nm(j)
    norm = math.sqrt(n + 1) if m == 0 else math.sqrt(2 * (n + 1))
    r = radial(n, m, np.asarray(rho, dtype=float))
    if m > 0:
        return norm * r * np.cos(m * theta)
    if m < 0:
        return norm * r * np.sin(-m * theta)
    return norm * r


def zernike_basis(n_modes: int, rho: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Stack of Z_1..Z_{n_modes}: shape (n_modes, *rho.shape)."""
    return np.stack([zernike(j, rho, theta) for j in range(1, n_modes + 1)])


def coefficients_to_array(coefficients: CoefficientsLike, n_modes: int | None = None) -> np.ndarray:
    """Dict {Noll: rad} or array (column k = Noll k+1) to a float array of Noll 1..n_modes.

    Arrays may be 1-D (one set) or 2-D (batch, modes). ``n_modes`` pads with zeros; a coefficient
    beyond ``n_modes`` that is non-zero raises ``ValueError``.
    """
    if isinstance(coefficients, Mapping):
        if not coefficients:
            return np.zeros(n_modes or 1)
        bad = [k for k in coefficients if int(k) != k or k < 1]
        if bad:
            raise ValueError(f"Zernike keys must be Noll indices >= 1, got {bad}")
        size = max(int(k) for k in coefficients)
        arr = np.zeros(max(size, n_modes or 0))
        for k, v in coefficients.items():
            arr[int(k) - 1] = float(v)
    else:
        arr = np.asarray(coefficients, dtype=float)
        if arr.ndim not in (1, 2):
            raise ValueError(f"coefficient array must be 1-D or 2-D, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("Zernike coefficients contain NaN or infinity")
    if n_modes is not None:
        size = arr.shape[-1]
        if size > n_modes:
            if np.any(arr[..., n_modes:] != 0):
                raise ValueError(
                    f"coefficients up to Noll {size} given, the simulator handles Noll 1..{n_modes}"
                )
            arr = arr[..., :n_modes]
        elif size < n_modes:
            pad = [(0, 0)] * (arr.ndim - 1) + [(0, n_modes - size)]
            arr = np.pad(arr, pad)
    return arr


def array_to_dict(array: Sequence[float], modes: Sequence[int] | None = None) -> dict[int, float]:
    """Array to {Noll: rad}. Without ``modes``, column k is Noll k+1."""
    modes = list(modes) if modes is not None else list(range(1, len(array) + 1))
    if len(modes) != len(array):
        raise ValueError(f"{len(array)} coefficients for {len(modes)} modes")
    return {int(m): float(v) for m, v in zip(modes, array)}


def rms(coefficients: CoefficientsLike, exclude: Sequence[int] = (1, 2, 3, 4)) -> float | np.ndarray:
    """Wavefront RMS in radians (orthonormal basis: root sum of squares), excluding given modes.

    By default piston, tip, tilt and defocus are excluded (they only move the focus).
    """
    arr = coefficients_to_array(coefficients)
    mask = np.ones(arr.shape[-1], dtype=bool)
    for j in exclude:
        if j - 1 < mask.size:
            mask[j - 1] = False
    return np.sqrt(np.sum(arr[..., mask] ** 2, axis=-1))
