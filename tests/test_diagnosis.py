"""Fault diagnosis from refined fits on the simulated microscope with hidden faults (small grids,
fixed seeds), the null floor of a bead, the charge-flip test and the orientation signatures."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from autoalign.settings import load_settings
from autoalign.calibration import diagnosis as dg
from autoalign.calibration.refine import RefineOptions, RefineStart, refine
from autoalign.hardware.simulated import SimulatedSLM
from autoalign.simulation.microscope import SimulatedMicroscope
from autoalign.simulation.phase import total_phase
from autoalign.simulation.vectorial import PSFSimulator
from autoalign.simulation.zernike import noll_to_nm

Z_UM = (np.arange(32) - 16) * 0.04
MODES = range(5, 16)
OPTIONS = RefineOptions(crop_px=24, pupil_samples=24)


@pytest.fixture(scope="module")
def small():
    return load_settings().replace(**{"camera.roi_px": 32, "stack.planes": 32, "optics.pupil_samples": 32,
                                      "model.binning": 1, "model.modes": list(range(5, 16)),
                                      "model.predict_offset": False, "model.fine_checkpoint": ""})


def fit(settings, commanded=None, options=OPTIONS, seed=7, start_noise=0.05, **faults):
    """Refine a noisy stack of a microscope with hidden ``faults``, started from the aberration
    present plus CNN-like noise; returns the result and the microscope."""
    mic = SimulatedMicroscope(settings, seed=seed, **faults)
    slm = SimulatedSLM(mic)
    slm.open()
    commanded = commanded or {}
    slm.show(total_phase(settings, slm.pupil_samples, commanded))
    rng = np.random.default_rng(seed)
    # the network reads the image as the camera shows it: rotated 180 deg, odd-m modes negated
    sign = {j: (-1) ** abs(noll_to_nm(j)[1]) if mic.camera_orientation == "rotate_180" else 1 for j in MODES}
    start = {j: sign[j] * (float(mic.aberration[j - 1]) + commanded.get(j, 0.0)) + float(rng.normal(0, start_noise))
             for j in MODES}
    r = refine(mic.render_stack(Z_UM), Z_UM, settings, RefineStart(coefficients=start), commanded=commanded,
               options=options)
    return r, mic


@pytest.mark.parametrize("fraction", [0.005, 0.02])
def test_wrong_hand_fraction_diagnosed(small, fraction):
    r, _ = fit(small, wrong_hand_fraction=fraction, wrong_hand_phase_rad=0.8)
    assert r.wrong_hand_fraction == pytest.approx(fraction, rel=0.3)
    found = dg.diagnose(r, small)
    assert found and found[0].name == "polarisation_impurity"
    assert "quarter-wave plate" in found[0].action
    assert found[0].value == pytest.approx(fraction, rel=0.3)


def test_a_clean_instrument_has_nothing_to_report(small):
    r, _ = fit(small)
    assert r.valid, r.reason
    assert dg.diagnose(r, small) == []


@pytest.mark.parametrize("grey, expected", [(204, {"slm.grey_level_2pi": 255}), (255, None)])
def test_slm_stroke_diagnosed_with_the_grey_level_to_set(small, grey, expected):
    s = small.replace(**{"slm.grey_level_2pi": grey})
    options = RefineOptions(crop_px=24, pupil_samples=24, fit_slm_scale=True)
    r, _ = fit(s, commanded={6: 0.2, 8: -0.1}, options=options, slm_phase_scale=0.8)
    assert r.slm_phase_scale == pytest.approx(0.8, abs=0.03)
    ranked = dg.diagnose(r, s)
    assert ranked[0].name == "slm_stroke"
    found = {d.name: d for d in ranked}
    if expected is not None:
        assert found["slm_stroke"].settings == expected
    else:  # 255 / 0.8 > 255: the driver cannot: compensate
        assert found["slm_stroke"].settings["phase compensation factor"] == pytest.approx(1.25, abs=0.05)


def test_rotated_camera_names_both_flips(small):
    """Pokes on cos and sin modes of even and odd m, read back by refinement through a camera
    rotated 180 deg: the odd-m ones come back negated; the diagnosis names flip_x and flip_y."""
    pokes = {5: 0.3, 6: 0.3, 7: 0.3, 8: -0.3, 9: -0.3, 10: 0.3, 11: 0.3}
    before, _ = fit(small, camera_orientation="rotate_180")
    after, _ = fit(small, commanded=pokes, camera_orientation="rotate_180")
    readback = {j: after.coefficients[j] - before.coefficients[j] for j in MODES}
    for j, a in pokes.items():
        m = abs(noll_to_nm(j)[1])
        assert readback[j] == pytest.approx(a * (-1) ** m, abs=0.1)
    d = dg.diagnose_orientation(pokes, readback)
    assert d.name == "orientation"
    assert d.settings == {"slm.flip_x": True, "slm.flip_y": True}
    # an upright camera reads back the identity
    assert dg.diagnose_orientation(pokes, pokes).name == "orientation_ok"


def test_mask_offset_beyond_range_recentres_the_pupil(small):
    # the fit's quadrature as fine as the data's (32 nodes): see tests/test_refine.py
    r, _ = fit(small, options=dataclasses.replace(OPTIONS, pupil_samples=32), mask_offset=(0.13, 0.02))
    ranked = dg.diagnose(r, small, max_mask_shift=0.1)
    assert ranked[0].name == "mask_offset"
    found = {d.name: d for d in ranked}
    cx, cy = found["mask_offset"].settings["slm.pupil_centre_px"]
    # the pattern must move by -offset x pupil radius (500 px) on the SLM
    assert (cx, cy) == pytest.approx((960 - 0.13 * 500, 576 - 0.02 * 500), abs=5)


def test_higher_modes_are_named_as_unmodelled(small):
    r, _ = fit(small, higher_order_rms_rad=0.3)
    found = dg.diagnose(r, small)
    assert found[0].name == "unmodelled_aberration"


def test_bead_too_large_for_the_wanted_null(small):
    r, _ = fit(small)
    found = {d.name: d for d in dg.diagnose(r, small, wanted_null=0.01)}
    d_max = found["bead_too_large"].settings["camera.bead_diameter_um"]
    assert d_max < small.camera.bead_diameter_um
    assert dg.null_floor(small, d_max) <= 0.01 < dg.null_floor(small, d_max + 0.01)


def test_orientation_signatures_follow_the_symmetry_rules():
    """x -> -x: theta -> pi - theta: cos(m t) -> (-1)^m cos, sin(m t) -> -(-1)^m sin;
    y -> -y: sin -> -sin; 180 deg: (-1)^m; transpose swaps tip and tilt."""
    modes = list(range(2, 29))
    for name, rule in (("mirror_x", lambda n, m: (-1) ** abs(m) * (1 if m >= 0 else -1)),
                       ("mirror_y", lambda n, m: 1 if m >= 0 else -1),
                       ("rotate_180", lambda n, m: (-1) ** abs(m))):
        t = dg.orientation_matrix(name, modes)
        assert np.allclose(t, np.diag([rule(*noll_to_nm(j)) for j in modes]), atol=0.03), name
    t = dg.orientation_matrix("transpose", modes)
    assert t[0, 1] == 1 and t[1, 0] == 1  # Z2 <-> Z3
    assert t[modes.index(6), modes.index(6)] == -1 and t[modes.index(5), modes.index(5)] == 1


def test_null_floor_of_a_small_bead_matches_the_quadratic_null():
    """Near the centre a perfect donut is I = a r^2; a sphere of radius R weights r^2 by its
    projected thickness, <r^2> = 2 R^2 / 5: floor = a (2/5) R^2 / peak for R << the ring."""
    s = load_settings()
    sim = PSFSimulator.from_settings(s, n_px=8, z_um=[0.0], pupil_samples=48)
    r = np.array([0.004, 0.008])
    a = float(np.polyfit(r**2, sim.intensity_at(r, 0 * r, 0.0).diagonal(), 1)[0])
    x = np.linspace(0.2, 0.3, 101)
    peak = float(sim.intensity_at(x, 0 * x, 0.0)[0].max())
    d = 0.03
    expected = a * 0.4 * (d / 2) ** 2 / peak
    assert dg.null_floor(s, d, method="continuous") == pytest.approx(expected, rel=0.05)
    # the camera-pixel version is what the simulated camera shows: larger, and a point shows ~0
    assert dg.null_floor(s, 0.08) > dg.null_floor(s, 0.08, method="continuous")
    assert dg.null_floor(s, 0.0) < 1e-6


@pytest.mark.parametrize("bead_um, tol", [(0.0, 0.05), (0.08, 0.3)])
def test_charge_flip_test_reads_the_wrong_hand(bead_um, tol):
    s = load_settings().replace(**{"camera.bead_diameter_um": bead_um})
    centre, peak = {}, {}
    for charge in (1, -1):
        mic = SimulatedMicroscope(s, noise=False, aberration={}, wrong_hand_fraction=0.02, wrong_hand_phase_rad=0.7)
        slm = SimulatedSLM(mic)
        slm.open()
        slm.show(total_phase(s.replace(**{"optics.vortex_charge": charge}), slm.pupil_samples))
        xy = mic.intensity([0.0])[0]
        centre[charge], peak[charge] = float(xy[32, 32]), float(xy.max())
    floor = dg.null_floor(s) * peak[1]
    assert dg.wrong_hand_from_charge_flip(centre[1], centre[-1], floor_plus=floor) == pytest.approx(0.02, rel=tol)
    with pytest.raises(ValueError, match="charge -1"):
        dg.wrong_hand_from_charge_flip(centre[-1], centre[1])


def test_stop_rules():
    assert dg.is_at_floor(0.049, 0.045, margin=0.25) and not dg.is_at_floor(0.08, 0.045)
    assert not dg.is_at_floor(float("nan"), 0.045)
    assert dg.residual_within_crb(0.007, 0.004) and not dg.residual_within_crb(0.02, 0.004)
    assert dg.stroke_residual_rms(0.8) == pytest.approx(0.2 * math.sqrt(math.pi**2 / 3 - 16 / 9))


def test_a_null_at_the_bead_floor_is_said_so(small):
    r, _ = fit(small)
    floor = dg.null_floor(small)
    names = [d.name for d in dg.diagnose(r, small, measured_null=1.1 * floor)]
    assert names == ["at_bead_floor"]
    assert dg.diagnose(r, small, measured_null=3 * floor) == []
