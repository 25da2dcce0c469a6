"""File -> Open measurement: analyse a recorded file in the window (what ``autoalign analyse`` does).

A dialog with the optics and camera of the recording (prefilled from the settings, or an
instrument file), a progress bar that names the step, and the result: the validity verdict and
its limits in words, and the report figure (data, model, residual, profiles, the Zernike estimate
of the fit and of the independent phase retrieval). The analysis runs in a worker thread; the
window's devices are not touched. Outputs go to ``<user data folder>/analysis/<file name>/``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from PyQt5 import QtCore, QtGui, QtWidgets

__all__ = ["MeasurementDialog", "AnalysisThread"]


class AnalysisThread(QtCore.QThread):
    """Runs :func:`autoalign.app.analysis.analyse_recording` off the GUI thread."""

    progress = QtCore.pyqtSignal(str)
    done = QtCore.pyqtSignal(object)     # list of (summary lines, png path)
    failed = QtCore.pyqtSignal(str)

    def __init__(self, path: str, instrument: Any, camera: Any, beam: str, out_dir: Path,
                 pixel_um: float | None = None, z_step_um: float | None = None) -> None:
        super().__init__()
        self.path, self.instrument, self.camera, self.beam = path, instrument, camera, beam
        self.out_dir, self.pixel_um, self.z_step_um = out_dir, pixel_um, z_step_um

    def run(self) -> None:  # noqa: D102 - QThread
        try:
            from autoalign.app.analysis import AnalysisOptions, analyse_recording, summary_lines
            from autoalign.app.analysis_report import write_report
            from autoalign.hardware.recorded import read_recording

            self.progress.emit(f"reading {Path(self.path).name}")
            rec = read_recording(self.path, pixel_um=self.pixel_um, z_step_um=self.z_step_um)
            if not rec.stacks:
                raise ValueError(f"{self.path}: no z-stack in this file (section scans: use 'autoalign analyse')")
            self.out_dir.mkdir(parents=True, exist_ok=True)
            results = []
            for a in analyse_recording(rec, self.instrument, self.camera, AnalysisOptions(beam=self.beam),
                                       progress=self.progress.emit):
                png = self.out_dir / f"{Path(self.path).stem}_{a.stack.name or 'stack'}.png"
                write_report(a, png, title=f"{Path(self.path).name}: {a.stack.name}")
                results.append((summary_lines(a), str(png)))
            self.done.emit(results)
        except Exception as exc:  # noqa: BLE001 - shown in the dialog, nothing lost
            self.failed.emit(f"{type(exc).__name__}: {exc}")


class MeasurementDialog(QtWidgets.QDialog):
    """Choose a recording and its optics, analyse it, show the verdict and the report.
    ``finished_analysis`` is emitted when an analysis ends (shown or failed)."""

    finished_analysis = QtCore.pyqtSignal()

    def __init__(self, settings: Any, parent: QtWidgets.QWidget | None = None, path: str | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Open measurement")
        self.settings = settings
        self.worker: AnalysisThread | None = None
        o, c = settings.optics, settings.camera
        form = QtWidgets.QFormLayout()
        self.path_edit = QtWidgets.QLineEdit(path or "")
        browse = QtWidgets.QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.path_edit)
        row.addWidget(browse)
        form.addRow("File (TIFF, OME-TIFF, .obf/.msr, HDF5)", row)
        self.instrument_edit = QtWidgets.QLineEdit("")
        self.instrument_edit.setPlaceholderText("none: the nominal optics below")
        form.addRow("Instrument file", self.instrument_edit)

        def spin(value: float, lo: float, hi: float, step: float, decimals: int = 3) -> QtWidgets.QDoubleSpinBox:
            s = QtWidgets.QDoubleSpinBox()
            s.setRange(lo, hi)
            s.setDecimals(decimals)
            s.setSingleStep(step)
            s.setValue(value)
            return s

        self.na = spin(o.numerical_aperture, 0.1, 1.7, 0.01)
        self.n_imm = spin(o.immersion_index, 1.0, 2.0, 0.01)
        self.lam = spin(o.wavelength_um, 0.2, 2.0, 0.005)
        self.beam = QtWidgets.QComboBox()
        self.beam.addItems(["none", "vortex", "tophat"])
        self.beam.setCurrentText(o.beam)
        self.offset = spin(c.offset_adu, 0.0, 1e5, 1.0, 1)
        self.e_per_adu = spin(1.0 / c.gain_adu_per_electron, 0.001, 100.0, 0.01, 4)
        self.read_noise = spin(c.read_noise_electrons, 0.0, 100.0, 0.1, 2)
        for label, w in (("NA", self.na), ("Immersion index", self.n_imm), ("Wavelength (µm)", self.lam),
                         ("Beam", self.beam), ("Camera offset (ADU)", self.offset),
                         ("Electrons per ADU", self.e_per_adu), ("Read noise (e⁻)", self.read_noise)):
            form.addRow(label, w)
        self.progress_bar = QtWidgets.QProgressBar()
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setFormat("idle")
        self.progress_bar.setTextVisible(True)
        self.progress_bar.hide()
        self.step = QtWidgets.QLabel("")
        self.verdict = QtWidgets.QPlainTextEdit()
        self.verdict.setReadOnly(True)
        self.verdict.setFont(QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.FixedFont))
        self.verdict.setMinimumHeight(110)
        self.figure = QtWidgets.QLabel("the report appears here")
        self.figure.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        scroll = QtWidgets.QScrollArea()
        scroll.setWidget(self.figure)
        scroll.setWidgetResizable(True)
        scroll.setMinimumSize(640, 420)
        buttons = QtWidgets.QDialogButtonBox()
        analyse = buttons.addButton("Analyse", QtWidgets.QDialogButtonBox.AcceptRole)
        assert analyse is not None
        self.analyse_button: QtWidgets.QPushButton = analyse
        buttons.addButton(QtWidgets.QDialogButtonBox.Close)
        buttons.accepted.connect(self._start_clicked)
        buttons.rejected.connect(self.reject)
        lay = QtWidgets.QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.progress_bar)
        lay.addWidget(self.step)
        lay.addWidget(self.verdict)
        lay.addWidget(scroll, 1)
        lay.addWidget(buttons)

    def _browse(self) -> None:
        path, _ = QtWidgets.QFileDialog.getOpenFileName(
            self, "Open measurement", "", "Recordings (*.tif *.tiff *.obf *.msr *.h5 *.hdf5);;All files (*)")
        if path:
            self.path_edit.setText(path)

    def _start_clicked(self) -> None:
        self.start()

    def start(self) -> bool:
        """Analyse the chosen file (False, with the reason shown, when it cannot start)."""
        from dataclasses import replace

        from autoalign.calibration.psf_fit import CameraCounts
        from autoalign.files import user_data_dir
        from autoalign.simulation.instrument import Instrument

        path = self.path_edit.text().strip()
        if not path or not Path(path).is_file():
            self.verdict.setPlainText(f"no such file: {path!r}")
            return False
        try:
            if self.instrument_edit.text().strip():
                ins = Instrument.load(self.instrument_edit.text().strip())
            else:
                ins = replace(Instrument.from_settings(self.settings), numerical_aperture=self.na.value(),
                              immersion_index=self.n_imm.value(), wavelength_um=self.lam.value(),
                              polarisation="unpolarised" if self.beam.currentText() == "none" else
                              Instrument.from_settings(self.settings).polarisation)
        except ValueError as exc:
            self.verdict.setPlainText(str(exc))
            return False
        cam = CameraCounts(offset_adu=self.offset.value(), electrons_per_adu=self.e_per_adu.value(),
                           read_noise_e=self.read_noise.value())
        out = user_data_dir() / "analysis" / Path(path).stem
        self.worker = AnalysisThread(path, ins, cam, self.beam.currentText(), out)
        self.worker.progress.connect(self._on_progress)
        self.worker.done.connect(self._on_done)
        self.worker.failed.connect(self._on_failed)
        self.analyse_button.setEnabled(False)
        self.progress_bar.show()
        self.progress_bar.setFormat("analysing…")
        self.verdict.setPlainText("")
        self.worker.start()
        return True

    def _on_progress(self, text: str) -> None:
        self.step.setText(text)
        self.progress_bar.setFormat(text.split("(")[0].strip()[:60])

    def _on_failed(self, text: str) -> None:
        self.progress_bar.hide()
        self.analyse_button.setEnabled(True)
        self.step.setText("the analysis failed")
        self.verdict.setPlainText(text)
        self.finished_analysis.emit()

    def _on_done(self, results: list) -> None:
        self.progress_bar.hide()
        self.analyse_button.setEnabled(True)
        self.step.setText(f"done: {len(results)} stack(s)")
        self.verdict.setPlainText("\n".join(line for lines, _ in results for line in lines))
        if results:
            pix = QtGui.QPixmap(results[0][1])
            self.figure.setPixmap(pix.scaledToWidth(1100, QtCore.Qt.TransformationMode.SmoothTransformation))
        self.finished_analysis.emit()

    def wait(self, ms: int = 600_000) -> bool:
        """Wait for the analysis (tests, scripts)."""
        return self.worker.wait(ms) if self.worker is not None else True
