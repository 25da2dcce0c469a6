"""The alignment window's views and helpers (issue 15), offscreen, without devices: display scales,
centre marker, profiles against the ideal donut, the bead's null floor, history, SLM panel, report
files, layout at 1366 x 768, high-DPI, keyboard shortcuts."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

pytest.importorskip("PyQt5")
pytest.importorskip("pyqtgraph")
pytest.importorskip("pytestqt")

from PyQt5 import QtCore, QtGui, QtWidgets  # noqa: E402

from autoalign.settings import load_settings  # noqa: E402


@pytest.fixture(scope="module")
def settings():
    from autoalign.app.gui import simulated_settings

    return simulated_settings(load_settings(None))


@pytest.fixture(scope="module")
def reference(settings):
    from autoalign.app.gui.reference import ideal_reference

    return ideal_reference(settings)


def _donut(n: int = 64, ring_px: float = 6.0, null: float = 0.0) -> np.ndarray:
    """A synthetic donut r^2 exp(-r^2 / ring^2) (peak 1 at r = ring), with a filled null."""
    c = np.arange(n) - n // 2
    r2 = (c[None, :] ** 2 + c[:, None] ** 2) / ring_px ** 2
    return (1 - null) * r2 * np.exp(1 - r2) + null


# ------------------------------------------------------------------ display scale and colour bar
def test_log_scale_tells_a_1_percent_from_a_0_01_percent_null():
    from autoalign.app.gui.widgets import colour_bar_ticks, display_values

    levels = (10.0, 1010.0)                      # background 10, peak 1000 above it
    one, hundredth = 10.0 + 10.0, 10.0 + 0.1     # 1 % and 0.01 % of the peak above background
    lin = display_values(np.array([one, hundredth]), levels, "linear")
    log = display_values(np.array([one, hundredth]), levels, "log")
    assert abs(lin[0] - lin[1]) < 0.011           # linear: both black
    # log over 3 decades: 1 % sits a third up the colour map, 0.01 % (below 0.1 %) at the bottom
    assert log[0] == pytest.approx(1 / 3, abs=0.02) and log[1] < 0.03
    gamma = display_values(np.array([one]), levels, "gamma", gamma=0.5)
    assert gamma[0] == pytest.approx(math.sqrt(0.01), abs=1e-6)
    # the colour bar's log ticks read in per cent of the peak, at the decades' positions
    # (each decade a third of the bar; the lowest decade squeezed by the offset that keeps a zero
    # finite)
    ticks = dict((label, pos) for pos, label in colour_bar_ticks(levels, "log"))
    assert ticks["100 %"] == pytest.approx(1.0)
    assert ticks["100 %"] - ticks["10 %"] == pytest.approx(1 / 3, abs=0.02)
    assert ticks["10 %"] - ticks["1 %"] == pytest.approx(1 / 3, abs=0.02)
    assert 0 < ticks["0.1 %"] < 0.15
    # linear ticks: photons at their linear positions
    for pos, label in colour_bar_ticks(levels, "linear"):
        assert pos == pytest.approx((float(label) - 10.0) / 1000.0, abs=1e-3)


def test_sections_view_scale_levels_and_marker_outside_the_null(qtbot):
    from autoalign.app.gui.widgets import OrthoSectionsView

    view = OrthoSectionsView()
    qtbot.addWidget(view)
    n, px, dz = 64, 0.04, 0.04
    sections = np.stack([_donut(n), _donut(n), _donut(n)]) * 1000.0 + 5.0
    view.set_measurement(sections, px, dz, centroid_px=(1.0, -2.0, 0.5), shift_px=(1, -2, 0),
                         background=5.0)
    assert view.levels[1] == pytest.approx(sections.max())
    # the centre-of-mass ticks lie outside the image: nothing is drawn over the null
    for sv in (view.xy, view.xz, view.yz):
        xs, ys = sv.marker.getData()
        rect = sv.image_rect
        assert len(xs) == 8
        for x, y in zip(xs, ys):
            inside = rect.left() < x < rect.right() and rect.top() < y < rect.bottom()
            assert not inside, (x, y, rect)
    xs, ys = view.xy.marker.getData()
    assert np.allclose(xs[:4], 1.0 * px) and np.allclose(ys[4:], -2.0 * px)   # they point at it
    # fixed levels: the image shows photons between them
    view.set_fixed_levels((5.0, 505.0))
    assert view.levels == (5.0, 505.0) and not view.lo_spin.isHidden()
    shown = view.xy.image.image
    assert np.nanmax(shown) == pytest.approx(1.0) and np.mean(shown >= 1.0) > 0.05  # clipped
    view.set_fixed_levels(None)
    view.set_scale("log")
    assert view.scale == "log" and view.colour_bar.ticks[0][1] == "100 %"
    view.cycle_scale()
    assert view.scale == "gamma" and view.gamma_spin.isEnabled()
    with pytest.raises(ValueError):
        view.set_fixed_levels((10.0, 1.0))


def test_profiles_through_the_centre_with_the_ideal_overlaid(qtbot, reference):
    from autoalign.app.gui.widgets import OrthoSectionsView

    view = OrthoSectionsView()
    qtbot.addWidget(view)
    view.set_reference(reference)
    n = reference.sections.shape[-1]
    c = n // 2
    # a measurement that IS the ideal donut (2000 photons peak above a background of 7)
    measured = reference.sections * 2000.0 + 7.0
    view.set_measurement(measured, 0.04, 0.04, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), background=7.0)
    prof = view.profiles.last
    np.testing.assert_allclose(prof["x"], measured[0, c, :])
    np.testing.assert_allclose(prof["y"], measured[0, :, c])
    np.testing.assert_allclose(prof["z_xz"], measured[1, :, c])
    np.testing.assert_allclose(prof["z_yz"], measured[2, :, c])
    # the ideal, scaled to the measured peak, coincides with it
    for key, ideal in view.profiles.last_ideal.items():
        np.testing.assert_allclose(ideal, prof[key], rtol=1e-9, atol=1e-6)
        assert view.profiles.ideal_curves[key].opts["pen"].style() == QtCore.Qt.DashLine
    # the donut: dark at the centre, bright on the ring, symmetric in x and y
    x = prof["x"] - 7.0
    assert x[c] < 0.1 * x.max()
    np.testing.assert_allclose(prof["x"], prof["y"], rtol=0.02, atol=2.0)
    # a dimmer measurement (half the photons): the ideal follows its peak
    view.set_measurement(reference.sections * 1000.0 + 7.0, 0.04, 0.04, None, background=7.0)
    assert view.profiles.last_ideal["x"].max() == pytest.approx(
        view.profiles.last["x"].max(), rel=0.02)


# ------------------------------------------------------------------ the bead's null floor
def test_null_floor_is_the_loops_measured_null_of_the_ideal_donut(settings, reference):
    """The floor equals what the loop itself measures on a noise-free unaberrated stack (its own
    simulated camera, acquisition and analysis), and grows with the bead, which fills the null."""
    from autoalign.app.gui.reference import ideal_reference
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.hardware.factory import open_devices

    devices = open_devices(settings)
    try:
        loop = AlignmentLoop(devices, settings, make_estimator("model", settings))
        assert reference.null_depth_floor == pytest.approx(loop.ideal_null_depth(), rel=0.05)
    finally:
        devices.close()
    assert 0 < reference.null_depth_scatter < reference.null_depth_floor
    bigger = ideal_reference(settings.replace(**{"camera.bead_diameter_um": 0.12}))
    assert bigger.null_depth_floor > 1.5 * reference.null_depth_floor


# ------------------------------------------------------------------ history, legends, diagnosis
def _legend_clear_of_data(plot_widget, legend) -> bool:
    vb = plot_widget.plotItem.vb.sceneBoundingRect()
    return not legend.sceneBoundingRect().intersects(vb)


def test_history_floor_current_state_and_legends_beside_the_points(qtbot):
    from autoalign.app.gui.widgets import HistoryPlots, ModeBarChart

    hist = HistoryPlots()
    qtbot.addWidget(hist)
    hist.resize(700, 260)
    hist.show()
    hist.add({"null_depth": 0.05, "predicted_residual_rms": 0.6}, label="before correction")
    hist.add({"null_depth": 0.01, "predicted_residual_rms": 0.2}, label="after iteration 1")
    hist.set_current({"null_depth": 0.004, "true_residual_rms": 0.05}, "after iteration 2")
    pts = hist.points()
    assert [p["x"] for p in pts] == [0, 1, 2] and pts[-1]["current"]
    xs, ys = hist.null_curve.getData()
    assert xs[-1] == 2 and ys[-1] == pytest.approx(math.log10(0.004))
    assert list(hist.now_marker.getData()[0]) == [2]
    # the next record at that x replaces the current-state point
    hist.add({"null_depth": 0.0041}, label="after iteration 2")
    assert [p["x"] for p in hist.points()] == [0, 1, 2] and hist.current is None
    hist.set_floor(0.02, bead_diameter_um=0.08, scatter=0.004)
    assert hist.floor_line.isVisible() and hist.floor_line.value() == pytest.approx(
        math.log10(0.02))
    lo, hi = hist.floor_band.getRegion()
    assert (lo, hi) == (pytest.approx(math.log10(0.016)), pytest.approx(math.log10(0.024)))
    assert "80 nm" in hist.floor_label and "2" in hist.floor_label
    hist.set_diagnosis("converged; null at the bead floor")
    assert hist.diagnosis_label.text() == "converged; null at the bead floor"
    bars = ModeBarChart([5, 6, 7])
    qtbot.addWidget(bars)
    bars.resize(400, 300)
    bars.show()
    qtbot.wait(50)
    assert _legend_clear_of_data(hist.residual, hist.residual_legend)
    assert _legend_clear_of_data(hist.null, hist.null_legend)
    assert _legend_clear_of_data(bars, bars.legend)


# ------------------------------------------------------------------ SLM panel
def test_slm_panel_shows_the_slm_wrapped_or_the_correction_unwrapped(qtbot):
    from autoalign.app.gui.widgets import PhaseView
    from autoalign.correction import Correction

    view = PhaseView()
    qtbot.addWidget(view)
    m = 64
    c = -1 + (np.arange(m) + 0.5) * 2 / m
    u, v = np.meshgrid(c, c)
    rho2 = u * u + v * v
    defocus = math.sqrt(3) * (2 * rho2 - 1)          # Noll 4, RMS-normalised
    vortex = np.arctan2(v, u)
    view.set_phase(vortex + 5.0 * defocus)
    assert view.mode == "slm"
    shown = view.last_phase
    inside = rho2 <= 1
    assert np.all(np.isnan(shown[~inside]))
    assert np.nanmin(shown) >= 0 and np.nanmax(shown) < 2 * np.pi
    view.set_correction(Correction({4: 5.0}))
    view.toggle_mode()
    assert view.mode == "correction"
    corr = view.last_correction_phase
    np.testing.assert_allclose(corr[inside], 5.0 * defocus[inside], atol=1e-9)
    assert np.nanmax(np.abs(corr)) > 2 * np.pi            # unwrapped
    assert "correction (rad)" in view.colour_bar.plotItem.getAxis("right").labelText
    view.toggle_mode()
    assert view.mode == "slm"


# ------------------------------------------------------------------ report files
def test_report_files_never_overwrite(qtbot, tmp_path, settings):
    from autoalign.app.gui.report import settings_summary, write_report
    from autoalign.correction import Correction

    image = QtGui.QImage(40, 30, QtGui.QImage.Format_RGB32)
    image.fill(QtGui.QColor("red"))
    corr = Correction({5: 0.25, 7: -0.1}, (0.01, 0.0))
    summary = {"state": "after iteration 3", "metrics": {"null_depth": 0.012},
               "settings": settings_summary(settings)}
    existing = tmp_path / "day1_2.json"
    existing.write_text("somebody else's file")
    first = write_report(tmp_path, image, summary, corr, base="day1")
    second = write_report(tmp_path, image, summary, corr, base="day1")
    assert first["png"].name == "day1.png"
    assert second["json"].name == "day1_3.json"          # _2 is taken by another file
    assert existing.read_text() == "somebody else's file"
    for paths in (first, second):
        data = json.loads(paths["json"].read_text())
        assert data["state"] == "after iteration 3" and data["metrics"]["null_depth"] == 0.012
        assert data["settings"]["camera"]["bead_diameter_um"] == settings.camera.bead_diameter_um
        assert data["saved_utc"].endswith("+00:00")
        loaded = Correction.load_yaml(paths["correction"])
        assert loaded.coefficients == corr.coefficients and loaded.mask_offset == corr.mask_offset
        assert QtGui.QImage(str(paths["png"])).size() == QtCore.QSize(40, 30)
    assert not list(tmp_path.glob("*.tmp"))


def test_report_files_have_the_default_mode_and_the_correction_its_optics(qtbot, tmp_path, settings):
    """Issue 24 (9): the report's files get the mode of any new file (0644 under umask 022, as
    Save… writes), not the temporary file's 0600; its correction records the optics, so Load
    correction can check it."""
    import os
    import stat

    import yaml

    from autoalign.app.gui.report import write_report
    from autoalign.correction import Correction, read_correction

    image = QtGui.QImage(40, 30, QtGui.QImage.Format_RGB32)
    image.fill(QtGui.QColor("red"))
    previous = os.umask(0o022)
    try:
        paths = write_report(tmp_path / "r", image, {"state": "x"}, Correction({5: 0.1}), base="r",
                             settings=settings)
        Correction({5: 0.1}).save_yaml(tmp_path / "saved.yaml", settings=settings)   # what Save… writes
    finally:
        os.umask(previous)
    modes = {k: stat.S_IMODE(p.stat().st_mode) for k, p in paths.items()}
    assert modes == {"png": 0o644, "json": 0o644, "correction": 0o644}, {k: oct(v) for k, v in modes.items()}
    assert stat.S_IMODE((tmp_path / "saved.yaml").stat().st_mode) == 0o644
    data = yaml.safe_load(paths["correction"].read_text())
    assert data["optics"] == {"optics.numerical_aperture": settings.optics.numerical_aperture,
                              "optics.wavelength_um": settings.optics.wavelength_um,
                              "slm.pupil_radius_px": settings.slm.pupil_radius_px}
    assert read_correction(paths["correction"], settings=settings)[1] == []   # checked, no warning


# ------------------------------------------------------------------ window without devices
@pytest.fixture
def bare_window(qtbot, settings):
    """The window over a worker whose devices fail to open (no devices needed)."""
    from autoalign.app.gui.main_window import MainWindow
    from autoalign.app.gui.worker import AlignWorker

    def failing_open(_settings):
        raise RuntimeError("no devices in this test")

    w = MainWindow(settings, worker=AlignWorker(settings, open_devices=failing_open))
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: not w.is_busy and bool(w.errors), timeout=30_000)
    for box in list(w.message_boxes):
        box.close()
    yield w
    w.close()


def test_layout_fits_1366x768(qtbot, bare_window):
    w = bare_window
    hint = w.minimumSizeHint()
    assert hint.width() <= 1366 and hint.height() <= 728, hint     # 40 px for a task bar
    w.resize(1366, 728)
    qtbot.waitUntil(lambda: w.size() == QtCore.QSize(1366, 728), timeout=2000)
    central = w.centralWidget()
    for child in central.findChildren(QtWidgets.QWidget):
        if child.isVisibleTo(w) and (child.minimumWidth() > 1366 or child.minimumHeight() > 728):
            pytest.fail(f"{child} minimum size {child.minimumSize()}")
    # the bead-walk file box shows its whole default name, inside the visible controls
    box = w.collect_path
    assert box.width() >= box.fontMetrics().horizontalAdvance(box.text())
    scroll = w.controls.parentWidget()   # the scroll area's viewport
    left = box.mapTo(scroll, QtCore.QPoint(0, 0)).x()
    assert left >= 0 and left + box.width() <= scroll.width()


HIGH_DPI_SCRIPT = """
import os
os.environ["QT_QPA_PLATFORM"] = "offscreen"
os.environ["QT_SCALE_FACTOR"] = "2"           # a 4K screen at 200 %
from autoalign.app.gui import enable_high_dpi, simulated_settings
enable_high_dpi()
from PyQt5 import QtCore, QtWidgets
app = QtWidgets.QApplication([])
assert app.testAttribute(QtCore.Qt.AA_EnableHighDpiScaling)
assert app.testAttribute(QtCore.Qt.AA_UseHighDpiPixmaps)
from autoalign.settings import load_settings
from autoalign.app.gui.main_window import MainWindow
from autoalign.app.gui.worker import AlignWorker
def fail(_settings):
    raise RuntimeError("no devices")
