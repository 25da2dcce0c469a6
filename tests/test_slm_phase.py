"""simulation.phase: pupil phases on the pupil grid."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autoalign.settings import load_settings
from autoalign.simulation import phase as ph


def test_pupil_grid_cell_centres():
    u, v, inside = ph.pupil_grid(4)
    np.testing.assert_allclose(u[0], [-0.75, -0.25, 0.25, 0.75])
    np.testing.assert_allclose(v[:, 0], [-0.75, -0.25, 0.25, 0.75])  # [v, u]: rows are y
    assert not inside[0, 0] and inside[1, 1] and inside[0, 1]
    with pytest.raises(ValueError, match="m = 0"):
        ph.pupil_grid(0)


def test_zernike_and_vortex_values():
    u, v, inside = ph.pupil_grid(8)
    z = ph.zernike_phase({2: 0.5, 4: 0.1}, 8)
    expect = 0.5 * 2 * u + 0.1 * math.sqrt(3) * (2 * (u**2 + v**2) - 1)  # RMS-normalised Z2, Z4
    np.testing.assert_allclose(z[inside], expect[inside])
    assert np.all(z[~inside] == 0)
    arr = np.zeros(5)
    arr[1], arr[3] = 0.5, 0.1  # column k = Noll k + 1
    np.testing.assert_allclose(ph.zernike_phase(arr, 8), z)
    vort = ph.vortex_phase(-1, 8, offset=(0.1, 0.0))
    np.testing.assert_allclose(vort[inside], -np.arctan2(v, u - 0.1)[inside])


def test_mask_and_total_phase_from_settings():
    s = load_settings()
    m = 16
    total = ph.total_phase(s, m, coefficients={5: 0.2}, mask_offset=(0.0, 0.0))
    np.testing.assert_allclose(total, ph.vortex_phase(s.optics.vortex_charge, m) + ph.zernike_phase({5: 0.2}, m))
    top = ph.mask_phase(s.replace(**{"optics.beam": "tophat"}), m)
    u, v, inside = ph.pupil_grid(m)
    np.testing.assert_allclose(top, np.where(inside & (u**2 + v**2 < s.optics.tophat_radius**2), math.pi, 0))
    assert not np.any(ph.mask_phase(s.replace(**{"optics.beam": "none"}), m))
    with pytest.raises(TypeError, match="lacks"):
        ph.mask_phase(object(), m)


def test_fit_zernike_recovers_coefficients():
    coef = {4: 0.3, 5: -0.2, 7: 0.1, 11: 0.05}
    fit = ph.fit_zernike(ph.zernike_phase(coef, 64), 22)
    want = np.zeros(22)
    for k, c in coef.items():
        want[k - 1] = c
    np.testing.assert_allclose(fit, want, atol=1e-10)
