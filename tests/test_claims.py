"""Figures stated in README.md and docs/*.md, each checked at least as tightly as it is stated
(a figure given to k digits is checked to half a unit of its last digit). Where the code does not
meet a stated figure the test fails: the figure or the code must change, not the tolerance.

The physics claims of the simulator table live in tests/test_simulation.py (tolerances tightened
to the README's figures); the ones here need the loop, the shipped model or the benchmark's
brute-force reference. The two slow ones run in CI (.ci/run, `pytest -m slow tests/test_claims.py`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "weights" / "default.pt"


def test_true_metrics_after_a_perfect_correction_are_the_8_bit_slm_floor():
    """README (loop section): after a perfect correction the delivered-phase residual is the
    simulated 8-bit SLM's quantisation, 2 pi / (255 sqrt 12) = 0.0071 rad (uniform quantisation
    error, computed here independently), and the exact true null is far below 1e-5."""
    from autoalign.app.loop import Correction
    from autoalign.settings import load_settings
    from tests.test_loop import ABERRATION, make_loop

    loop, _ = make_loop(settings=load_settings(), aberration=ABERRATION, noise=False)
    loop.apply(Correction({k: -v for k, v in ABERRATION.items()}))
    quantisation = 2 * np.pi / (255 * np.sqrt(12))
    assert loop.true_residual_rms() == pytest.approx(quantisation, rel=0.05)
    assert loop.true_null_depth() < 1e-5


@pytest.mark.slow
def test_simulator_error_vs_brute_force_is_the_stated_3_3e_4():
    """README: 'brute-force polar quadrature of the Debye integral (200 x 256 nodes, float64),
    1 rad RMS aberrations: max error 3.3e-4 of the section peak', and the benchmark table's
    'max relative error vs brute force 3.3e-4'. The benchmark's own draw (`autoalign benchmark`:
    seed 0, Noll 5..15 uniform in +-0.5 rad scaled to <= 1 rad RMS, its first three triplets,
    every fourth pixel). NOTE: other 1 rad RMS draws reach 4.9e-4 (8 draws); the README states
    the benchmark's figure only."""
    from autoalign.simulation import PSFSimulator, debye_quadrature
    from autoalign.simulation.zernike import rms

    sim = PSFSimulator.from_settings()
    rng = np.random.default_rng(0)
    coeffs = np.zeros((256, 15))
    coeffs[:, 4:15] = rng.uniform(-0.5, 0.5, (256, 11))
    coeffs *= np.minimum(1.0, 1.0 / np.maximum(rms(coeffs), 1e-9))[:, None]
    sub = slice(None, None, 4)
    x, y = np.meshgrid(sim.coords_um[sub], sim.coords_um[sub])
    xz, zz = np.meshgrid(sim.coords_um[sub], sim.z_um[sub])
    worst = 0.0
    for k in range(3):
        fast = sim.orthosections(coeffs[k])
        for s, (px, py, pz) in enumerate([(x, y, 0 * x), (xz, 0 * xz, zz), (0 * xz, xz, zz)]):
            field = debye_quadrature(sim.optics, px, py, pz, coeffs[k], n_rho=200, n_phi=256)
            ref = (np.abs(field) ** 2).sum(0) / sim._peak
            worst = max(worst, float(np.abs(fast[s][sub, sub] - ref).max() / ref.max()))
    assert worst < 3.35e-4, worst


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED.exists(), reason=f"shipped model {SHIPPED} absent")
def test_shipped_model_rmse_is_the_stated_figure(tmp_path, one_torch_thread):
    """README (model): the default model on 299 fresh noisy samples of its own domain (seed 2): mean
    per-mode RMSE 0.021 rad, worst 0.027 (measured 0.0211 / 0.0266). Re-simulated here: `write_dataset(seed=2)` with 375
    samples, its 80 % train split (299 samples), evaluated as `autoalign evaluate` does."""
    from autoalign.models.evaluate import evaluate
    from autoalign.settings import load_settings
    from autoalign.simulation.dataset import write_dataset

    # the shipped default's own domain (Noll 5..15, <= 1 rad, no offset, nominal instrument): the
    # default data-set settings now describe the wider 5..22 + offset model's domain
    old_domain = load_settings(Path(__file__).resolve().parents[1] / "scripts" / "previous_domain_settings.yaml")
    data = write_dataset(old_domain, 375, tmp_path / "fresh.h5", seed=2, workers=1, progress=False)
    result = evaluate(SHIPPED, data, split="train", resimulate=0)
    assert result["samples"] >= 299
    assert result["rmse_mean"] < 0.0215, result["rmse_mean"]
    assert result["rmse_max"] < 0.0275, result["rmse_max"]
