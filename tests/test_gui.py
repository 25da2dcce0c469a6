"""The alignment application (issue 6), offscreen with pytest-qt, on the simulated microscope.

These drive the real worker, loop, simulated devices and shipped model through the window, the way
a user does: buttons, the Stop button, closing the window.
"""
from __future__ import annotations

import json
import os
import re
import time

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

pytest.importorskip("PyQt5")
pytest.importorskip("pyqtgraph")
pytest.importorskip("pytestqt")

from PyQt5 import QtCore, QtGui, QtWidgets  # noqa: E402

from autoalign.app.gui.reference import null_metric  # noqa: E402
from autoalign.correction import Correction  # noqa: E402
from autoalign.settings import load_settings  # noqa: E402

#: the names of one state in the log and the status bar
STATE = re.compile(r"before correction|after iteration \d+|best correction restored")

OPEN_TIMEOUT_MS = 90_000
TASK_TIMEOUT_MS = 60_000


def _need_stack() -> None:
    """The real loop, devices and model (issues 3-5)."""
    pytest.importorskip("autoalign.app.loop")
    pytest.importorskip("autoalign.hardware.factory")
    pytest.importorskip("autoalign.models.predictor")


def _need_model(settings) -> None:
    """The shipped model (issue 3) is needed to correct."""
    from pathlib import Path

    path = Path(settings.model.checkpoint)
    if not path.is_absolute():
        path = Path(__file__).resolve().parent.parent / path
    if not path.exists():
        pytest.skip(f"no shipped model yet ({settings.model.checkpoint})")


@pytest.fixture
def settings():
    from autoalign.app.gui import simulated_settings

    return simulated_settings(load_settings(None))


@pytest.fixture
def window(qtbot, settings):
    _need_stack()
    from autoalign.app.gui.main_window import MainWindow

    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: not w.is_busy, timeout=OPEN_TIMEOUT_MS)
    assert w.loop_ready, f"devices did not open: {w.errors}"
    yield w
    w.close()


def _wait_done(qtbot, w, task: str, timeout: int = TASK_TIMEOUT_MS) -> None:
    qtbot.waitUntil(lambda: not w.is_busy and (task in w.results or
                                               any(t == task for t, _ in w.errors)),
                    timeout=timeout)


# ------------------------------------------------------------------ with the simulated microscope
def test_a_run_shows_the_measured_residual_first_in_the_status_bar_and_the_plot(qtbot, window):
    """Issue 24 (1-3): after a run the status bar, the quality plot and the diagnosis show the
    MEASURED residual (calibration.quality: the refined estimator's model fit) first and the null
    second; the plot's axes say which is which, and the figure agrees with the truth."""
    _need_model(window.settings)
    from autoalign.calibration.quality import ALIGNED_RAD, Quality

    w = window
    assert w.corrector == "refined"                 # the default corrector: the fit's residual
    w.results.clear()
    assert w.auto_align(iterations=1, gain=1.0)
    _wait_done(qtbot, w, "run")
    assert not w.errors, w.errors
    hist = w.history
    n = len(hist.data["iteration"])
    current = hist.points()[-1]
    assert current["current"] and current["x"] == n
    # the state on the SLM now: its measured residual is the model fit's, and agrees with the truth
    q = Quality.from_metrics(w.state_metrics)
    assert q is not None and q.source == "fit" and current["quality_rad"] == pytest.approx(q.value)
    true = w.state_metrics["true_residual_rms"]
    assert q.value == pytest.approx(true, abs=max(3 * q.sigma, 0.15 * true)), (q, true)
    # the plot: the measured residual first (left axis, rad), the null second (right axis)
    xs, ys = hist.quality_curve.getData()
    assert list(xs) == list(range(n + 1)) and ys[-1] == pytest.approx(np.log10(q.value))
    assert list(hist.quality_now.getData()[0]) == [n]
    assert hist.null.plotItem.getAxis("left").labelText == "measured residual (rad RMS)"
    assert hist.null.plotItem.getAxis("right").labelText == "null depth (centre / peak)"
    assert hist.aligned_line.value() == pytest.approx(np.log10(ALIGNED_RAD))
    assert hist.null_curve.getData()[0][-1] == n
    # the status bar: one state, its measured residual first, then its null
    text = w.status_metrics.text()
    assert text.startswith(f"after iteration {n}: residual {q.value:.3f} ± {q.sigma:.3f} rad (fit), "), text
    assert text.index("residual") < text.index("null ")
    assert "measured residual" in w.status_metrics.toolTip()
    # the diagnosis under the plot names the measured residual and whether it is aligned
    assert f"measured residual {q.value:.3f}" in hist.diagnosis_label.text()
    assert ("NOT aligned" in hist.diagnosis_label.text()) == (q.value > ALIGNED_RAD)


