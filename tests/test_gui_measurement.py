"""File -> Open measurement in the window (pytest-qt): a recorded TIFF analysed off the GUI
thread, the verdict in words and the report figure shown, a missing file refused in the dialog."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
pytest.importorskip("pytestqt")

from autoalign.app.gui.measurement import MeasurementDialog  # noqa: E402
from autoalign.settings import load_settings  # noqa: E402


def test_open_measurement_analyses_and_shows_the_report(qtbot, tmp_path, monkeypatch):
    from tests.test_analyse import _sim_tiff

    monkeypatch.setenv("AUTOALIGN_DATA_DIR", str(tmp_path / "data"))
    tif = tmp_path / "bead.tif"
    _sim_tiff(tif, {6: 0.06})
    dialog = MeasurementDialog(load_settings(None), path=str(tif))
    qtbot.addWidget(dialog)
    dialog.na.setValue(1.0)
    dialog.n_imm.setValue(1.33)
    dialog.lam.setValue(0.515)
    dialog.beam.setCurrentText("none")
    dialog.offset.setValue(100)
    dialog.e_per_adu.setValue(0.25)
    dialog.read_noise.setValue(1.5)
    with qtbot.waitSignal(dialog.finished_analysis, timeout=600_000):
        assert dialog.start()
    text = dialog.verdict.toPlainText()
    assert "the model" in text and "vs phase retrieval" in text, text
    assert dialog.figure.pixmap() is not None and not dialog.figure.pixmap().isNull()
    dialog.resize(1200, 900)
    dialog.grab().save(os.environ.get("AUTOALIGN_DIALOG_PNG", str(tmp_path / "dialog.png")))


def test_open_measurement_refuses_a_missing_file(qtbot, tmp_path):
    dialog = MeasurementDialog(load_settings(None), path=str(tmp_path / "nothing.tif"))
    qtbot.addWidget(dialog)
    assert not dialog.start()
    assert "no such file" in dialog.verdict.toPlainText()
