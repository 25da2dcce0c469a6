"""Synthetic data sets: file round trip and attributes, determinism, the label frame (centred
sections), offsets, atomic writing, and clear errors for corrupt or foreign files."""
import json

import h5py
import numpy as np
import pytest
import yaml

from autoalign.settings import load_settings
from autoalign.calibration.centroid import section_centroid
import autoalign.simulation.dataset as sd
from autoalign.simulation.dataset import (
    DATASET_FORMAT, INSTRUMENT_FIELDS, DatasetError, combine_shards, dataset_info, dataset_settings,
    draw_aberrations, draw_higher_order, generate_chunk, open_dataset, render_samples, shard_path,
    simulated_modes, write_dataset, write_shard,
)

SMALL = {"camera.roi_px": 32, "stack.planes": 32, "optics.pupil_samples": 48,
         "dataset.modes": [5, 7, 11], "model.modes": [5, 7, 11]}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def small_settings():
    return load_settings().replace(**SMALL)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, small_settings):
    path = tmp_path_factory.mktemp("data") / "small.h5"
    write_dataset(small_settings, 40, path, seed=3, workers=1, progress=False)
    return path


def test_round_trip_and_attributes(small_file, small_settings):
    assert not small_file.with_name(small_file.name + ".partial").exists()
    info = dataset_info(small_file)
    assert info["format"] == DATASET_FORMAT
    assert info["modes"] == [5, 7, 11] and info["label_names"] == ["Z5", "Z7", "Z11", "offset_x", "offset_y"]
    assert info["label_units"] == ["rad"] * 3 + ["pupil radii"] * 2 and info["has_offset"]
    assert info["splits"] == {"train": 32, "val": 4, "test": 4} and info["count"] == 40
    assert info["seed"] == 3 and info["code_version"] and info["n_px"] == 32
    assert not info["noise_baked"]
    assert dataset_settings(small_file).to_dict() == small_settings.to_dict()
    with open_dataset(small_file) as f:
        for split, n in info["splits"].items():
            assert f[f"{split}_img"].shape == (n, 3, 32, 32) and f[f"{split}_img"].dtype == np.float32
            assert f[f"{split}_labels"].shape == (n, 5) and f[f"{split}_labels"].dtype == np.float32
            inst = f[f"{split}_instrument"][:]
            ds = small_settings.dataset
            for k, key in enumerate(("na_scale_range", "wavelength_scale_range", "pixel_scale_range",
                                     "polarisation_impurity_range", "slm_stroke_range")):
                lo, hi = getattr(ds, key)
                assert np.all((inst[:, k] >= lo - 1e-6) & (inst[:, k] <= hi + 1e-6)), key
            assert f[f"{split}_higher_order_rad"].shape == (n, len(ds.unlabelled_modes))
            for name in ("peak_photons", "background_photons", "bead_diameter_um"):
                assert f[f"{split}_{name}"].shape == (n,)
            peak = f[f"{split}_peak_photons"][:]
            lo, hi = small_settings.dataset.peak_photons_range
            assert np.all((peak >= lo) & (peak <= hi))
            assert np.all(np.isfinite(f[f"{split}_img"][:]))
        rms = np.sqrt((f["train_labels"][:, :3] ** 2).sum(1))
        assert rms.max() <= small_settings.dataset.max_total_rms_rad + 1e-5
        assert np.any(f["train_centring_rad"][:] != 0)  # tip/tilt/defocus applied, not labelled


def test_deterministic_for_a_seed(small_settings):
    a = generate_chunk(small_settings, 5, 0, 6)
    b = generate_chunk(small_settings, 5, 0, 6)
    c = generate_chunk(small_settings, 6, 0, 6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a["labels"], c["labels"])


def test_draw_aberrations_mixture_and_isotropy():
    rng = np.random.default_rng(0)
    mix = ((0.15, 0.15), (0.35, 0.5), (0.5, 1.0))
    c = draw_aberrations(rng, 40000, 18, 2.2, mix)
    total = np.sqrt((c**2).sum(1))
    assert total.max() <= 2.2 + 1e-9 and total.max() > 2.1  # reaches the large aberrations
    # P(total < 0.33) = 0.15 * 1 + 0.35 * 0.33/1.1 + 0.5 * 0.33/2.2 = 0.33
    assert abs(np.mean(total < 0.33) - 0.33) < 0.015
    # isotropic: every mode carries the same mean square, no sign preference
    ms = (c**2).mean(0)
    assert ms.max() / ms.min() < 1.1 and np.all(np.abs(c.mean(0)) < 0.02)
    clipped = draw_aberrations(rng, 1000, 18, 2.2, mix, max_coefficient=0.5)
    assert np.abs(clipped).max() <= 0.5
    with pytest.raises(ValueError, match="sum to 1"):
        draw_aberrations(rng, 10, 3, 1.0, ((0.5, 1.0),))


