"""Nothing lost, nothing surprising: atomic writes, the writer lock, bead-walk file checks, Ctrl-C and
device errors keeping finished work, paths relative to the settings file, settings merging and
format versions, correction and poke-calibration files."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from autoalign.files import (FileLock, FileLocked, OverwriteRefused, atomic_write_text, atomic_writer,
                             deferred_interrupt, png_software, refuse_overwrite)
from autoalign.settings import DEFAULT_SETTINGS_PATH, SettingsError, load_settings

ROOT = Path(__file__).resolve().parent.parent


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ files
def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "result.yaml"
    target.write_text("old result\n")
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as fh:
            fh.write("half of the new res")
            raise RuntimeError("crash in the middle")
    assert target.read_text() == "old result\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.yaml"]  # no temporary file left
    atomic_write_text(target, "new result\n")
    assert target.read_text() == "new result\n"


def test_atomic_path_for_writers_that_need_a_name(tmp_path):
    from autoalign.files import atomic_path

    target = tmp_path / "data.h5"
    with h5py.File(target, "w") as f:
        f["old"] = np.arange(3)
    digest = _sha(target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            with h5py.File(tmp, "w") as f:
                f["new"] = np.arange(5)
            raise RuntimeError("killed before the end")
    assert _sha(target) == digest and sorted(p.name for p in tmp_path.iterdir()) == ["data.h5"]
    with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
        f["new"] = np.arange(5)
    with h5py.File(target, "r") as f:
        assert list(f) == ["new"]


def test_refuse_overwrite(tmp_path):
    p = tmp_path / "a.h5"
    assert refuse_overwrite(p) == p
    p.write_bytes(b"data")
    with pytest.raises(OverwriteRefused, match="--force"):
        refuse_overwrite(p)
    assert refuse_overwrite(p, force=True) == p and p.read_bytes() == b"data"


def test_lock_excludes_a_live_holder_and_takes_a_stale_one(tmp_path):
    target = tmp_path / "walk.h5"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from autoalign.files import FileLock
        with FileLock({str(target)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FileLocked, match=f"process {holder.pid}"):
            FileLock(target).acquire()
    finally:
        holder.kill()  # SIGKILL: the lock file stays behind, stale
        holder.wait()
    assert (tmp_path / "walk.h5.lock").exists()
    lock = FileLock(target).acquire()
    assert lock.stale_info is not None and lock.stale_info["pid"] == holder.pid
    assert json.loads((tmp_path / "walk.h5.lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "walk.h5.lock").exists()


def test_deferred_interrupt_finishes_the_block_then_raises():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with deferred_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append("the block ran to its end")
    assert done == ["the block ran to its end"]


def test_png_software_reads_matplotlib_metadata(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(tmp_path / "ours.png", metadata={"Software": "autoalign test"})
    plt.close(fig)
    assert png_software(tmp_path / "ours.png") == "autoalign test"
    (tmp_path / "text.png").write_text("not a png")
    assert png_software(tmp_path / "text.png") is None and png_software(tmp_path / "absent.png") is None


# ------------------------------------------------------------------------------------ bead walk
def _walk(path, rounds, seed=0, settings=None, callbacks=None):
    from autoalign.app.collect import BeadWalk
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from tests.test_loop_support import OraclePredictor, sim_devices, small_settings

    s = settings or small_settings()
    dev = sim_devices(s, {5: 0.3, 7: -0.2}, seed=seed)
    loop = AlignmentLoop(dev, s, make_estimator("model", s, OraclePredictor(dev.microscope)))
    return BeadWalk(loop, path, rounds=rounds, random_aberration_rms=0.4, seed=seed,
                    callbacks=callbacks), dev


def test_bead_walk_file_carries_format_and_refuses_foreign_and_other_settings(tmp_path):
    from autoalign.app.collect import BEADWALK_FORMAT, BEADWALK_FORMAT_VERSION, CollectionFileError
    from tests.test_loop_support import small_settings

    path = tmp_path / "walk.h5"
    walk, _ = _walk(path, rounds=1)
    assert walk.run() == 1
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == BEADWALK_FORMAT and f.attrs["format_version"] == BEADWALK_FORMAT_VERSION
        created = f.attrs["created"]
    digest = _sha(path)
    other = small_settings(**{"camera.exposure_ms": 35.0, "loop.min_snr": 5.0})
    walk2, _ = _walk(path, rounds=1, settings=other)
    with pytest.raises(CollectionFileError) as info:
        walk2.run()
    msg = str(info.value)
    # the exposure changes what the data mean; a loop threshold does not (issue 24: it may differ)
    assert "camera.exposure_ms: 20.0 in the file, 35.0 now" in msg and "loop.min_snr" not in msg
    assert _sha(path) == digest and not (tmp_path / "walk.h5.lock").exists()
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    digest = _sha(foreign)
    walk3, _ = _walk(foreign, rounds=1)
    with pytest.raises(CollectionFileError, match="not an autoalign bead-walk file"):
        walk3.run()
    assert _sha(foreign) == digest
    from autoalign.app.collect import open_bead_walk

    with open_bead_walk(path) as f:
        assert f["round"].shape[0] == 1
    with pytest.raises(CollectionFileError, match="not an autoalign bead-walk file"):
        open_bead_walk(foreign)
    with h5py.File(tmp_path / "newer.h5", "w") as f:
        f.attrs["format"], f.attrs["format_version"] = BEADWALK_FORMAT, BEADWALK_FORMAT_VERSION + 1
    with pytest.raises(CollectionFileError, match=f"format version {BEADWALK_FORMAT_VERSION + 1} is newer"):
        open_bead_walk(tmp_path / "newer.h5")
    walk4, _ = _walk(path, rounds=1, seed=3)  # same settings, other seed: appends, metadata kept
    assert walk4.run() == 1
    with h5py.File(path, "r") as f:
        assert f["round"].shape[0] == 2 and f.attrs["created"] == created


def test_second_writer_is_locked_out(tmp_path):
    from autoalign.files import FileLocked

    path = tmp_path / "walk.h5"
    walk, _ = _walk(path, rounds=1)
    assert walk.run() == 1
    digest = _sha(path)
    with FileLock(path):  # another writer holds the file
        walk2, _ = _walk(path, rounds=1)
        with pytest.raises(FileLocked, match="in use by process"):
            walk2.run()
    assert _sha(path) == digest


def test_ctrl_c_keeps_finished_rounds(tmp_path):
    class InterruptAfterTwo:
        def on_progress(self, done, total):
            if done == 2:
                raise KeyboardInterrupt

    path = tmp_path / "walk.h5"
    walk, _ = _walk(path, rounds=None, callbacks=InterruptAfterTwo())
    assert walk.run() == 2
    assert walk.interrupted and "Ctrl-C" in walk.stop_reason
    assert not (tmp_path / "walk.h5.lock").exists()
    with h5py.File(path, "r") as f:
        assert f["round"].shape[0] == 2 and f["stack"].shape[0] == 2 and f["stack"][1].max() > 0


def test_device_error_keeps_finished_rounds(tmp_path):
    from autoalign.hardware.base import DeviceError

    path = tmp_path / "walk.h5"
    walk, _ = _walk(path, rounds=5)
    real_acquire = walk.loop.acquire
    calls = {"n": 0}

    def acquire(*a, **kw):  # the camera fails on the 5th stack (inside the third round or so)
        calls["n"] += 1
        if calls["n"] == 5:
            raise DeviceError("camera: cable pulled")
        return real_acquire(*a, **kw)

    walk.loop.acquire = acquire
    n = walk.run()
    assert 1 <= n < 5 and walk.stop_reason == "device failure: camera: cable pulled"
    assert not (tmp_path / "walk.h5.lock").exists()
    with h5py.File(path, "r") as f:
        assert f["round"].shape[0] == n and f["stack"].shape[0] == n


def test_unfinished_round_is_trimmed_before_appending(tmp_path):
    path = tmp_path / "walk.h5"
    walk, _ = _walk(path, rounds=2)
    assert walk.run() == 2
    with h5py.File(path, "a") as f:  # a kill after some datasets of round 3 were appended
        for name in ("stack", "sections", "prediction"):
            f[name].resize(3, axis=0)
    walk2, _ = _walk(path, rounds=1, seed=4)
    assert walk2.run() == 1
    with h5py.File(path, "r") as f:
        n = f["round"].shape[0]
        assert n == 3 and all(f[k].shape[0] == n for k in ("stack", "sections", "prediction", "timestamp"))
        assert list(f["round"][:]) == [0, 1, 2]


def test_collect_command_progress_and_exit(tmp_path, monkeypatch, capsys):
    """`autoalign collect` with --rounds shows a tqdm bar with the total (ETA)."""
    from autoalign.app.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({
        "camera": {"roi_px": 32, "pixel_size_um": 0.05}, "stack": {"planes": 32, "z_step_um": 0.06},
        "model": {"binning": 1}, "loop": {"edge_margin_px": 3}, "optics": {"pupil_samples": 48}}))
    rc = main(["collect", "--settings", "small.yaml", "--out", "w.h5", "--rounds", "2", "--no-model"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "2/2" in captured.err and "round" in captured.err  # the progress bar
    assert "2 round(s) appended" in captured.out
    with h5py.File(tmp_path / "w.h5", "r") as f:
        assert f["round"].shape[0] == 2


# ------------------------------------------------------------------------------------ align
def _fake_trial(rms0):
    rows = [{"iteration": 0, "stacks": 0, "true_residual_rms": rms0, "true_null_depth": 0.02,
             "null_depth": 0.03, "correlation_ideal": 0.8},
            {"iteration": 1, "stacks": 1, "true_residual_rms": rms0 / 8, "true_null_depth": 0.002,
             "null_depth": 0.02, "correlation_ideal": 0.99}]
    return {"rows": rows, "decisions": ["applied"], "iteration_s": [0.1], "stacks": 1,
            "ideal_null_depth": 0.026, "stop": ""}


@pytest.mark.parametrize("failure, status, words", [
    (KeyboardInterrupt, 130, "interrupted (Ctrl-C) after 2 of 4 trial(s)"),
    ("device", 1, "device error after 2 of 4 trial(s): camera: cable pulled"),
])
def test_align_interrupted_keeps_finished_trials_and_report(tmp_path, monkeypatch, capsys, failure, status, words):
    from autoalign.app.cli import main
    from autoalign.app.commands import align
    from autoalign.hardware.base import DeviceError

    calls = []

    def run_trial(settings, iterations, *a, **kw):
        calls.append(settings.simulation.seed)
        if len(calls) == 3:
            raise KeyboardInterrupt if failure is KeyboardInterrupt else DeviceError("camera: cable pulled")
        return _fake_trial(0.7 + 0.1 * len(calls))

    monkeypatch.setattr(align, "run_trial", run_trial)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOALIGN_DATA_DIR", str(tmp_path / "userdata"))
    rc = main(["align", "--trials", "4", "--iterations", "1", "--corrector", "modal", "--report", "rep",
               "--fixed-iterations"])
    err = capsys.readouterr().err
    assert rc == status, err
    last = err.strip().splitlines()[-1]
    assert words in last and "kept 2 finished trial(s)" in last and str(tmp_path / "rep") in last
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["hidden_rms"] == pytest.approx([0.8, 0.9])
    assert summary["stopped"].startswith(words.split(":")[0])
    assert png_software(tmp_path / "rep" / "align.png") == "autoalign align"
    # a second run may replace its own report
    monkeypatch.setattr(align, "run_trial", lambda *a, **k: _fake_trial(0.5))
    assert main(["align", "--trials", "1", "--corrector", "modal", "--report", "rep", "--fixed-iterations"]) == 0


# ------------------------------------------------------------------------------------ settings
def test_duplicate_keys_refused_naming_file_key_and_lines(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("loop:\n  gain: 0.5\n  max_iterations: 3\n  gain: 0.7\n")
    with pytest.raises(SettingsError) as info:
        load_settings(p)
    assert str(info.value) == (f"{p}: duplicate key 'gain' at line 4 (first at line 2); keep one of them")


def test_partial_settings_merge_over_defaults(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("loop:\n  gain: 0.5\n")
    s, d = load_settings(p), load_settings()
    assert s.loop.gain == 0.5 and s.loop.max_iterations == d.loop.max_iterations
    assert s.replace(**{"loop.gain": d.loop.gain}).to_dict() == d.to_dict()
    p.write_text("loop:\n  gian: 0.5\n")
    with pytest.raises(SettingsError, match="loop.gian': unknown key \\(did you mean 'loop.gain'"):
        load_settings(p)
    p.write_text("lop:\n  gain: 0.5\n")
    with pytest.raises(SettingsError, match="'lop': unknown key \\(did you mean 'loop'"):
        load_settings(p)


def test_format_version(tmp_path):
    p = tmp_path / "v.yaml"
    p.write_text("format_version: 1\nloop:\n  gain: 0.5\n")
    assert load_settings(p).loop.gain == 0.5
    p.write_text("format_version: 2\n")
    with pytest.raises(SettingsError, match="format version 2 is newer than this autoalign understands \\(1\\)"):
        load_settings(p)
    p.write_text("format_version: one\n")
    with pytest.raises(SettingsError, match="format_version' = 'one': expected an integer"):
        load_settings(p)
    assert yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())["format_version"] == 1


def test_paths_resolve_against_the_settings_file_not_the_current_directory(tmp_path, monkeypatch):
    folder = tmp_path / "setup"
    (folder / "cal").mkdir(parents=True)
    (folder / "mine.yaml").write_text("model:\n  checkpoint: weights/mine.pt\nslm:\n  lut_file: cal/lut.txt\n"
                                      "hardware:\n  micromanager:\n    config_file: ~/scope.cfg\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings("../setup/mine.yaml")
    assert s.model.checkpoint == str(folder / "weights" / "mine.pt")
    assert s.slm.lut_file == str(folder / "cal" / "lut.txt")
    assert s.hardware.micromanager.config_file == str(Path.home() / "scope.cfg")


def test_packaged_checkpoint_is_the_shipped_weights(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.chdir(tmp_path)
    s = load_settings()
    location = Path(list(importlib.util.find_spec("autoalign.models").submodule_search_locations)[0])
    assert Path(s.model.checkpoint) == (location / "weights" / "modes5-22_offset.pt").resolve()
    assert Path(s.model.fine_checkpoint) == (location / "weights" / "fine5-22_offset.pt").resolve()
    assert Path(s.model.checkpoint).is_file() and Path(s.model.fine_checkpoint).is_file()
    # a copy of the defaults elsewhere still names the shipped weights
    (tmp_path / "copy.yaml").write_text(DEFAULT_SETTINGS_PATH.read_text())
    copy = load_settings(tmp_path / "copy.yaml").model
    assert (copy.checkpoint, copy.fine_checkpoint) == (s.model.checkpoint, s.model.fine_checkpoint)


# ------------------------------------------------------------------------------------ correction
def test_correction_records_optics_and_refuses_other_optics(tmp_path, caplog):
    from autoalign.correction import Correction, CorrectionError

    s = load_settings()
    c = Correction({5: 0.2, 8: -0.1}, (0.01, 0.0))
    path = tmp_path / "c.yaml"
    c.save_yaml(path, settings=s)
    data = yaml.safe_load(path.read_text())
    assert data["format"] == "autoalign-correction" and data["format_version"] == 1
    assert data["optics"] == {"optics.numerical_aperture": 1.4, "optics.wavelength_um": 0.775,
                              "slm.pupil_radius_px": 500.0}
    assert Correction.load_yaml(path, settings=s) == c
    other = s.replace(**{"optics.wavelength_um": 0.66})
    with pytest.raises(CorrectionError, match="optics.wavelength_um: 0.775 in the file, 0.66 now"):
        Correction.load_yaml(path, settings=other)
    assert Correction.load_yaml(path, settings=other, force=True) == c
    assert "loaded anyway" in caplog.text


HEADER = "format: autoalign-correction\n"


@pytest.mark.parametrize("text, words", [
    (HEADER + "coefficients: {5.7: 0.1}", "coefficient key 5.7: expected a Noll index"),
    (HEADER + "coefficients: {0: 0.1}", "coefficient key 0"),
    (HEADER + "coefficients: {true: 0.1}", "coefficient key True"),
    (HEADER + "coefficients: {5: 0.1, 5: 0.2}", "duplicate key 5"),
    (HEADER + "coefficients: {5: .nan}", "coefficient 5 = nan: expected a finite number"),
    (HEADER + "coefficients: {5: abc}", "coefficient 5 = 'abc': expected a number"),
    (HEADER + "coefficients: {5: [unclosed", "not valid YAML at line 2"),
    ("just text", "not a correction file"),
    (HEADER + "coefficients: {5: 0.1}\nmask_offset: [1]", "mask_offset = [1]: expected two numbers"),
    (HEADER + "format_version: 9\ncoefficients: {5: 0.1}", "correction format version 9 is newer"),
    # issue 24 (8): no header, a mode nothing renders
    ("coefficients: {5: 0.1}", "key 'format' is missing: not an autoalign correction file"),
    ("units: my own\ncoefficients: {5: 0.1}", "key 'format' is missing"),
    ("format: something-else\ncoefficients: {5: 0.1}", "key 'format' = 'something-else'"),
    (HEADER + "coefficients: {5: 0.1, 99: 0.3}", "key 'coefficients.99' = 0.3: Noll 99 is outside"),
])
def test_correction_junk_gives_a_clear_error(tmp_path, text, words):
    from autoalign.correction import Correction, CorrectionError

    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(CorrectionError) as info:
        Correction.load_yaml(p)
    assert str(p) in str(info.value) and words in str(info.value), str(info.value)


def test_correction_modes_outside_the_settings_and_old_files(tmp_path):
    """Issue 24 (8): with settings, a Noll index outside the modes they correct is refused naming
    the file, key and value; a file of the first layout (no header, its own units line) still loads,
    with the warning returned (for the window) that its optics cannot be checked."""
    from autoalign.correction import LEGACY_UNITS, Correction, CorrectionError, read_correction

    s = load_settings()
    p = tmp_path / "c.yaml"
    Correction({4: 0.1, 23: 0.2}).save_yaml(p, settings=s)
    with pytest.raises(CorrectionError, match=r"c.yaml: key 'coefficients.23' = 0.2: Noll 23 is outside the "
                       r"modes these settings correct .*: 1-22"):
        read_correction(p, settings=s)
    assert read_correction(p)[0].coefficients == {4: 0.1, 23: 0.2}   # no settings: Noll 1-36
    old = tmp_path / "old.yaml"   # as autoalign wrote it before the format header
    old.write_text(yaml.safe_dump({"units": LEGACY_UNITS, "coefficients": {2: 0.01, 5: 0.2, 8: -0.1},
                                   "mask_offset": [0.01, 0.0], "saved": "2026-11-23T20:31:21+00:00"},
                                  sort_keys=False))
    corr, warnings = read_correction(old, settings=s)
    assert corr == Correction({2: 0.01, 5: 0.2, 8: -0.1}, (0.01, 0.0))
    assert len(warnings) == 1 and "old.yaml: records no optics" in warnings[0]
    corr, warnings = read_correction(old)  # without settings: nothing to check against, no warning
    assert warnings == []


# ------------------------------------------------------------------------------------ poke calibration
def test_poke_calibration_location_and_automatic_use(tmp_path, monkeypatch):
    from autoalign.calibration.poke import (PokeCalibration, default_calibration_path,
                                            load_matching_calibration)

    monkeypatch.setenv("AUTOALIGN_DATA_DIR", str(tmp_path / "data"))
    d = load_settings()
    assert default_calibration_path(d) == tmp_path / "data" / "poke_calibration.yaml"
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "s.yaml").write_text("loop:\n  gain: 0.8\n")
    s = load_settings(tmp_path / "lab" / "s.yaml")
    path = default_calibration_path(s)
    assert path == tmp_path / "lab" / "poke_calibration.yaml"
    assert load_matching_calibration(s) == (None, "")
    cal = PokeCalibration(np.diag([2.0, 2.0, 5.0]), settings=PokeCalibration.from_optics(s).settings)
    cal.save(path)
    used, message = load_matching_calibration(s)
    assert used is not None and np.allclose(used.matrix_um_per_rad, np.diag([2.0, 2.0, 5.0]))
    assert "optics match" in message
    (tmp_path / "lab" / "s.yaml").write_text("optics:\n  wavelength_um: 0.66\n")
    used, message = load_matching_calibration(load_settings(tmp_path / "lab" / "s.yaml"))
    assert used is None and "ignoring" in message and "wavelength_um" in message
    assert yaml.safe_load(path.read_text())["format_version"] == 1


def test_poke_stage_step_must_be_positive_before_anything_moves():
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.calibration.poke import run_poke_calibration
    from tests.test_loop_support import sim_devices, small_settings

    s = small_settings()
    with sim_devices(s, {}) as dev:
        loop = AlignmentLoop(dev, s, make_estimator("model", s))
        for step in (-0.2, 0.0, float("nan")):
            with pytest.raises(ValueError, match="stage_step_um .*expected a number > 0"):
                run_poke_calibration(loop, 1.0, stage_step_um=step)
        assert loop.stacks_acquired == 0


def test_stage_poke_refuses_a_stage_that_does_not_move():
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.calibration.poke import _poke_stage
    from tests.test_loop_support import sim_devices, small_settings

    s = small_settings()
    with sim_devices(s, {}) as dev:
        loop = AlignmentLoop(dev, s, make_estimator("model", s))
        dev.xy.move_to = lambda x, y: None  # a stuck stage
        with pytest.raises(RuntimeError, match="moved the bead by only"):
            _poke_stage(loop, 0.2)


def test_ctrl_c_on_the_collect_command(tmp_path):
    """A real SIGINT to `autoalign collect`: exit status 130, one-line reason, rounds kept, lock gone."""
    from tests.test_collect import wait_for_rounds

    (tmp_path / "small.yaml").write_text(yaml.safe_dump({
        "camera": {"roi_px": 32, "pixel_size_um": 0.05}, "stack": {"planes": 32, "z_step_um": 0.06},
        "model": {"binning": 1}, "loop": {"edge_margin_px": 3}, "optics": {"pupil_samples": 48}}))
    path = tmp_path / "w.h5"
    proc = subprocess.Popen([sys.executable, "-m", "autoalign.app.cli", "collect", "--settings", "small.yaml",
                             "--out", "w.h5", "--no-model"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_for_rounds(path, 2, timeout_s=120)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert "interrupted (Ctrl-C)" in last and "every finished round is kept" in last
    assert not (tmp_path / "w.h5.lock").exists()
    with h5py.File(path, "r") as f:
        n = f["round"].shape[0]
        assert n >= 2 and all(f[k].shape[0] == n for k in ("stack", "sections", "timestamp", "decision"))


def test_align_uses_the_saved_poke_calibration_when_the_optics_match(tmp_path, monkeypatch, capsys):
    from autoalign.app.cli import main
    from autoalign.app.commands import align
    from autoalign.calibration.poke import PokeCalibration

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOALIGN_DATA_DIR", str(tmp_path / "data"))
    s = load_settings()
    PokeCalibration(np.diag([3.0, 3.0, 7.0]), settings=PokeCalibration.from_optics(s).settings).save(
        tmp_path / "data" / "poke_calibration.yaml")
    seen = []
    monkeypatch.setattr(align, "run_trial", lambda settings, it, corrector, gain, predictor, calibration:
                        seen.append(calibration) or _fake_trial(0.7))
    legacy = ["align", "--corrector", "modal", "--fixed-iterations"]
    assert main(legacy) == 0
    assert "using the saved poke calibration" in capsys.readouterr().err
    assert np.allclose(seen[-1].matrix_um_per_rad, np.diag([3.0, 3.0, 7.0]))
    assert main(legacy + ["--no-calibration"]) == 0 and seen[-1] is None
    (tmp_path / "other.yaml").write_text("optics:\n  wavelength_um: 0.66\n")
    assert main(legacy + ["--settings", "other.yaml"]) == 0
    assert seen[-1] is None  # other.yaml's folder has no calibration: the optics formulas


def test_calibrate_prints_its_table_once(tmp_path, monkeypatch, capsys):
    from autoalign.app.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["calibrate", "selfcheck", "--modes", "5", "-v"])
    out = capsys.readouterr()
    assert rc in (0, 3), out.err
    assert (out.out + out.err).count("convention self-check (") == 1


def test_unreachable_device_is_a_one_line_failure(tmp_path, monkeypatch, capsys):
    """Micro-Manager's Java bridge not running: exit status 1, one line naming the device problem."""
    pytest.importorskip("pycromanager")
    from autoalign.app.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mm.yaml").write_text("hardware:\n  backend: micromanager\n  micromanager:\n"
                                      "    python_backend: false\n    port: 1\n    timeout_ms: 500\n")
    rc = main(["align", "--settings", "mm.yaml", "--corrector", "modal"])
    err = capsys.readouterr().err
    assert rc == 1, err
    last = err.strip().splitlines()[-1]
    assert "device error" in last and "nothing to report" in last and "Traceback" not in err


