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
from autoalign.calibration.selfcheck import (
    CANDIDATES,
    diagnose,
    expected_response,
    flip_signature,
    handedness_factor,
    run_self_check,
)
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
    blob = np.exp(-((zz - 15.4) ** 2 + (yy - 17.2) ** 2 + (xx - 14.6) ** 2) / 18)
    stack = rng.poisson(5.0, (32, 32, 32)) + 800 * blob
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
    assert cal.stage_scale == pytest.approx((1.0, 1.0), abs=0.01) and cal.pixel_size_check(s) is None
    assert loop.calibration is cal
    assert dev.slm.frames_shown >= 8 and np.allclose(dev.slm.phase_rad, first)  # restored
    path = tmp_path / "poke.yaml"
    cal.save(path)
    back = PokeCalibration.load(path, settings=s, strict=True)
    assert np.allclose(back.matrix_um_per_rad, cal.matrix_um_per_rad) and back.stage_scale == cal.stage_scale
    assert "created" in path.read_text()
    with pytest.raises(ValueError, match="other settings"):
        PokeCalibration.load(path, settings=s.replace(**{"camera.pixel_size_um": 0.06}), strict=True)
    # with the calibration the loop cancels a tip offset with the true (scaled) phase
    corr = cal.correction_for_shift((0.1, 0.0, 0.0))
    assert corr[2] == pytest.approx(-0.1 * opt.tip_tilt_per_um(1.4, 0.775) / 0.8, rel=0.04)


def test_the_stage_poke_measures_a_wrong_camera_pixel_size():
    """The camera's true pixel is 5 % larger than camera.pixel_size_um says: a stage move shows
    as 1/1.05 of itself through the settings' pixel size, and the check names the pixel size."""
    s = small_settings().replace(**{"simulation.true_pixel_scale": 1.05})
    dev = sim_devices(s, {}, noise=False)
    loop = AlignmentLoop(dev, s, make_estimator("model", s))
    loop.zero_slm()
    cal = run_poke_calibration(loop, amplitude_rad=1.0, stage_step_um=0.2)
    assert cal.stage_scale == pytest.approx((1 / 1.05, 1 / 1.05), abs=0.01)
    check = cal.pixel_size_check(s)
    assert check is not None and "camera.pixel_size_um is probably" in check
    suggested = float(check.split("probably ")[1].split(" um")[0])
    assert suggested == pytest.approx(1.05 * s.camera.pixel_size_um, rel=0.01)


# camera-side flips, applied by the simulated microscope to every rendered stack (nz, ny, nx)
FLIPS = {
    "mirrored x": lambda d: d[..., ::-1],
    "mirrored y": lambda d: d[..., ::-1, :],
    "mirrored x and mirrored y": lambda d: d[..., ::-1, ::-1],   # the camera rotated by 180 degrees
    "swapped x/y": lambda d: np.swapaxes(d, -1, -2),
    "reversed z": lambda d: d[::-1] if d.ndim == 3 else d,
}


@pytest.fixture(scope="module")
def linear_predictor():
    # astigmatism (m = 2), trefoil (m = 3: tells a mirror in x from one in y), spherical (m = 0)
    return LinearPredictor(small_settings(), modes=(5, 6, 9, 10, 11))


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
    assert rep.stacks == 10


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


# ------------------------------------------------------------------ flip signatures from symmetry
# Noll's table (Noll 1976, J. Opt. Soc. Am. 66, 207), written out here independently of
# simulation/zernike.py: j -> (n, |m|, 'c' cosine / 's' sine / '' for m = 0).
NOLL_TABLE = {
    2: (1, 1, "c"), 3: (1, 1, "s"), 4: (2, 0, ""), 5: (2, 2, "s"), 6: (2, 2, "c"), 7: (3, 1, "s"),
    8: (3, 1, "c"), 9: (3, 3, "s"), 10: (3, 3, "c"), 11: (4, 0, ""), 12: (4, 2, "c"), 13: (4, 2, "s"),
    14: (4, 4, "c"), 15: (4, 4, "s"), 16: (5, 1, "c"), 17: (5, 1, "s"), 18: (5, 3, "c"), 19: (5, 3, "s"),
    20: (5, 5, "c"), 21: (5, 5, "s"), 22: (6, 0, ""),
}
MODES = sorted(NOLL_TABLE)


def _analytic_sign(j: int, transform: str) -> float:
    """Sign of Z_j o G from cos(m theta) / sin(m theta) under theta -> G(theta):
    x -> -x is theta -> pi - theta: cos(m theta) -> (-1)^m cos, sin(m theta) -> -(-1)^m sin;
    y -> -y is theta -> -theta: cos keeps, sin flips; the rotation theta -> theta + pi: (-1)^m."""
    _, m, kind = NOLL_TABLE[j]
    if transform == "mirrored x":
        return (-1.0) ** m if kind != "s" else -((-1.0) ** m)
    if transform == "mirrored y":
        return -1.0 if kind == "s" else 1.0
    if transform == "mirrored x and mirrored y":
        return (-1.0) ** m
    raise ValueError(transform)