def test_auto_align_lowers_true_residual(qtbot, window, tmp_path):
    _need_model(window.settings)
    w = window
    w.results.clear()
    w.iterations_spin.setValue(3)
    w.gain_spin.setValue(1.0)
    qtbot.mouseClick(w.buttons["run"], QtCore.Qt.LeftButton)
    assert w.is_busy and w.actions["stop"].isEnabled() and not w.actions["acquire"].isEnabled()
    _wait_done(qtbot, w, "run")
    assert not w.errors, w.errors
    result = w.results["run"]
    assert result["true_before"] is not None and result["true_after"] is not None
    assert result["true_after"] < 0.5 * result["true_before"], result
    # the views were fed: sections, SLM phase, bars, history, status bar
    assert w.sections_view.last_sections is not None
    assert w.sections_view.xy.centre_of_mass_um is not None
    assert w.phase_view.last_phase is not None
    assert np.nanmax(w.phase_view.last_phase) < 2 * np.pi + 1e-6
    assert any(abs(v) > 1e-3 for v in w.bars.correction.values())
    assert w.bars.prediction
    assert 1 <= len(w.history.data["iteration"]) <= 3
    true = w.history.true_residual
    assert true[max(true)] < true[0]
    assert not w.is_busy and w.actions["run"].isEnabled()
    # the last point is the state on the SLM now, imaged after the run (one more stack)
    n = len(w.history.data["iteration"])
    current = w.history.points()[-1]
    assert current["current"] and current["x"] == n and current["label"] == f"after iteration {n}"
    null_now = null_metric()(w.sections_view.last_sections, w.sections_view._args["background"])
    assert current["null_depth"] == pytest.approx(null_now)
    assert w.history.null_curve.getData()[0][-1] == n
    # status bar and log lines name one state each, with that state's numbers
    assert w.status_metrics.text().startswith(f"after iteration {n}: residual ")
    assert ", null " in w.status_metrics.text()
    state_lines = [line.split("  ", 1)[1] for line in w.log.lines
                   if STATE.match(line.split("  ", 1)[-1])]
    assert state_lines[-1].startswith(f"after iteration {n} (on the SLM now): measured residual ")
    for line in state_lines:
        assert len(STATE.findall(line)) == 1, line
    # the floor for the bead (computed once) and the diagnosis slot
    assert w.reference is not None and w.history.floor == w.reference.null_depth_floor
    from autoalign.app.gui.text import display_text

    assert display_text(w.results["run"]["stop_reason"]) in w.history.diagnosis_label.text()
    # before / after: the first imaged state and the current one
    ba = w.before_after
    assert "before correction" in ba.before.text and f"after iteration {n}" in ba.after.text
    np.testing.assert_allclose(ba.after.sections, w.sections_view.last_sections)
    assert not np.allclose(ba.before.sections, ba.after.sections)
    # the report: PNG + JSON + correction of this state, never overwriting
    reports = tmp_path / "reports"
    first, second = w.save_report(reports), w.save_report(reports)
    assert len({p.name for p in (*first.values(), *second.values())}) == 6
    data = json.loads(first["json"].read_text())
    assert data["state"] == f"after iteration {n}"
    assert data["metrics"]["null_depth"] == pytest.approx(current["null_depth"])
    assert data["null_depth_floor"] == pytest.approx(w.reference.null_depth_floor)
    saved = Correction.load_yaml(first["correction"]).coefficients
    live = w.worker.loop.correction.coefficients
    assert all(abs(saved.get(k, 0.0) - v) < 1e-9 for k, v in live.items())
    assert first["png"].stat().st_size > 10_000
    # with all that content, the window still fits 1366 x 768
    w.resize(1366, 728)
    qtbot.waitUntil(lambda: w.size() == QtCore.QSize(1366, 728), timeout=2000)
    assert w.minimumSizeHint().width() <= 1366 and w.minimumSizeHint().height() <= 728


