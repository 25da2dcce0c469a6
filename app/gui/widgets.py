"""The window's views: ortho-sections, SLM phase, per-mode bar chart, history plots, log panel.

Display only: every widget takes plain numbers or arrays and draws them; none computes physics.
"""
from __future__ import annotations

import html
import math
import time
from collections.abc import Mapping, Sequence

import numpy as np
import pyqtgraph as pg
from PyQt5 import QtCore, QtGui, QtWidgets

pg.setConfigOptions(antialias=True, imageAxisOrder="row-major", background="w", foreground="k")

try:
    from autoalign.simulation.zernike import mode_name
except Exception:  # pragma: no cover - the foundation always has it
    def mode_name(noll: int) -> str:
        return f"Z{noll}"


def _small_axes(plot_item: pg.PlotItem, point_size: int = 8) -> None:
    """Smaller tick fonts (the default is large next to the Qt widgets)."""
    font = QtGui.QFont()
    font.setPointSize(point_size)
    for name in ("left", "bottom", "right", "top"):
        axis = plot_item.getAxis(name)
        axis.setStyle(tickFont=font)
        axis.label.setFont(font)


def _cmap(name: str, fallback: str = "viridis") -> pg.ColorMap:
    for source in (None, "matplotlib"):
        try:
            cm = pg.colormap.get(name, source=source) if source else pg.colormap.get(name)
            if cm is not None:
                return cm
        except Exception:  # noqa: BLE001 - colormap availability varies
            continue
    return pg.colormap.get(fallback)