@pytest.mark.parametrize("transform", ["mirrored x", "mirrored y", "mirrored x and mirrored y"])
def test_flip_signature_is_the_analytic_symmetry_of_each_mode(transform):
    s = flip_signature(MODES, transform)
    expected = np.diag([_analytic_sign(j, transform) for j in MODES])
    np.testing.assert_allclose(s, expected, atol=1e-9)
    # the rotation is the two mirrors in turn
    if transform == "mirrored x and mirrored y":
        np.testing.assert_allclose(s, flip_signature(MODES, "mirrored x") @ flip_signature(MODES, "mirrored y"),
                                   atol=1e-9)


def test_swap_signature_exchanges_odd_partners():
    """x <-> y is theta -> pi/2 - theta: for even m, cos(m theta) -> (-1)^(m/2) cos and
    sin(m theta) -> -(-1)^(m/2) sin; for odd m the cosine and sine partners exchange with the
    sign (-1)^((m-1)/2)."""
    s = flip_signature(MODES, "swapped x/y")
    expected = np.zeros_like(s)
    index = {j: k for k, j in enumerate(MODES)}
    for j, (n, m, kind) in NOLL_TABLE.items():
        if m == 0:
            expected[index[j], index[j]] = 1.0
        elif m % 2 == 0:
            expected[index[j], index[j]] = (-1.0) ** (m // 2) * (1.0 if kind == "c" else -1.0)
        else:
            partner = next(i for i, v in NOLL_TABLE.items() if v[:2] == (n, m) and v[2] != kind)
            expected[index[partner], index[j]] = (-1.0) ** ((m - 1) // 2)
    np.testing.assert_allclose(s, expected, atol=1e-9)


def test_a_rotated_camera_is_named_mirrored_x_and_mirrored_y():
    modes = [5, 6, 7, 8, 9, 10, 11]
    rotated = 1.2 * np.diag([(-1.0) ** NOLL_TABLE[j][1] for j in modes])   # odd m flips
    assert diagnose(rotated, modes)[0] == "mirrored x and mirrored y"
    # every candidate is recognised from its own expected pattern
    for name in CANDIDATES:
        got = diagnose(0.9 * expected_response(modes, name), modes)[0]
        assert got == ("conventions consistent" if name == "identity" else name)
    # with even-m modes only a mirror in x and one in y look the same, and the report says so
    even = [5, 6, 11]
    assert "cannot tell" in diagnose(expected_response(even, "mirrored y"), even)[0]


def test_a_mirror_is_exactly_the_opposite_handed_donut_with_the_mirrored_pupil():
    """The symmetry the expected patterns rest on, on the vectorial simulator: the x-mirrored
    image of the (+1 charge, circular plus) donut with W is the image of the (-1, circular minus)
    donut with W o (u -> -u), whose coefficients flip_signature gives. The grid is centred on
    pixel n/2, so x -> -x maps column i to n - i."""
    s = small_settings()
    plus = simulator(s)
    minus = simulator(s.replace(**{"optics.vortex_charge": -1, "optics.polarisation": "circular_minus"}))
    modes = [5, 6, 7, 8, 9, 10, 11]
    c = np.array([0.3, -0.2, 0.25, 0.1, -0.3, 0.2, 0.15])
    a = plus.orthosections(dict(zip(modes, c)))
    b = minus.orthosections(dict(zip(modes, flip_signature(modes, "mirrored x") @ c)))
    mirror = lambda img: np.roll(img[:, ::-1], 1, axis=-1)[:, 1:]  # noqa: E731 (x -> -x, column 0 has no partner)
    assert np.abs(mirror(a[0]) - b[0][:, 1:]).max() < 1e-5 * a.max()
    assert np.abs(mirror(a[1]) - b[1][:, 1:]).max() < 1e-5 * a.max()
    np.testing.assert_allclose(a[2], b[2], atol=1e-5 * a.max())     # the yz section lies on x = 0


def test_handedness_factor_of_the_opposite_donut(linear_predictor):
    """epsilon(m): a reader of the configured donut reads the opposite-handed donut's
    spherical (m = 0) with the same sign and its astigmatism and trefoil (m = 2, 3) with the
    opposite sign. Independent of the self-check: sections rendered directly."""
    s = small_settings()
    minus = simulator(s.replace(**{"optics.vortex_charge": -1, "optics.polarisation": "circular_minus"}))
    from autoalign.simulation.noise import blur_by_bead

    def read(sim, j, a):
        sec = blur_by_bead(sim.orthosections({j: a}), s.camera.bead_diameter_um, s.camera.pixel_size_um)
        return linear_predictor.predict(sec * 1000.0).coefficients[j]

    for j in linear_predictor.modes:
        gain = (read(minus, j, 0.4) - read(minus, j, -0.4)) / 0.8
        assert np.sign(gain) == handedness_factor(j), (j, gain)
        assert abs(gain) > 0.3, (j, gain)