def test_window_starts_on_the_vortex_mask(qtbot, window):
    """Not a flat SLM: the beam's vortex (charge from the settings) is on the SLM and shown."""
    w = window
    phase = np.asarray(w.worker.loop.devices.slm.phase_rad, dtype=float)
    m = phase.shape[0]
    # winding number of the phase around the pupil centre, on a circle of half the pupil radius
    t = np.linspace(0, 2 * np.pi, 721)
    rows = np.clip(np.round(m / 2 - 0.5 + 0.25 * m * np.sin(t)).astype(int), 0, m - 1)
    cols = np.clip(np.round(m / 2 - 0.5 + 0.25 * m * np.cos(t)).astype(int), 0, m - 1)
    steps = np.angle(np.exp(1j * np.diff(phase[rows, cols])))
    assert round(steps.sum() / (2 * np.pi)) == w.settings.optics.vortex_charge
    shown = w.phase_view.last_phase
    assert shown is not None and np.nanmax(shown) - np.nanmin(shown) > 6.0   # the full 2 pi ramp
    assert any("mask + correction shown" in line for line in w.log.lines)


def test_best_restore_refreshes_history_bars_and_images(qtbot, window, monkeypatch):
    """After a run that restores its best correction, the last point, the bars and the sections
    show the restored state (imaged once more on the worker)."""
    _need_model(window.settings)
    w = window
    loop = w.worker.loop
    loop.patience = 1
    from autoalign.app import loop as loop_module

    scores = iter(range(1000))
    # every measured state looks worse than the one before: the loop restores the best
    monkeypatch.setattr(loop_module, "measured_score", lambda metrics: float(next(scores)))
    w.results.clear()
    seen = w.measurements_seen
    w.auto_align(iterations=4, gain=0.5)
    _wait_done(qtbot, w, "run")
    assert not w.errors, w.errors
    result = w.results["run"]
    assert "correction restored" in result["stop_reason"], result
    assert w.measurements_seen == seen + result["records"] + 1     # one stack of the restored state
    current = w.history.points()[-1]
    assert current["current"] and current["label"].startswith("best correction restored")
    restored = loop.correction.coefficients
    assert all(abs(w.bars.correction.get(k, 0.0) - v) < 1e-9 for k, v in restored.items())
    assert not any(abs(v) > 1e-12 for v in w.bars.prediction.values())
    null_now = null_metric()(w.sections_view.last_sections, w.sections_view._args["background"])
    assert current["null_depth"] == pytest.approx(null_now)
    assert w.status_metrics.text().startswith("best correction restored")
    assert "best correction restored" in w.before_after.after.text


def test_stop_mid_run(qtbot, window):
    _need_model(window.settings)
    w = window
    w.results.clear()
    seen = w.measurements_seen
    w.auto_align(iterations=50, gain=0.3)
    # the worker is inside the run once its first stack arrived; press Stop then
    qtbot.waitUntil(lambda: w.measurements_seen > seen, timeout=TASK_TIMEOUT_MS)
    assert w.buttons["stop"].isEnabled()
    t0 = time.perf_counter()
    qtbot.mouseClick(w.buttons["stop"], QtCore.Qt.LeftButton)
    _wait_done(qtbot, w, "run")
    stopped_in = time.perf_counter() - t0
    result = w.results["run"]
    assert result["stop_reason"] == "stopped by request", result
    assert result["records"] <= 2
    assert stopped_in < 10.0
    # still usable: another request runs (a stale Stop does not stop it)
    qtbot.mouseClick(w.buttons["correct_once"], QtCore.Qt.LeftButton)
    _wait_done(qtbot, w, "correct_once")
    assert w.results["correct_once"] is not None and not w.errors, w.errors


