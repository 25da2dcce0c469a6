"""Section scans of a scanning STED microscope (xy, xz, yz of one bead): the instrument-model fit
(calibration/section_fit.py), its verdict, the confocal detection, and ``autoalign analyse`` on an
Imspector .msr (app/analysis.py analyse_scans, app/analysis_report.py write_sections_report).

Truth comes from the nominal vectorial simulator (simulation/vectorial.py PSFSimulator, another code
path than the fit's InstrumentPSF) with a known aberration, mask offset and bead position, with
Poisson noise; the confocal detection is checked against an independent calculation (the detection
PSF on a 10 nm grid convolved with the pinhole disc by scipy). Sections are 100 x 100 px at 20 nm
(binned 2 x 2 by the fit) to keep the tests fast.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import pytest
import torch

from autoalign.calibration.section_fit import (
    SplitPupilPSF, _SectionProblem, fit_sections, pinhole_radius_um, split_chord_rule)
from autoalign.recording import SectionScan, SectionScans
from autoalign.simulation.instrument import Instrument, InstrumentPSF
from autoalign.simulation.vectorial import Optics, PSFSimulator

F64 = torch.float64
LAM, N_IMM, NA = 0.775, 1.518, 1.4
CENTRE = (1.0, -0.5, 2.0)                 # the scans' centre pixel in the scanner's frame, µm
BEAD = (0.023, -0.017, 0.041)             # the bead from that centre, µm (the sections miss it a little)
TRUTH = {7: 0.15, 11: 0.10}               # rad
OFFSET = (0.03, -0.02)                    # vortex mask offset, pupil radii
NOMINAL = Instrument(numerical_aperture=NA, immersion_index=N_IMM, wavelength_um=LAM, polarisation="circular_plus")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def simulate(coeffs: dict[int, float], offset=(0.0, 0.0), beam: str = "vortex", n: int = 100, pix: float = 0.02,
             bead=BEAD, peak: float = 300.0, background: float = 2.0, seed: int | None = 0, channel: str = "STED 775",
             nodes: int = 192, polarisation: str = "circular_plus", linear_angle_deg: float = 0.0) -> SectionScans:
    """xy, xz, yz scans through the grid centre of a bead at ``bead`` from it, by PSFSimulator:
    the bead's lateral offset as tip/tilt (exact: a Fourier shift), its axial offset by shifting
    the planes; counts ``peak * I + background`` with Poisson noise (``seed`` None: the expected
    counts). 192 pupil nodes: the simulator's unsplit rule needs them for an off-centre vortex."""
    dx, dy, dz = bead
    z = (np.arange(n) - n // 2) * pix
    sim = PSFSimulator(Optics(numerical_aperture=NA, immersion_index=N_IMM, wavelength_um=LAM, beam=beam,  # type: ignore[arg-type]
                              polarisation=polarisation, linear_angle_deg=linear_angle_deg),  # type: ignore[arg-type]
                       pixel_size_um=pix, n_px=n, z_um=z - dz, pupil_samples=nodes, n_modes=22, dtype=F64)
    c = dict(coeffs)
    c[2] = c.get(2, 0.0) + math.pi * NA * dx / LAM   # moves the focus by +dx (README conventions)
    c[3] = c.get(3, 0.0) + math.pi * NA * dy / LAM
    off = offset if beam != "none" else (0.0, 0.0)
    xy = sim.stack(c, mask_offset=off, z_um=[-dz])[0]
    _, xz, yz = sim.orthosections(c, mask_offset=off)
    rng = np.random.default_rng(seed) if seed is not None else None
    scans = {}
    for plane, img in (("xy", xy), ("xz", xz), ("yz", yz)):
        mu = peak * np.asarray(img, dtype=float) + background
        scans[plane] = SectionScan(cast(Literal["xy", "xz", "yz"], plane),
                                   rng.poisson(mu).astype(float) if rng is not None else mu, (pix, pix), CENTRE,
                                   channel=channel, name=f"{channel} {plane}")
    return SectionScans(xy=scans["xy"], xz=scans["xz"], yz=scans["yz"], channel=channel, name=channel)


@pytest.fixture(scope="module")
def donut() -> SectionScans:
    return simulate(TRUTH, OFFSET)


@pytest.fixture(scope="module")
def donut_fit(donut: SectionScans, one_torch_thread):
    return fit_sections(donut, NOMINAL, beam="vortex")


# ----------------------------------------------------------------------------- recovery and verdict
def test_fit_recovers_the_aberration_mask_offset_and_bead(donut_fit) -> None:
    """0.15 rad Noll 7 + 0.10 rad Noll 11 and a mask offset of (0.03, -0.02) pupil radii under
    Poisson noise (300 photons at the unaberrated peak): every mode, the offset and the bead within
    4 sigma, the sigmas small enough to mean something, and the verdict valid at the true optics."""
    f = donut_fit
    for j in range(5, 23):
        assert abs(f.coefficients[j] - TRUTH.get(j, 0.0)) < 4 * f.sigma[j], (j, f.coefficients[j], f.sigma[j])
        assert f.sigma[j] < 0.01
    for i in range(2):
        assert abs(f.mask_offset[i] - OFFSET[i]) < 4 * f.mask_offset_sigma[i] and f.mask_offset_sigma[i] < 0.005
    for i in range(3):
        assert abs(f.bead_um[i] - CENTRE[i] - BEAD[i]) < 4 * f.bead_sigma_um[i] + 1e-4
    assert f.valid, f.verdict
    assert f.deviance_per_dof < 1.1 and f.structure_p[4] > 1e-3
    assert f.verdict.startswith("the model explains the sections")
    # the sections' planes are where they were scanned, not through the bead
    assert f.plane_offset_um["xy"] == pytest.approx(-BEAD[2], abs=2e-3)
    assert f.plane_offset_um["xz"] == pytest.approx(-BEAD[1], abs=2e-3)
    assert f.bin_factor == {"xy": 2, "xz": 2, "yz": 2}


def test_verdict_invalid_at_a_wrong_na(donut: SectionScans) -> None:
    """The same data fitted at NA 1.2 instead of 1.4: the model cannot explain them."""
    f = fit_sections(donut, Instrument(numerical_aperture=1.2, immersion_index=N_IMM, wavelength_um=LAM,
                                       polarisation="circular_plus"), beam="vortex", max_iterations=60)
    assert not f.valid
    assert any("deviance" in r for r in f.reasons) and f.deviance_per_dof > 3
    assert "does NOT explain" in f.verdict


def test_verdict_invalid_with_a_mode_outside_the_fitted_set(donut: SectionScans) -> None:
    """The data's 0.15 rad Noll 7 left out of the fitted modes: the fit cannot explain the sections."""
    f = fit_sections(donut, NOMINAL, beam="vortex", modes=[m for m in range(5, 23) if m != 7], max_iterations=60)
    assert not f.valid, f.verdict
    assert f.deviance_per_dof > 1.2 or f.structure_p[4] < 1e-3


@pytest.fixture(scope="module")
def mirrored(one_torch_thread) -> SectionScans:
    """The donut as a focus scanned over a fixed bead records it: each section point-reflected about
    its centre pixel (61 px: the reflection is about a pixel), i.e. the focus at bead - scan for a
    bead at 2 centre - bead."""
    d = simulate(TRUTH, OFFSET, n=61, seed=5)
    flipped = {s.plane: SectionScan(s.plane, s.image[::-1, ::-1].copy(), s.pixel_um, s.centre_um, channel="STED")
               for s in d.sections()}
    return SectionScans(xy=flipped["xy"], xz=flipped["xz"], yz=flipped["yz"], channel="STED")


def test_mirrored_orientation_recovers_a_beam_scanned_donut(mirrored: SectionScans) -> None:
    """orientation='mirrored' (the focus at bead - scan) recovers the same aberration and offset from
    point-reflected sections, and the bead at its reflected position."""
    f = fit_sections(mirrored, NOMINAL, beam="vortex", orientation="mirrored", max_iterations=80)
    assert f.valid, f.verdict
    for j in range(5, 23):
        assert abs(f.coefficients[j] - TRUTH.get(j, 0.0)) < 4 * f.sigma[j], (j, f.coefficients[j], f.sigma[j])
    for i in range(2):
        assert abs(f.mask_offset[i] - OFFSET[i]) < 4 * f.mask_offset_sigma[i]
    for i in range(3):
        assert abs(f.bead_um[i] - CENTRE[i] + BEAD[i]) < 4 * f.bead_sigma_um[i] + 1e-4


@pytest.mark.slow
def test_mirrored_sections_read_as_the_focus_are_not_explained(mirrored: SectionScans) -> None:
    """The same sections read with the wrong orientation: refused (the point reflection negates the
    coefficients and flips the vortex's and the polarisation's handedness, which the model's fixed
    handedness cannot follow)."""
    f = fit_sections(mirrored, NOMINAL, beam="vortex", orientation="focus", max_iterations=80)
    assert not f.valid and f.deviance_per_dof > 1.5


def test_split_pupil_rule_is_exact_where_the_plain_rule_is_not() -> None:
    """The fit's pupil rule split at the vortex centre: its weights integrate the disc, it agrees
    with the unsplit rule for a smooth pupil (a focus), and for a vortex 0.036 pupil radii off
    centre 32 of its nodes agree with 128 where 32 unsplit nodes are far off."""
    u, v, w = split_chord_rule(32, (0.03, -0.02))
    assert w.sum() == pytest.approx(math.pi, rel=1e-12)
    assert np.all(u**2 + v**2 <= 1 + 1e-12) and np.all(u == u[:, :1])        # one u per row: separable
    xs = torch.as_tensor((np.arange(40) - 20) * 0.04, dtype=F64)
    z = torch.as_tensor([-0.4, 0.0, 0.3], dtype=F64)
    coef = torch.zeros(22, dtype=F64)
    coef[6], coef[10] = 0.15, 0.1
    p = {"mask_offset_x": torch.as_tensor(0.03, dtype=F64), "mask_offset_y": torch.as_tensor(-0.02, dtype=F64)}

    def image(nodes: int, beam: str, split: tuple[float, float] | None) -> np.ndarray:
        if split is None:
            m = InstrumentPSF(NOMINAL, 0.05, 8, 22, beam=beam, pupil_samples=nodes)
        else:
            m = SplitPupilPSF(NOMINAL, 0.05, 8, 22, beam=beam, pupil_samples=nodes, split=split)
        with torch.no_grad():
            return m.intensity_on(p if beam == "vortex" else {}, z, coef, xs, xs).numpy()

    focus = image(64, "none", None)
    assert np.abs(image(64, "none", (0.03, -0.02)) - focus).max() < 1e-6 * focus.max()
    ref = image(128, "vortex", (0.03, -0.02))
    split_err = np.abs(image(32, "vortex", (0.03, -0.02)) - ref).max() / ref.max()
    plain_err = np.abs(image(32, "vortex", None) - ref).max() / ref.max()
    assert split_err < 1e-5 and plain_err > 100 * split_err, (split_err, plain_err)


# ----------------------------------------------------------------------------- confocal detection
def _disc(radius: float, step: float, sub: int = 10) -> np.ndarray:
    """Area fractions of a disc on a square lattice (the test's own, independent of the fit's)."""
    m = int(radius / step) + 2
    o = (np.arange(sub) + 0.5) / sub - 0.5
    g = (np.arange(-m, m + 1)[:, None] + o[None, :]).ravel() * step
    inside = (g[:, None] ** 2 + g[None, :] ** 2 <= radius**2).reshape(2 * m + 1, sub, 2 * m + 1, sub)
    return inside.mean(axis=(1, 3))


def test_confocal_model_is_illumination_times_detection_through_the_pinhole() -> None:
    """The fit's confocal signal of an aberrated, offset donut equals, on xy and xz sections whose
    planes miss the bead, the illumination (PSFSimulator) times the unpolarised detection PSF
    (PSFSimulator, mean of x and y linear) convolved with a 1 AU pinhole disc by scipy on a 10 nm
    grid. The lateral pinhole integral of the axial section is exact: the chord-length
    approximation (the detection's row through the section weighted by the disc's chord) is
    several times further off."""
    from scipy import signal

    n, pix, fine = 40, 0.02, 0.01
    scans = simulate(TRUTH, OFFSET, n=n, pix=pix, seed=None)
    problem = _SectionProblem(scans, NOMINAL, "vortex", list(range(5, 23)), True, max_px=64, pupil_samples=96)
    theta = np.zeros(len(problem.names))
    ix = problem.index
    for j, c in TRUTH.items():
        theta[ix[f"Z{j}"]] = c
    theta[ix["mask_offset_x"]], theta[ix["mask_offset_y"]] = OFFSET
    for i, a in enumerate("xyz"):
        theta[ix[f"bead_{a}_um"]] = CENTRE[i] + BEAD[i]
    problem.split_at(OFFSET)
    with torch.no_grad():
        mine = {g.plane: problem.point_signal(torch.as_tensor(theta), k).numpy() for k, g in enumerate(problem.grids)}
    radius = pinhole_radius_um(NOMINAL)
    disc = _disc(radius, fine)
    # the detection PSF on a fine grid centred on the scans' centre, the bead displaced as in simulate()
    m = int(round((n * pix / 2 + radius + 0.1) / fine))
    nf = 2 * m + 1
    dx, dy, dz = BEAD
    tilt = {2: math.pi * NA * dx / LAM, 3: math.pi * NA * dy / LAM}
    z = (np.arange(n) - n // 2) * pix

    def detection(planes: np.ndarray) -> np.ndarray:
        out = 0.0
        for angle in (0.0, 90.0):
            sim = PSFSimulator(Optics(numerical_aperture=NA, immersion_index=N_IMM, wavelength_um=LAM, beam="none",
                                      polarisation="linear", linear_angle_deg=angle),
                               pixel_size_um=fine, n_px=nf, z_um=planes, pupil_samples=64, n_modes=22, dtype=F64)
            out = out + 0.5 * sim.stack(tilt, z_um=planes)
        return np.asarray(out)

    on_grid = m + 2 * (np.arange(n) - n // 2)          # the sections' pixels on the fine grid
    det_xy = detection(np.array([-dz]))[0]
    conv_xy = signal.fftconvolve(det_xy, disc, mode="same")[np.ix_(on_grid, on_grid)]
    det_xz = detection(z - dz)                          # (z, y, x) planes
    conv_xz = np.stack([signal.fftconvolve(p, disc, mode="same")[m] for p in det_xz])[:, on_grid]
    chord = np.sqrt(np.clip(radius**2 - ((np.arange(nf) - m) * fine) ** 2, 0, None))
    chord_xz = np.stack([np.convolve(p[m], chord, mode="same") for p in det_xz])[:, on_grid]
    sim = PSFSimulator(Optics(numerical_aperture=NA, immersion_index=N_IMM, wavelength_um=LAM, beam="vortex",
                              polarisation="circular_plus"), pixel_size_um=pix, n_px=n, z_um=z - dz,
                       pupil_samples=192, n_modes=22, dtype=F64)
    coeffs = dict(TRUTH) | tilt
    ill_xy = sim.stack(coeffs, mask_offset=OFFSET, z_um=[-dz])[0]
    ill_xz = sim.orthosections(coeffs, mask_offset=OFFSET)[1]
    for plane, ill, conv in (("xy", ill_xy, conv_xy), ("xz", ill_xz, conv_xz)):
        ref = ill * conv
        a, b = mine[plane] / mine[plane].max(), ref / ref.max()
        assert np.abs(a - b).max() < 2e-3, (plane, np.abs(a - b).max())
    ref = ill_xz * conv_xz
    chord_ref = ill_xz * chord_xz
    err = np.abs(mine["xz"] / mine["xz"].max() - ref / ref.max()).max()
    chord_err = np.abs(chord_ref / chord_ref.max() - ref / ref.max()).max()
    assert chord_err > 5 * err and chord_err > 0.01, (err, chord_err)
    # and the detection matters: the illumination alone differs by far more than the noise
    with torch.no_grad():
        direct = problem.point_signal(torch.as_tensor(theta), 0, detection=False).numpy()
    scale = float((mine["xy"] * direct).sum() / (direct * direct).sum())
    assert np.abs(mine["xy"] - scale * direct).max() / mine["xy"].max() > 0.1


def test_bead_blur_matches_a_sphere_averaged_point_response() -> None:
    """A 150 nm sphere: the fit's bead (projection onto the plane times its marginal across it)
    against the point response averaged over the sphere (a 4 x 6 x 8 product Gauss rule in
    spherical coordinates) on the xz section through the donut's null, where the bead fills it."""
    n, pix, diam = 40, 0.02, 0.15
    scans = simulate(TRUTH, OFFSET, n=n, pix=pix, seed=None, nodes=64)
    bead_ins = Instrument(numerical_aperture=NA, immersion_index=N_IMM, wavelength_um=LAM,
                          polarisation="circular_plus", bead_diameter_um=diam)
    sphere = _SectionProblem(scans, bead_ins, "vortex", [7, 11], False, pupil_samples=48)
    point = _SectionProblem(scans, NOMINAL, "vortex", [7, 11], False, pupil_samples=48)
    theta = np.zeros(len(point.names))
    ix = point.index
    theta[ix["Z7"]], theta[ix["Z11"]] = TRUTH[7], TRUTH[11]
    theta[ix["mask_offset_x"]], theta[ix["mask_offset_y"]] = OFFSET
    for i, a in enumerate("xyz"):
        theta[ix[f"bead_{a}_um"]] = CENTRE[i] + BEAD[i]
    for pr in (sphere, point):
        pr.split_at(OFFSET)
    k = point.keys.index("xz")
    r, wr = np.polynomial.legendre.leggauss(4)
    ct, wt = np.polynomial.legendre.leggauss(6)
    rad = 0.5 * diam * 0.5 * (r + 1)
    wr = wr * 0.5 * (0.5 * diam) * rad**2
    phi = 2 * math.pi * np.arange(8) / 8
    total: Any = 0.0
    weight = 0.0
    with torch.no_grad():
        for ri, wri in zip(rad, wr):
            for c, wc in zip(ct, wt):
                s = math.sqrt(1 - c * c)
                for ph in phi:
                    th = theta.copy()
                    th[ix["bead_x_um"]] += ri * s * math.cos(ph)
                    th[ix["bead_y_um"]] += ri * s * math.sin(ph)
                    th[ix["bead_z_um"]] += ri * c
                    total = total + wri * wc * point.intensity(torch.as_tensor(th), k).numpy()
                    weight += wri * wc
        brute = total / weight
        mine = sphere.intensity(torch.as_tensor(theta), k).numpy()
        bare = point.intensity(torch.as_tensor(theta), k).numpy()
    peak = brute.max()
    assert np.abs(mine - brute).max() < 3e-3 * peak
    assert np.abs(bare - brute).max() > 10 * np.abs(mine - brute).max()


@pytest.fixture(scope="module")
def confocal_data(one_torch_thread) -> SectionScans:
    """Confocal sections: the model's own confocal expectation of the donut (600 photons), Poisson."""
    scans = simulate({}, (0.0, 0.0), n=60, pix=0.02, seed=None, nodes=64)
    problem = _SectionProblem(scans, NOMINAL, "vortex", list(range(5, 12)), True, pupil_samples=40)
    theta = np.zeros(len(problem.names))
    ix = problem.index
    for j, c in TRUTH.items():
        theta[ix[f"Z{j}"]] = c
    theta[ix["mask_offset_x"]], theta[ix["mask_offset_y"]] = OFFSET
    for i, a in enumerate("xyz"):
        theta[ix[f"bead_{a}_um"]] = CENTRE[i] + BEAD[i]
    problem.split_at(OFFSET)
    rng = np.random.default_rng(3)
    sections = {}
    with torch.no_grad():
        for k, g in enumerate(problem.grids):
            mu = 600 * problem.intensity(torch.as_tensor(theta), k).numpy() + 2.0
            sections[g.plane] = SectionScan(g.plane, rng.poisson(mu).astype(float), g.pix, CENTRE, channel="STED")
    return SectionScans(xy=sections["xy"], xz=sections["xz"], yz=sections["yz"], channel="STED")


def test_confocal_fit_recovers_what_it_was_given(confocal_data: SectionScans) -> None:
    """Confocal data: the fit with the detection expanded about the bead (and re-expanded as it
    moves) recovers the aberration, the offset and the bead within 4 sigma."""
    f = fit_sections(confocal_data, NOMINAL, beam="vortex", modes=range(5, 12), confocal=True)
    assert f.valid, f.verdict
    for j in range(5, 12):
        assert abs(f.coefficients[j] - TRUTH.get(j, 0.0)) < 4 * f.sigma[j], (j, f.coefficients[j], f.sigma[j])
    for i in range(2):
        assert abs(f.mask_offset[i] - OFFSET[i]) < 4 * f.mask_offset_sigma[i]
    for i in range(3):
        assert abs(f.bead_um[i] - CENTRE[i] - BEAD[i]) < 4 * f.bead_sigma_um[i] + 1e-4
    assert f.confocal and max(f.detection_effect.values()) > 0.1


@pytest.mark.slow
def test_confocal_data_fitted_as_direct_detection_are_not_explained(confocal_data: SectionScans) -> None:
    """The same confocal data fitted without the detection (the illumination alone): refused."""
    f = fit_sections(confocal_data, NOMINAL, beam="vortex", modes=range(5, 12), confocal=False, max_iterations=60)
    assert not f.valid and f.deviance_per_dof > 3


# ----------------------------------------------------------------------------- the command on an .msr
def _write_msr(path: Path, depletion: SectionScans, excitation: SectionScans) -> Path:
    from tests.obf_writer import imspector_stack, write_obf

    stacks = []
    centre_m = (CENTRE[0] * 1e-6, CENTRE[1] * 1e-6, CENTRE[2] * 1e-6)
    for i, plane in enumerate(("xy", "xz", "yz")):
        for label, scans in (("STED 775", depletion), ("Confocal 640", excitation)):
            scan = getattr(scans, plane)
            stacks.append(imspector_stack(f"{label} {{{i + 1}}}", np.round(scan.image).astype(np.uint16), plane,
                                          scan.pixel_um[0] * 1e-6, centre_m, compress=plane == "xz"))
    return write_obf(path, stacks, description="autoalign test: section scans of one bead")


def test_analyse_msr_every_channel_report_and_json(tmp_path: Path, monkeypatch, capsys, donut: SectionScans) -> None:
    """``autoalign analyse FILE.msr --beam vortex ... --scan-detection direct --json`` on an Imspector
    file with a STED (depletion) and a confocal (excitation) channel: each channel analysed with
    its beam (depletion: the vortex, excitation: a focus), a report PNG per channel, one JSON
    with the fit, the verdict, the beam rule and how much confocal detection would change the
    model; the depletion channel's aberration recovered."""
    from autoalign.app.cli import main

    monkeypatch.chdir(tmp_path)
    focus = simulate({5: 0.1}, beam="none", peak=500.0, seed=1, channel="Confocal 640", nodes=64)
    msr = _write_msr(tmp_path / "bead.msr", donut, focus)
    out = tmp_path / "report"
    rc = main(["analyse", str(msr), "--beam", "vortex", "--na", "1.4", "--immersion-index", "1.518",
               "--wavelength-um", "0.775", "--bead-diameter-um", "0", "--scan-detection", "direct", "--json",
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr()
    result = json.loads(printed.out)
    assert json.loads((out / "bead.json").read_text()) == result
    scans = {e["channel"]: e for e in result["scans"]}
    assert set(scans) == {"STED 775", "Confocal 640"}
    sted, conf = scans["STED 775"], scans["Confocal 640"]
    assert (sted["beam"], conf["beam"]) == ("vortex", "none")
    assert "excitation" in conf["beam_rule"] and "depletion" in sted["beam_rule"]
    for e in (sted, conf):
        assert e["detection"] == "direct" and e["confocal_detection"] is False
        assert 0.03 < e["confocal_effect_of_peak"] < 0.6
        assert set(e["sections"]) == {"xy", "xz", "yz"}
        assert e["fit"]["valid"], e["fit"]["verdict"]
        png = Path(e["report_png"])
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert any("confocal detection" in s for s in e["limits"])
    assert len({e["report_png"] for e in (sted, conf)}) == 2
    fit, sig = sted["fit"]["coefficients_rad"], sted["fit"]["sigma_rad"]
    for j, c in TRUTH.items():
        assert abs(fit[str(j)] - c) < 4 * sig[str(j)]
    assert abs(sted["fit"]["mask_offset"][0] - OFFSET[0]) < 4 * sted["fit"]["mask_offset_sigma"][0]
    assert abs(conf["fit"]["coefficients_rad"]["5"] - 0.1) < 4 * conf["fit"]["sigma_rad"]["5"]
    assert "mask_offset" in sted["fit"] and "networks" in sted and "networks" not in conf
    assert any("640 nm" in s for s in conf["limits"])     # the name's wavelength differs from the one modelled