def test_align_trials_ctrl_c_keeps_finished_trials_and_report(tmp_path, monkeypatch, capsys):
    """The default simulated path (app.trials, the loop's own stop rules): Ctrl-C during the third
    trial keeps the two finished ones, writes their summary atomically and exits 130."""
    from autoalign.app import trials as trials_mod
    from autoalign.app.cli import main

    real, calls = trials_mod.run_loop_trial, []

    def interrupted_third(settings, iterations, estimator, **kw):
        calls.append(settings.simulation.seed)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(settings, iterations, estimator, **kw)

    monkeypatch.setattr(trials_mod, "run_loop_trial", interrupted_third)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOALIGN_DATA_DIR", str(tmp_path / "userdata"))
    small = tmp_path / "small.yaml"
    small.write_text(yaml.safe_dump({
        "camera": {"roi_px": 32, "pixel_size_um": 0.05}, "stack": {"planes": 32, "z_step_um": 0.06},
        "model": {"binning": 1}, "loop": {"edge_margin_px": 3}, "optics": {"pupil_samples": 32}}))
    rc = main(["align", "--settings", str(small), "--trials", "4", "--iterations", "1", "--corrector", "modal",
               "--report", "rep"])
    err = capsys.readouterr().err
    assert rc == 130, err
    assert "interrupted (Ctrl-C) after 2 of 4 trial(s)" in err.strip().splitlines()[-1]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["trials"] == 2 and summary["stopped"].startswith("interrupted")
    assert summary["kind"] == trials_mod.REPORT_KIND


