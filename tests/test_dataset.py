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
    DATASET_FORMAT, DatasetError, dataset_info, dataset_settings, draw_aberrations, generate_chunk,
    open_dataset, write_dataset,
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
    assert info["modes"] == [5, 7, 11] and info["label_names"] == ["Z5", "Z7", "Z11"]
    assert info["label_units"] == ["rad"] * 3 and not info["has_offset"]
    assert info["splits"] == {"train": 32, "val": 4, "test": 4} and info["count"] == 40
    assert info["seed"] == 3 and info["code_version"] and info["n_px"] == 32
    assert not info["noise_baked"]
    assert dataset_settings(small_file).to_dict() == small_settings.to_dict()
    with open_dataset(small_file) as f:
        for split, n in info["splits"].items():
            assert f[f"{split}_img"].shape == (n, 3, 32, 32) and f[f"{split}_img"].dtype == np.float32
            assert f[f"{split}_labels"].shape == (n, 3) and f[f"{split}_labels"].dtype == np.float32
            for name in ("peak_photons", "background_photons", "bead_diameter_um"):
                assert f[f"{split}_{name}"].shape == (n,)
            peak = f[f"{split}_peak_photons"][:]
            lo, hi = small_settings.dataset.peak_photons_range
            assert np.all((peak >= lo) & (peak <= hi))
            assert np.all(np.isfinite(f[f"{split}_img"][:]))
        rms = np.sqrt((f["train_labels"][:] ** 2).sum(1))
        assert rms.max() <= small_settings.dataset.max_total_rms_rad + 1e-5
        assert np.any(f["train_centring_rad"][:] != 0)  # tip/tilt/defocus applied, not labelled


def test_deterministic_for_a_seed(small_settings):
    a = generate_chunk(small_settings, 5, 0, 6)
    b = generate_chunk(small_settings, 5, 0, 6)
    c = generate_chunk(small_settings, 6, 0, 6)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.allclose(a["labels"], c["labels"])


def test_draw_aberrations_caps_and_mixes():
    rng = np.random.default_rng(0)
    c = draw_aberrations(rng, 5000, 11, 0.6, 1.0)
    total = np.sqrt((c**2).sum(1))
    assert total.max() <= 1.0 + 1e-9
    plain = draw_aberrations(rng, 5000, 11, 0.6, 1.0, rms_mix=())
    assert np.abs(plain).max() <= 0.6 and np.sqrt((plain**2).sum(1)).max() <= 1.0 + 1e-9
    assert 0.05 < np.mean(total < 0.25) < 0.25  # the small-aberration share near convergence
    assert np.mean(total > 0.95) > 0.4


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
