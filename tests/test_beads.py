"""Bead detection in overviews (calibration/beads.py) on simulated bead fields (simulation/field.py):
isolated beads are found and accepted with centroids within 10 nm; neighbours, clusters, edge,
saturated and dim beads are rejected with the reason in words; hot pixels are never beads and never
chosen; the lobes of an aberrated PSF are not beads; the PNG and JSON are written."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from autoalign.calibration.beads import OVERVIEW_FORMAT, OverviewOptions, detect_beads, plot_overview
from autoalign.calibration.camera_defects import centre_of_mass
from autoalign.files import png_software
from autoalign.settings import load_settings
from autoalign.simulation.field import FieldSimulator, SensorDefects, random_positions, simulate_field
from autoalign.simulation.microscope import draw_aberration

PIXEL = 0.04
OPTIONS = OverviewOptions(min_distance_um=1.5)


@pytest.fixture(scope="module")
def simulator(one_torch_thread):
    return FieldSimulator(shape=(240, 240))


def _match(result, xy, tol=0.25):
    """The bead candidate nearest to (x, y) µm within ``tol``, else None."""
    best = min(result.beads, key=lambda b: np.hypot(b.x_um - xy[0], b.y_um - xy[1]), default=None)
    if best is None or np.hypot(best.x_um - xy[0], best.y_um - xy[1]) > tol:
        return None
    return best


# ----------------------------------------------------------------------------- the field
def test_random_positions_keep_their_spacing_and_pairs():
    rng = np.random.default_rng(0)
    xy = random_positions(20, (12.0, 12.0), rng, min_spacing_um=1.0, margin_um=0.5, close_pairs=3,
                          pair_distance_um=(1.0, 1.2))
    d = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1])
    np.fill_diagonal(d, np.inf)
    assert d.min() >= 1.0 - 1e-9
    for k in range(3):
        assert 1.0 <= d[2 * k, 2 * k + 1] <= 1.2
    assert np.all(np.abs(xy) <= 5.5)
    with pytest.raises(ValueError, match="cannot place"):
        random_positions(200, (5.0, 5.0), rng, min_spacing_um=1.0)


def test_a_bead_is_rendered_where_it_is(simulator):
    """Sub-pixel positions are exact tip/tilt: the noise-free centroid sits on the bead (+x right, +y down)."""
    xy = np.array([[0.37 * PIXEL, -0.21 * PIXEL], [3.0, 2.6]])
    img = simulator.intensity(xy)[0]
    rc = simulator.pixel_of(xy)
    for (r, c) in rc:
        got = centre_of_mass(img, (round(r), round(c)), 15)
        assert np.hypot(got[0] - r, got[1] - c) < 0.01


def test_simulated_field_truth(simulator):
    f = simulate_field(n_beads=8, seed=3, simulator=simulator, min_spacing_um=1.0)
    assert f.image.shape == (240, 240) and f.beads_um.shape == (8, 3)
    assert len(f.defects.hot) == round(0.001 * 240 * 240)
    assert np.all(f.image[f.defects.hot[:, 0], f.defects.hot[:, 1]] == 65535)
    again = simulate_field(n_beads=8, seed=3, simulator=simulator, min_spacing_um=1.0)
    np.testing.assert_array_equal(again.image, f.image)
    other = simulate_field(n_beads=8, seed=4, sensor_seed=3, simulator=simulator)
    np.testing.assert_array_equal(other.defects.hot, f.defects.hot)  # the camera, not the slide
    # a camera ROI of the simulated camera: its defects are the sensor's in that window
    sensor = SensorDefects.simulated_camera(seed=0)
    roi = sensor.crop((64, 64))
    assert np.array_equal(roi.mask(), sensor.mask()[:64, :64])
    with pytest.raises(ValueError, match="sensor of"):
        simulate_field(n_beads=2, simulator=simulator, defects=roi)


# ----------------------------------------------------------------------------- a designed field
@pytest.fixture(scope="module")
def designed(simulator):
    """Beads placed to show every verdict, 0.1 % hot pixels, one more hot pixel on bead A's ring."""
    beads = {
        "A": (-2.9, -2.9), "B": (2.6, -3.1), "C": (-2.7, 2.4),           # isolated
        "pair1": (0.2, -0.4), "pair2": (1.4, -0.4),                        # 1.2 µm apart
        "edge": (4.65, 1.0),                                               # 0.15 µm from the border
        "unresolved1": (-0.3, 3.6), "unresolved2": (-0.1, 3.6),            # 0.2 µm apart: one blob, 2 x
        "dim": (3.2, 3.4),
    }
    bright = {"dim": 0.05}
    names = list(beads)
    xy = np.array([beads[n] for n in names])
    defects = SensorDefects.random(simulator.shape, hot_fraction=0.001, seed=11)
    b = np.array([bright.get(n, 1.0) for n in names])
    img = simulator.render(xy, np.random.default_rng(5), b, defects)[0]
    ra, ca = simulator.pixel_of(np.array(beads["A"]))
    hot_on_a = (int(round(ra)) + 6, int(round(ca)))        # on the donut's ring, 0.24 µm from its centre
    img[hot_on_a] = 65535
    return img, dict(zip(names, xy)), defects, hot_on_a


