"""Model-based refinement: Poisson fit of the vectorial model to a measured stack, its
uncertainties and goodness of fit (small grids, fixed seeds)."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from autoalign.settings import load_settings
from autoalign.calibration.refine import (
    RefineOptions, RefineStart, _bead_kernel_torch, fisher_information, refine, structure_test, zernike_torch)
from autoalign.hardware.simulated import SimulatedSLM
from autoalign.simulation.microscope import SimulatedMicroscope
from autoalign.simulation.noise import bead_kernel
from autoalign.simulation.phase import total_phase
from autoalign.simulation.zernike import zernike

Z_UM = (np.arange(32) - 16) * 0.04
OPTIONS = RefineOptions(crop_px=24, pupil_samples=24)
MODES = range(5, 16)


@pytest.fixture(scope="module")
def small():
    return load_settings().replace(**{"camera.roi_px": 32, "stack.planes": 32, "optics.pupil_samples": 32,
                                      "model.binning": 1, "model.modes": list(range(5, 16)),
                                      "model.predict_offset": False, "model.fine_checkpoint": ""})


def measure(settings, commanded=None, seed=7, **faults):
    """A noisy stack of the simulated microscope showing the vortex + ``commanded``; returns the
    stack and the aberration present (hidden + commanded) for the modes 5..15."""
    mic = SimulatedMicroscope(settings, seed=seed, **faults)
    slm = SimulatedSLM(mic)
    slm.open()
    commanded = commanded or {}
    slm.show(total_phase(settings, slm.pupil_samples, commanded))
    mic.bead_um = (0.02, -0.01, 0.03)
    present = {j: float(mic.aberration[j - 1]) + commanded.get(j, 0.0) for j in MODES}
    return mic.render_stack(Z_UM), present, mic


def noisy_start(present, sigma=0.1, seed=0):
    rng = np.random.default_rng(seed)
    return {j: v + float(rng.normal(0, sigma)) for j, v in present.items()}


def test_zernike_torch_matches_numpy():
    rng = np.random.default_rng(0)
    u, v = rng.uniform(-0.7, 0.7, (2, 50))
    for j in range(1, 29):
        ref = zernike(j, np.hypot(u, v), np.arctan2(v, u))
        got = zernike_torch(j, torch.tensor(u), torch.tensor(v)).numpy()
        assert np.allclose(got, ref, atol=1e-10), j


def test_bead_kernel_torch_matches_numpy():
    for d in (0.06, 0.08, 0.1):
        ref = bead_kernel(d, 0.04)
        half = ref.shape[0] // 2
        got = _bead_kernel_torch(torch.tensor(d, dtype=torch.float64), 0.04, half).numpy()
        assert np.allclose(got, ref, atol=1e-6)


def test_fisher_information_of_the_photon_count():
    """mu_i = N g_i + b: the information on N is sum g_i^2 / mu_i (Poisson)."""
    g = np.linspace(0.0, 1.0, 50)
    n, b = 1000.0, 5.0
    mu = n * g + b
    fisher = fisher_information(g[:, None], mu)
    assert fisher[0, 0] == pytest.approx(float(np.sum(g**2 / mu)))


def test_structure_test_flags_smooth_residuals_only():
    rng = np.random.default_rng(1)
    noise = rng.normal(size=(5, 24, 24))
    assert structure_test(noise)[0] > 0.01
    yy, xx = np.mgrid[:24, :24]
    blob = 0.8 * np.exp(-((xx - 12) ** 2 + (yy - 12) ** 2) / 30.0)  # smooth, 0.8 sigma at its peak
    assert structure_test(noise + blob)[0] < 1e-4


def test_refine_recovers_the_aberration_with_honest_uncertainties(small):
    commanded = {6: 0.2, 7: -0.1, 2: 0.05}
    stack, present, _ = measure(small, commanded)
    start = noisy_start(present)
    r = refine(stack, Z_UM, small, RefineStart(coefficients=start), commanded=commanded, options=OPTIONS)
    err0 = np.array([start[j] - present[j] for j in MODES])
    err = np.array([r.coefficients[j] - present[j] for j in MODES])
    assert np.sqrt(np.mean(err**2)) < 0.2 * np.sqrt(np.mean(err0**2))
    sig = np.array([r.sigma(j) for j in MODES])
    assert np.all(sig > 0) and np.all(np.abs(err) < 5 * sig + 0.01)  # + model error of 24 vs 32 nodes
    assert r.crb_residual_rms == pytest.approx(math.sqrt(float(np.sum(sig**2))))
    assert 0.8 < r.chi2_per_dof < 1.3 and 0.8 < r.deviance_per_dof < 1.3
    assert r.valid, r.reason
    assert r.bead_um[:2] == pytest.approx((0.02, -0.01), abs=0.005)
    assert r.bead_um[2] == pytest.approx(0.03, abs=0.01)
    assert r.peak_photons == pytest.approx(small.camera.peak_photons, rel=0.05)
    assert r.background_photons == pytest.approx(small.camera.background_photons, rel=0.3)


def test_refine_fits_a_mask_offset_from_a_far_start(small):
    stack, present, _ = measure(small, mask_offset=(0.13, 0.02))
    # the fit's pupil quadrature as fine as the data's (32 nodes): with the pattern's margin the beam
    # is not clipped, and a displaced singularity alone is read only that finely (with 24 nodes the
    # fit lands 0.019 off, 10x its sigma; docs/refined.md)
    r = refine(stack, Z_UM, small, RefineStart(coefficients=present),
               options=dataclasses.replace(OPTIONS, pupil_samples=32))
    assert r.mask_offset == pytest.approx((0.13, 0.02), abs=0.01)
    for i, k in enumerate(("offset_x", "offset_y")):  # and within its own uncertainty
        assert abs(r.mask_offset[i] - (0.13, 0.02)[i]) < 4 * r.uncertainty[k], (r.mask_offset, r.uncertainty[k])


def test_refine_flags_a_model_that_misses_modes(small):
    stack, present, _ = measure(small, higher_order_rms_rad=0.3)
    r = refine(stack, Z_UM, small, RefineStart(coefficients=present), options=OPTIONS)
    assert not r.valid and r.structure_p < 1e-4


def test_refine_rejects_bad_input(small):
    with pytest.raises(ValueError, match="finite stack"):
        refine(np.full((32, 32, 32), np.nan), Z_UM, small)
    with pytest.raises(ValueError, match="focus positions"):
        refine(np.zeros((32, 32, 32)), Z_UM[:5], small)


@pytest.mark.slow
def test_fisher_uncertainty_matches_the_scatter_over_noise(small):
    """The inverse Fisher information predicts the spread of the refined coefficients over noise
    realisations of the same stack (8 fits; ratio within 0.6..1.6)."""
    mic = SimulatedMicroscope(small, seed=7, noise=True)
    slm = SimulatedSLM(mic)
    slm.open()
    slm.show(total_phase(small, slm.pupil_samples))
    present = {j: float(mic.aberration[j - 1]) for j in MODES}
    fits = []
    for _ in range(8):
        r = refine(mic.render_stack(Z_UM), Z_UM, small, RefineStart(coefficients=present), options=OPTIONS)
        fits.append([r.coefficients[j] for j in MODES])
        sig = np.array([r.sigma(j) for j in MODES])
    spread = np.std(np.array(fits), axis=0, ddof=1)
    ratio = float(np.sqrt(np.mean(spread**2)) / np.sqrt(np.mean(sig**2)))
    assert 0.6 < ratio < 1.6


def test_refine_separates_the_commanded_vortex_shift(small):
    """The SLM shows its pattern shifted by -0.04 (a loop correction) on a misregistration of 0.06:
    the offset present is 0.02, the misregistration 0.06."""
    from autoalign.simulation.phase import mask_phase, zernike_phase

    mic = SimulatedMicroscope(small, seed=7, mask_offset=(0.06, 0.0))
    slm = SimulatedSLM(mic)
    slm.open()
    m = slm.pupil_samples
    commanded = {6: 0.1}
    slm.show(mask_phase(small, m) + zernike_phase(commanded, m), shift=(-0.04, 0.0))
    present = {j: float(mic.aberration[j - 1]) + commanded.get(j, 0.0) for j in MODES}
    r = refine(mic.render_stack(Z_UM), Z_UM, small, RefineStart(coefficients=present, mask_offset=(0.02, 0.0)),
               commanded=commanded, commanded_shift=(-0.04, 0.0), options=OPTIONS)
    assert r.mask_offset == pytest.approx((0.02, 0.0), abs=0.008)
    assert r.misregistration == pytest.approx((0.06, 0.0), abs=0.008)
