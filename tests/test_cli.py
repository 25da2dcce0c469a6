"""The command line's error boundary: a bad-input matrix (each bad input gives its clear one-line error,
exit status 2, and leaves every file byte-identical), help texts, logging level, settings resolution."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from autoalign.app.cli import build_parser, main
from autoalign.settings import DEFAULT_SETTINGS_PATH, load_settings


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def workspace(tmp_path, monkeypatch):
    """A folder of files a careless command could destroy, and the current directory set to it."""
    from autoalign.app.collect import CollectionFile

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUTOALIGN_DATA_DIR", str(tmp_path / "userdata"))
    (tmp_path / "notes.txt").write_text("a day of lab notes\n")
    with h5py.File(tmp_path / "training.h5", "w") as f:  # someone else's HDF5 file
        f.create_dataset("sections", data=np.arange(12.0).reshape(3, 4))
        f.attrs["format"] = "autoalign-dataset"
    s = load_settings()
    CollectionFile(tmp_path / "walk.h5", s, (s.stack.planes, s.camera.roi_px, s.camera.roi_px))
    with h5py.File(tmp_path / "newer.h5", "w") as f:
        f.attrs["format"] = "autoalign-beadwalk"
        f.attrs["format_version"] = 99
    CollectionFile(tmp_path / "locked.h5", s, (s.stack.planes, s.camera.roi_px, s.camera.roi_px))
    (tmp_path / "locked.h5.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(),
                                                          "started": "now"}))
    (tmp_path / "other_exposure.yaml").write_text("camera:\n  exposure_ms: 30.0\n")
    (tmp_path / "dup.yaml").write_text("camera:\n  exposure_ms: 30.0\n  exposure_ms: 40.0\n")
    (tmp_path / "typo.yaml").write_text("camera:\n  exposure_msec: 30.0\n")
    (tmp_path / "future.yaml").write_text("format_version: 7\ncamera:\n  exposure_ms: 30.0\n")
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "bad_cal.yaml").write_text("kind: autoalign poke calibration\nmatrix_um_per_rad: [[1, 2]]\n")
    (tmp_path / "figs").mkdir()  # a figure of someone's own, named like ours
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(tmp_path / "figs" / "align.png")
    plt.close(fig)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "summary.json").write_text('{"mine": "a summary from my own analysis"}')
    return tmp_path


# (argv, words in the one-line message, exit status)
MATRIX = [
    (["align", "--iterations", "0"], ["--iterations", "expected an integer >= 1", "0"], 2),
    (["align", "--trials", "0"], ["--trials", "expected an integer >= 1"], 2),
    (["align", "--gain", "3"], ["--gain", "> 0 and <= 1", "3"], 2),
    (["align", "--gain", "-1"], ["--gain", "> 0 and <= 1"], 2),
    (["align", "--gain", "nan"], ["--gain", "> 0 and <= 1"], 2),
    (["align", "--aberration-rms", "2:1"], ["--aberration-rms", "0 <= A <= B"], 2),
    (["calibrate", "--amplitude", "0"], ["--amplitude", "expected a number > 0"], 2),
    (["calibrate", "--stage-step", "-0.2"], ["--stage-step", "expected a number > 0"], 2),
    (["calibrate", "--stage-step", "0"], ["--stage-step", "expected a number > 0"], 2),
    (["collect", "--out", "x.h5", "--rounds", "0"], ["--rounds", "expected an integer >= 1"], 2),
    (["collect", "--out", "x.h5", "--random-aberration", "-1"], ["--random-aberration", ">= 0"], 2),
    (["align", "--settings", "missing.yaml"], ["missing.yaml", "no such settings file", "settings --write"], 2),
    (["align", "--settings", "dup.yaml"], ["dup.yaml", "duplicate key 'exposure_ms' at line 3", "line 2"], 2),
    (["align", "--settings", "typo.yaml"], ["typo.yaml", "camera.exposure_msec", "did you mean 'camera.exposure_ms'"], 2),
    (["align", "--settings", "future.yaml"], ["future.yaml", "format version 7 is newer"], 2),
    (["align", "--checkpoint", "missing.pt"], ["missing.pt", "no such checkpoint", "--checkpoint"], 2),
    (["align", "--checkpoint", "corrupt.pt"], ["corrupt.pt", "checkpoint"], 2),
    (["align", "--calibration", "bad_cal.yaml"], ["bad_cal.yaml", "3 x 3"], 2),
    (["align", "--report", "report"], ["summary.json", "not an autoalign align report", "--force"], 2),
    (["align", "--report", "figs"], ["align.png", "not written by autoalign", "--force"], 2),
    (["align", "--report", "notes.txt"], ["notes.txt", "expects a folder"], 2),
    (["align", "--report", "notes.txt/sub"], ["notes.txt", "cannot create the folder"], 2),
    (["collect", "--out", "notes.txt"], ["notes.txt", "not an HDF5 file", "new --out"], 2),
    (["collect", "--out", "training.h5"], ["training.h5", "not an autoalign bead-walk file", "autoalign-dataset"], 2),
    (["collect", "--out", "newer.h5"], ["newer.h5", "format version 99 is newer"], 2),
    (["collect", "--out", "walk.h5", "--settings", "other_exposure.yaml"],
     ["walk.h5", "other settings", "camera.exposure_ms: 20.0 in the file, 30.0 now"], 2),
    (["collect", "--out", "locked.h5", "--rounds", "1"], ["locked.h5", "in use by process", "locked.h5.lock"], 2),
    (["calibrate", "poke", "--out", "notes.txt"], ["notes.txt", "not a poke calibration file", "--force"], 2),
    (["settings", "--write", "notes.txt"], ["notes.txt", "exists", "--force"], 2),
]


def run_cli(argv: list[str]) -> int:
    """Exit status of ``autoalign ARGV`` (argparse's own refusals raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


@pytest.mark.parametrize("argv, words, status", MATRIX, ids=[" ".join(m[0]) for m in MATRIX])
def test_bad_input_matrix(workspace, capsys, argv, words, status):
    before = _hashes(workspace)
    rc = run_cli(argv)
    err = capsys.readouterr().err
    assert rc == status, err
    # one line carries the message (after the line saying which settings were used)
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("usage:", " "))
             and not re.match(r"autoalign \S+: settings /", ln)]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], err
    assert "Traceback" not in err
    assert _hashes(workspace) == before, "a file was changed"
    assert not (workspace / "userdata").exists()
    assert not list(workspace.glob(".*.tmp")), "a temporary file was left"


