"""The commands of issue 23's bead selection and camera defects: ``autoalign calibrate camera``
(dark frames from files or the simulated camera; refuses foreign outputs and frames that are not
dark) and ``autoalign overview`` (a file or ``--sim``; table, PNG, JSON; the defect map applied)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from autoalign.app.cli import main
from autoalign.calibration.camera_defects import HOT, DefectMap
from autoalign.files import png_software
from autoalign.simulation.field import FieldSimulator, SensorDefects, dark_frames, flat_frames
from autoalign.simulation.noise import CameraModel


@pytest.fixture()
def here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOALIGN_DATA_DIR", str(tmp_path / "userdata"))
    return tmp_path


def test_calibrate_camera_from_the_simulated_camera(here, capsys):
    assert main(["calibrate", "camera", "--json"]) == 0
    out = capsys.readouterr()
    data = json.loads(out.out)
    truth = data["simulated_truth"]
    assert truth["found_hot"] == truth["hot_and_warm"] > 0 and truth["found_dead"] == truth["dead"] > 0
    assert truth["false"] == 0
    path = here / "userdata" / "camera_defects.npz"
    assert data["defect_map"] == str(path)
    dmap = DefectMap.load(path)
    sensor = SensorDefects.simulated_camera(seed=0)
    assert np.array_equal(dmap.mask(HOT) & sensor.mask("hot"), sensor.mask("hot"))


def test_calibrate_camera_from_tiff_files_with_flats(here, capsys):
    import tifffile

    cam = CameraModel()
    sensor = SensorDefects.random((48, 64), hot_fraction=0.002, dead_fraction=0.002, seed=2)
    rng = np.random.default_rng(0)
    tifffile.imwrite(here / "dark1.tif", dark_frames(cam, sensor, 12, rng).astype(np.uint16))
    tifffile.imwrite(here / "dark2.tif", dark_frames(cam, sensor, 12, rng).astype(np.uint16))
    tifffile.imwrite(here / "flat.tif", flat_frames(cam, sensor, 5, rng).astype(np.uint16))
    assert main(["calibrate", "camera", "dark1.tif", "dark2.tif", "flat=flat.tif", "--out", "cam.npz"]) == 0
    out = capsys.readouterr().out
    assert "dark frames: 24 of 48 x 64 pixels" in out and "camera defect map written to" in out
    dmap = DefectMap.load(here / "cam.npz")
    assert np.array_equal(dmap.mask(), sensor.mask())
    assert dmap.info["flat_frames"] == 5 and dmap.info["source"] == "dark1.tif, dark2.tif, flat.tif"


def test_calibrate_camera_refuses_light_foreign_outputs_and_bad_files(here, capsys):
    import tifffile

    bright = FieldSimulator(shape=(64, 64)).render(np.array([[0.0, 0.0]]), np.random.default_rng(1),
                                                    focus_um=[0.0, 0.0, 0.0])
    tifffile.imwrite(here / "light.tif", bright.astype(np.uint16))
    assert main(["calibrate", "camera", "light.tif", "--out", "x.npz"]) == 2
    assert "do not look like dark frames" in capsys.readouterr().err
    assert not (here / "x.npz").exists()
    (here / "notes.npz").write_text("my own numbers")
    assert main(["calibrate", "camera", "--out", "notes.npz"]) == 2
    assert "notes.npz: exists and is not an autoalign camera defect map" in capsys.readouterr().err
    assert (here / "notes.npz").read_text() == "my own numbers"
    (here / "junk.tif").write_bytes(b"II*\x00 this is not really a tiff")
    assert main(["calibrate", "camera", "junk.tif", "--out", "y.npz"]) == 2
    assert "junk.tif: expected camera frames" in capsys.readouterr().err
    assert main(["calibrate", "camera", "flat=junk.tif", "--out", "y.npz"]) == 2
    assert "flat frames need dark frames" in capsys.readouterr().err


def test_overview_sim_prints_the_table_and_writes_png_and_json(here, capsys):
    assert main(["calibrate", "camera"]) == 0
    capsys.readouterr()
    argv = ["overview", "--sim", "--beads", "8", "--field-px", "240", "--seed", "3", "--out", "ov",
            "--defects", "userdata/camera_defects.npz"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "CHOSEN" in out and "x um" in out and "truth: 8 beads; 8 found; 0 false detection(s)" in out
    assert "pixel(s) of the defect map repaired" in out
    assert png_software(here / "ov.png") == "autoalign overview"
    data = json.loads((here / "ov.json").read_text())
    assert data["format"] == "autoalign-overview" and data["chosen"]["accepted"]
    assert data["counts"]["hot_pixels"] == 0          # the map repaired them all
    assert data["simulated_truth"]["comparison"]["found"] == 8
    # again: our own outputs are replaced; someone else's are not
    assert main(argv) == 0
    capsys.readouterr()
    (here / "mine.json").write_text('{"mine": 1}')
    assert main(["overview", "--sim", "--beads", "5", "--field-px", "160", "--out", "mine"]) == 2
    assert "mine.json: exists and was not written by autoalign overview" in capsys.readouterr().err
    assert json.loads((here / "mine.json").read_text()) == {"mine": 1}


def test_overview_of_a_file(here, capsys):
    import tifffile

    sim = FieldSimulator(shape=(200, 200))
    xy = np.array([[-2.0, -2.0], [2.0, 1.5], [-1.5, 2.5], [-0.3, 2.5]])
    img = sim.render(xy, np.random.default_rng(2), defects=SensorDefects.random((200, 200), seed=5))[0]
    tifffile.imwrite(here / "slide.tif", img.astype(np.uint16))
    assert main(["overview", "slide.tif"]) == 2
    assert "--pixel-um" in capsys.readouterr().err
    assert main(["overview", "slide.tif", "--pixel-um", "0.04", "--centre-um", "100", "50", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["beads"] == 4 and data["counts"]["hot_pixels"] == 40
    xs = sorted(round(b["x_um"], 1) for b in data["beads"])
    assert xs == [98.0, 98.5, 99.7, 102.0]
    verdicts = {round(b["x_um"], 1): b["reason"] for b in data["beads"]}
    assert verdicts[98.5].startswith("neighbour 1.") and verdicts[99.7].startswith("neighbour 1.")
    assert (here / "overview_slide.png").exists()
    np.save(here / "slide.npy", img)
    assert main(["overview", "slide.npy", "--pixel-um", "0.04", "--out", "npy"]) == 0
    capsys.readouterr()
    assert main(["overview"]) == 2
    assert "give an overview FILE or --sim" in capsys.readouterr().err
    (here / "bad.npz").write_text("not a map")
    assert main(["overview", "slide.npy", "--pixel-um", "0.04", "--defects", "bad.npz"]) == 2
    assert "bad.npz: expected an autoalign camera defect map" in capsys.readouterr().err


def test_overview_of_the_real_widefield_bead_stack(here, capsys):
    """The recorded widefield stack (tests/data): its brightest plane holds one bead, chosen."""
    from pathlib import Path

    stack = Path(__file__).parent / "data" / "aovift-widefield-bead" / "WF_150ms.tif"
    assert main(["overview", str(stack), "--json", "--out", "real"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["counts"]["beads"] == 1 and data["chosen"]["snr"] > 100
    assert any("brightest" in n for n in data["notes"])
