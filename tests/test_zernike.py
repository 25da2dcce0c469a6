"""Zernike basis: orthonormality by independent quadrature, closed forms, index conversions."""
import math

import numpy as np
import pytest

from autoalign.simulation import zernike as zk


def _disk_quadrature(n_rho=60, n_phi=128):
    x, w = np.polynomial.legendre.leggauss(n_rho)
    rho = 0.5 * (x + 1)
    w_rho = 0.5 * w * rho
    phi = np.arange(n_phi) * 2 * np.pi / n_phi
    rr, pp = np.meshgrid(rho, phi, indexing="ij")
    weights = w_rho[:, None] * (2 * np.pi / n_phi) / np.pi  # mean over the unit disk
    return rr, pp, weights * np.ones_like(rr)


def test_orthonormal_over_unit_disk():
    rr, pp, w = _disk_quadrature()
    basis = zk.zernike_basis(28, rr, pp)
    gram = np.einsum("iab,jab,ab->ij", basis, basis, w)
    np.testing.assert_allclose(gram, np.eye(28), atol=1e-10)


@pytest.mark.parametrize(
    "j, formula",
    [
        (1, lambda r, t: np.ones_like(r)),
        (2, lambda r, t: 2 * r * np.cos(t)),
        (3, lambda r, t: 2 * r * np.sin(t)),
        (4, lambda r, t: math.sqrt(3) * (2 * r**2 - 1)),
        (5, lambda r, t: math.sqrt(6) * r**2 * np.sin(2 * t)),
        (6, lambda r, t: math.sqrt(6) * r**2 * np.cos(2 * t)),
        (7, lambda r, t: math.sqrt(8) * (3 * r**3 - 2 * r) * np.sin(t)),
        (8, lambda r, t: math.sqrt(8) * (3 * r**3 - 2 * r) * np.cos(t)),
        (9, lambda r, t: math.sqrt(8) * r**3 * np.sin(3 * t)),
        (10, lambda r, t: math.sqrt(8) * r**3 * np.cos(3 * t)),
        (11, lambda r, t: math.sqrt(5) * (6 * r**4 - 6 * r**2 + 1)),
        (12, lambda r, t: math.sqrt(10) * (4 * r**4 - 3 * r**2) * np.cos(2 * t)),
        (13, lambda r, t: math.sqrt(10) * (4 * r**4 - 3 * r**2) * np.sin(2 * t)),
        (14, lambda r, t: math.sqrt(10) * r**4 * np.cos(4 * t)),
        (15, lambda r, t: math.sqrt(10) * r**4 * np.sin(4 * t)),
    ],
)
def test_closed_forms_noll(j, formula):
    rng = np.random.default_rng(j)
    r, t = rng.uniform(0, 1, 50), rng.uniform(0, 2 * np.pi, 50)
    np.testing.assert_allclose(zk.zernike(j, r, t), formula(r, t), atol=1e-12)


def test_index_conversions():
    # Noll's table (1976) and the ANSI/OSA standard (Thibos et al. 2002)
    assert [zk.noll_to_nm(j) for j in range(1, 12)] == [
        (0, 0), (1, 1), (1, -1), (2, 0), (2, -2), (2, 2), (3, -1), (3, 1), (3, -3), (3, 3), (4, 0)
    ]
    assert [zk.ansi_to_nm(j) for j in range(6)] == [(0, 0), (1, -1), (1, 1), (2, -2), (2, 0), (2, 2)]
    assert zk.noll_to_ansi(11) == 12 and zk.noll_to_ansi(4) == 4 and zk.noll_to_ansi(3) == 1
    for j in range(1, 80):
        assert zk.nm_to_noll(*zk.noll_to_nm(j)) == j
        assert zk.ansi_to_noll(zk.noll_to_ansi(j)) == j
    with pytest.raises(ValueError):
        zk.noll_to_nm(0)
    with pytest.raises(ValueError):
        zk.nm_to_noll(2, 1)


def test_coefficients_and_rms():
    arr = zk.coefficients_to_array({5: 0.3, 8: -0.4}, n_modes=15)
    assert arr.shape == (15,) and arr[4] == 0.3 and arr[7] == -0.4
    assert zk.rms({2: 5.0, 5: 0.3, 8: -0.4}) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        zk.coefficients_to_array([float("nan")])
    assert zk.mode_name(7) == "vertical coma"