def test_device_error_shows_message_and_window_stays_usable(qtbot, window):
    _need_model(window.settings)
    w = window
    loop = w.worker.loop
    camera = loop.devices.camera
    inject = _fault_injector(loop.devices)
    assert w.correct_once()            # a good, non-trivial mask on the SLM
    _wait_done(qtbot, w, "correct_once")
    assert not w.errors, w.errors
    good_phase = np.array(loop.devices.slm.phase_rad, copy=True)
    inject()
    w.results.clear()
    w.auto_align(iterations=3, gain=1.0)
    _wait_done(qtbot, w, "run")
    assert w.errors and w.errors[-1][0] == "run", w.errors
    assert any(isinstance(b, QtWidgets.QMessageBox) and b.isVisible() for b in w.message_boxes)
    assert not w.message_boxes[-1].isModal()
    assert any(line.split("  ", 1)[-1].startswith("ERROR") for line in w.log.lines)
    # the SLM keeps the last good mask (the loop's guarantee, surfaced here)
    np.testing.assert_allclose(loop.devices.slm.phase_rad, good_phase)
    # usable afterwards: buttons enabled and the next acquisition works once the fault is gone
    assert w.actions["acquire"].isEnabled() and w.buttons["run"].isEnabled()
    _clear_faults(loop.devices)
    n_errors = len(w.errors)
    qtbot.mouseClick(w.buttons["acquire"], QtCore.Qt.LeftButton)
    _wait_done(qtbot, w, "acquire")
    assert len(w.errors) == n_errors, w.errors
    assert camera.is_open


def test_closing_stops_the_loop_and_closes_the_devices(qtbot, settings):
    _need_stack()
    from autoalign.app.gui.main_window import MainWindow

    w = MainWindow(settings)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: not w.is_busy, timeout=OPEN_TIMEOUT_MS)
    devices = w.worker.devices
    w.auto_align(iterations=50, gain=0.1)
    qtbot.waitUntil(lambda: len(w.history.data["iteration"]) >= 1, timeout=TASK_TIMEOUT_MS)
    t0 = time.perf_counter()
    w.close()
    assert time.perf_counter() - t0 < 15.0
    assert not w.thread.isRunning()
    for name in ("camera", "focus", "xy", "slm"):
        dev = getattr(devices, name)
        assert not dev.is_open, f"{name} still open"


def test_save_and_load_correction(qtbot, window, tmp_path):
    _need_model(window.settings)
    w = window
    assert w.correct_once()
    _wait_done(qtbot, w, "correct_once")
    saved = dict(w.worker.loop.correction.coefficients)
    path = tmp_path / "corr.yaml"
    assert w.save_correction(str(path))
    _wait_done(qtbot, w, "save_correction")
    assert path.exists()
    assert w.zero_slm()
    _wait_done(qtbot, w, "zero_slm")
    assert not any(w.worker.loop.correction.coefficients.values())
    assert w.load_correction(str(path))
    _wait_done(qtbot, w, "load_correction")
    loaded = w.worker.loop.correction.coefficients
    assert set(loaded) == set(saved)
    assert all(abs(loaded[k] - saved[k]) < 1e-9 for k in saved)
    # a bad file: an error dialog, nothing applied
    bad = tmp_path / "bad.yaml"
    bad.write_text("hello: 1\n")
    w.results.pop("load_correction", None)  # else _wait_done returns on the earlier load's result
    assert w.load_correction(str(bad))
    _wait_done(qtbot, w, "load_correction")
    assert w.errors and w.errors[-1][0] == "load_correction"
    assert all(abs(w.worker.loop.correction.coefficients[k] - saved[k]) < 1e-9 for k in saved)


# ------------------------------------------------------------------ fault injection helpers
def _fault_injector(devices):
    """A callable making the camera fail from its next operation on, through the simulated
    devices' fault hook (``hardware.simulated.FaultInjection.fail_after``)."""
    return lambda: devices.camera.fail_after(0)


def _clear_faults(devices):
    devices.camera.fail_after(None)