def test_argparse_errors_are_one_line_with_the_range(capsys):
    with pytest.raises(SystemExit) as info:
        main(["align", "--gain", "3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --gain: expected a number > 0 and <= 1, got 3" in err


def test_debug_shows_the_traceback(workspace, capsys):
    assert main(["align", "--settings", "dup.yaml", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "duplicate key" in err


def test_help_texts_have_descriptions_and_no_rst(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    for name, p in sub.choices.items():
        if name not in ("align", "collect", "calibrate", "report", "benchmark", "gui", "settings"):
            continue  # commands of other modules check their own help
        text = p.format_help()
        assert "``" not in text and ":class:" not in text, name
        assert p.description, name
        for action in p._actions:
            if action.option_strings and action.dest not in ("help",):
                assert action.help, f"{name} {action.option_strings} has no help"


def test_settings_resolution_order_and_announcement(tmp_path, monkeypatch, capsys):
    from autoalign.settings import resolve_settings_path

    monkeypatch.chdir(tmp_path)
    assert resolve_settings_path(None) == (DEFAULT_SETTINGS_PATH, "packaged default")
    (tmp_path / "settings.yaml").write_text("camera:\n  exposure_ms: 33.0\n")
    assert resolve_settings_path(None) == (tmp_path / "settings.yaml", "./settings.yaml")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.yaml").write_text("camera:\n  exposure_ms: 44.0\n")
    assert resolve_settings_path("sub/mine.yaml") == (tmp_path / "sub" / "mine.yaml", "--settings")
    assert main(["settings", "--show"]) == 0
    out = capsys.readouterr()
    assert f"settings {tmp_path / 'settings.yaml'} (./settings.yaml)" in out.err
    assert yaml.safe_load(out.out)["camera"]["exposure_ms"] == 33.0


def test_settings_write_copies_the_defaults_and_refuses_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["settings", "--write", "mine.yaml"]) == 0
    assert (tmp_path / "mine.yaml").read_text() == DEFAULT_SETTINGS_PATH.read_text()
    (tmp_path / "mine.yaml").write_text("camera:\n  exposure_ms: 50.0\n")
    assert main(["settings", "--write", "mine.yaml"]) == 2
    assert (tmp_path / "mine.yaml").read_text() == "camera:\n  exposure_ms: 50.0\n"
    assert main(["settings", "--write", "mine.yaml", "--force"]) == 0
    assert load_settings(tmp_path / "mine.yaml").to_dict() == load_settings().to_dict()


def test_default_logging_is_quiet_and_v_shows_info(tmp_path, monkeypatch, capsys):
    import logging

    monkeypatch.chdir(tmp_path)
    main(["settings", "--show"])
    assert logging.getLogger().level == logging.WARNING
    main(["settings", "--show", "-v"])
    assert logging.getLogger().level == logging.INFO
    main(["-v", "-v", "settings", "--show"])
    assert logging.getLogger().level == logging.DEBUG


# ------------------------------------------------------------------ issue 24 (15): what the commands say
def test_settings_write_names_the_file_it_wrote(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["settings", "--write", "my.yaml"]) == 0
    err = capsys.readouterr().err
    assert "{out}" not in err and f"--settings {tmp_path / 'my.yaml'}" in err, err


def test_deprecated_stop_rule_is_said_and_not_in_the_defaults(tmp_path, caplog):
    import logging

    from autoalign.settings import DEPRECATED_KEYS

    assert "converged_rms_rad" not in yaml.safe_load(DEFAULT_SETTINGS_PATH.read_text())["loop"]
    old = tmp_path / "old.yaml"
    old.write_text("loop:\n  converged_rms_rad: 0.02\n")
    with caplog.at_level(logging.WARNING, logger="autoalign.settings"):
        s = load_settings(old)
    assert s.loop.converged_rms_rad == 0.02       # an old file still loads
    text = caplog.text
    assert "old.yaml" in text and "loop.converged_rms_rad" in text and "deprecated and ignored" in text
    assert "floor_margin" in text and "loop.converged_rms_rad" in DEPRECATED_KEYS
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="autoalign.settings"):
        load_settings(None)
        main(["settings", "--write", str(tmp_path / "fresh.yaml")])
        load_settings(tmp_path / "fresh.yaml")
    assert "deprecated" not in caplog.text      # the packaged defaults and a fresh copy do not set it


def test_align_help_promises_files_only_with_report():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    text = " ".join(sub.choices["align"].format_help().split())
    assert "Files are written only with --report DIR" in text, text
    assert "writes JSON and PNG plots" not in text
    assert "--demo-micromanager is a WIRING DEMO" in text


def test_report_table_says_its_null_is_noise_free_without_the_bead(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "--out", "d.png"]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "beam null" in header
    assert "NOISE-FREE and WITHOUT the bead" in out


def test_gui_names_the_missing_xcb_libraries_before_qt(monkeypatch, capsys):
    """Issue 24 (16): on a minimal Debian Qt's xcb plugin lacks libxcb-icccm4, libxcb-keysyms1 and
    libxcb-xinerama0 and Qt only says "Could not load the Qt platform plugin xcb": `autoalign gui`
    checks first (QT_QPA_PLATFORM unset or xcb, a DISPLAY) and says in one line what to install,
    before any QApplication exists."""
    import sys

    gui = pytest.importorskip("autoalign.app.gui")
    missing = {"libxcb-icccm.so.4", "libxcb-keysyms.so.1", "libxcb-xinerama.so.0"}

    def reached(*_a, **_k):
        raise AssertionError("the QApplication was about to be created")

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(gui, "_loadable", lambda soname: soname not in missing)
    monkeypatch.setattr(gui, "enable_high_dpi", reached)
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.delenv("QT_QPA_PLATFORM", raising=False)
    assert main(["gui", "--sim"]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if not re.match(r"autoalign gui: settings /", ln)]
    assert len(lines) == 1, lines
    assert "libxcb-icccm.so.4, libxcb-keysyms.so.1, libxcb-xinerama.so.0" in lines[0]
    assert "sudo apt-get install libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0" in lines[0]
    # another platform, no display, or nothing missing: no complaint
    assert gui.qt_xcb_problem({"DISPLAY": ":0", "QT_QPA_PLATFORM": "offscreen"}) is None
    assert gui.qt_xcb_problem({"QT_QPA_PLATFORM": "xcb"}) is None
    assert gui.qt_xcb_problem({"DISPLAY": ":0", "QT_QPA_PLATFORM": "xcb"}, loadable=lambda s: True) is None
    assert "libxcb-icccm4" in gui.qt_xcb_problem({"DISPLAY": ":0", "QT_QPA_PLATFORM": "xcb"})