class SectionView(pg.PlotWidget):
    """One ortho-section as an ``ImageItem`` with µm axes and a marker at the centre of mass."""

    def __init__(self, title: str, x_label: str, y_label: str, parent=None) -> None:
        super().__init__(parent=parent)
        self.plotItem.setTitle(title, size="9pt")
        self.plotItem.setLabel("bottom", x_label, units="µm")
        self.plotItem.setLabel("left", y_label, units="µm")
        # axis values already in µm; don't let pyqtgraph rescale to "mm"/"m" prefixes
        for ax in ("bottom", "left"):
            self.plotItem.getAxis(ax).enableAutoSIPrefix(False)
        _small_axes(self.plotItem)
        self.image = pg.ImageItem()
        self.image.setColorMap(_cmap("inferno"))
        self.plotItem.addItem(self.image)
        self.marker = pg.ScatterPlotItem(size=14, symbol="+", pen=pg.mkPen("c", width=2),
                                         brush=None)
        self.plotItem.addItem(self.marker)
        dash = pg.mkPen((255, 255, 255, 110), width=1, style=QtCore.Qt.DashLine)
        for angle in (0, 90):
            self.plotItem.addItem(pg.InfiniteLine(0.0, angle=angle, pen=dash))
        self.plotItem.setAspectLocked(True)
        self.plotItem.invertY(True)          # rows downwards, like every image viewer
        self.setMinimumSize(180, 180)
        self.centre_of_mass_um: tuple[float, float] | None = None

    def set_section(self, image: np.ndarray, dx_um: float, dy_um: float,
                    marker_px: tuple[float, float] | None,
                    shift_px: tuple[float, float] = (0.0, 0.0)) -> None:
        """``image[row, col]``; ``dx_um``/``dy_um``: pixel sizes along columns/rows.

        Coordinates are relative to the ROI centre (0 µm: where the bead should be): the section's
        centre pixel ``n // 2`` sits at ``shift_px`` (col, row) pixels, and the marker (the centre of
        mass) at ``marker_px`` (col, row) pixels."""
        image = np.asarray(image, dtype=float)
        ny, nx = image.shape
        finite = image[np.isfinite(image)]
        lo, hi = (np.percentile(finite, 0.5), finite.max()) if finite.size else (0.0, 1.0)
        if not hi > lo:
            hi = lo + 1.0
        self.image.setImage(image, levels=(lo, hi), autoLevels=False)
        x0 = (shift_px[0] - nx // 2 - 0.5) * dx_um
        y0 = (shift_px[1] - ny // 2 - 0.5) * dy_um
        self.image.setRect(QtCore.QRectF(x0, y0, nx * dx_um, ny * dy_um))
        if marker_px is None or not all(np.isfinite(marker_px)):
            self.marker.setData([], [])
        else:
            self.marker.setData([marker_px[0] * dx_um], [marker_px[1] * dy_um])
        self.centre_of_mass_um = None if marker_px is None else (
            marker_px[0] * dx_um, marker_px[1] * dy_um)


class OrthoSectionsView(QtWidgets.QWidget):
    """The three live ortho-sections xy[y, x], xz[z, x], yz[z, y] with the centre of mass (+)
    and the ROI centre (dashed lines), in µm from the ROI centre."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.xy = SectionView("xy (focal plane)", "x", "y")
        self.xz = SectionView("xz", "x", "z")
        self.yz = SectionView("yz", "y", "z")
        for v in (self.xy, self.xz, self.yz):
            layout.addWidget(v)
        self.last_sections: np.ndarray | None = None

    def set_measurement(self, sections: np.ndarray, pixel_um: float, z_step_um: float,
                        centroid_px: tuple[float, float, float] | None,
                        shift_px: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
        """``centroid_px``: (x, y, z) centre of mass in pixels / planes from the ROI centre;
        ``shift_px``: (x, y, z) position of the sections' centre voxel relative to the ROI centre
        (the loop re-centres the sections on the bead)."""
        sections = np.asarray(sections)
        self.last_sections = sections
        sx, sy, sz = shift_px
        have = centroid_px is not None
        cx, cy, cz = centroid_px if have else (0.0, 0.0, 0.0)
        self.xy.set_section(sections[0], pixel_um, pixel_um, (cx, cy) if have else None, (sx, sy))
        self.xz.set_section(sections[1], pixel_um, z_step_um, (cx, cz) if have else None, (sx, sz))
        self.yz.set_section(sections[2], pixel_um, z_step_um, (cy, cz) if have else None, (sy, sz))


class PhaseView(pg.PlotWidget):
    """The phase on the SLM, wrapped to [0, 2π) as the SLM shows it (cyclic colour map)."""

    MAX_PIXELS = 320  # displayed size (the SLM has ~2 Mpx; show a strided view)

    def __init__(self, parent=None) -> None:
        super().__init__(parent=parent)
        self.plotItem.setTitle("SLM phase (wrapped, 0 … 2π)", size="9pt")
        self.plotItem.hideAxis("bottom")
        self.plotItem.hideAxis("left")
        self.image = pg.ImageItem()
        self.image.setColorMap(_cmap("twilight", fallback="CET-C1"))
        self.plotItem.addItem(self.image)
        self.plotItem.setAspectLocked(True)
        self.plotItem.invertY(True)
        self.setMinimumSize(180, 150)
        self.last_phase: np.ndarray | None = None

    @QtCore.pyqtSlot(object)
    def set_phase(self, phase_rad: np.ndarray) -> None:
        phase = np.asarray(phase_rad, dtype=np.float32)
        if phase.ndim != 2 or phase.size == 0:
            return
        step = max(1, int(math.ceil(max(phase.shape) / self.MAX_PIXELS)))
        shown = np.mod(phase[::step, ::step], 2 * np.pi)   # NaN (outside the pupil) stays NaN
        if phase.shape[0] == phase.shape[1]:
            # a pupil grid (cell centres spanning the diameter): blank the cells outside the pupil
            m = shown.shape[0]
            c = -1 + (np.arange(m) + 0.5) * 2 / m
            outside = np.hypot(c[None, :], c[:, None]) > 1.0
            shown = np.where(outside, np.nan, shown).astype(np.float32)
        self.last_phase = shown
        self.image.setImage(shown, levels=(0.0, 2 * np.pi), autoLevels=False)
        self.image.setRect(QtCore.QRectF(0, 0, phase.shape[1], phase.shape[0]))


class ModeBarChart(pg.PlotWidget):
    """Horizontal bars per Zernike mode (named): current correction and last prediction, rad."""

    def __init__(self, modes: Sequence[int], parent=None) -> None:
        super().__init__(parent=parent)
        self.plotItem.setTitle(
            'Zernike modes (rad): <span style="color:#1e64c8">&#9632; correction</span> &nbsp; '
            '<span style="color:#e67814">&#9632; last prediction</span>', size="9pt")
        self.plotItem.setLabel("bottom", "coefficient (rad)")
        self.plotItem.getAxis("bottom").enableAutoSIPrefix(False)
        _small_axes(self.plotItem)
        self.plotItem.showGrid(x=True, y=False, alpha=0.3)
        self.plotItem.invertY(True)
        self.plotItem.setMouseEnabled(x=True, y=False)
        self.correction_bars: pg.BarGraphItem | None = None
        self.prediction_bars: pg.BarGraphItem | None = None
        self.modes: list[int] = []
        self.correction: dict[int, float] = {}
        self.prediction: dict[int, float] = {}
        self.plotItem.addItem(pg.InfiniteLine(0.0, angle=90, pen=pg.mkPen((0, 0, 0, 120))))
        self.set_modes(modes)
        self.setMinimumSize(260, 220)

    def set_modes(self, modes: Sequence[int]) -> None:
        self.modes = sorted({int(m) for m in modes})
        ticks = [(i, f"{m} {mode_name(m)}") for i, m in enumerate(self.modes)]
        self.plotItem.getAxis("left").setTicks([ticks])
        self.plotItem.setYRange(-0.7, len(self.modes) - 0.3, padding=0)
        self._redraw()

    def set_values(self, correction: Mapping[int, float] | None = None,
                   prediction: Mapping[int, float] | None = None) -> None:
        if correction is not None:
            self.correction = {int(k): float(v) for k, v in correction.items()}
        if prediction is not None:
            self.prediction = {int(k): float(v) for k, v in prediction.items()}
        extra = (set(self.correction) | set(self.prediction)) - set(self.modes)
        extra = {m for m in extra if m >= 2 and (abs(self.correction.get(m, 0)) > 1e-9
                                                 or abs(self.prediction.get(m, 0)) > 1e-9)}
        if extra:
            self.set_modes(list(self.modes) + sorted(extra))
        else:
            self._redraw()

    def _redraw(self) -> None:
        for item in (self.correction_bars, self.prediction_bars):
            if item is not None:
                self.plotItem.removeItem(item)
        y = np.arange(len(self.modes), dtype=float)
        c = np.array([self.correction.get(m, 0.0) for m in self.modes])
        p = np.array([self.prediction.get(m, 0.0) for m in self.modes])
        self.correction_bars = pg.BarGraphItem(x0=np.zeros_like(c), y=y - 0.18, height=0.34,
                                               width=c, brush=pg.mkBrush(30, 100, 200, 200))
        self.prediction_bars = pg.BarGraphItem(x0=np.zeros_like(p), y=y + 0.18, height=0.34,
                                               width=p, brush=pg.mkBrush(230, 120, 20, 200))
        self.plotItem.addItem(self.correction_bars)
        self.plotItem.addItem(self.prediction_bars)
        span = float(np.max(np.abs(np.concatenate([c, p, [0.1]]))))
        self.plotItem.setXRange(-1.1 * span, 1.1 * span, padding=0)


class HistoryPlots(QtWidgets.QWidget):
    """Per-iteration history: residual RMS (predicted and true) and null depth (log scale; values
    below ``NULL_FLOOR``, including a fitted 0, are drawn at the floor)."""

    NULL_FLOOR = 1e-4

    def __init__(self, parent=None, horizontal: bool = True) -> None:
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self) if horizontal else QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.residual = pg.PlotWidget()
        self.residual.plotItem.setTitle("Residual RMS per iteration", size="9pt")
        self.residual.plotItem.setLabel("left", "RMS (rad)")
        self.residual.plotItem.getAxis("left").enableAutoSIPrefix(False)
        self.residual.plotItem.showGrid(x=True, y=True, alpha=0.3)
        self.residual.plotItem.addLegend(offset=(-5, 5), labelTextSize="8pt")
        self.null = pg.PlotWidget()
        self.null.plotItem.setTitle("Null depth (log scale)", size="9pt")
        # log10 of the null depth on a linear axis with our own ticks (pyqtgraph's log axis
        # crowds the labels within one decade): decades labelled in %, 2..9 unlabelled
        self.null.plotItem.setLabel("left", "centre / peak")
        self.null.plotItem.showGrid(x=True, y=True, alpha=0.3)
        for w in (self.residual, self.null):
            w.plotItem.setLabel("bottom", "iterations done")
            _small_axes(w.plotItem)
            w.plotItem.getAxis("bottom").setTickSpacing(major=1, minor=1)
            w.setMinimumSize(220, 140)
            layout.addWidget(w)
        self.null.plotItem.setXLink(self.residual.plotItem)
        sym = dict(symbol="o", symbolSize=6)
        self.pred_curve = self.residual.plot([], [], pen=pg.mkPen((230, 120, 20), width=2),
                                             symbolBrush=(230, 120, 20), name="predicted", **sym)
        self.true_curve = self.residual.plot([], [], pen=pg.mkPen((20, 150, 60), width=2),
                                             symbolBrush=(20, 150, 60),
                                             name="true (simulated)", **sym)
        self.null_curve = self.null.plot([], [], pen=pg.mkPen((30, 100, 200), width=2),
                                         symbolBrush=(30, 100, 200), **sym)
        self.data: dict[str, list[float]] = {}
        self.clear()

    def clear(self) -> None:
        # x = iterations done when the state was seen: the stack of iteration k (0-based) shows the
        # state after k iterations; the true residual after the last iteration lands one further
        self.data = {"iteration": [], "null_depth": [], "predicted_residual_rms": []}
        self.true_residual: dict[int, float] = {}
        self._redraw()

    def add(self, metrics: Mapping[str, float]) -> None:
        """Add one iteration record's metrics (``app.loop.IterationRecord.metrics``)."""
        k = len(self.data["iteration"])
        self.data["iteration"].append(k)
        for key in ("null_depth", "predicted_residual_rms"):
            v = metrics.get(key)
            self.data[key].append(float("nan") if v is None else float(v))
        measured = metrics.get("true_residual_rms_measured")
        after = metrics.get("true_residual_rms")
        if measured is not None and np.isfinite(measured):
            self.true_residual[k] = float(measured)
        if after is not None and np.isfinite(after):
            if measured is None:   # only one value given: it describes this measurement
                self.true_residual[k] = float(after)
            else:
                self.true_residual[k + 1] = float(after)
        self._redraw()

    @staticmethod
    def _finite(x: Sequence[float], y: Sequence[float], positive: bool = False):
        xs, ys = [], []
        for a, b in zip(x, y):
            if b is not None and np.isfinite(b) and (b > 0 or not positive):
                xs.append(a)
                ys.append(b)
        return xs, ys

    def _redraw(self) -> None:
        it = self.data["iteration"]
        self.pred_curve.setData(*self._finite(it, self.data["predicted_residual_rms"]))
        ks = sorted(self.true_residual)
        self.true_curve.setData(*self._finite(ks, [self.true_residual[k] for k in ks]))
        nd = [v if not np.isfinite(v) else max(v, self.NULL_FLOOR) for v in self.data["null_depth"]]
        xs, ys = self._finite(it, nd, positive=True)
        logs = [math.log10(v) for v in ys]
        self.null_curve.setData(xs, logs)
        if logs:  # whole decades in view, so that there are labelled ticks
            lo = math.floor(min(logs) + 1e-9)
            hi = max(math.ceil(max(logs) - 1e-9), lo + 1)
            self.null.plotItem.setYRange(lo, hi, padding=0.1)
            major = [(float(k), self._percent(10.0 ** k)) for k in range(lo, hi + 1)]
            minor = [(k + math.log10(m), "") for k in range(lo, hi) for m in range(2, 10)]
            self.null.plotItem.getAxis("left").setTicks([major, minor])

    @staticmethod
    def _percent(value: float) -> str:
        pct = 100.0 * value
        return f"{pct:.0f} %" if pct >= 1 else f"{pct:.{max(0, -math.floor(math.log10(pct)))}f} %"


class LogPanel(QtWidgets.QPlainTextEdit):
    """Time-stamped, read-only log; errors in red."""

    MAX_LINES = 5000

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setReadOnly(True)
        self.setMaximumBlockCount(self.MAX_LINES)
        font = QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.FixedFont)
        font.setPointSize(8)
        self.setFont(font)
        self.lines: list[str] = []

    @QtCore.pyqtSlot(str)
    def add(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        for line in str(message).splitlines() or [""]:
            text = f"{stamp}  {line}"
            self.lines.append(text)
            if len(self.lines) > self.MAX_LINES:
                del self.lines[: len(self.lines) - self.MAX_LINES]
            esc = html.escape(text)
            if line.startswith(("ERROR", "WARNING")):
                colour = "#c00000" if line.startswith("ERROR") else "#a06000"
                self.appendHtml(f'<span style="color:{colour}">{esc}</span>')
            else:
                self.appendHtml(f"<span>{esc}</span>")
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())