def test_higher_order_spectrum_decays_with_radial_order():
    rng = np.random.default_rng(1)
    modes = list(range(23, 37))  # radial orders 6 (23..28) and 7 (29..36)
    c = draw_higher_order(rng, 40000, modes, (0.0, 0.25), decay=2.0)
    total = np.sqrt((c**2).sum(1))
    assert total.max() <= 0.25 + 1e-9
    ms = (c**2).mean(0)
    ratio = ms[6:].mean() / ms[:6].mean()  # order 7 vs order 6: (6/7)**4 in variance
    assert abs(ratio - (6 / 7) ** 4) < 0.05


def _ring_radius(xy):
    """Radius (px) of the donut's ring: maximum of the azimuthal mean, sampled every 0.02 px."""
    from scipy.ndimage import map_coordinates

    n = xy.shape[-1]
    r = np.arange(0.5, n / 4, 0.02)
    phi = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    yy = n // 2 + r[:, None] * np.sin(phi)
    xx = n // 2 + r[:, None] * np.cos(phi)
    profile = map_coordinates(xy, [yy.ravel(), xx.ravel()], order=3).reshape(yy.shape).mean(1)
    return r[np.argmax(profile)]


def test_instrument_randomisation_scales_the_donut_as_optics_predict():
    """The donut's lateral size scales as wavelength / (NA pixel size) (in pixels)."""
    s = load_settings().replace(**{"dataset.unlabelled_modes": []})
    n = simulated_modes(s)
    zero = np.zeros((2, n)), np.zeros((2, 2))
    w = {}
    for name, a, b in (("pixel", [1, 1, 0.95, 0, 1], [1, 1, 1.05, 0, 1]),
                       ("wavelength", [1, 0.99, 1, 0, 1], [1, 1.01, 1, 0, 1])):
        img = render_samples(s, *zero, np.array([a, b], float))
        w[name] = _ring_radius(img[1, 0]) / _ring_radius(img[0, 0])
    assert abs(w["pixel"] - 0.95 / 1.05) < 0.01
    assert abs(w["wavelength"] - 1.01 / 0.99) < 0.01


def test_slm_stroke_and_polarisation_impurity_fill_the_null():
    """A full 2 pi stroke reproduces the simulator's own vortex; a short stroke or a wrong-hand
    fraction f lights the centre (the impure centre is f times the wrong hand's, since the right
    hand is dark there)."""
    from autoalign.simulation.vectorial import PSFSimulator

    s = load_settings().replace(**{"dataset.unlabelled_modes": []})
    n = simulated_modes(s)
    rng = np.random.default_rng(2)
    coeffs = np.zeros((5, n))
    coeffs[:, 4:11] = rng.normal(0, 0.1, (5, 7))
    coeffs[1:] = 0
    offsets = np.array([[0.05, -0.03], [0, 0], [0, 0], [0, 0], [0, 0]])
    inst = np.array([[1, 1, 1, 0, 1], [1, 1, 1, 0, 1], [1, 1, 1, 0, 0.95], [1, 1, 1, 0, 0.85],
                     [1, 1, 1, 0.03, 1]], float)
    img = render_samples(s, coeffs, offsets, inst)
    own = PSFSimulator.from_settings(s, n_modes=n).orthosections_batch(coeffs[:1], offsets[:1])
    np.testing.assert_allclose(img[0], own[0], atol=2e-5)
    m = s.camera.roi_px // 2
    centre = img[:, 0, m, m]
    assert centre[1] < 1e-6 and 0.003 < centre[2] < centre[3]
    wrong = PSFSimulator.from_settings(s, n_modes=n, polarisation="circular_minus")
    right = PSFSimulator.from_settings(s, n_modes=n)
    wrong_centre = wrong.orthosections(np.zeros(n))[0, m, m] * wrong._peak / right._peak
    assert abs(centre[4] - 0.03 * wrong_centre) < 1e-3 * wrong_centre