# ------------------------------------------------------------------ widgets alone (no devices)
def test_widgets_show_named_modes_history_and_wrapped_phase(qtbot):
    from autoalign.app.gui.widgets import HistoryPlots, ModeBarChart, PhaseView

    bars = ModeBarChart([5, 6, 7])
    qtbot.addWidget(bars)
    ticks = bars.plotItem.getAxis("left")._tickLevels[0]
    assert (2, "7 vertical coma") in ticks
    bars.set_values(correction={7: -0.3, 22: 0.2}, prediction={7: 0.1})
    assert 22 in bars.modes and bars.correction[7] == -0.3

    hist = HistoryPlots()
    qtbot.addWidget(hist)
    hist.add({"null_depth": 0.05, "predicted_residual_rms": 0.6,
              "true_residual_rms_measured": 0.7, "true_residual_rms": 0.2})
    hist.add({"null_depth": 0.01, "predicted_residual_rms": 0.2,
              "true_residual_rms_measured": 0.2, "true_residual_rms": 0.05})
    assert hist.true_residual == {0: 0.7, 1: 0.2, 2: 0.05}
    assert hist.data["iteration"] == [0, 1]

    phase = PhaseView()
    qtbot.addWidget(phase)
    grid = np.full((64, 64), 7.0)
    phase.set_phase(grid)
    shown = phase.last_phase
    assert np.isnan(shown[0, 0]) and abs(shown[32, 32] - (7.0 - 2 * np.pi)) < 1e-5


def test_bead_walk_collection_with_progress(qtbot, window, tmp_path):
    pytest.importorskip("autoalign.app.collect")
    h5py = pytest.importorskip("h5py")
    w = window
    out = tmp_path / "walk.h5"
    assert w.start_collection(path=str(out), rounds=2, random_aberration_rms=0.0)
    assert w.collect_progress.maximum() == 2
    _wait_done(qtbot, w, "collect", timeout=TASK_TIMEOUT_MS)
    assert not w.errors, w.errors
    assert w.results["collect"]["written"] == 2
    assert w.collect_progress.value() == 2
    with h5py.File(out, "r") as f:
        assert f["sections"].shape[0] == 2


def test_poke_calibration_and_self_check(qtbot, window, tmp_path):
    _need_model(window.settings)
    pytest.importorskip("autoalign.calibration.poke")
    pytest.importorskip("autoalign.calibration.selfcheck")
    w = window
    path = tmp_path / "poke.yaml"
    assert w.poke_calibration(str(path))
    _wait_done(qtbot, w, "poke_calibration")
    assert not w.errors, w.errors
    assert path.exists() and w.worker.loop.calibration is not None
    n_boxes = len(w.message_boxes)
    # the button checks every mode; three keep it fast (spherical, m = 0, tells "reversed z" apart)
    assert w.self_check(modes=[5, 7, 11])
    _wait_done(qtbot, w, "self_check", timeout=TASK_TIMEOUT_MS)
    assert not w.errors, w.errors
    report = w.results["self_check"]
    assert report.ok, report.summary()
    assert len(w.message_boxes) == n_boxes + 1
    assert "PASSED" in w.message_boxes[-1].text()


def test_screenshot_command(qtbot, settings, tmp_path):
    _need_stack()
    from autoalign.app.gui import run_app

    out = tmp_path / "shot.png"
    assert run_app(settings, screenshot=str(out), auto_align=1, timeout_s=120) == 0
    assert out.exists() and out.stat().st_size > 10_000


def test_device_open_failure_is_reported_and_window_stays_alive(qtbot, settings):
    """Opening the devices fails (e.g. Micro-Manager not running): a message, no crash, the
    actions stay disabled and Reconnect is offered."""
    from autoalign.hardware.base import DeviceNotConnected

    from autoalign.app.gui.main_window import MainWindow
    from autoalign.app.gui.worker import AlignWorker

    def failing_open(_settings):
        raise DeviceNotConnected("camera: Micro-Manager is not running (port 4827)")

    w = MainWindow(settings, worker=AlignWorker(settings, open_devices=failing_open))
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: not w.is_busy and bool(w.errors), timeout=OPEN_TIMEOUT_MS)
    assert w.errors[0][0] == "open" and "Micro-Manager is not running" in w.errors[0][1]
    assert w.message_boxes and w.message_boxes[-1].isVisible()
    assert not w.loop_ready
    assert not w.actions["run"].isEnabled() and not w.buttons["acquire"].isEnabled()
    assert w.actions["reconnect"].isEnabled() and w.actions["quit"].isEnabled()
    assert not w.acquire()   # refused in the window, nothing queued
    w.close()
    assert not w.thread.isRunning()


