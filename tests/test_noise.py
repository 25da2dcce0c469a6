"""Camera model statistics and the bead's projected profile against closed forms."""
import numpy as np
import pytest

from autoalign.simulation.noise import CameraModel, bead_kernel, blur_by_bead


def test_exposure_mean_and_variance_follow_shot_and_read_noise():
    cam = CameraModel(peak_photons=400, background_photons=10, quantum_efficiency=0.8,
                      read_noise_electrons=3.0, gain_adu_per_electron=2.0, offset_adu=100, bit_depth=16)
    rng = np.random.default_rng(0)
    intensity = np.full((200, 200), 0.5)
    frames = cam.expose(intensity, rng)
    electrons = (0.5 * 400 + 10) * 0.8  # 168 e-
    assert frames.mean() == pytest.approx(100 + 2.0 * electrons, rel=2e-3)
    # Poisson variance equals the mean in electrons; read noise adds in quadrature; gain squares;
    # rounding to whole ADU adds 1/12
    assert frames.var() == pytest.approx(4.0 * (electrons + 9.0) + 1 / 12, rel=0.03)
    assert cam.to_photons(frames).mean() == pytest.approx(0.5 * 400 + 10, rel=2e-3)


def test_saturation_and_no_negative_values():
    cam = CameraModel(peak_photons=1e6, bit_depth=12, offset_adu=0.0, read_noise_electrons=5.0)
    frames = cam.expose(np.array([[1.0, 0.0]]), np.random.default_rng(1))
    assert frames[0, 0] == 4095 and frames.min() >= 0
    assert cam.saturation_adu == 4095


def test_bead_kernel_is_projected_sphere():
    assert bead_kernel(0.0, 0.04) is None
    radius_px = 4.0
    k = bead_kernel(2 * radius_px * 0.01, 0.01)
    assert k.sum() == pytest.approx(1.0)
    c = k.shape[0] // 2
    x = np.arange(k.shape[0]) - c
    # variance of a sphere's projected thickness along one axis is R^2 / 5
    var_x = (k.sum(axis=0) * x**2).sum()
    assert var_x == pytest.approx(radius_px**2 / 5 + 1 / 12, rel=0.05)  # + pixel box variance


def test_blur_preserves_total_and_spreads_a_point():
    img = np.zeros((2, 31, 31))
    img[:, 15, 15] = 1.0
    out = blur_by_bead(img, 0.2, 0.02)
    assert out.sum() == pytest.approx(2.0)
    assert out[0, 15, 15] < 0.1 and (out[0] > 0).sum() > 50
    np.testing.assert_allclose(out[0], out[1])
