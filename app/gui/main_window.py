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

from autoalign.app.gui.widgets import HistoryPlots, LogPanel, ModeBarChart, OrthoSectionsView, PhaseView
from autoalign.app.gui.worker import AlignWorker

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
    ("quit", "&Quit", "Ctrl+Q", "Stop, close the devices and quit"),
]


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
        w.log.connect(self.log.add)
        w.measurement.connect(self.on_measurement)
        w.iteration.connect(self.on_iteration)
        w.progress.connect(self.on_progress)
        w.slm_phase.connect(self.phase_view.set_phase)
        w.state.connect(self.on_state)
        w.busy.connect(self._set_busy)
        w.error.connect(self._on_worker_error)   # a bound slot: runs in the GUI thread
        w.finished.connect(self.on_finished)
        w.ready.connect(self.on_ready)
        self.thread.finished.connect(self.worker.deleteLater)
        self.thread.start()
        self.log.add("autoalign GUI started; settings: " + str(getattr(settings, "source", "?")))
        self.request.emit("open", {})

    # ------------------------------------------------------------------ construction
    def _build_views(self) -> None:
        self.sections_view = OrthoSectionsView()
        self.phase_view = PhaseView()
        # tip, tilt and defocus (centring) first, then the model's modes
        modes = [2, 3, 4] + list(getattr(self.settings.model, "modes", range(5, 16)))
        self.bars = ModeBarChart(modes)
        self.history = HistoryPlots(horizontal=False)
        self.log = LogPanel()

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
        g = QtWidgets.QGroupBox("Correction")
        h = QtWidgets.QHBoxLayout(g)
        h.addWidget(self._button("save_correction", "Save…"))
        h.addWidget(self._button("load_correction", "Load…"))
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
        self.collect_path = QtWidgets.QLineEdit(
            str(Path.cwd() / f"beadwalk_{time.strftime('%Y%m%d')}.h5"))
        self.collect_path.setToolTip("HDF5 file; an existing file is appended to")
        browse = QtWidgets.QToolButton()
        browse.setText("…")
        browse.setToolTip("Choose the output file")
        browse.clicked.connect(self.choose_collect_path)
        self.collect_browse = browse
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.collect_path)
        row.addWidget(browse)
        form.addRow("File", row)
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
        handlers = {
            "acquire": self.acquire,
            "centre": self.centre,
            "correct_once": self.correct_once,
            "run": self.auto_align,
            "stop": self.stop,
            "zero_slm": self.zero_slm,
            "save_correction": self.save_correction,
            "load_correction": self.load_correction,
            "self_check": self.self_check,
            "poke_calibration": self.poke_calibration,
            "load_poke_calibration": self.load_poke_calibration,
            "collect": self.start_collection,
            "reconnect": self.reconnect,
            "new_aberration": self.new_aberration,
            "clear_history": self.clear_history,
            "screenshot": self.save_screenshot_dialog,
            "quit": self.close,
        }
        for key, text, shortcut, tip in ACTIONS:
            a = QtWidgets.QAction(text, self)
            if shortcut:
                a.setShortcut(QtGui.QKeySequence(shortcut))
                a.setShortcutContext(QtCore.Qt.WindowShortcut)
            a.setToolTip(f"{tip} ({shortcut})" if shortcut else tip)
            a.setStatusTip(tip)
            a.triggered.connect(lambda _checked=False, h=handlers[key]: h())
            self.addAction(a)
            self.actions[key] = a
            if key in self.buttons:
                self.buttons[key].clicked.connect(a.trigger)
                self.buttons[key].setToolTip(a.toolTip())

        mb = self.menuBar()
        menus = {
            "&File": ["load_correction", "save_correction", None, "reconnect", "screenshot", None,
                      "quit"],
            "&Align": ["acquire", "centre", "correct_once", "run", "stop", None, "zero_slm"],
            "&Calibrate": ["self_check", "poke_calibration", "load_poke_calibration"],
            "C&ollect": ["collect"],
            "&Simulation": ["new_aberration"],
            "&View": ["clear_history"],
        }
        for title, keys in menus.items():
            m = mb.addMenu(title)
            for key in keys:
                if key is None:
                    m.addSeparator()
                else:
                    m.addAction(self.actions[key])
        helpm = mb.addMenu("&Help")
        a = helpm.addAction("Keyboard &shortcuts")
        a.triggered.connect(self.show_shortcuts)

    def _build_status_bar(self) -> None:
        sb = self.statusBar()
        self.status_state = QtWidgets.QLabel("Starting…")
        self.status_metrics = QtWidgets.QLabel("")
        self.status_backend = QtWidgets.QLabel("")
        self.status_progress = QtWidgets.QProgressBar()
        self.status_progress.setMaximumWidth(160)
        self.status_progress.setVisible(False)
        sb.addWidget(self.status_state, 1)
        sb.addPermanentWidget(self.status_metrics)
        sb.addPermanentWidget(self.status_progress)
        sb.addPermanentWidget(self.status_backend)

    def _layout(self) -> None:
        top = QtWidgets.QSplitter(QtCore.Qt.Horizontal)
        top.addWidget(self.sections_view)
        top.addWidget(self.phase_view)
        top.setStretchFactor(0, 3)
        top.setStretchFactor(1, 1)

        middle = QtWidgets.QSplitter(QtCore.Qt.Horizontal)
        middle.addWidget(self.bars)
        middle.addWidget(self.history)
        middle.setStretchFactor(0, 3)
        middle.setStretchFactor(1, 2)

        views = QtWidgets.QSplitter(QtCore.Qt.Vertical)
        views.addWidget(top)
        views.addWidget(middle)
        views.addWidget(self.log)
        views.setStretchFactor(0, 4)
        views.setStretchFactor(1, 5)
        views.setStretchFactor(2, 2)
        views.setSizes([300, 380, 130])
        top.setSizes([780, 260])
        middle.setSizes([600, 440])

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
        self.resize(1400, 900)

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
            elif key in ("screenshot", "quit", "clear_history"):
                a.setEnabled(True)
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
        self.history.clear()

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
        rows = "".join(f"<tr><td><b>{QtGui.QKeySequence(sc).toString()}</b></td>"
                       f"<td>{text.replace('&', '')}</td></tr>" for _, text, sc, _ in ACTIONS if sc)
        self._message(QtWidgets.QMessageBox.Information, "Keyboard shortcuts",
                      f"<table cellspacing=6>{rows}</table>")

    def _status(self, text: str, limit: int = 56) -> None:
        """The left status-bar text, shortened to leave room for the metrics; full in the tooltip."""
        self.status_state.setToolTip(text)
        self.status_state.setText(text if len(text) <= limit else text[: limit - 1] + "…")

    # ------------------------------------------------------------------ worker signals
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
        self.sections_view.set_measurement(sections, pixel, zstep, centroid, shift)
        if not getattr(m, "valid", True):
            self._status(f"Invalid stack: {getattr(m, 'reason', '?')}")

    @QtCore.pyqtSlot(object)
    def on_iteration(self, r: Any) -> None:
        self._iterations_done += 1
        metrics = dict(getattr(r, "metrics", {}) or {})
        self.history.add(metrics)
        corr = getattr(getattr(r, "correction", None), "coefficients", None)
        self.bars.set_values(correction=corr, prediction=getattr(r, "prediction", None))
        # the loop logs the decision itself; add the metrics
        parts = [f"iteration {getattr(r, 'iteration', self._iterations_done)} metrics"]
        for key, label in (("null_depth", "null depth"), ("predicted_residual_rms", "pred. RMS"),
                           ("true_residual_rms", "true RMS"), ("photons", "photons")):
            v = metrics.get(key)
            if v is not None and np.isfinite(v):
                parts.append(f"{label} {v:.3g}")
        self.log.add(parts[0] + ": " + ", ".join(parts[1:]))
        self._show_metrics(metrics)

    def _show_metrics(self, metrics: dict) -> None:
        bits = [f"it {len(self.history.data['iteration'])}"]
        if metrics.get("null_depth") is not None and np.isfinite(metrics["null_depth"]):
            bits.append(f"null {100 * metrics['null_depth']:.2f} %")
        pred = metrics.get("predicted_residual_rms")
        if pred is not None and np.isfinite(pred):
            bits.append(f"pred. {pred:.3f} rad")
        true = self.last_state.get("true_residual_rms", metrics.get("true_residual_rms"))
        if true is not None:
            bits.append(f"true residual {true:.3f} rad")
        self.status_metrics.setText(" · ".join(bits) + "  |")
        self.status_metrics.setToolTip("iterations · null depth · predicted residual RMS · true "
                                       "residual RMS (simulated microscope)")

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
        corr = self.last_state.get("correction")
        if corr is not None and getattr(corr, "coefficients", None) is not None:
            self.bars.set_values(correction=corr.coefficients)
        true = self.last_state.get("true_residual_rms")
        if true is not None and self.history.data["iteration"]:
            self._show_metrics({k: v[-1] for k, v in self.history.data.items()})
        elif true is not None:
            self.status_metrics.setText(f"true residual {true:.3f} rad  |")

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
        elif task == "zero_slm":
            self.bars.set_values(correction={}, prediction={})
        text = f"{TASK_TITLES.get(task, task)}: done"
        if task == "run" and isinstance(result, dict) and result.get("stop_reason"):
            text = f"Auto-align: {result['stop_reason']}"
        elif task == "collect" and isinstance(result, dict) and result.get("stop_reason"):
            text = f"Bead walk: {result['stop_reason']}"
        elif result is None and task not in ("zero_slm", "save_correction"):
            text = f"{TASK_TITLES.get(task, task)}: stopped"
        self._status(text)
        self.task_finished.emit(task, result)

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