s = simulated_settings(load_settings(None))
w = MainWindow(s, worker=AlignWorker(s, open_devices=fail))
w.resize(1366, 728)
w.show()
app.processEvents()
try:
    image = w.grab()
    # the same layout drawn with (at least) twice the pixels: sharp on the 4K screen, not tiny
    # (the offscreen screen adds its own 100/96 dpi factor on top)
    ratio = image.devicePixelRatioF()
    assert 2.0 <= ratio < 2.2, ratio
    assert abs(image.width() - ratio * w.width()) <= 2, (image.size(), w.size())
finally:
    w.shutdown()
print("ok")
"""


def test_high_dpi_scaling_is_set_before_the_application():
    out = subprocess.run([sys.executable, "-c", HIGH_DPI_SCRIPT], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_every_shortcut_is_bound_and_listed_in_help(qtbot, bare_window, monkeypatch):
    from autoalign.app.gui.main_window import ACTIONS, HANDLERS

    w = bare_window
    w.activateWindow()
    qtbot.waitUntil(lambda: QtWidgets.QApplication.activeWindow() is w, timeout=5000)
    help_menu = [a.menu() for a in w.menuBar().actions() if a.text() == "&Help"][0]
    assert w.actions["shortcuts"] in help_menu.actions()
    called: list[str] = []
    with_shortcut = [k for k, _, sc, _ in ACTIONS if sc]
    assert len(with_shortcut) >= 20
    for key in with_shortcut:
        monkeypatch.setattr(w, HANDLERS[key], lambda *a, _k=key, **kw: called.append(_k))
        w.actions[key].setEnabled(True)
    seen: set[str] = set()
    for key in with_shortcut:
        seq = w.actions[key].shortcut()
        assert not seq.isEmpty() and w.actions[key] in w.actions.values()
        assert seq.toString() not in seen, f"{seq.toString()} bound twice"
        seen.add(seq.toString())
        combo = seq[0]
        qtbot.keyClick(w, QtCore.Qt.Key(combo & ~int(QtCore.Qt.KeyboardModifierMask)),
                       QtCore.Qt.KeyboardModifiers(combo & int(QtCore.Qt.KeyboardModifierMask)))
        assert called and called[-1] == key, f"{seq.toString()} did not trigger {key}"
    monkeypatch.undo()
    n = len(w.message_boxes)
    w.show_shortcuts()
    text = w.message_boxes[n].text()
    for key in with_shortcut:
        assert w.actions[key].shortcut().toString(QtGui.QKeySequence.NativeText) in text
