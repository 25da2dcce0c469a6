"""The main window of ``autoalign gui``.

The window owns no device: an :class:`~app.gui.worker.AlignWorker` in a ``QThread`` does. The window
sends requests through :attr:`MainWindow.request` (queued to the worker thread) and shows what the
worker's signals bring back. Stop is the exception: it calls ``worker.stop()`` directly, which sets
the loop's thread-safe stop flag, so it works while the worker is busy.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from PyQt5 import QtCore, QtGui, QtWidgets

from autoalign.app.gui.text import LOOP_ITERATION_LINE, display_text
from autoalign.app.gui.widgets import (BeforeAfterView, HistoryPlots, LogPanel, ModeBarChart,
                                       OrthoSectionsView, PhaseView)
from autoalign.app.gui.worker import AlignWorker
from autoalign.calibration.quality import ALIGNED_RAD, Quality, is_aligned_quality

#: the loop's metrics of the measured quality figure (``calibration.quality.Quality.as_metrics``)
QUALITY_KEYS = ("quality_rad", "quality_sigma_rad", "quality_shape_rad", "quality_from_fit",
                "correlation_noise_free")

TASK_TITLES = {
    "open": "Opening devices",
    "acquire": "Acquiring",
    "centre": "Centring",
    "correct_once": "Correcting once",
    "run": "Auto-aligning",
    "zero_slm": "Zeroing the SLM",
    "new_aberration": "New hidden aberration",
    "set_corrector": "Choosing the corrector",
    "save_correction": "Saving the correction",
    "load_correction": "Loading the correction",
    "self_check": "Convention self-check",
    "poke_calibration": "Poke calibration",
    "load_poke_calibration": "Loading the poke calibration",
    "collect": "Bead-walk collection",
    "shutdown": "Closing devices",
}

# (action key, menu text, shortcut, tooltip)
ACTIONS = [
    ("acquire", "&Acquire once", "F5", "Acquire one z-stack and show its ortho-sections"),
    ("centre", "&Centre", "F6", "Re-centre the bead: stage (xy, focus) and tip/tilt/defocus"),
    ("correct_once", "Correct &once", "F7", "One iteration: acquire, predict, apply the correction"),
    ("run", "A&uto-align", "F8", "Run the closed loop for the given iterations and gain"),
    ("stop", "&Stop", "Esc", "Stop the running loop after the current step"),
    ("zero_slm", "&Zero SLM", "Ctrl+0", "Show the bare vortex mask; clears the correction"),
    ("save_correction", "&Save correction…", "Ctrl+S", "Save the current correction (YAML)"),
    ("load_correction", "&Load correction…", "Ctrl+O", "Load a correction (YAML) and apply it"),
    ("open_measurement", "Open &measurement…", "Ctrl+Shift+O",
     "Analyse a recorded file (TIFF, OME-TIFF, .obf/.msr, HDF5): instrument-model fit, phase retrieval, verdict"),
    ("self_check", "Convention &self-check", "Ctrl+K",
     "Apply each mode with + and − sign and check the model reads it back"),
    ("poke_calibration", "&Poke calibration…", "Ctrl+P",
     "Measure the tip/tilt/defocus response and save the calibration (YAML)"),
    ("load_poke_calibration", "Load poke &calibration…", "",
     "Use a saved poke calibration (YAML) for centring"),
    ("collect", "Start &bead walk", "Ctrl+B", "Collect bead-walk rounds into the HDF5 file"),
    ("new_aberration", "&New hidden aberration", "Ctrl+N",
     "Simulated microscope: draw a fresh random hidden aberration"),
    ("clear_history", "C&lear history", "", "Clear the history plots"),
    ("reconnect", "&Reconnect devices", "", "Open the devices again (after opening failed)"),
    ("screenshot", "Save screens&hot…", "Ctrl+Shift+S", "Save a PNG of this window"),
    ("save_report", "Save &report…", "Ctrl+R",
     "Save the current state for a lab notebook: PNG of the window, JSON of the metrics and "
     "settings, and the correction (YAML), into a folder; nothing is overwritten"),
    ("cycle_scale", "Section &scale: linear / log / gamma", "Ctrl+L",
     "Cycle the colour scale of the sections and the profiles"),
    ("toggle_slm_view", "SLM panel: SLM / correction &alone", "Ctrl+M",
     "Switch the SLM panel between what the SLM shows (wrapped) and the correction alone"),
    ("show_live", "&Live sections", "Ctrl+1", "Show the live sections and profiles"),
    ("show_before_after", "&Before / after", "Ctrl+2",
     "Show the first and the current state side by side"),
    ("quit", "&Quit", "Ctrl+Q", "Stop, close the devices and quit"),
    ("shortcuts", "Keyboard &shortcuts", "F1", "List the keyboard shortcuts"),
]

#: actions that only change the view (enabled whatever the worker does)
VIEW_ACTIONS = {"open_measurement", "screenshot", "quit", "clear_history", "cycle_scale", "toggle_slm_view",
                "show_live", "show_before_after", "shortcuts"}

#: what each actions's menu item and button calls (a method name of MainWindow, looked up when
#: triggered)
HANDLERS = {
    "acquire": "acquire", "centre": "centre", "correct_once": "correct_once", "run": "auto_align",
    "stop": "stop", "zero_slm": "zero_slm", "save_correction": "save_correction",
    "load_correction": "load_correction", "self_check": "self_check", "open_measurement": "open_measurement",
    "poke_calibration": "poke_calibration", "load_poke_calibration": "load_poke_calibration",
    "collect": "start_collection", "reconnect": "reconnect", "new_aberration": "new_aberration",
    "clear_history": "clear_history", "screenshot": "save_screenshot_dialog",
    "save_report": "save_report", "cycle_scale": "cycle_scale",
    "toggle_slm_view": "toggle_slm_view", "show_live": "show_live",
    "show_before_after": "show_before_after", "quit": "close", "shortcuts": "show_shortcuts",
}


class MainWindow(QtWidgets.QMainWindow):
    """The alignment application window. ``settings``: a validated :class:`app.settings.Settings`."""

    request = QtCore.pyqtSignal(str, dict)        # queued to AlignWorker.execute
    task_finished = QtCore.pyqtSignal(str, object)  # re-emitted for scripts / the screenshot mode

    def __init__(self, settings: Any, worker: AlignWorker | None = None,
                 close_timeout_s: float = 60.0) -> None:
        super().__init__()
        self.settings = settings
        self.close_timeout_s = close_timeout_s
        self.setWindowTitle("autoalign — STED donut alignment")
        self.busy_task: str | None = None
        self.ready_info: dict | None = None
        self.errors: list[tuple[str, str]] = []       # (task, message), for tests and scripts
        self.results: dict[str, Any] = {}             # last result per task
        self.last_state: dict[str, Any] = {}
        self.message_boxes: list[QtWidgets.QMessageBox] = []
        self._shut_down = False
        self._iterations_done = 0
        self.measurements_seen = 0
        self.corrector = "model"                      # confirmed by the worker
        self.reference = None                         # app.gui.reference.IdealReference
        self.slm_state = "before correction"          # the name of the state on the SLM now
        self.before_state: dict | None = None         # the first imaged state (before/after)
        self.now_state: dict | None = None            # the latest imaged state
        self.state_metrics: dict[str, Any] = {}       # metrics of the state in the status bar
        self.diagnosis = ""

        self._build_views()
        self._build_controls()
        self._build_actions()
        self._build_status_bar()
        self._layout()
        self._set_busy(True, "open")

        # the worker and its thread
        self.worker = worker or AlignWorker(settings)
        self.thread = QtCore.QThread(self)
        self.thread.setObjectName("autoalign-worker")
        self.worker.moveToThread(self.thread)
        self.request.connect(self.worker.execute, QtCore.Qt.QueuedConnection)
        w = self.worker
        w.log.connect(self.on_worker_log)
        w.measurement.connect(self.on_measurement)
        w.iteration.connect(self.on_iteration)
        w.progress.connect(self.on_progress)
        w.slm_phase.connect(self.phase_view.set_phase)
        w.state.connect(self.on_state)
        w.busy.connect(self._set_busy)
        w.error.connect(self._on_worker_error)   # a bound slot: runs in the GUI thread
        w.finished.connect(self.on_finished)
        w.ready.connect(self.on_ready)
        w.reference.connect(self.on_reference)
        w.current_state.connect(self.on_current_state)
        self.thread.finished.connect(self.worker.deleteLater)
        self.thread.start()
        self.log.add("autoalign GUI started; settings: " + str(getattr(settings, "source", "?")))
        self.request.emit("open", {})

    # ------------------------------------------------------------------ construction
    def _build_views(self) -> None:
        self.sections_view = OrthoSectionsView()
        self.sections_view.changed.connect(self._refresh_before_after)
        self.before_after = BeforeAfterView()
        self.view_tabs = QtWidgets.QTabWidget()
        self.view_tabs.addTab(self.sections_view, "Live sections")
        self.view_tabs.addTab(self.before_after, "Before / after")
        self.view_tabs.setDocumentMode(True)
        self.phase_view = PhaseView()
        # tip, tilt and defocus (centring) first, then the model's modes
        modes = [2, 3, 4] + list(getattr(self.settings.model, "modes", range(5, 16)))
        self.bars = ModeBarChart(modes)
        self.history = HistoryPlots(horizontal=True)
        self.log = LogPanel()
        self.log.setMinimumHeight(48)

    def _build_controls(self) -> None:
        s = self.settings
        self.buttons: dict[str, QtWidgets.QPushButton] = {}
        panel = QtWidgets.QWidget()
        v = QtWidgets.QVBoxLayout(panel)
        v.setContentsMargins(4, 4, 4, 4)

        # alignment
        g = QtWidgets.QGroupBox("Alignment")
        grid = QtWidgets.QGridLayout(g)
        for i, key in enumerate(("acquire", "centre", "correct_once", "zero_slm")):
            grid.addWidget(self._button(key), i // 2, i % 2)
        self.iterations_spin = QtWidgets.QSpinBox()
        self.iterations_spin.setRange(1, 100)
        self.iterations_spin.setValue(int(s.loop.max_iterations))
        self.iterations_spin.setToolTip("Iterations of the auto-align run (it may stop earlier on "
                                        "convergence or no improvement)")
        self.gain_spin = QtWidgets.QDoubleSpinBox()
        self.gain_spin.setRange(0.05, 2.0)
        self.gain_spin.setSingleStep(0.05)
        self.gain_spin.setDecimals(2)
        self.gain_spin.setValue(float(s.loop.gain))
        self.gain_spin.setToolTip("Fraction of the prediction applied per iteration")
        self.corrector_combo = QtWidgets.QComboBox()
        self.corrector_combo.addItem("CNN model", "model")
        self.corrector_combo.addItem("CNN + model fit (diagnosis)", "refined")
        self.corrector_combo.addItem("classical modal", "modal")
        self.corrector_combo.setToolTip("Corrector used by Correct once and Auto-align: the CNN "
                                        "(one stack per iteration) or the model-free modal "
                                        "baseline (2N+1 stacks per iteration)")
        self.corrector_combo.activated.connect(self._corrector_chosen)
        form = QtWidgets.QFormLayout()
        form.addRow("Corrector", self.corrector_combo)
        form.addRow("Iterations", self.iterations_spin)
        form.addRow("Gain", self.gain_spin)
        grid.addLayout(form, 2, 0, 1, 2)
        grid.addWidget(self._button("run"), 3, 0)
        grid.addWidget(self._button("stop"), 3, 1)
        self.buttons["run"].setStyleSheet("font-weight: bold")
        self.buttons["stop"].setStyleSheet("QPushButton:enabled { color: #b00000; font-weight: bold }")
        v.addWidget(g)

        # correction file
        g = QtWidgets.QGroupBox("Correction and report")
        grid = QtWidgets.QGridLayout(g)
        grid.addWidget(self._button("save_correction", "Save…"), 0, 0)
        grid.addWidget(self._button("load_correction", "Load…"), 0, 1)
        grid.addWidget(self._button("save_report", "Save report…"), 1, 0, 1, 2)
        v.addWidget(g)

        # calibration
        g = QtWidgets.QGroupBox("Calibration")
        h = QtWidgets.QHBoxLayout(g)
        h.addWidget(self._button("self_check", "Self-check"))
        h.addWidget(self._button("poke_calibration", "Poke calib…"))
        v.addWidget(g)

        # bead walk
        g = QtWidgets.QGroupBox("Bead-walk collection")
        form = QtWidgets.QFormLayout(g)
        # the file name alone (relative to the current directory, which the tooltip names), and
        # a box wide enough to show it whole
        self.collect_path = QtWidgets.QLineEdit(f"beadwalk_{time.strftime('%Y%m%d')}.h5")
        self.collect_path.setToolTip(f"HDF5 file, relative to {Path.cwd()}; an existing file is "
                                     "appended to")
        fm = self.collect_path.fontMetrics()
        self.collect_path.setMinimumWidth(fm.horizontalAdvance(self.collect_path.text() + "MM") + 12)
        browse = QtWidgets.QToolButton()
        browse.setText("…")
        browse.setToolTip("Choose the output file")
        browse.clicked.connect(self.choose_collect_path)
        self.collect_browse = browse
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.collect_path, 1)
        row.addWidget(browse)
        form.addRow(QtWidgets.QLabel("File (HDF5, appended to)"))
        form.addRow(row)
        self.rounds_spin = QtWidgets.QSpinBox()
        self.rounds_spin.setRange(0, 100000)
        self.rounds_spin.setValue(20)
        self.rounds_spin.setSpecialValueText("until walk-off")
        self.rounds_spin.setToolTip("Rounds to collect (0: until the bead walks off)")
        form.addRow("Rounds", self.rounds_spin)
        self.random_rms_spin = QtWidgets.QDoubleSpinBox()
        self.random_rms_spin.setRange(0.0, 2.0)
        self.random_rms_spin.setSingleStep(0.05)
        self.random_rms_spin.setSuffix(" rad")
        self.random_rms_spin.setToolTip("RMS of a fresh random aberration added each round "
                                        "(0: none), for labelled real data")
        form.addRow("Random ab.", self.random_rms_spin)
        form.addRow(self._button("collect", "Start bead walk"))
        self.collect_progress = QtWidgets.QProgressBar()
        self.collect_progress.setRange(0, 1)
        self.collect_progress.setValue(0)
        self.collect_progress.setFormat("idle")
        form.addRow(self.collect_progress)
        v.addWidget(g)

        v.addStretch(1)
        self.controls = panel

    def _button(self, key: str, text: str | None = None) -> QtWidgets.QPushButton:
        if text is None:
            text = next(t for k, t, _, _ in ACTIONS if k == key).replace("&", "").rstrip("…")
        b = QtWidgets.QPushButton(text)
        b.setAutoDefault(False)
        self.buttons[key] = b
        return b

    def _build_actions(self) -> None:
        self.actions: dict[str, QtWidgets.QAction] = {}
        for key, text, shortcut, tip in ACTIONS:
            a = QtWidgets.QAction(text, self)
            if shortcut:
                a.setShortcut(QtGui.QKeySequence(shortcut))
                a.setShortcutContext(QtCore.Qt.WindowShortcut)
            a.setToolTip(f"{tip} ({shortcut})" if shortcut else tip)
            a.setStatusTip(tip)
            # looked up when triggered (not bound now), so the handler is always the current one
            a.triggered.connect(lambda _checked=False, name=HANDLERS[key]: getattr(self, name)())
            self.addAction(a)
            self.actions[key] = a
            if key in self.buttons:
                self.buttons[key].clicked.connect(a.trigger)
                self.buttons[key].setToolTip(a.toolTip())

        mb = self.menuBar()
        menus = {
            "&File": ["load_correction", "save_correction", None, "open_measurement", None, "reconnect", "screenshot", None,
                      "quit"],
            "&Align": ["acquire", "centre", "correct_once", "run", "stop", None, "zero_slm"],
            "&Calibrate": ["self_check", "poke_calibration", "load_poke_calibration"],
            "C&ollect": ["collect"],
            "&Simulation": ["new_aberration"],
            "&View": ["show_live", "show_before_after", None, "cycle_scale", "toggle_slm_view",
                      None, "clear_history", "save_report"],
        }
        for title, keys in menus.items():
            m = mb.addMenu(title)
            for key in keys:
                if key is None:
                    m.addSeparator()
                else:
                    m.addAction(self.actions[key])
        mb.addMenu("&Help").addAction(self.actions["shortcuts"])

    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        self.status_state = QtWidgets.QLabel("Starting…")
        self.status_metrics = QtWidgets.QLabel("")
        self.status_backend = QtWidgets.QLabel("")
        self.status_progress = QtWidgets.QProgressBar()
        self.status_progress.setMaximumWidth(160)
        self.status_progress.setVisible(False)
        # long texts are cut (full text in the tooltip), never widen the window
        for label in (self.status_state, self.status_metrics):
            label.setMinimumWidth(40)
            label.setSizePolicy(QtWidgets.QSizePolicy.Ignored, QtWidgets.QSizePolicy.Preferred)
        sb.addWidget(self.status_state, 2)
        sb.addPermanentWidget(self.status_metrics, 3)
        sb.addPermanentWidget(self.status_progress)
        sb.addPermanentWidget(self.status_backend)

    def _layout(self) -> None:
        top = QtWidgets.QSplitter(QtCore.Qt.Horizontal)
        top.addWidget(self.view_tabs)
        top.addWidget(self.phase_view)
        top.setStretchFactor(0, 3)
        top.setStretchFactor(1, 1)

        middle = QtWidgets.QSplitter(QtCore.Qt.Horizontal)
        middle.addWidget(self.bars)
        middle.addWidget(self.history)
        middle.setStretchFactor(0, 2)
        middle.setStretchFactor(1, 3)

        views = QtWidgets.QSplitter(QtCore.Qt.Vertical)
        views.addWidget(top)
        views.addWidget(middle)
        views.addWidget(self.log)
        views.setStretchFactor(0, 5)
        views.setStretchFactor(1, 4)
        views.setStretchFactor(2, 1)
        for splitter in (top, middle, views):
            splitter.setChildrenCollapsible(False)
        views.setSizes([420, 300, 60])
        top.setSizes([800, 260])
        middle.setSizes([420, 640])

        scroll = QtWidgets.QScrollArea()
        scroll.setWidget(self.controls)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(QtCore.Qt.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(self.controls.sizeHint().width() + 20)

        central = QtWidgets.QSplitter(QtCore.Qt.Horizontal)
        central.addWidget(views)
        central.addWidget(scroll)
        central.setStretchFactor(0, 1)
        central.setStretchFactor(1, 0)
        self.setCentralWidget(central)
        self.resize(self.default_size())

    def default_size(self) -> QtCore.QSize:
        """1400 x 900 (device-independent pixels), at most the screen's available area, larger on
        a large screen (a 4K screen without scaling: three quarters of it)."""
        screen = self.screen() if hasattr(self, "screen") else None
        screen = screen or QtWidgets.QApplication.primaryScreen()
        if screen is None:
            return QtCore.QSize(1400, 900)
        avail = screen.availableGeometry()
        w = min(avail.width(), max(1400, int(0.75 * avail.width())))
        h = min(avail.height(), max(900, int(0.8 * avail.height())))
        return QtCore.QSize(w, h)

    # ------------------------------------------------------------------ state
    @property
    def is_busy(self) -> bool:
        return self.busy_task is not None

    @QtCore.pyqtSlot(bool, str)
    def _set_busy(self, busy: bool, task: str) -> None:
        if busy:
            self.busy_task = task
            self.status_state.setText(TASK_TITLES.get(task, task) + "…")
            if task != "collect":
                self.status_progress.setVisible(True)
                self.status_progress.setRange(0, 0)
        else:
            if self.busy_task == task or task == "":
                self.busy_task = None
            self.status_state.setText("Ready" if self.loop_ready else "Devices not open")
            self.status_progress.setVisible(False)
        enabled = (not self.is_busy) and self.loop_ready and not self._shut_down
        for key, a in self.actions.items():
            if key == "stop":
                a.setEnabled(self.is_busy and not self._shut_down)
            elif key in VIEW_ACTIONS:
                a.setEnabled(True)
            elif key == "save_report":
                a.setEnabled(not self.is_busy and not self._shut_down)
            elif key == "new_aberration":
                a.setEnabled(enabled and bool((self.ready_info or {}).get("simulated")))
            elif key == "reconnect":
                a.setEnabled(not self.is_busy and not self.loop_ready and not self._shut_down)
            else:
                a.setEnabled(enabled)
        for key, b in self.buttons.items():
            b.setEnabled(self.actions[key].isEnabled())
        for w in (self.corrector_combo, self.iterations_spin, self.gain_spin, self.collect_path,
                  self.collect_browse,
                  self.rounds_spin, self.random_rms_spin):
            w.setEnabled(enabled)

    @property
    def loop_ready(self) -> bool:
        return self.ready_info is not None

    # ------------------------------------------------------------------ actions
    def _send(self, name: str, **kwargs: Any) -> bool:
        if self._shut_down:
            return False
        if name != "open" and not self.loop_ready:
            self.log.add(f"{TASK_TITLES.get(name, name)}: the devices are not open "
                         "(File → Reconnect devices)")
            return False
        if self.is_busy:
            self.log.add(f"{TASK_TITLES.get(name, name)}: busy with "
                         f"{TASK_TITLES.get(self.busy_task, self.busy_task)}; press Stop first")
            return False
        # mark busy now (the worker confirms) so a double press cannot queue a second task
        self._set_busy(True, name)
        kwargs["_sent_at"] = time.monotonic()   # lets the worker drop it if Stop comes first
        self.request.emit(name, kwargs)
        return True

    def reconnect(self) -> bool:
        if self.loop_ready:
            return False
        return self._send("open")

    def new_aberration(self, rms_rad: float | None = None, seed: int | None = None) -> bool:
        return self._send("new_aberration", rms_rad=rms_rad, seed=seed)

    def clear_history(self) -> None:
        """Clear the history plots; the next imaged state becomes the 'before' state."""
        self.history.clear()
        self.before_state = None
        self._refresh_before_after()

    def cycle_scale(self) -> None:
        self.sections_view.cycle_scale()

    def toggle_slm_view(self) -> None:
        self.phase_view.toggle_mode()

    def show_live(self) -> None:
        self.view_tabs.setCurrentWidget(self.sections_view)

    def show_before_after(self) -> None:
        self.view_tabs.setCurrentWidget(self.before_after)

    def acquire(self) -> bool:
        return self._send("acquire")

    def centre(self) -> bool:
        return self._send("centre")

    def correct_once(self) -> bool:
        return self._send("correct_once", gain=float(self.gain_spin.value()))

    def auto_align(self, iterations: int | None = None, gain: float | None = None) -> bool:
        if iterations is not None:
            self.iterations_spin.setValue(int(iterations))
        if gain is not None:
            self.gain_spin.setValue(float(gain))
        return self._send("run", iterations=int(self.iterations_spin.value()),
                          gain=float(self.gain_spin.value()))

    def set_corrector(self, corrector: str) -> bool:
        index = self.corrector_combo.findData(corrector)
        if index < 0:
            raise ValueError(f"unknown corrector {corrector!r}")
        self.corrector_combo.setCurrentIndex(index)
        return self._send("set_corrector", corrector=corrector)

    def _corrector_chosen(self, index: int) -> None:
        if not self._send("set_corrector", corrector=self.corrector_combo.itemData(index)):
            self.corrector_combo.setCurrentIndex(
                max(0, self.corrector_combo.findData(self.corrector)))

    def stop(self) -> None:
        """Stop mid-run: direct, thread-safe call (the worker's event loop is busy)."""
        if self.is_busy:
            self.log.add("Stop requested: stopping after the current step")
            self.status_state.setText("Stopping…")
        self.worker.stop()

    def zero_slm(self) -> bool:
        return self._send("zero_slm")

    def save_correction(self, path: str | None = None) -> bool:
        if path is None:
            path = self._ask_path("save", "Save correction", "correction.yaml",
                                  "YAML (*.yaml *.yml)")
            if not path:
                return False
        return self._send("save_correction", path=str(path))

    def load_correction(self, path: str | None = None) -> bool:
        if path is None:
            path = self._ask_path("open", "Load correction", "", "YAML (*.yaml *.yml)")
            if not path:
                return False
        return self._send("load_correction", path=str(path))

    def open_measurement(self, path: str | None = None) -> Any:
        """File -> Open measurement: the analysis dialog (:mod:`app.gui.measurement`); returns it."""
        from autoalign.app.gui.measurement import MeasurementDialog

        dialog = MeasurementDialog(self.settings, self, path)
        dialog.setModal(False)
        dialog.show()
        return dialog

    def self_check(self, modes: list[int] | None = None) -> bool:
        """Convention self-check over ``modes`` (default: every mode the model predicts)."""
        return self._send("self_check", modes=list(modes) if modes else None)

    def poke_calibration(self, path: str | None = None) -> bool:
        if path is None:
            path = self._ask_path("save", "Save poke calibration",
                                  f"poke_calibration_{time.strftime('%Y%m%d_%H%M')}.yaml",
                                  "YAML (*.yaml *.yml)")
            if not path:
                return False
        return self._send("poke_calibration", path=str(path))

    def load_poke_calibration(self, path: str | None = None) -> bool:
        if path is None:
            path = self._ask_path("open", "Load poke calibration", "", "YAML (*.yaml *.yml)")
            if not path:
                return False
        return self._send("load_poke_calibration", path=str(path))

    def choose_collect_path(self) -> None:
        path = self._ask_path("save", "Bead-walk output file", self.collect_path.text(),
                              "HDF5 (*.h5 *.hdf5)", confirm_overwrite=False)
        if path:
            self.collect_path.setText(path)

    def start_collection(self, path: str | None = None, rounds: int | None = None,
                         random_aberration_rms: float | None = None) -> bool:
        if path is not None:
            self.collect_path.setText(str(path))
        if rounds is not None:
            self.rounds_spin.setValue(int(rounds))
        if random_aberration_rms is not None:
            self.random_rms_spin.setValue(float(random_aberration_rms))
        out = self.collect_path.text().strip()
        if not out:
            self.on_error("collect", "choose an output file first")
            return False
        n = int(self.rounds_spin.value())
        self.collect_progress.setFormat("round %v / %m")
        self.collect_progress.setRange(0, n if n > 0 else 0)
        self.collect_progress.setValue(0)
        return self._send("collect", path=out, rounds=n if n > 0 else None,
                          random_aberration_rms=float(self.random_rms_spin.value()))

    def _ask_path(self, mode: str, title: str, default: str, filters: str,
                  confirm_overwrite: bool = True) -> str:
        """File dialog (tests call the actions with a path instead)."""
        if mode == "open":
            path, _ = QtWidgets.QFileDialog.getOpenFileName(self, title, default, filters)
        else:
            opts = QtWidgets.QFileDialog.Options()
            if not confirm_overwrite:
                opts |= QtWidgets.QFileDialog.DontConfirmOverwrite
            path, _ = QtWidgets.QFileDialog.getSaveFileName(self, title, default, filters,
                                                            options=opts)
        return path

    def save_screenshot(self, path: str | Path) -> bool:
        """Grab the whole window into a PNG."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ok = self.grab().save(str(path))
        self.log.add(f"Screenshot {'saved to' if ok else 'could NOT be saved to'} {path}")
        return bool(ok)

    def save_screenshot_dialog(self) -> None:
        path = self._ask_path("save", "Save screenshot", "autoalign.png", "PNG (*.png)")
        if path:
            self.save_screenshot(path)

    def show_shortcuts(self) -> None:
        """Help → Keyboard shortcuts: every bound shortcut, read from the actions themselves."""
        rows = "".join(
            f"<tr><td><b>{a.shortcut().toString(QtGui.QKeySequence.NativeText)}</b></td>"
            f"<td nowrap>{a.text().replace('&', '')}</td></tr>"
            for a in self.actions.values() if not a.shortcut().isEmpty())
        self._message(QtWidgets.QMessageBox.Information, "Keyboard shortcuts",
                      f"<table cellspacing=6>{rows}</table>")
        self.message_boxes[-1].setStyleSheet(   # one line a row
            "QLabel#qt_msgbox_label { min-width: 24em; }")

    # ------------------------------------------------------------------ report
    def report_summary(self) -> dict[str, Any]:
        """What the report's JSON holds: the state on the SLM now, its metrics, the first state,
        the history, the ideal floor, the correction and a summary of the settings."""
        from autoalign.app.gui.report import settings_summary

        corr = self.last_state.get("correction")
        hist = self.history
        ks = sorted(hist.true_residual)
        devices = {k: v for k, v in (self.ready_info or {}).items() if k != "corrector"}  # one truth: below
        return {
            "state": self.slm_state,
            "metrics": _plain(self.state_metrics),
            "null_depth_floor": None if self.reference is None else
            float(self.reference.null_depth_floor),
            "diagnosis": self.diagnosis,
            # the first state of the history (its first valid point, "history_index" in
            # history.null_depth); before any point, the first imaged stack
            "before": _state_record(self.before_state),
            "now": _state_record(self.now_state),
            "history": {
                "null_depth": [_plain(p) for p in hist.points()],
                "predicted_residual_rms": [
                    {"x": x, "value": _plain(v)} for x, v in
                    zip(hist.data["iteration"], hist.data["predicted_residual_rms"])],
                "true_residual_rms": [{"x": k, "value": hist.true_residual[k]} for k in ks],
            },
            "correction": None if corr is None else corr.to_dict(),
            "corrector": self.corrector,
            "devices": _plain(devices),
            "settings": settings_summary(self.settings),
        }

    def save_report(self, folder: str | Path | None = None) -> dict[str, Path] | None:
        """Write ``<stem>.png`` (the window), ``<stem>.json`` (:meth:`report_summary`) and
        ``<stem>_correction.yaml`` into ``folder`` (asked for when ``None``); an existing file is
        never overwritten (a numbered stem instead). Returns the paths, or ``None``."""
        from autoalign.app.gui.report import write_report

        if folder is None:
            folder = QtWidgets.QFileDialog.getExistingDirectory(self, "Save report into folder",
                                                                str(Path.cwd()))
            if not folder:
                return None
        try:
            paths = write_report(folder, self.grab().toImage(), self.report_summary(),
                                 self.last_state.get("correction"), settings=self.settings)
        except Exception as exc:  # noqa: BLE001 - reported, the window lives on
            self.on_error("save_report", f"{type(exc).__name__}: {exc}")
            return None
        self.log.add("Report saved: " + ", ".join(str(p) for p in paths.values()))
        self._status(f"Report saved ({self.slm_state}) to {Path(folder)}")
        self.results["save_report"] = paths
        return paths

    def _status(self, text: str, limit: int = 56) -> None:
        """The left status-bar text, shortened to leave room for the metrics; full in the tooltip."""
        self.status_state.setToolTip(text)
        self.status_state.setText(text if len(text) <= limit else text[: limit - 1] + "…")

    # ------------------------------------------------------------------ worker signals
    @QtCore.pyqtSlot(str)
    def on_worker_log(self, message: str) -> None:
        """A line from the worker or the loop, worded like the window's own (null depths in %,
        µm); the loop's per-iteration decision line is written by :meth:`on_iteration` instead,
        numbered like the states."""
        if LOOP_ITERATION_LINE.match(str(message)):
            return
        self.log.add(display_text(message))

    @QtCore.pyqtSlot(object)
    def on_ready(self, info: dict) -> None:
        self.ready_info = dict(info or {})
        self.corrector = str(self.ready_info.get("corrector", self.corrector))
        self.corrector_combo.setCurrentIndex(max(0, self.corrector_combo.findData(self.corrector)))
        where = ("simulated microscope" if self.ready_info.get("simulated")
                 else f"{self.ready_info.get('backend', '?')} hardware")
        model = self.ready_info.get("model")
        self.status_backend.setText(f"{where} · {'model ' + model if model else 'no model'}")
        self._set_busy(self.is_busy, self.busy_task or "")

    @QtCore.pyqtSlot(object)
    def on_measurement(self, m: Any) -> None:
        self.measurements_seen += 1
        stack = getattr(m, "stack", None)
        pixel = float(getattr(stack, "pixel_size_um", self.settings.camera.pixel_size_um))
        zstep = float(getattr(stack, "z_step_um", self.settings.stack.z_step_um))
        sections = getattr(m, "sections", None)
        if sections is None:
            return
        n = sections.shape[-1]
        c = getattr(m, "centroid", None)
        centroid = None if c is None else (c.x_px, c.y_px, c.z_px)
        centre = getattr(m, "centre_zyx", None)
        shift = (0.0, 0.0, 0.0)
        if centre is not None:  # the loop re-centres the sections on the rounded bead centre
            z0, y0, x0 = (min(max(round(v), 0), n - 1) - n // 2 for v in centre)
            shift = (float(x0), float(y0), float(z0))
        background = float(getattr(m, "background_photons", 0.0) or 0.0)
        self.sections_view.set_measurement(sections, pixel, zstep, centroid, shift, background)
        valid = bool(getattr(m, "valid", True))
        null = float("nan")
        if valid:
            try:
                from autoalign.app.gui.reference import null_metric

                null = float(null_metric()(sections, background))
            except Exception:  # noqa: BLE001 - a caption, never a failure
                null = float("nan")
        # the stack shows the state on the SLM when it was taken (named now; a best-restore or a
        # zero renames it when the worker says so)
        self.now_state = {"sections": np.array(sections, dtype=float, copy=True),
                          "state": self.slm_state, "null_depth": null, "valid": valid,
                          "timestamp": float(getattr(m, "timestamp", 0.0) or time.time())}
        if self.before_state is None and valid:
            self.before_state = dict(self.now_state)
        self._refresh_before_after()
        if not valid:
            self._status(f"Invalid stack ({self.slm_state}): {getattr(m, 'reason', '?')}")

    def state_name(self, iterations: int) -> str:
        """The name of the state after ``iterations`` iterations (counted since the window
        opened; refused iterations count, and change nothing on the SLM)."""
        return "before correction" if iterations <= 0 else f"after iteration {iterations}"

    def _state_text(self, state: str, metrics: dict, now: bool = False) -> str:
        """One line naming ONE state and only its metrics, the measured residual first (the
        quality figure, :mod:`calibration.quality`), then the null: 'after iteration 3: measured
        residual 0.012 ± 0.006 rad (model fit), aligned, null 2.9 %, …'."""
        bits = []
        q = Quality.from_metrics(metrics)
        if q is not None:
            verdict = "aligned" if is_aligned_quality(q) else (
                "not aligned" if not is_aligned_quality(q, sigmas=0.0) else "aligned? (within the noise)")
            bits.append(f"measured {q.text('±')}, {verdict}")
        nd = metrics.get("null_depth")
        if nd is not None and np.isfinite(nd):
            bits.append(f"null {100 * nd:.3g} %")
        pred = metrics.get("predicted_residual_rms")
        if pred is not None and np.isfinite(pred):
            bits.append(f"predicted residual {pred:.3f} rad")
        true = metrics.get("true_residual_rms")
        if true is not None and np.isfinite(true):
            bits.append(f"true residual {true:.3f} rad")
        return f"{state}{' (on the SLM now)' if now else ''}: " + (", ".join(bits) or "no metrics")

    def _first_state(self, sections: Any, state: str, metrics: dict, valid: bool,
                     timestamp: float | None, current: bool = False) -> None:
        """Make the 'before' state the one of the history's first valid point (the report's
        ``before`` is then ``history.null_depth[history_index]``), replacing a first imaged stack
        taken before any point, or a current-state point that a record has since replaced."""
        index = len(self.history.points()) - 1
        held = None if self.before_state is None else self.before_state.get("history_index")
        replaced = held == index and bool(self.before_state.get("current")) and not current
        if (held is not None and not replaced) or not valid or sections is None:
            return
        metrics = dict(metrics)
        for key in ("true_residual_rms", "true_null_depth", "true_mask_offset"):
            if f"{key}_measured" in metrics:   # the truth when the stack was taken, not after the correction
                metrics[key] = metrics.pop(f"{key}_measured")
        nd = metrics.get("null_depth")
        self.before_state = {"sections": np.array(sections, dtype=float, copy=True), "state": state,
                             "null_depth": float("nan") if nd is None else float(nd), "valid": True,
                             "metrics": dict(metrics), "timestamp": float(timestamp or time.time()),
                             "history_index": index, "current": current}
        self._refresh_before_after()

    @QtCore.pyqtSlot(object)
    def on_iteration(self, r: Any) -> None:
        self._iterations_done += 1
        metrics = dict(getattr(r, "metrics", {}) or {})
        state = self.slm_state          # what was on the SLM when this record's stack was taken
        self.history.add(metrics, label=state)
        m = getattr(r, "measurement", None)
        self._first_state(getattr(m, "sections", None), state, metrics, bool(getattr(m, "valid", False)),
                          getattr(m, "timestamp", None))
        corr = getattr(getattr(r, "correction", None), "coefficients", None)
        self.bars.set_values(correction=corr, prediction=getattr(r, "prediction", None) or {})
        # the stack of this record saw the state BEFORE its correction: its metrics only
        applied = str(getattr(r, "decision", "")).startswith("applied")
        true_seen = metrics.get("true_residual_rms_measured")
        if true_seen is None and not applied:   # nothing applied: the one value is this state's
            true_seen = metrics.get("true_residual_rms")
        seen = {"null_depth": metrics.get("null_depth"),
                "predicted_residual_rms": metrics.get("predicted_residual_rms"),
                "true_residual_rms": true_seen,
                **{k: metrics[k] for k in QUALITY_KEYS if k in metrics}}
        photons = metrics.get("photons")
        line = self._state_text(state, seen)
        if photons is not None and np.isfinite(photons):
            line += f", {photons:.3g} photons"
        self.log.add(line)
        # the decision on that stack, numbered like the states: iteration k leads to "after iteration k"
        self.log.add(f"iteration {self._iterations_done}: {display_text(str(getattr(r, 'decision', '')))}")
        self._show_state(state, seen)
        if applied:
            self.slm_state = self.state_name(self._iterations_done)
            if self.now_state is not None:
                self.now_state["state"] = state

    @QtCore.pyqtSlot(object)
    def on_current_state(self, info: dict) -> None:
        """The worker imaged the state on the SLM now (after a run, a best-restore, a single
        correction, a zero or a load): the last history point, the bars and the 'now' snapshot."""
        info = dict(info or {})
        event = str(info.get("event", ""))
        k = self._iterations_done
        names = {"restored": f"best correction restored (after {k} iteration(s))",
                 "zero_slm": "SLM zeroed (mask only)", "load_correction": "correction loaded"}
        self.slm_state = names.get(event, self.slm_state)
        metrics = dict(info.get("metrics") or {})
        self.history.set_current(metrics, self.slm_state)
        if self.now_state is not None:   # the stack just imaged is this state's
            self._first_state(self.now_state.get("sections"), self.slm_state, metrics,
                              bool(info.get("valid", True)) and bool(self.now_state.get("valid")),
                              info.get("timestamp"), current=True)
        corr = info.get("correction")
        if corr is not None:
            self.bars.set_values(correction=corr.coefficients,
                                 prediction={} if event in names else None)
            self.phase_view.set_correction(corr)
        if self.now_state is not None:
            self.now_state["state"] = self.slm_state
            self.now_state["metrics"] = metrics
        self._refresh_before_after()
        self.log.add(self._state_text(self.slm_state, metrics, now=True))
        self._show_state(self.slm_state, metrics)

    def _show_state(self, state: str, metrics: dict) -> None:
        """The status bar's metrics: one state, named, with its own metrics only."""
        self.state_metrics = {"state": state, **{k: v for k, v in metrics.items()
                                                 if v is not None}}
        text = self._state_text(state, metrics)
        short = (text.replace("measured residual", "residual").replace("predicted residual", "pred.")
                 .replace("true residual", "true").replace(" (model fit)", " (fit)").replace(" (donut shape)", " (shape)"))
        if self.reference is not None:
            short += f" (floor {100 * self.reference.null_depth_floor:.2g} %)"
        self.status_metrics.setText(short + "  |")
        self.status_metrics.setToolTip(text)

    @QtCore.pyqtSlot(object)
    def on_reference(self, reference: Any) -> None:
        """The ideal donut through the bead: profiles' overlay and the null floor line."""
        self.reference = reference
        self.sections_view.set_reference(reference)
        self.history.set_floor(reference.null_depth_floor, reference.bead_diameter_um,
                               getattr(reference, "null_depth_scatter", None))

    def _refresh_before_after(self) -> None:
        def state(s: dict | None, which: str) -> dict | None:
            if s is None:
                return None
            nd = s.get("null_depth")
            caption = f"{which}: {s.get('state', '?')}"
            if nd is not None and np.isfinite(nd):
                caption += f" · null {100 * nd:.3g} %"
            true = (s.get("metrics") or {}).get("true_residual_rms")
            if true is not None and np.isfinite(true):
                caption += f" · true residual {true:.3f} rad"
            return {"sections": s["sections"], "caption": caption}

        sv = self.sections_view
        levels = None if sv.auto_check.isChecked() else sv.levels
        self.before_after.set_states(state(self.before_state, "before"),
                                     state(self.now_state, "now"), sv.scale,
                                     float(sv.gamma_spin.value()), levels)

    @QtCore.pyqtSlot(int, int)
    def on_progress(self, done: int, total: int) -> None:
        bar = self.collect_progress if self.busy_task == "collect" else self.status_progress
        if total <= 0 and bar is self.collect_progress:   # until the bead walks off
            bar.setRange(0, done + 1)
            bar.setValue(done)
            bar.setFormat(f"round {done} (until the bead walks off)")
        elif total <= 0:
            bar.setRange(0, 0)
        else:
            bar.setRange(0, max(total, 1))
            bar.setValue(done)

    @QtCore.pyqtSlot(object)
    def on_state(self, state: dict) -> None:
        self.last_state = dict(state or {})
        if self.last_state.get("corrector"):
            self.corrector = str(self.last_state["corrector"])
        corr = self.last_state.get("correction")
        if corr is not None and getattr(corr, "coefficients", None) is not None:
            self.bars.set_values(correction=corr.coefficients)
            self.phase_view.set_correction(corr)
        true = self.last_state.get("true_residual_rms")
        if true is not None and not self.state_metrics:
            self._show_state(self.slm_state, {"true_residual_rms": true})

    @QtCore.pyqtSlot(str, object)
    def on_finished(self, task: str, result: Any) -> None:
        self.results[task] = result
        if task == "self_check" and result is not None:
            ok = bool(getattr(result, "ok", False))
            summary = result.summary() if hasattr(result, "summary") else str(result)
            self._message(QtWidgets.QMessageBox.Information if ok else QtWidgets.QMessageBox.Warning,
                          "Convention self-check", ("PASSED\n\n" if ok else "FAILED\n\n") + summary)
        elif task == "collect":
            written = int((result or {}).get("written", 0)) if isinstance(result, dict) else 0
            self.collect_progress.setRange(0, max(self.collect_progress.maximum(), written, 1))
            self.collect_progress.setValue(written)
            self.collect_progress.setFormat(f"{written} round(s) written")
        elif task == "set_corrector" and result:
            self.corrector = str(result)
        elif task == "load_correction" and isinstance(result, dict) and result.get("warnings"):
            self._message(QtWidgets.QMessageBox.Warning, "autoalign: correction loaded with a warning",
                          "The correction was loaded and applied, but:\n\n" + "\n\n".join(result["warnings"]))
        elif task == "zero_slm":
            self.bars.set_values(correction={}, prediction={})
        elif task in ("acquire", "centre") and result is not None and self.now_state is not None:
            seen = {"null_depth": self.now_state.get("null_depth")}
            self.log.add(self._state_text(self.now_state.get("state", self.slm_state), seen))
            self._show_state(self.now_state.get("state", self.slm_state), seen)
        text = f"{TASK_TITLES.get(task, task)}: done"
        if task == "run" and isinstance(result, dict):
            self.set_diagnosis(result)
        if task == "run" and isinstance(result, dict) and result.get("stop_reason"):
            text = f"Auto-align: {str(result['stop_reason']).split(' (')[0]}"
        elif task == "collect" and isinstance(result, dict) and result.get("stop_reason"):
            text = f"Bead walk: {result['stop_reason']}"
        elif task == "load_correction" and isinstance(result, dict) and result.get("warnings"):
            text = f"Correction loaded; WARNING: {result['warnings'][0]}"
        elif result is None and task not in ("zero_slm", "save_correction"):
            text = f"{TASK_TITLES.get(task, task)}: stopped"
        self._status(display_text(text))
        self.task_finished.emit(task, result)

    def set_diagnosis(self, result: dict | str) -> None:
        """The text slot under the null plot: why the run stopped and what limits the alignment
        (the run's ``diagnosis`` text when the loop gives one), the measured residual of the state
        shown (the quality figure: aligned or not) and where its null is against the bead floor.
        The null alone never reads "at the floor": through the bead an aberrated donut's can."""
        if isinstance(result, str):
            parts = [result]
        else:
            parts = [str(result.get(k) or "") for k in ("diagnosis", "stop_reason")]
            if parts[1]:
                parts[1] = "stopped: " + parts[1]
        q = Quality.from_metrics(self.state_metrics)
        aligned = q is not None and is_aligned_quality(q)
        if q is not None:
            where = (f"aligned (≤ {ALIGNED_RAD:g} rad)" if aligned else
                     f"NOT aligned (> {ALIGNED_RAD:g} rad)" if not is_aligned_quality(q, sigmas=0.0) else
                     f"within {ALIGNED_RAD:g} rad, not beyond the noise")
            parts.append(f"{self.state_metrics.get('state', 'now')}: measured {q.text('±')}: {where}")
        nd = self.state_metrics.get("null_depth")
        if (self.reference is not None and nd is not None and np.isfinite(nd)
                and self.reference.null_depth_floor > 0):
            ratio = nd / self.reference.null_depth_floor
            scatter = getattr(self.reference, "null_depth_scatter", float("nan"))
            where = ""
            if np.isfinite(scatter) and scatter > 0:
                if nd >= self.reference.null_depth_floor + 2 * scatter:
                    where = " (above the floor: an aberration, the mask or a fault limits it)"
                elif aligned:
                    where = " (at the floor within the noise)"
                else:
                    where = " (near the floor, but the residual says aberrated: the bead hides it)"
            parts.append(f"null {100 * nd:.3g} % = {ratio:.2g} × the bead floor "
                         f"{100 * self.reference.null_depth_floor:.2g} %{where}")
        self.diagnosis = display_text("; ".join(p for p in parts if p))   # null depths in % throughout
        self.history.set_diagnosis(self.diagnosis)

    @QtCore.pyqtSlot(str, str)
    def _on_worker_error(self, task: str, message: str) -> None:
        self.on_error(task, message, logged=True)   # the worker logged it already

    def on_error(self, task: str, message: str, logged: bool = False) -> None:
        """Errors never kill the app: log, status bar and a non-modal dialog."""
        self.errors.append((task, message))
        if task == "collect":
            self.collect_progress.setRange(0, max(self.collect_progress.maximum(), 1))
            self.collect_progress.setFormat("stopped: %v round(s)")
        if task == "set_corrector":
            self.corrector_combo.setCurrentIndex(
                max(0, self.corrector_combo.findData(self.corrector)))
        if not logged:
            self.log.add(f"ERROR ({TASK_TITLES.get(task, task)}): {message}")
        self._status(f"Error in {TASK_TITLES.get(task, task).lower()}: {message}")
        self._message(QtWidgets.QMessageBox.Critical, f"autoalign: {TASK_TITLES.get(task, task)}",
                      f"{TASK_TITLES.get(task, task)} failed:\n\n{message}\n\n"
                      "The SLM keeps the last good mask. The window stays usable.")
        self.task_finished.emit(task, None)

    def _message(self, icon: QtWidgets.QMessageBox.Icon, title: str, text: str) -> None:
        box = QtWidgets.QMessageBox(icon, title, text, QtWidgets.QMessageBox.Ok, self)
        box.setWindowModality(QtCore.Qt.NonModal)   # never blocks the worker's signals
        box.setAttribute(QtCore.Qt.WA_DeleteOnClose)
        box.finished.connect(lambda _r, b=box: self.message_boxes.remove(b)
                             if b in self.message_boxes else None)
        self.message_boxes.append(box)
        box.show()

    # ------------------------------------------------------------------ closing
    def shutdown(self) -> bool:
        """Stop the loop, close the devices in the worker thread, wait for the thread to end."""
        if self._shut_down:
            return True
        self._shut_down = True
        self.log.add("Closing: stopping the loop and closing the devices…")
        self.worker.stop()
        self.request.emit("shutdown", {})
        # wait for the worker while still serving events: devices may need the GUI thread while
        # closing (the Qt SLM window's widget lives here), so a plain blocking wait could deadlock
        deadline = time.monotonic() + self.close_timeout_s
        finished = self.thread.wait(10)
        while not finished and time.monotonic() < deadline:
            QtWidgets.QApplication.processEvents(QtCore.QEventLoop.AllEvents, 20)
            finished = self.thread.wait(20)
        if not finished:  # pragma: no cover - a device that hangs in close
            self.log.add(f"WARNING: the worker did not finish within {self.close_timeout_s:.0f} s")
        return finished

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 - Qt name
        self.shutdown()
        for box in list(self.message_boxes):
            box.close()
        event.accept()


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy numbers to floats, NaN/inf to None, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return str(value)


def _state_record(state: dict | None) -> dict | None:
    """A before/now state for the report (without its sections)."""
    if state is None:
        return None
    return _plain({"state": state.get("state"), "null_depth": state.get("null_depth"),
                   "metrics": state.get("metrics") or {}, "history_index": state.get("history_index"),
                   "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                             time.gmtime(state.get("timestamp") or 0))})
