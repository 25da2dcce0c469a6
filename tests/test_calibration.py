"""Calibration: centroid -> tip/tilt/defocus against the optics (independently computed), robust
centroid, poke calibration recovering a known scale, the convention self-check catching flips
(all on the real simulated devices; flips through the microscope's image transform and a
misconfigured vortex handedness)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autoalign.app.estimators import make_estimator
from autoalign.app.loop import AlignmentLoop
from autoalign.calibration import optics as opt
from autoalign.calibration.centroid import centred_sections, robust_stack_centroid
from autoalign.calibration.poke import PokeCalibration, run_poke_calibration
from autoalign.calibration.selfcheck import run_self_check
from tests.test_loop_support import LinearPredictor, ScaledSLM, sim_devices, simulator, small_settings


def test_tip_tilt_formula_matches_independent_fourier_shift():
    # Independent: a pupil phase c * 2 u (Z2 = 2 rho cos) is exp(i kx x0) with kx = 2 pi NA u / lambda
    # -> x0 = 2 c lambda / (2 pi NA) = c lambda / (pi NA).
    na, lam = 1.4, 0.775
    assert opt.tip_tilt_per_um(na, lam) == pytest.approx(math.pi * na / lam, rel=1e-12)
    shift = opt.zernike_to_shift({2: 0.5, 3: -0.25}, na, 1.518, lam)
    assert shift[0] == pytest.approx(0.5 * lam / (math.pi * na))
    assert shift[1] == pytest.approx(-0.25 * lam / (math.pi * na))


def test_defocus_formula_matches_independent_projection():
    # Independent numeric projection (midpoint rule on a 2-D grid) of k dz sqrt(n^2 - NA^2 rho^2)
    # on Z4 = sqrt3 (2 rho^2 - 1), with the sign convention +c4 -> +z.
    na, n, lam = 1.4, 1.518, 0.775
    m = 801
    c = -1 + (np.arange(m) + 0.5) * 2 / m
    u, v = np.meshgrid(c, c)
    r2 = u * u + v * v
    inside = r2 <= 1
    phase = 2 * math.pi / lam * np.sqrt(n * n - na * na * r2[inside])
    z4 = math.sqrt(3) * (2 * r2[inside] - 1)
    per_um = -float(np.mean(phase * z4))
    assert opt.defocus_per_um(na, n, lam) == pytest.approx(per_um, rel=2e-3)
    assert opt.shift_to_zernike(0.1, 0.0, 0.2, na, n, lam)[4] == pytest.approx(0.2 * per_um, rel=2e-3)


def test_measured_centroid_shift_matches_optics():
    s = small_settings()
    sim = simulator(s)
    c2 = 1.0
    base = sim.stack({})
    shifted = sim.stack({2: c2, 3: -0.5})
    z0, y0, x0 = robust_stack_centroid(base * 2000 + 5)
    z1, y1, x1 = robust_stack_centroid(shifted * 2000 + 5)
    px = s.camera.pixel_size_um
    lam, na = s.optics.wavelength_um, s.optics.numerical_aperture
    assert (x1 - x0) * px == pytest.approx(c2 * lam / (math.pi * na), rel=0.05)
    assert (y1 - y0) * px == pytest.approx(-0.5 * lam / (math.pi * na), rel=0.05)


def test_hot_pixel_does_not_move_centroid():
    rng = np.random.default_rng(0)
    zz, yy, xx = np.indices((32, 32, 32))
    stack = rng.poisson(5.0, (32, 32, 32)) + 800 * np.exp(-((zz - 15.4) ** 2 + (yy - 17.2) ** 2 + (xx - 14.6) ** 2) / 18)
    clean = robust_stack_centroid(stack)
    stack[:, 2, 29] += 60000.0  # hot camera pixel: the same (y, x) in every plane
    stack[3, 30, 3] += 60000.0  # cosmic ray
    assert np.allclose(robust_stack_centroid(stack), clean, atol=0.05)
    sec = centred_sections(stack - 0.0, clean)
    sec[:, :, :] = np.where(sec > 5000, 0, sec)  # ignore the hot pixel itself
    assert np.unravel_index(np.argmax(sec[0]), sec[0].shape) == (16, 16)


def test_poke_calibration_recovers_known_scale(tmp_path):
    s = small_settings()
    dev = sim_devices(s, {}, noise=False)
    dev.slm = ScaledSLM(dev.slm, 0.8)  # the SLM writes 80 % of the commanded phase
    loop = AlignmentLoop(dev, s, make_estimator("model", s))
    loop.zero_slm()
    first = dev.slm.phase_rad
    cal = run_poke_calibration(loop, amplitude_rad=1.0, stage_step_um=0.2)
    scale = cal.scale_vs_optics(s)
    assert scale[0] == pytest.approx(0.8, abs=0.03)
    assert scale[1] == pytest.approx(0.8, abs=0.03)
    assert 0.6 < scale[2] < 0.9  # defocus: Z4 is not a pure shift at NA 1.4
    assert cal.stage_sign == (1.0, 1.0, 1.0)
    assert loop.calibration is cal
    assert dev.slm.frames_shown >= 8 and np.allclose(dev.slm.phase_rad, first)  # restored
    path = tmp_path / "poke.yaml"
    cal.save(path)
    back = PokeCalibration.load(path, settings=s, strict=True)
    assert np.allclose(back.matrix_um_per_rad, cal.matrix_um_per_rad)
    assert "created" in path.read_text()
    with pytest.raises(ValueError, match="other settings"):
        PokeCalibration.load(path, settings=s.replace(**{"camera.pixel_size_um": 0.06}), strict=True)
    # with the calibration the loop cancels a tip offset with the true (scaled) phase
    corr = cal.correction_for_shift((0.1, 0.0, 0.0))
    assert corr[2] == pytest.approx(-0.1 * opt.tip_tilt_per_um(1.4, 0.775) / 0.8, rel=0.04)


# camera-side flips, applied by the simulated microscope to every rendered stack (nz, ny, nx)
FLIPS = {
    "mirrored x": lambda d: d[..., ::-1],
    "swapped x/y": lambda d: np.swapaxes(d, -1, -2),
    "reversed z": lambda d: d[::-1] if d.ndim == 3 else d,
}


@pytest.fixture(scope="module")
def linear_predictor():
    return LinearPredictor(small_settings(), modes=(5, 6, 11))


def _check(settings, predictor, transform=None, charge_on_slm=None):
    dev = sim_devices(settings, {}, image_transform=transform, seed=3)
    loop_settings = settings
    if charge_on_slm is not None:  # the loop's settings say another handedness than the optics'
        loop_settings = settings.replace(**{"optics.vortex_charge": charge_on_slm})
    loop = AlignmentLoop(dev, loop_settings, make_estimator("model", loop_settings, predictor))
    loop.zero_slm()
    return run_self_check(loop, amplitude_rad=0.4)


def test_self_check_passes_with_correct_conventions(linear_predictor):
    rep = _check(small_settings(), linear_predictor)
    assert rep.ok, rep.summary()
    assert rep.diagnosis == "conventions consistent"
    assert all(r.sign_ok and r.mode_ok for r in rep.rows)
    assert rep.stacks == 6


@pytest.mark.parametrize("flip", sorted(FLIPS))
def test_self_check_detects_flip(linear_predictor, flip):
    rep = _check(small_settings(), linear_predictor, transform=FLIPS[flip])
    assert not rep.ok, rep.summary()
    assert any(not r.sign_ok for r in rep.rows)
    assert rep.diagnosis == flip, rep.summary()


def test_self_check_detects_wrong_vortex_handedness(linear_predictor):
    rep = _check(small_settings(), linear_predictor, charge_on_slm=-1)
    assert not rep.ok
    assert "handedness" in rep.diagnosis
    assert rep.null_depth > 0.25