def test_the_default_corrector_is_the_settings_loop_corrector(tmp_path, monkeypatch, capsys):
    """`align` without --corrector uses loop.corrector (the packaged default: refined), the flag
    overrides it; the GUI's worker starts with the same."""
    import json

    import yaml

    from autoalign.app import trials as trials_mod
    from autoalign.app.cli import main
    from autoalign.app.gui.worker import AlignWorker
    from autoalign.settings import load_settings

    assert load_settings().loop.corrector == "refined"
    assert AlignWorker(load_settings()).initial_corrector == "refined"
    seen = []
    monkeypatch.setattr(trials_mod, "run_loop_trial", lambda settings, iterations, estimator, **kw:
                        seen.append(estimator.name) or {"rows": [{"iteration": 0}], "stop": "x", "converged": False,
                                                        "diagnosis": None, "false_success": False,
                                                        "ideal_null_depth": 0.02, "stacks": 1, "wall_s": 0.0,
                                                        "worse_than_start": False})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOALIGN_DATA_DIR", str(tmp_path / "userdata"))
    modal = tmp_path / "modal.yaml"
    modal.write_text(yaml.safe_dump({"loop": {"corrector": "modal"}}))
    assert main(["align", "--settings", str(modal), "--trials", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["corrector"] == "modal"
    assert main(["align", "--settings", str(modal), "--trials", "1", "--json", "--corrector", "model"]) == 0
    assert json.loads(capsys.readouterr().out)["corrector"] == "model"
    assert seen == ["modal", "model"]
    assert AlignWorker(load_settings(str(modal))).initial_corrector == "modal"