def test_keyboard_shortcuts_acquire_and_stop(qtbot, window):
    w = window
    w.activateWindow()
    qtbot.waitUntil(lambda: QtWidgets.QApplication.activeWindow() is w, timeout=5000)
    seen = w.measurements_seen
    qtbot.keyClick(w, QtCore.Qt.Key_F5)                      # acquire once
    _wait_done(qtbot, w, "acquire")
    assert w.measurements_seen == seen + 1 and not w.errors, w.errors
    assert QtGui.QKeySequence("Esc") == w.actions["stop"].shortcut()
    assert QtGui.QKeySequence("F8") == w.actions["run"].shortcut()


# ------------------------------------------------------------------ issue 24: rough edges
def test_load_correction_refuses_a_foreign_file_and_sends_nothing(qtbot, window, tmp_path):
    """Issue 24 (8): a YAML without the format header, or with a mode the settings do not correct
    (Noll 99), is refused before the SLM: the error names the file, key and value in the log, the
    status bar and a message box; the SLM, the correction and the mode rows are unchanged. A file of
    the first layout (no header, its own units line) still loads, its warning in the window."""
    import yaml

    from autoalign.correction import LEGACY_UNITS

    w = window
    slm = w.worker.devices.slm
    phase = np.array(slm.phase_rad, copy=True)
    correction = w.worker.loop.correction.copy()
    rows = list(w.bars.modes)
    shown = np.array(w.phase_view.last_phase, copy=True)
    cases = (("foreign.yaml", "coefficients:\n  5: 0.1\n  99: 0.5\n", "key 'format' is missing"),
             ("mode99.yaml", "format: autoalign-correction\ncoefficients:\n  5: 0.1\n  99: 0.5\n",
              "key 'coefficients.99' = 0.5: Noll 99 is outside"))
    for name, text, words in cases:
        path = tmp_path / name
        path.write_text(text)
        n_boxes = len(w.message_boxes)
        w.results.pop("load_correction", None)
        assert w.load_correction(str(path))
        _wait_done(qtbot, w, "load_correction")
        task, message = w.errors[-1]
        assert task == "load_correction" and str(path) in message and words in message, message
        assert len(w.message_boxes) == n_boxes + 1 and words in w.message_boxes[-1].text()
        assert words in w.status_state.toolTip()
        assert any(words in line for line in w.log.lines)
        np.testing.assert_array_equal(slm.phase_rad, phase)          # nothing sent to the SLM
        assert w.worker.loop.correction == correction
        assert w.bars.modes == rows and 99 not in w.bars.modes      # no "Z99" row
        np.testing.assert_array_equal(w.phase_view.last_phase, shown)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"units": LEGACY_UNITS, "coefficients": {5: 0.05}, "mask_offset": [0.0, 0.0],
                                   "saved": "2026-11-23T20:31:21+00:00"}, sort_keys=False))
    n_errors, n_boxes = len(w.errors), len(w.message_boxes)
    w.results.pop("load_correction", None)
    assert w.load_correction(str(old))
    _wait_done(qtbot, w, "load_correction")
    assert len(w.errors) == n_errors, w.errors[-1]
    assert w.worker.loop.correction.coefficients == {5: 0.05}
    assert any("WARNING" in line and "old.yaml: records no optics" in line for line in w.log.lines)
    assert len(w.message_boxes) == n_boxes + 1 and "records no optics" in w.message_boxes[-1].text()


def test_mode_rows_follow_the_values_shown(qtbot):
    """Issue 24 (8): a mode beyond the configured rows is shown while it has a value and goes
    again (it does not stay for the session)."""
    from autoalign.app.gui.widgets import ModeBarChart

    bars = ModeBarChart([2, 3, 4, 5, 6])
    qtbot.addWidget(bars)
    bars.set_values(correction={5: 0.1, 30: 0.2})
    assert 30 in bars.modes
    bars.set_values(correction={5: 0.1}, prediction={})
    assert bars.modes == [2, 3, 4, 5, 6]