def test_isolated_beads_are_found_accepted_and_centred(designed):
    img, beads, f, _ = designed
    res = detect_beads(img, PIXEL, OPTIONS)
    for name in ("A", "B", "C"):
        b = _match(res, beads[name])
        assert b is not None and b.accepted, (name, b and b.reason)
        err_nm = np.hypot(b.x_um - beads[name][0], b.y_um - beads[name][1]) * 1000
        assert err_nm < 10, (name, err_nm)
    assert res.chosen is not None and res.chosen.kind == "bead" and res.chosen.accepted
    assert _match(res, beads["A"]).hot_pixels_in_window >= 1   # the one on its ring (and random ones)


def test_the_ranking_gives_the_bead_walk_its_next_bead(designed):
    img, beads, _, _ = designed
    res = detect_beads(img, PIXEL, OPTIONS)
    ranked = res.ranked()
    assert ranked[0] is res.chosen and len(ranked) == len(res.accepted) == 3
    nxt = res.ranked(exclude=(res.chosen.index,))
    assert nxt == ranked[1:] and all(b.accepted for b in nxt)


def test_rejected_beads_say_why(designed):
    img, beads, _, _ = designed
    res = detect_beads(img, PIXEL, OPTIONS)
    for name in ("pair1", "pair2"):
        b = _match(res, beads[name])
        assert not b.accepted and any(r.startswith("neighbour 1.") and r.endswith("(< 1.5 µm)") for r in b.reasons), \
            b.reasons
    edge = _match(res, beads["edge"], tol=OPTIONS.edge_um)
    assert edge is not None and edge.reasons[0].startswith("at the edge"), edge and edge.reasons
    dim = _match(res, beads["dim"])
    assert dim is not None and any(r.startswith("too dim") for r in dim.reasons), dim and dim.reasons
    mid = (beads["unresolved1"] + beads["unresolved2"]) / 2
    clus = _match(res, mid)
    assert clus is not None and any(r.startswith("cluster (2.") or r.startswith("cluster (1.9") for r in clus.reasons), \
        clus and clus.reasons
    assert len(res.beads) == 8                      # nine beads, two of them unresolved
    lines = "\n".join(res.table())
    assert re.search(r"rejected: neighbour 1\.[12]\d µm away \(< 1\.5 µm\)", lines) and "CHOSEN" in lines


def test_hot_pixels_are_never_beads_nor_chosen(designed):
    img, _, defects, hot_on_a = designed
    res = detect_beads(img, PIXEL, OPTIONS)
    spikes = {(int(c.row), int(c.col)) for c in res.hot_pixels}
    hot = {(int(r), int(c)) for r, c in defects.hot} | {hot_on_a}
    assert hot <= spikes and len(spikes) == len(hot)
    assert all(c.kind == "hot pixel" and not c.accepted and not c.chosen for c in res.hot_pixels)
    for b in res.beads:
        assert min(np.hypot(r - b.row, c - b.col) for r, c in hot) > 1.5 or b.signal_adu > 1e4
    assert res.hot_pixels[0].reasons[0].startswith("one-pixel spike")


def test_saturated_beads_are_rejected_but_hot_pixels_saturate_nothing(simulator):
    xy = np.array([[-2.0, -2.0], [2.0, 2.0], [-2.0, 2.2]])
    img = simulator.render(xy, np.random.default_rng(1), np.array([60.0, 1.0, 1.0]))[0]
    img[simulator.pixel_of(xy[1]).round().astype(int)[0] + 5, simulator.pixel_of(xy[1]).round().astype(int)[1]] = 65535
    res = detect_beads(img, PIXEL, OPTIONS)
    assert any(r.startswith("saturated") for r in _match(res, xy[0]).reasons)
    assert not any(r.startswith("saturated") for r in _match(res, xy[1]).reasons)


