"""The simulated microscope: geometry, the SLM-made vortex, correction, drift, reproducibility."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autoalign.settings import load_settings
from autoalign.hardware.acquisition import acquire_stack
from autoalign.hardware.factory import open_devices
from autoalign.hardware.simulated import SimulatedSLM
from autoalign.hardware.slm.convert import PhaseToGrey
from autoalign.simulation.microscope import SimulatedMicroscope, true_instrument
from autoalign.simulation.phase import total_phase


@pytest.fixture(scope="module")
def settings():
    # a point-like bead so the donut's null is not filled by the bead's size
    return load_settings().replace(**{"camera.bead_diameter_um": 0.0})


def centroid(img):
    img = np.clip(img - np.median(img), 0, None)
    y, x = np.indices(img.shape)
    return (img * x).sum() / img.sum(), (img * y).sum() / img.sum()


def null_depth(mic):
    """Centre over peak of the in-focus xy section (bead at the stage centre)."""
    xy = mic.intensity([mic.bead_um[2]])[0]
    n = xy.shape[0] // 2
    return xy[n, n] / xy.max()


def test_bead_displacement_seen_in_pixels(settings):
    # flat SLM (nothing shown): a plain focus; the bead moved by d appears moved by d / pixel
    mic = SimulatedMicroscope(settings, noise=False, aberration={})
    x0, y0 = centroid(mic.snap())
    mic.bead_um = (0.2, -0.12, 0.0)  # (5, -3) px of 0.04 µm
    x1, y1 = centroid(mic.snap())
    assert (x1 - x0, y1 - y0) == pytest.approx((5.0, -3.0), abs=0.05)
    assert (x0, y0) == pytest.approx((32.0, 32.0), abs=0.05)  # centre pixel n // 2
    # moving the stage by the same amount brings it back
    mic.stage_xy_um = (0.2, -0.12)
    assert centroid(mic.snap()) == pytest.approx((x0, y0), abs=1e-6)


def test_vortex_from_the_slm_and_its_correction(settings):
    """The key end-to-end check: SLM geometry, 8-bit wrapping, decoding, hidden aberration."""
    with open_devices(settings, noise=False, seed=3) as dev:
        mic, m = dev.microscope, dev.slm.pupil_samples
        assert mic.residual_rms() == pytest.approx(settings.simulation.aberration_rms_rad)
        # the hidden aberration alone, vortex shown on the SLM, fills the centre
        dev.slm.show(total_phase(settings, m))
        filled = null_depth(mic)
        assert filled > 0.02
        # zero aberration: the SLM-made vortex is dark in the centre
        hidden = mic.aberration.copy()
        mic.set_aberration({})
        assert null_depth(mic) < 1e-3
        mic.set_aberration(hidden)
        # the negative of the hidden aberration on the SLM restores the dark centre
        dev.slm.show(total_phase(settings, m, coefficients=-hidden))
        assert mic.residual_rms() < 1e-6
        assert np.abs(mic.residual_coefficients()).max() < 1e-6
        assert null_depth(mic) < 2e-3
        # half of it: in between
        dev.slm.show(total_phase(settings, m, coefficients=-0.5 * hidden))
        assert mic.residual_rms() == pytest.approx(0.5 * settings.simulation.aberration_rms_rad, rel=1e-6)
        assert 2e-3 < null_depth(mic) < filled


def test_slm_render_matches_simulator_mask_offset_convention(settings):
    """A centred vortex on an SLM misregistered by (ox, oy) is the vortex centred at (ox, oy) in the
    pupil, as the simulator's mask_offset: atan2(v - oy, u - ox) over the whole beam, since the SLM
    draws the pattern out to (1 + slm.pupil_margin) R (0.2 > 0.13: the beam is not clipped; the
    ring carries the pupil edge's value in its direction, which for a vortex is the vortex)."""
    offset = (0.12, -0.05)
    mic = SimulatedMicroscope(settings, noise=False, aberration={6: 0.2}, mask_offset=offset)
    with SimulatedSLM(mic) as slm:
        slm.show(total_phase(settings, slm.pupil_samples))
        got = mic.intensity([0.0])[0]
    u, v = mic.simulator.pupil_coordinates()
    du, dv = u - offset[0], v - offset[1]
    assert settings.slm.pupil_margin >= math.hypot(*offset)
    pupil = np.arctan2(dv, du)
    want = mic.simulator.stack({6: 0.2}, z_um=[0.0], pupil_phase=pupil, include_mask=False)[0]
    assert np.abs(got - want).max() < 0.02 * want.max()
    opposite = mic.simulator.stack({6: 0.2}, z_um=[0.0], pupil_phase=np.arctan2(v + offset[1], u + offset[0]),
                                   include_mask=False)[0]
    assert np.abs(got - opposite).max() > 0.2 * want.max()


def test_fast_path_equals_simulator_public_api(settings):
    mic = SimulatedMicroscope(settings, noise=False, seed=5, bead_um=(0.06, -0.03, 0.2))
    mic.stage_xy_um = (0.01, 0.02)
    slm = SimulatedSLM(mic)
    with slm:
        slm.show(total_phase(settings, 96, coefficients={8: 0.3}))
        for z in (0.0, 0.5):
            fast = mic.intensity([z])[0]
            slow = mic.intensity_per_plane(z)
            np.testing.assert_allclose(fast, slow, atol=1e-5 * slow.max())


def test_misconfigured_slm_flip_reverses_the_vortex(settings):
    """An SLM configured with flip_x but mounted without: the vortex turns the other way, which
    with circular polarisation of the other handedness fills the centre."""
    mic = SimulatedMicroscope(settings, noise=False, aberration={})
    wrong = PhaseToGrey.from_settings(settings.replace(**{"slm.flip_x": True}))
    with SimulatedSLM(mic, converter=wrong) as slm:
        slm.show(total_phase(settings, slm.pupil_samples))
        assert null_depth(mic) > 0.3
    # a correctly configured flip is invisible
    s2 = settings.replace(**{"slm.flip_x": True, "slm.flip_y": True})
    mic2 = SimulatedMicroscope(s2, noise=False, aberration={})
    with SimulatedSLM(mic2) as slm:
        slm.show(total_phase(s2, slm.pupil_samples, coefficients={7: 0.2}))
        assert mic2.residual_coefficients()[6] == pytest.approx(0.2, abs=1e-9)


def test_drift_walks_the_bead_off(settings):
    s = settings.replace(**{"simulation.drift_um_per_step": 0.5})
    with open_devices(s, seed=11) as dev:
        mic = dev.microscope
        start = np.array(mic.bead_um)
        first = acquire_stack(dev.camera, dev.focus, s)
        assert mic.acquisitions == 1 and not np.allclose(mic.bead_um, start)
        steps = 0
        while max(abs(mic.bead_um[0]), abs(mic.bead_um[1])) < 4.0 and steps < 1000:
            mic.new_acquisition()
            steps += 1
        assert steps < 1000
        gone = acquire_stack(dev.camera, dev.focus, s)
    cm = mic.camera_model
    background = cm.offset_adu + cm.background_photons * cm.quantum_efficiency
    assert first.data.max() > background + 300
    assert gone.data.mean() == pytest.approx(background, abs=1.0)  # only background left
    assert gone.data.max() < background + 40


def test_reproducible_for_a_seed(settings):
    def run(seed):
        s = settings.replace(**{"simulation.drift_um_per_step": 0.01})
        with open_devices(s, seed=seed) as dev:
            dev.slm.show(total_phase(s, 64))
            stack = acquire_stack(dev.camera, dev.focus, s)
            return dev.microscope.aberration, dev.microscope.bead_um, stack.data

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    assert not np.array_equal(a[0], c[0])
    # noise is real: shot noise of a bright donut differs between seeds
    assert not np.array_equal(a[2], c[2])


def ring_radius_px(img):
    """Radius (pixels) of the donut's brightest ring: azimuthal mean in 1-px annuli around the
    image centre, parabola through the maximum."""
    n = img.shape[0]
    y, x = np.indices(img.shape) - n // 2
    k = np.rint(np.hypot(x, y)).astype(int)
    prof = np.bincount(k.ravel(), img.ravel()) / np.bincount(k.ravel())
    i = int(np.argmax(prof[: n // 2]))
    a, b, c = prof[i - 1:i + 2]
    return i + 0.5 * (a - c) / (a - 2 * b + c)


@pytest.mark.parametrize("key, scale, expected", [
    ("simulation.true_na_scale", 0.92, 1 / 0.92),        # ring radius ~ wavelength / NA
    ("simulation.true_wavelength_scale", 1.1, 1.1),
    ("simulation.true_pixel_scale", 1.1, 1 / 1.1),        # the same ring, larger pixels
])
def test_the_true_instrument_differs_from_the_settings_as_physics_says(settings, key, scale, expected):
    from autoalign.calibration import donut
    from autoalign.correction import Correction

    nominal = SimulatedMicroscope(settings, noise=False, aberration={})
    true = SimulatedMicroscope(settings.replace(**{key: scale}), noise=False, aberration={})
    radii = []
    for mic in (nominal, true):
        with SimulatedSLM(mic) as slm:
            donut.show_correction(slm, settings, Correction())  # the vortex, as the loop shows it
            radii.append(ring_radius_px(mic.intensity([mic.bead_um[2]])[0]))
    assert radii[1] / radii[0] == pytest.approx(expected, rel=0.03)
    assert true_instrument(true.settings) == true.settings  # applied once, never twice
