"""Bead-walk collection: rounds appended to HDF5, appendable later, readable after kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import pytest
import numpy as np

from autoalign.app.collect import BeadWalk
from autoalign.app.estimators import make_estimator
from autoalign.app.loop import AlignmentLoop
from tests.test_loop_support import OraclePredictor, sim_devices, small_settings

ROOT = Path(__file__).resolve().parent.parent



def wait_for_rounds(path, rounds: int, timeout_s: float) -> None:
    """Poll the bead-walk file another process is writing until it holds ``rounds`` rounds (or
    the time is up; the caller's assertions then tell what happened)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            with h5py.File(path, "r") as f:
                if f["round"].shape[0] >= rounds:
                    return
        except (OSError, KeyError):
            continue

def _walk(path, rounds, seed=0, **kw):
    s = small_settings()
    dev = sim_devices(s, {5: 0.3, 7: -0.2}, seed=seed, **kw)
    loop = AlignmentLoop(dev, s, make_estimator("model", s, OraclePredictor(dev.microscope)))
    return BeadWalk(loop, path, rounds=rounds, random_aberration_rms=0.4, seed=seed), dev


def _check_consistent(f):
    n = f["round"].shape[0]
    for name in ("stack", "sections", "prediction", "applied", "random_aberration", "correction_after",
                 "stage_xy_um", "focus_um", "centroid_um", "timestamp", "decision"):
        assert f[name].shape[0] == n, name
    for name in f["metrics"]:
        assert f["metrics"][name].shape[0] == n
    return n


def test_bead_walk_writes_and_appends(tmp_path):
    path = tmp_path / "walk.h5"
    walk, _ = _walk(path, rounds=2)
    assert walk.run() == 2
    walk2, _ = _walk(path, rounds=1, seed=1)
    assert walk2.run() == 1
    with h5py.File(path, "r") as f:
        assert _check_consistent(f) == 3
        assert list(f["round"][:]) == [0, 1, 2]
        assert f["stack"].shape[1:] == (32, 32, 32) and f["sections"].shape[1:] == (3, 32, 32)
        # the prediction (oracle) reads the labelled random aberration plus the system's
        rand = f["random_aberration"][:]
        pred = f["prediction"][:]
        assert np.allclose(pred[:, 4], rand[:, 4] + 0.3, atol=1e-4)
        assert np.all(np.isfinite(f["metrics/null_depth"][:]))
        assert "settings_yaml" in f.attrs and np.all(np.diff(f["timestamp"][:]) > 0)


def test_bead_walk_stops_when_bead_walks_off(tmp_path):
    walk, dev = _walk(tmp_path / "off.h5", rounds=5)
    dev.microscope.bead_um = (3.0, 0.0, 0.0)
    assert walk.run() == 0
    assert "walked off" in walk.stop_reason


def test_killed_collection_leaves_readable_file(tmp_path):
    path = tmp_path / "killed.h5"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_collect import _walk
        walk, _ = _walk({str(path)!r}, rounds=None)
        walk.run()
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_rounds(path, 2, timeout_s=90)
        time.sleep(0.37)  # land somewhere inside a later round
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with h5py.File(path, "r") as f:
        n = _check_consistent(f)
        assert n >= 2
        assert f["stack"][n - 1].max() > 0
    walk, _ = _walk(path, rounds=1, seed=5)  # and a later run appends
    assert walk.run() == 1
    with h5py.File(path, "r") as f:
        assert _check_consistent(f) == n + 1


SMALL_YAML = """camera:
  roi_px: 32
  pixel_size_um: 0.05
stack:
  planes: 32
  z_step_um: 0.06
optics:
  pupil_samples: 48
model:
  binning: 1
  fine_checkpoint: ""
loop:
  edge_margin_px: 3
"""


def test_collect_twice_appends_new_rounds_and_says_the_total(tmp_path, monkeypatch, capsys):
    """Issue 24 (15): a second `collect --seed S` into the same file draws new random states (not
    the first run's rounds again), says how many rounds the file holds, and settings that differ
    only where the data keep their meaning (loop.max_iterations) may append."""
    from autoalign.app.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.yaml").write_text(SMALL_YAML)
    (tmp_path / "small_more_iterations.yaml").write_text(SMALL_YAML + "  max_iterations: 9\n")
    common = ["collect", "--out", "walk.h5", "--backend", "sim", "--rounds", "2", "--seed", "3",
              "--no-model", "--random-aberration", "0.3"]
    assert main([*common, "--settings", "small.yaml"]) == 0
    assert "2 round(s) appended" in capsys.readouterr().out
    assert main([*common, "--settings", "small_more_iterations.yaml"]) == 0
    out = capsys.readouterr().out
    assert "2 round(s) appended" in out and "(4 in the file now)" in out, out
    with h5py.File(tmp_path / "walk.h5", "r") as f:
        assert _check_consistent(f) == 4 and list(f["round"][:]) == [0, 1, 2, 3]
        rand, stacks = f["random_aberration"][:], f["stack"][:]
    for k in (0, 1):
        assert not np.allclose(rand[k], rand[k + 2]), "the continuation repeated the first run's aberration"
        assert not np.array_equal(stacks[k], stacks[k + 2]), "the continuation repeated the first run's stack"


def test_append_refuses_only_settings_that_change_the_data(tmp_path):
    from autoalign.app.collect import CollectionFileError, check_collection_file, settings_differences
    from autoalign.settings import load_settings

    s = load_settings()
    shape = (s.stack.planes, s.camera.roi_px, s.camera.roi_px)
    from autoalign.app.collect import CollectionFile

    CollectionFile(tmp_path / "w.h5", s, shape)
    for key, value in (("loop.max_iterations", 9), ("loop.gain", 0.5), ("refine.max_iterations", 10),
                       ("stage.settle_timeout_s", 9.0), ("simulation.seed", 7), ("slm.monitor", 2)):
        assert check_collection_file(tmp_path / "w.h5", s.replace(**{key: value}), shape) == 0, key
    for key, value in (("camera.exposure_ms", 30.0), ("optics.wavelength_um", 0.66),
                       ("slm.grey_level_2pi", 200), ("model.modes", [5, 6, 7]),
                       ("simulation.aberration_rms_rad", 0.3), ("hardware.backend", "micromanager")):
        with pytest.raises(CollectionFileError, match=key.replace(".", r"\.")):
            check_collection_file(tmp_path / "w.h5", s.replace(**{key: value}), shape)
    assert settings_differences(s.to_yaml(), s.replace(**{"loop.patience": 5})) == []