def test_random_aberrated_fields_meet_the_targets(one_torch_thread):
    """Three fields, 0.7 rad of aberration: every isolated bead found and accepted, no false bead,
    centroids within 10 nm of the bead plus the noise-free PSF's own centroid offset, the chosen
    bead truly isolated, the PSF's side lobes named lobes."""
    s = load_settings()
    opt = OverviewOptions.from_settings(s)
    for seed in (3313, 4308, 5306):
        rng = np.random.default_rng(seed)
        ab = draw_aberration(rng, s.simulation.aberration_modes, 0.7)
        sim = FieldSimulator(s, aberration=ab, beam="none" if seed == 5306 else None)
        f = simulate_field(s, n_beads=14, seed=seed, close_pairs=2, simulator=sim)
        psf = sim.psf()[0]
        h = sim.patch_px // 2
        r0, c0 = centre_of_mass(psf, (h, h), opt.window_um / PIXEL)
        offset = np.array([c0 - h, r0 - h]) * PIXEL
        res = detect_beads(f.image, f.pixel_size_um, opt, centre_um=f.centre_um)
        nn = f.nearest_neighbour_um()
        rc = f.pixel_of(f.beads_um[:, :2])
        edge = np.minimum.reduce([rc[:, 0], rc[:, 1], 319 - rc[:, 0], 319 - rc[:, 1]]) * PIXEL
        for j, xy in enumerate(f.beads_um[:, :2]):
            b = _match(res, xy, tol=opt.edge_um if edge[j] < opt.edge_um else 0.25)
            if edge[j] > opt.edge_um + 0.05 and nn[j] > opt.min_distance_um + 0.1:
                assert b is not None and b.accepted, (seed, j, b and b.reason)
                assert np.hypot(*(np.array([b.x_um, b.y_um]) - xy - offset)) < 0.010
            elif edge[j] > opt.edge_um + 0.05 and nn[j] < opt.min_distance_um - 0.1:
                assert b is not None and any(r.startswith(("neighbour", "cluster")) for r in b.reasons)
        truth = f.beads_um[:, :2]
        for b in res.beads:
            tol = opt.edge_um if b.edge_um < opt.edge_um else 0.25
            assert np.min(np.hypot(truth[:, 0] - b.x_um, truth[:, 1] - b.y_um)) < tol, (seed, b.index, b.reason)
        for lobe in res.lobes:
            assert np.min(np.hypot(truth[:, 0] - lobe.x_um, truth[:, 1] - lobe.y_um)) > 0.5
        ch = res.chosen
        assert ch is not None
        j = int(np.argmin(np.hypot(truth[:, 0] - ch.x_um, truth[:, 1] - ch.y_um)))
        assert nn[j] >= opt.min_distance_um


def test_options_from_the_settings():
    s = load_settings()
    opt = OverviewOptions.from_settings(s)
    assert opt.min_distance_um == pytest.approx(0.5 * 64 * 0.04 + 0.775 / 1.4, abs=0.01)
    assert opt.min_snr == s.loop.min_snr and opt.saturation_adu == 65535
    assert OverviewOptions.from_settings(s, min_distance_um=3.0, min_snr=None).min_distance_um == 3.0


def test_json_and_png(tmp_path, designed):
    img, _, _, _ = designed
    res = detect_beads(img, PIXEL, OPTIONS, centre_um=(10.0, -5.0), source="test")
    data = json.loads(json.dumps(res.to_dict()))
    assert data["format"] == OVERVIEW_FORMAT and data["counts"]["beads"] == len(res.beads)
    assert data["chosen"]["accepted"] and data["chosen"]["reason"] == "chosen"
    assert all("reason" in b and "x_um" in b for b in data["beads"])
    assert abs(np.mean([b["x_um"] for b in data["beads"]]) - 10.0) < 5   # the stage frame
    png = plot_overview(img, res, tmp_path / "ov.png", title="test")
    assert png_software(png) == "autoalign overview"
    res.save_json(tmp_path / "ov.json")
    assert json.loads((tmp_path / "ov.json").read_text())["summary"] == res.summary()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D overview"):
        detect_beads(np.zeros(50), PIXEL)
    img = np.zeros((20, 20))
    img[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        detect_beads(img, PIXEL)
    with pytest.raises(ValueError, match="pixel_size_um"):
        detect_beads(np.zeros((20, 20)), 0.0)
    empty = detect_beads(np.random.default_rng(0).normal(100, 2, (64, 64)), PIXEL)
    assert empty.beads == [] and empty.chosen is None
