"""Camera defects (calibration/camera_defects.py) on the simulated sensor (simulation/field.py):
the defect map from dark frames finds the injected hot, dead and warm pixels and nothing else;
flats find pixels that do not respond; the file round-trips and a foreign, damaged or newer file is
refused with its name and what was found; the robust centroid ignores a hot pixel that drags the
plain centre of mass away."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from autoalign.calibration.camera_defects import (
    DEAD,
    DEFECT_FORMAT,
    HOT,
    NOISY,
    STUCK,
    DefectMap,
    DefectMapError,
    centre_of_mass,
    find_spikes,
    measure_defects,
    replace_pixels,
    robust_centroid,
)
from autoalign.files import OverwriteRefused
from autoalign.simulation.field import FieldSimulator, SensorDefects, dark_frames, flat_frames
from autoalign.simulation.noise import CameraModel

CAMERA = CameraModel()


@pytest.fixture(scope="module")
def sensor():
    return SensorDefects.random((128, 160), hot_fraction=0.001, dead_fraction=0.0005, warm_fraction=0.0005, seed=7)


@pytest.fixture(scope="module")
def dark(sensor):
    return dark_frames(CAMERA, sensor, 30, np.random.default_rng(1))


def test_the_simulated_sensor_is_fixed_by_its_seed(sensor):
    again = SensorDefects.random((128, 160), hot_fraction=0.001, dead_fraction=0.0005, warm_fraction=0.0005, seed=7)
    np.testing.assert_array_equal(again.hot, sensor.hot)
    # the hot pixels of a seed do not move when the other kinds change
    other = SensorDefects.random((128, 160), hot_fraction=0.001, seed=7)
    np.testing.assert_array_equal(other.hot, sensor.hot)
    assert not np.array_equal(SensorDefects.random((128, 160), seed=8).hot, sensor.hot)
    assert len(sensor.hot) == 20 and len(sensor.dead) == 10 and len(sensor.warm) == 10
    assert not (sensor.mask("hot") & sensor.mask("dead")).any()


def test_dark_frames_hold_the_defects(sensor, dark):
    r, c = sensor.hot[0]
    assert np.all(dark[:, r, c] == CAMERA.saturation_adu)
    r, c = sensor.dead[0]
    assert np.all(dark[:, r, c] == CAMERA.offset_adu)
    good = ~sensor.mask()
    assert abs(np.median(dark[:, good]) - CAMERA.offset_adu) <= 1


def test_defect_map_finds_the_injected_pixels_and_nothing_else(sensor, dark):
    dmap = measure_defects(dark, saturation_adu=CAMERA.saturation_adu)
    hot_truth = sensor.mask("hot") | sensor.mask("warm")
    assert np.array_equal(dmap.mask(HOT), hot_truth)
    assert np.array_equal(dmap.mask(DEAD), sensor.mask("dead"))
    assert np.array_equal(dmap.mask(), sensor.mask())          # no good pixel flagged
    assert np.array_equal(dmap.mask(STUCK), sensor.mask("hot") | sensor.mask("dead"))
    assert np.all(dmap.mask(NOISY)[sensor.mask("warm")])     # Poisson dark current: noisy too
    assert dmap.counts()["full_scale"] == len(sensor.hot)
    assert "stuck at full scale" in dmap.summary()


def test_flats_find_pixels_that_do_not_respond(sensor, dark):
    flats = flat_frames(CAMERA, sensor, 10, np.random.default_rng(2), photons=2000.0)
    weak = [(5, 5), (60, 100)]
    for r, c in weak:  # pixels at a fifth of the sensitivity: they still have dark noise
        flats[:, r, c] = CAMERA.offset_adu + 0.2 * (flats[:, r, c] - CAMERA.offset_adu)
    dmap = measure_defects(dark, flats)
    for r, c in weak:
        assert dmap.flags[r, c] & DEAD
    assert np.count_nonzero(dmap.mask(DEAD)) == len(sensor.dead) + len(weak)
    assert dmap.info["flat_frames"] == 10
    with pytest.raises(ValueError, match="more light"):
        measure_defects(dark, dark[:5])                       # "flats" without light


def test_measure_refuses_too_few_or_bad_frames(dark):
    with pytest.raises(ValueError, match="at least 2"):
        measure_defects(dark[:1])
    bad = dark[:3].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        measure_defects(bad)


def test_save_load_apply_and_window(tmp_path, sensor, dark):
    dmap = measure_defects(dark, origin=(10, 20), source="test")
    path = dmap.save(tmp_path / "defects.npz")
    back = DefectMap.load(path)
    np.testing.assert_array_equal(back.flags, dmap.flags)
    assert back.origin == (10, 20) and back.info["source"] == "test"
    frame = dark_frames(CAMERA, sensor, 2, np.random.default_rng(3))
    fixed = back.apply(frame)
    assert fixed.shape == frame.shape
    assert np.all(np.abs(fixed[:, sensor.mask()] - CAMERA.offset_adu) <= 6)   # hot pixels gone
    np.testing.assert_array_equal(fixed[:, ~sensor.mask()], frame[:, ~sensor.mask()])
    # a camera ROI inside the sensor: its own window of the map
    r, c = sensor.hot[0]
    roi = frame[0, r - 4:r + 4, c - 4:c + 4]
    fixed_roi = back.apply(roi, origin=(10 + r - 4, 20 + c - 4))
    assert fixed_roi[4, 4] < 200
    with pytest.raises(ValueError, match="leaves the defect map"):
        back.apply(frame[0], origin=(0, 0))
    # replacing an existing map is fine; a foreign file is not (unless forced)
    dmap.save(path)
    foreign = tmp_path / "notes.npz"
    foreign.write_bytes(b"my own data")
    with pytest.raises(OverwriteRefused, match="not an autoalign camera defect map"):
        dmap.save(foreign)
    assert foreign.read_bytes() == b"my own data"
    dmap.save(foreign, force=True)
    assert DefectMap.load(foreign).shape == dmap.shape


def test_foreign_damaged_and_newer_files_are_refused_by_name(tmp_path, dark):
    missing = tmp_path / "none.npz"
    with pytest.raises(DefectMapError, match=r"none\.npz: no such camera defect map"):
        DefectMap.load(missing)
    text = tmp_path / "notes.txt"
    text.write_text("a day of lab notes\n")
    with pytest.raises(DefectMapError, match=r"notes\.txt: expected an autoalign camera defect map"):
        DefectMap.load(text)
    arrays = tmp_path / "arrays.npz"
    np.savez(arrays, flags=np.zeros((4, 4), np.uint8))
    with pytest.raises(DefectMapError, match=r"arrays\.npz: .*found entries \['flags'\] and no 'format'"):
        DefectMap.load(arrays)
    other = tmp_path / "other.npz"
    np.savez(other, format=np.array("someone-else"), flags=np.zeros((4, 4), np.uint8))
    with pytest.raises(DefectMapError, match="found format 'someone-else'"):
        DefectMap.load(other)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros((4, 4)))
    with pytest.raises(DefectMapError, match="a single numpy array"):
        DefectMap.load(single)
    good = measure_defects(dark).save(tmp_path / "good.npz")
    newer = tmp_path / "newer.npz"
    with np.load(good) as d:
        entries = {k: d[k] for k in d.files}
    entries["format_version"] = np.array(99)
    np.savez(newer, **entries)
    with pytest.raises(DefectMapError, match="format version 99.*update autoalign"):
        DefectMap.load(newer)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DefectMapError, match=r"truncated\.npz: "):
        DefectMap.load(truncated)
    broken = tmp_path / "broken.npz"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("format.npy", b"garbage")
    with pytest.raises(DefectMapError, match=r"broken\.npz: "):
        DefectMap.load(broken)
    assert json.loads(json.dumps(measure_defects(dark).to_dict()))["format"] == DEFECT_FORMAT


def test_replace_pixels_uses_good_neighbours_only():
    img = np.full((6, 6), 10.0)
    img[2, 2] = img[2, 3] = 1000.0           # two adjacent hot pixels
    m = np.zeros((6, 6), bool)
    m[2, 2] = m[2, 3] = True
    out = replace_pixels(np.stack([img, 2 * img]), m)
    assert np.all(out[0][m] == 10.0) and np.all(out[1][m] == 20.0)
    block = np.zeros((6, 6), bool)
    block[1:4, 1:4] = True                   # the centre has no good neighbour within 3 x 3
    assert np.all(replace_pixels(img, block)[block] == 10.0)


@pytest.fixture(scope="module")
def one_bead():
    """A camera ROI (64 x 64, 40 nm) with one donut at a known sub-pixel position, noisy."""
    sim = FieldSimulator(shape=(64, 64))
    truth_px = (0.37, -0.21)                 # (dx, dy) from the centre pixel
    image = sim.render(np.array([[truth_px[0] * 0.04, truth_px[1] * 0.04]]), np.random.default_rng(4))[0]
    return image, (32 + truth_px[1], 32 + truth_px[0])   # (row, col)


def test_robust_centroid_ignores_a_hot_pixel_the_plain_centre_of_mass_follows(one_bead):
    image, (r0, c0) = one_bead
    noisy_err = np.hypot(*np.subtract(robust_centroid(image, 15), (r0, c0))) * 40
    assert noisy_err < 5                      # nm, without a hot pixel
    hot = image.copy()
    hot[32 + 9, 32 - 5] = CAMERA.saturation_adu   # a hot pixel inside the ROI, 10 px from the bead
    assert find_spikes(hot)[32 + 9, 32 - 5] and np.count_nonzero(find_spikes(hot)) == 1
    robust_err = np.hypot(*np.subtract(robust_centroid(hot, 15), (r0, c0))) * 40
    plain = centre_of_mass(hot, (32, 32), 15, float(np.median(hot)))
    plain_err = np.hypot(*np.subtract(plain, (r0, c0))) * 40
    assert robust_err < 20, robust_err
    assert plain_err > 20, plain_err
    assert abs(robust_err - noisy_err) < 1
    # the known map does the same without the spike test
    m = np.zeros(hot.shape, bool)
    m[32 + 9, 32 - 5] = True
    assert np.hypot(*np.subtract(robust_centroid(hot, 15, defects=m), (r0, c0))) * 40 < 20


def test_no_spikes_on_a_clean_bead_at_any_brightness(one_bead):
    image, _ = one_bead
    assert not find_spikes(image).any()
    assert not find_spikes(50 * (image - 100) + 100, gain_adu_per_electron=50).any()
