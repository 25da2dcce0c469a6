"""The instrument model (simulation/instrument.py) against independent calculations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoalign.simulation.instrument import (
    Instrument, InstrumentFileError, InstrumentPSF, pupil_samples_for, sphere_transfer)
from autoalign.simulation.noise import bead_kernel
from autoalign.simulation.vectorial import Optics, PSFSimulator

F64 = torch.float64
WATER = dict(numerical_aperture=1.0, immersion_index=1.33, wavelength_um=0.515)


def t(a):
    return torch.as_tensor(np.asarray(a, dtype=float), dtype=F64)


def test_point_intensity_matches_the_nominal_simulator_for_focus_and_donut():
    """With the ideal instrument, the model is the nominal vectorial simulator (another code path,
    itself checked against Bessel-function Richards-Wolf): focus and vortex with a mask offset."""
    z = np.linspace(-0.6, 0.6, 5)
    xs = t((np.arange(48) - 24) * 0.03)
    for beam, optics in (("none", dict(WATER)), ("vortex", dict(numerical_aperture=1.4, immersion_index=1.518,
                                                                  wavelength_um=0.775))):
        ins = Instrument(polarisation="circular_plus", **optics)
        model = InstrumentPSF(ins, 0.03, 48, n_modes=22, pupil_samples=64, beam=beam)
        coef = torch.zeros(22, dtype=F64)
        coef[6], coef[10] = 0.3, -0.2
        mine = model.intensity_on({"mask_offset_x": t(0.05)}, t(z), coef, xs, xs).numpy()
        sim = PSFSimulator(Optics(beam=beam, polarisation="circular_plus", **optics), pixel_size_um=0.03, n_px=48,
                           z_um=z, pupil_samples=64, n_modes=22, dtype=F64)
        ref = sim.stack({7: 0.3, 11: -0.2}, mask_offset=(0.05 if beam == "vortex" else 0.0, 0.0), z_um=z)
        scale = float((mine * ref).sum() / (ref * ref).sum())
        assert np.abs(mine - scale * ref).max() < 1e-8 * mine.max()


def test_plane_integrates_to_one_and_pixel_integration_is_exact():
    """Parseval normalisation: a plane on a large grid sums to 1; camera pixels are the point
    intensity averaged over the pixel (checked by 11 x 11 sub-samples of the point intensity)."""
    ins = Instrument(polarisation="unpolarised", **WATER)
    model = InstrumentPSF(ins, 0.097, 96, n_modes=22, pupil_samples=48)
    planes = model.planes({}, t([0.0]), torch.zeros(22, dtype=F64)).numpy()
    assert planes[0].sum() == pytest.approx(1.0, abs=0.01)
    n, p = 96, 0.097
    sub = (np.arange(11) + 0.5) / 11 - 0.5
    centre = np.arange(-3, 4)
    xs = (centre[:, None] + sub[None, :]).ravel() * p
    point = model.intensity_on({}, t([0.0]), torch.zeros(22, dtype=F64), t(xs), t(xs)).numpy()[0]
    brute = point.reshape(7, 11, 7, 11).mean(axis=(1, 3)) * p * p
    mine = planes[0, n // 2 - 3: n // 2 + 4, n // 2 - 3: n // 2 + 4]
    assert np.abs(mine - brute).max() < 2e-3 * brute.max()


def test_coarse_pixels_are_supersampled():
    """Pixels coarser than the intensity's Nyquist limit (NA 1.4, 0.16 µm) still integrate
    exactly: the model supersamples and bins."""
    ins = Instrument(numerical_aperture=1.4, immersion_index=1.518, wavelength_um=0.6, polarisation="unpolarised")
    model = InstrumentPSF(ins, 0.16, 32, n_modes=22, pupil_samples=48)
    assert model.supersample == 2
    plane = model.planes({}, t([0.3]), torch.zeros(22, dtype=F64)).numpy()[0]
    sub = (np.arange(9) + 0.5) / 9 - 0.5
    xs = ((np.arange(-2, 3)[:, None] + sub[None, :]).ravel()) * 0.16
    point = model.intensity_on({}, t([0.3]), torch.zeros(22, dtype=F64), t(xs), t(xs)).numpy()[0]
    brute = point.reshape(5, 9, 5, 9).mean(axis=(1, 3)) * 0.16**2
    assert np.abs(plane[14:19, 14:19] - brute).max() < 5e-3 * brute.max()


def test_bead_blur_is_the_sphere_projection():
    """The bead's transfer function equals a direct convolution with the sphere's projected chord
    profile (simulation.noise.bead_kernel, 5 x 5 sub-sampled) on a fine grid."""
    from scipy import signal

    ins0 = Instrument(polarisation="unpolarised", **WATER)
    p = 0.02
    sharp = InstrumentPSF(ins0, p, 96, n_modes=22, pupil_samples=48, pad_px=12)
    blurred = InstrumentPSF(Instrument(polarisation="unpolarised", bead_diameter_um=0.2, **WATER), p, 96,
                            n_modes=22, pupil_samples=48, pad_px=12)
    zero = torch.zeros(22, dtype=F64)
    a = sharp.planes({}, t([0.2]), zero).numpy()[0]
    b = blurred.planes({}, t([0.2]), zero).numpy()[0]
    ref = signal.fftconvolve(a, bead_kernel(0.2, p), mode="same")
    inner = slice(10, 86)
    assert np.abs(b[inner, inner] - ref[inner, inner]).max() < 0.02 * ref.max()
    assert b.max() < 0.9 * a.max()  # a 200 nm bead visibly blurs a 20 nm-sampled focus


def test_a_bead_below_one_pixel_keeps_its_gradient():
    """The bead diameter has a finite, non-zero gradient at 50 nm on 97 nm pixels (a kernel on the
    pixel grid collapses to a delta there); sphere_transfer is smooth through q = 0."""
    ins = Instrument(polarisation="unpolarised", **WATER)
    model = InstrumentPSF(ins, 0.097, 32, n_modes=22, pupil_samples=40)
    d = torch.tensor(0.05, dtype=F64, requires_grad=True)
    out = model.planes({"bead_diameter_um": d}, t([0.0]), torch.zeros(22, dtype=F64))
    out[0, 16, 16].backward()
    assert d.grad is not None and float(d.grad) < 0  # a larger bead lowers the peak
    q = torch.linspace(0, 0.05, 11, dtype=F64, requires_grad=True)
    s = sphere_transfer(q)
    s.sum().backward()
    assert torch.all(torch.isfinite(q.grad))
    assert float(sphere_transfer(t(3.0))) == pytest.approx(3 * (math.sin(3) - 3 * math.cos(3)) / 27, rel=1e-12)


def test_axial_scale_drift_and_unpolarised_light():
    """axial_scale s at stage focus z is the ideal instrument at optical defocus s z; a drift of
    g µm/µm is a lateral shift of g z; unpolarised = mean of x- and y-linear."""
    zero = torch.zeros(22, dtype=F64)
    zero[5] = 0.2
    base = Instrument(polarisation="unpolarised", **WATER)
    xs = t((np.arange(40) - 20) * 0.05)
    m = InstrumentPSF(base, 0.05, 40, n_modes=22, pupil_samples=48)
    scaled = m.intensity_on({"axial_scale": t(1.1)}, t([0.8]), zero, xs, xs)
    direct = m.intensity_on({}, t([0.88]), zero, xs, xs)
    assert torch.allclose(scaled, direct, atol=1e-10)
    drifted = m.intensity_on({"drift_x_per_um": t(0.05)}, t([0.8]), zero, xs, xs)
    shifted = m.intensity_on({"bead_x_um": t(0.04)}, t([0.8]), zero, xs, xs)
    assert torch.allclose(drifted, shifted, atol=1e-10)
    lx = InstrumentPSF(Instrument(polarisation="linear_x", **WATER), 0.05, 40, n_modes=22, pupil_samples=48)
    ly = InstrumentPSF(Instrument(polarisation="linear_y", **WATER), 0.05, 40, n_modes=22, pupil_samples=48)
    mean = 0.5 * (lx.intensity_on({}, t([0.3]), zero, xs, xs) + ly.intensity_on({}, t([0.3]), zero, xs, xs))
    assert torch.allclose(m.intensity_on({}, t([0.3]), zero, xs, xs), mean, rtol=1e-9, atol=1e-12)
    # linear x is elongated along x at high NA; unpolarised is round
    img = lx.intensity_on({}, t([0.0]), torch.zeros(22, dtype=F64), xs, xs).numpy()[0]
    assert img[20, 22] > img[22, 20] * 0.999 and img[20, 23] > 1.02 * img[23, 20]


def test_fill_factor_and_apodisation_widen_the_focus():
    """A Gaussian fill (weaker pupil edge) or apodisation gamma > 0 lowers the effective NA: the
    in-focus spot gets wider; decentration of the fill moves the defocused disc's light."""
    xs = t((np.arange(41) - 20) * 0.03)
    zero = torch.zeros(22, dtype=F64)

    def second_moment(ins: Instrument, z: float = 0.0, p=None) -> np.ndarray:
        m = InstrumentPSF(ins, 0.03, 41, n_modes=22, pupil_samples=48)
        return m.intensity_on(p or {}, t([z]), zero, xs, xs).numpy()[0]

    ideal = second_moment(Instrument(polarisation="unpolarised", **WATER))
    filled = second_moment(Instrument(polarisation="unpolarised", fill_factor=0.8, **WATER))
    apod = second_moment(Instrument(polarisation="unpolarised", apodisation=2.0, **WATER))
    r2 = (xs.numpy()[None, :] ** 2 + xs.numpy()[:, None] ** 2)

    def width(img: np.ndarray) -> float:
        core = r2 < 0.25**2
        return float((img * r2 * core).sum() / (img * core).sum())

    assert width(filled) > 1.05 * width(ideal) and width(apod) > 1.02 * width(ideal)
    dec = second_moment(Instrument(polarisation="unpolarised", fill_factor=0.7, decentration=(0.3, 0.0), **WATER), z=1.0)
    cx = float((dec * xs.numpy()[None, :]).sum() / dec.sum())
    assert abs(cx) > 0.02  # a decentred fill tilts the light of a defocused plane