def _write_shard_in_process(args):
    import torch

    torch.set_num_threads(1)
    settings_yaml, count, out, i, n, chunk = args
    sd.CHUNK = chunk
    from autoalign.settings import settings_from_dict

    write_shard(settings_from_dict(yaml.safe_load(settings_yaml)), count, out, i, n, seed=4, progress=False)


def test_two_shard_workers_equal_one_process(tmp_path, small_settings, monkeypatch):
    """Two independent worker processes writing shards 0/2 and 1/2, combined without copying,
    give exactly the samples of a single-process run with the same seed, split by sample index."""
    import multiprocessing as mp

    monkeypatch.setattr(sd, "CHUNK", 8)
    single = write_dataset(small_settings, 45, tmp_path / "single.h5", seed=4, workers=1, progress=False)
    out = tmp_path / "sharded" / "data.h5"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_shard_in_process, args=((small_settings.to_yaml(), 45, str(out), i, 2, 8),))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    combine_shards(out, 2)
    assert out.stat().st_size < 0.2 * shard_path(out, 1, 2).stat().st_size  # virtual: no copy
    with open_dataset(single) as a, open_dataset(out) as b:
        assert sorted(a) == sorted(b)
        for key in a:
            np.testing.assert_array_equal(a[key][:], b[key][:])
    with pytest.raises(FileExistsError):
        combine_shards(out, 2)
    shard_path(out, 0, 2).unlink()
    with pytest.raises(DatasetError, match="shard .* is missing"):
        open_dataset(out)
    with pytest.raises(DatasetError, match="missing"):
        combine_shards(out, 2, force=True)


def test_refuses_to_overwrite_without_force(tmp_path, small_settings):
    out = tmp_path / "d.h5"
    out.write_text("precious")
    with pytest.raises(FileExistsError, match="--force"):
        write_dataset(small_settings, 4, out, workers=1, progress=False)
    assert out.read_text() == "precious"
    write_dataset(small_settings, 4, out, workers=1, progress=False, force=True)
    assert dataset_info(out)["count"] == 4


def test_label_frame_is_centred():
    """Sections of generated samples are centred on their centroid (within the drawn residual
    decentring, to about a pixel), in the default 64 px geometry."""
    s = load_settings()
    d = generate_chunk(s, 11, 0, 8)
    for img, dec in zip(d["img"], d["decentre_px"]):
        c = section_centroid(img)
        got = np.array([c.x_px, c.y_px, c.z_px])
        assert np.all(np.abs(got - dec) <= 1.2), (got, dec)
        assert np.all(np.abs(got) <= s.dataset.decentre_px + 1.2)


def test_offset_columns(tmp_path, small_settings):
    s = small_settings.replace(**{"dataset.max_offset": 0.1})
    assert INSTRUMENT_FIELDS[-1] == "slm_stroke"
    path = write_dataset(s, 10, tmp_path / "off.h5", seed=0, workers=1, progress=False)
    info = dataset_info(path)
    assert info["has_offset"] and info["label_names"][-2:] == ["offset_x", "offset_y"]
    assert info["label_units"][-1] == "pupil radii"
    with h5py.File(path) as f:
        off = f["train_labels"][:, 3:]
    assert off.shape == (8, 2) and np.abs(off).max() <= 0.1 and np.any(off != 0)


def test_baked_noise(tmp_path, small_settings):
    path = write_dataset(small_settings, 10, tmp_path / "noisy.h5", seed=0, workers=1, bake_noise=True,
                         progress=False)
    assert dataset_info(path)["noise_baked"]
    with h5py.File(path) as f:
        img = f["train_img"][:]
    assert img.max() > 50  # photons, not normalised intensity


def test_interrupted_run_leaves_no_file(tmp_path, small_settings, monkeypatch):
    calls = []

    def failing(settings, seed, chunk, count, bake_noise=False):
        calls.append(chunk)
        if chunk == 1:
            raise KeyboardInterrupt
        return real(settings, seed, chunk, count, bake_noise)

    real = sd.generate_chunk
    monkeypatch.setattr(sd, "generate_chunk", failing)
    monkeypatch.setattr(sd, "CHUNK", 4)
    out = tmp_path / "broken.h5"
    with pytest.raises(KeyboardInterrupt):
        write_dataset(small_settings, 12, out, workers=1, progress=False)
    assert not out.exists()
    # the leftover partial file is not accepted as a data set
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        with pytest.raises(DatasetError, match="incomplete|not a readable"):
            open_dataset(partial)