def test_report_tells_one_corrector_and_before_is_the_first_history_point(qtbot, window, tmp_path):
    """Issue 24 (9): the report's JSON names the corrector once (the loop's), its ``before`` is the
    history's first point (not an earlier Acquire's stack), its files are 0644 like Save…'s and its
    correction records the optics."""
    import stat

    import yaml

    _need_model(window.settings)
    w = window
    assert w.acquire()                      # a stack before any history point
    _wait_done(qtbot, w, "acquire")
    assert w.set_corrector("model")
    _wait_done(qtbot, w, "set_corrector")
    assert w.correct_once()
    _wait_done(qtbot, w, "correct_once")
    assert not w.errors, w.errors
    previous = os.umask(0o022)
    try:
        paths = w.save_report(tmp_path / "reports")
    finally:
        os.umask(previous)
    data = json.loads(paths["json"].read_text())
    assert data["corrector"] == "model" and "corrector" not in data["devices"]
    index = data["before"]["history_index"]
    first = data["history"]["null_depth"][index]
    assert index == 0 and data["before"]["state"] == first["label"] == "before correction"
    assert data["before"]["null_depth"] == pytest.approx(first["null_depth"])
    assert "before correction" in w.before_after.before.text
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths.values()} == {0o644}
    assert "optics" in yaml.safe_load(paths["correction"].read_text())


def test_log_and_texts_use_one_unit_and_one_numbering(qtbot, window, tmp_path):
    """Issue 24 (10): null depths in percent throughout a sentence (log, diagnosis, status), µm
    (never px beside µm), iterations numbered like the states ("iteration 1: applied" leads to
    "after iteration 1"), the bead walk's rounds numbered like its bar, and Centre saying the
    tip/tilt/defocus it applied (not "RMS 0.000 rad")."""
    _need_model(window.settings)
    w = window
    assert w.set_corrector("model")
    _wait_done(qtbot, w, "set_corrector")
    before = dict(w.worker.loop.correction.coefficients)
    assert w.centre()
    _wait_done(qtbot, w, "centre")
    after = dict(w.worker.loop.correction.coefficients)
    change = sum((after.get(j, 0.0) - before.get(j, 0.0)) ** 2 for j in (2, 3, 4)) ** 0.5
    centre_lines = [ln for ln in w.log.lines if "Centre: tip/tilt/defocus" in ln]
    assert change > 1e-3    # the simulated bead is off focus: Centre applies tip/tilt/defocus
    assert centre_lines and f"({change:.2f} rad RMS)" in centre_lines[-1], centre_lines
    assert not any("applied correction: RMS" in ln for ln in w.log.lines)
    assert w.auto_align(iterations=2, gain=1.0)
    _wait_done(qtbot, w, "run")
    assert not w.errors, w.errors
    assert w.start_collection(path=str(tmp_path / "walk.h5"), rounds=2, random_aberration_rms=0.0)
    _wait_done(qtbot, w, "collect")
    assert not w.errors, w.errors
    text = [ln.split("  ", 1)[1] for ln in w.log.lines]
    fraction = re.compile(r"\b(null(?: depth)?|floor) 0\.\d+(?![\d.]*\s*%)")
    for line in text + [w.history.diagnosis_label.text(), w.status_state.toolTip(), w.status_metrics.toolTip()]:
        assert not fraction.search(line), line
        assert not re.search(r"\d\)? um\b", line) and " px" not in line, line
    # the loop's own 0-based line is not shown; the window's numbering matches its states
    assert not any(re.match(r"iteration 0: ", ln) for ln in text)
    decisions = [i for i, ln in enumerate(text) if re.match(r"iteration 1: applied", ln)]
    assert decisions, text
    following = [ln for ln in text[decisions[0] + 1:] if STATE.match(ln)]
    assert following and following[0].startswith("after iteration 1"), following[:2]
    rounds = [ln for ln in text if ln.startswith("bead walk round")]
    assert [ln.split(":")[0] for ln in rounds] == ["bead walk round 1/2", "bead walk round 2/2"], rounds
    assert w.collect_progress.value() == 2