def test_pupil_samples_for_this_geometry_and_the_32_node_default_fails():
    """At the real stack's geometry (NA 1.0 water, 97 nm, +-2.4 µm defocus, 64 px) the rule's
    node count is accurate to 1e-3 of the peak against twice the nodes; 32 nodes are off by more
    than the photon noise at the real stack's peak (1 / sqrt(2800 e) = 1.9 %)."""
    ins = Instrument(polarisation="unpolarised", **WATER)
    n = pupil_samples_for(1.0, 1.33, 0.515, 0.5 * 72 * 0.097, 2.4)
    coef = torch.zeros(22, dtype=F64)
    coef[10] = 0.1
    z = t([-2.4, 0.0, 2.4])
    good = InstrumentPSF(ins, 0.097, 64, n_modes=22, pupil_samples=n)
    assert good.quadrature_error(coef, z, factor=2.0) < 1e-3
    bad = InstrumentPSF(ins, 0.097, 64, n_modes=22, pupil_samples=32)
    assert bad.quadrature_error(coef, z, factor=2.0) > 0.02


def test_instrument_file_round_trip_and_errors(tmp_path):
    ins = Instrument(fill_factor=0.9, decentration=(0.02, -0.01), axial_scale=0.95, bead_diameter_um=0.12,
                     source="bead.tif", uncertainty={"axial_scale": 0.003}, **WATER)
    path = ins.save(tmp_path / "instrument.yaml")
    assert Instrument.load(path) == ins
    uniform = Instrument(**WATER)
    assert Instrument.load(uniform.save(tmp_path / "u.yaml")).fill_factor == math.inf
    (tmp_path / "foreign.yaml").write_text("optics: {numerical_aperture: 1.0}\n")
    with pytest.raises(InstrumentFileError, match="not an autoalign instrument file"):
        Instrument.load(tmp_path / "foreign.yaml")
    text = path.read_text().replace("axial_scale: 0.95", "axial_scale: 7.0")
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(InstrumentFileError, match="axial_scale = 7.0"):
        Instrument.load(tmp_path / "bad.yaml")
    (tmp_path / "extra.yaml").write_text(path.read_text().replace("axial_scale:", "axial_scal: 1.0\n  axial_scale:"))
    with pytest.raises(InstrumentFileError, match="instrument.axial_scal"):
        Instrument.load(tmp_path / "extra.yaml")
    with pytest.raises(InstrumentFileError, match="cannot read"):
        Instrument.load(tmp_path / "missing.yaml")
