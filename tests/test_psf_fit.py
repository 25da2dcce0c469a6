"""The instrument-model fit (calibration/psf_fit.py) on stacks whose truth is known: the hidden
instrument and aberration of a simulated bead stack (Poisson + read noise, ADU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoalign.calibration.psf_fit import CameraCounts, FitOptions, fit_stacks
from autoalign.recording import ZStack
from autoalign.simulation.instrument import Instrument, InstrumentPSF

WATER = dict(numerical_aperture=1.0, immersion_index=1.33, wavelength_um=0.515, polarisation="unpolarised")
CAMERA = CameraCounts(offset_adu=100.0, electrons_per_adu=0.25, read_noise_e=1.5)


def simulated_stack(instrument: Instrument, coefficients: dict[int, float], *, n_px: int = 32, n_planes: int = 9,
                    z_step: float = 0.3, photons: float = 4e4, background: float = 3.0, seed: int = 0,
                    bead_xyz: tuple[float, float, float] = (0.03, -0.02, 0.07)) -> ZStack:
    """A bead stack in ADU rendered by the instrument model itself at the true instrument (the fit
    knows only the nominal one), with Poisson and read noise."""
    rng = np.random.default_rng(seed)
    model = InstrumentPSF(instrument, 0.097, n_px, 37, pupil_samples=48, pad_px=6)
    z = (np.arange(n_planes) - n_planes // 2) * z_step
    coef = torch.zeros(37, dtype=torch.float64)
    for j, c in coefficients.items():
        coef[j - 1] = c
    p = {k: torch.tensor(v, dtype=torch.float64) for k, v in zip(("bead_x_um", "bead_y_um", "bead_z_um"), bead_xyz)}
    with torch.no_grad():
        mean = photons * model.planes(p, torch.as_tensor(z), coef).numpy() + background
    e = rng.poisson(np.clip(mean, 0, None)) + rng.normal(0, CAMERA.read_noise_e, mean.shape)
    adu = np.round(e / CAMERA.electrons_per_adu + CAMERA.offset_adu)
    return ZStack(adu, 0.097, 0.097, z, name=f"sim{seed}")


def test_fit_at_the_true_instrument_recovers_the_aberration_and_passes():
    """At the true instrument the fit recovers each mode within 4 sigma, its deviance per dof is
    that of pure noise (~1), it passes its validity test, and the sandwich sigma agrees with the
    Fisher sigma (an exact model: no overdispersion)."""
    true = Instrument(bead_diameter_um=0.1, **WATER)
    rng = np.random.default_rng(3)
    aberr = {j: float(v) for j, v in zip(range(5, 12), rng.normal(0, 0.05, 7))}
    stack = simulated_stack(true, aberr, seed=1)
    fit = fit_stacks([stack], CAMERA, true, FitOptions(modes=tuple(range(5, 12)), z_range_um=1.3, crop_px=28))
    sf = fit.stacks[0]
    assert sf.valid, sf.verdict
    assert 0.95 < sf.deviance_per_dof < 1.08
    z = [abs(sf.coefficients[j] - aberr[j]) / sf.sigma[j] for j in aberr]
    assert max(z) < 4.0, z
    ratio = np.array([sf.sigma_sandwich[j] / sf.sigma_fisher[j] for j in aberr])
    assert np.all((ratio > 0.6) & (ratio < 1.6)), ratio


def test_a_wrong_instrument_fails_the_validity_test_and_calibration_recovers_it():
    """A stack from an instrument whose NA is 4 % low and whose pupil is underfilled (fill 0.9)
    with a 150 nm bead: the nominal fit does not explain it; the instrument calibration recovers
    NA, fill and bead within 4 of its sigmas, and the calibrated fit passes."""
    true = Instrument(bead_diameter_um=0.15, fill_factor=0.9, **{**WATER, "numerical_aperture": 0.96})
    nominal = Instrument(bead_diameter_um=0.1, **WATER)
    aberr = {6: 0.05, 8: -0.04, 11: 0.06}
    stack = simulated_stack(true, aberr, seed=2, photons=8e4)
    opts = dict(modes=tuple(range(5, 12)), z_range_um=1.3, crop_px=28)
    before = fit_stacks([stack], CAMERA, nominal, FitOptions(**opts, uncertainties=False)).stacks[0]
    assert not before.valid, before.verdict
    cal = fit_stacks([stack], CAMERA, nominal, FitOptions(
        **opts, free_instrument=("numerical_aperture", "inv_fill2", "bead_diameter_um")))
    after = cal.stacks[0]
    assert after.valid, after.verdict
    assert after.deviance_per_dof < before.deviance_per_dof
    v, s = cal.instrument_values, cal.instrument_sigma
    assert abs(v["numerical_aperture"] - 0.96) < 4 * s["numerical_aperture"] + 1e-3
    assert abs(v["bead_diameter_um"] - 0.15) < 4 * s["bead_diameter_um"] + 5e-3
    assert abs(1 / v["fill_factor"] ** 2 - 1 / 0.9**2) < 4 * (2 * s["fill_factor"] / 0.9**3) + 0.02
    assert cal.instrument.numerical_aperture == pytest.approx(v["numerical_aperture"])


def test_an_unmodelled_mode_is_refused():
    """Aberration content outside the fitted modes (0.35 rad of Noll 16, secondary coma) leaves a structured
    residual: the fit says the model does not explain the data."""
    true = Instrument(bead_diameter_um=0.1, **WATER)
    stack = simulated_stack(true, {6: 0.05, 16: 0.35}, seed=4, photons=8e4)
    fit = fit_stacks([stack], CAMERA, true, FitOptions(modes=tuple(range(5, 12)), z_range_um=1.3, crop_px=28,
                                                        uncertainties=False))
    assert not fit.stacks[0].valid
    assert fit.stacks[0].model_error_fraction > 0.02


def test_bad_input_names_the_stack():
    true = Instrument(**WATER)
    flat = ZStack(np.full((9, 32, 32), 100.0), 0.097, 0.097, np.arange(9) * 0.2, name="dark")
    with pytest.raises(ValueError, match="'dark': no bead"):
        fit_stacks([flat], CAMERA, true)
    nan = ZStack(np.full((9, 32, 32), np.nan), 0.097, 0.097, np.arange(9) * 0.2, name="broken")
    with pytest.raises(ValueError, match="'broken': contains NaN"):
        fit_stacks([nan], CAMERA, true)
    with pytest.raises(ValueError, match="free_instrument"):
        FitOptions(free_instrument=("numerical_apperture",))
    assert math.isfinite(CAMERA.electrons_per_adu)