def test_corrupt_foreign_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(DatasetError, match=r"garbage\.h5: not a readable HDF5 file"):
        open_dataset(garbage)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["images"] = np.zeros((2, 3, 4, 4))
    with pytest.raises(DatasetError, match=r"foreign\.h5: not an autoalign data set"):
        open_dataset(foreign)
    with pytest.raises(DatasetError, match="no such data file"):
        open_dataset(tmp_path / "missing.h5")


def test_truncated_file(tmp_path, small_file):
    cut = tmp_path / "cut.h5"
    cut.write_bytes(small_file.read_bytes()[:20000])
    with pytest.raises(DatasetError, match=r"cut\.h5"):
        dataset_info(cut)


def test_cli_simulate(tmp_path, small_settings, capsys):
    from autoalign.app.cli import main

    cfg = tmp_path / "small.yaml"
    cfg.write_text(small_settings.to_yaml())
    out = tmp_path / "cli.h5"
    assert main(["simulate", "--count", "10", "--out", str(out), "--settings", str(cfg), "--seed", "2",
                 "--workers", "1", "--quiet"]) == 0
    assert "10 samples" in capsys.readouterr().out
    assert dataset_info(out)["seed"] == 2
    assert yaml.safe_load(dataset_info(out)["settings_yaml"])["camera"]["roi_px"] == 32
    assert json.loads(json.dumps(dataset_info(out)))  # plain values


@pytest.mark.slow
def test_same_file_for_any_number_of_workers(tmp_path, small_settings):
    a = write_dataset(small_settings, 300, tmp_path / "a.h5", seed=1, workers=1, progress=False)
    b = write_dataset(small_settings, 300, tmp_path / "b.h5", seed=1, workers=2, progress=False)
    with h5py.File(a) as fa, h5py.File(b) as fb:
        for key in fa:
            np.testing.assert_array_equal(fa[key][:], fb[key][:])


def test_cli_shards_and_combine(tmp_path, small_settings, capsys):
    from autoalign.app.cli import main

    cfg = tmp_path / "small.yaml"
    cfg.write_text(small_settings.to_yaml())
    out = tmp_path / "cli.h5"
    common = ["simulate", "--count", "6", "--out", str(out), "--settings", str(cfg), "--seed", "2", "--quiet"]
    assert main(common + ["--shard", "2/2"]) == 2 and "0 <= i < N" in capsys.readouterr().err
    assert main(common + ["--shard", "one/2"]) == 2 and "expected i/N" in capsys.readouterr().err
    assert main(["simulate", "--out", str(out), "--combine", "2"]) == 2
    assert "missing" in capsys.readouterr().err
    for i in range(2):
        assert main(common + ["--shard", f"{i}/2"]) == 0
    assert main(["simulate", "--out", str(out), "--combine", "2"]) == 0
    assert "6 samples" in capsys.readouterr().out
    single = write_dataset(small_settings, 6, tmp_path / "single.h5", seed=2, workers=1, progress=False)
    with open_dataset(single) as a, open_dataset(out) as b:
        np.testing.assert_array_equal(a["train_img"][:], b["train_img"][:])
        np.testing.assert_array_equal(a["test_labels"][:], b["test_labels"][:])
    assert main(common) == 2 and "--force" in capsys.readouterr().err  # out exists


@pytest.mark.parametrize("key, value, words", [
    ("dataset.slm_stroke_range", [1.05, 0.85], "expected 0 <= low <= high"),
    ("dataset.rms_mix", [[0.5, 1.0], [0.2, 0.5]], "summing to 1"),
    ("dataset.unlabelled_modes", [15, 23], "not in dataset.modes"),
    ("dataset.polarisation_impurity_range", [0.0, 0.7], "<= 0.5"),
    ("dataset.na_scale_range", [1.0, 1.1], "immersion_index"),
    ("model.modes", [5, 6, 40], "dataset.modes"),
])
def test_bad_dataset_settings_are_named(key, value, words):
    from autoalign.settings import SettingsError

    with pytest.raises(SettingsError, match=key.replace(".", r"\.")) as info:
        load_settings().replace(**{key: value})
    assert words in str(info.value)
