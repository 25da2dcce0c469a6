"""The window's views: ortho-sections with colour bar, scale and profiles, before/after, SLM
phase, per-mode bar chart, history plots, log panel.

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

from autoalign.calibration.quality import ALIGNED_RAD as QUALITY_ALIGNED_RAD

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


# ============================================================================ display scale
SCALES = ("linear", "log", "gamma")
LOG_DECADES = 3.0   # the log scale shows this many decades below the top level


def display_values(values: np.ndarray | float, levels: tuple[float, float], scale: str,
                   gamma: float = 0.5) -> np.ndarray:
    """Photons to display values in [0, 1] for the colour map: ``linear`` (lo → 0, hi → 1),
    ``log`` (``LOG_DECADES`` decades of ``v - lo`` below ``hi - lo``: a 1 % and a 0.01 % null look
    different) or ``gamma`` (``u ** gamma`` of the linear value). NaN stays NaN."""
    if scale not in SCALES:
        raise ValueError(f"scale {scale!r}: expected one of {SCALES}")
    lo, hi = float(levels[0]), float(levels[1])
    span = hi - lo if hi > lo else 1.0
    v = np.asarray(values, dtype=float)
    if scale == "log":
        eps = span * 10.0 ** -LOG_DECADES
        with np.errstate(invalid="ignore"):
            u = (np.log10(np.clip(v - lo, 0.0, span) + eps) - math.log10(eps)) / (
                math.log10(span + eps) - math.log10(eps))
        return np.clip(u, 0.0, 1.0)
    u = np.clip((v - lo) / span, 0.0, 1.0)
    if scale == "gamma":
        u = u ** float(gamma)
    return u


def colour_bar_ticks(levels: tuple[float, float], scale: str, gamma: float = 0.5,
                     count: int = 5) -> list[tuple[float, str]]:
    """(display position in [0, 1], label) for a colour bar of ``levels`` on ``scale``: photons
    (linear, gamma) or, on the log scale, per cent of the top level above the lowest (so a null
    reads directly: "1 %")."""
    lo, hi = float(levels[0]), float(levels[1])
    span = hi - lo if hi > lo else 1.0
    if scale == "log":
        return [(float(display_values(lo + span * 10.0 ** -k, (lo, hi), scale, gamma)),
                 f"{100 * 10.0 ** -k:g} %") for k in range(int(LOG_DECADES) + 1)]
    else:
        step = _nice_step(span / max(count - 1, 1))
        first = math.ceil(lo / step) * step
        values = list(np.arange(first, hi + 1e-9 * span, step))
    ticks = []
    for v in values:
        pos = float(display_values(v, (lo, hi), scale, gamma))
        if all(abs(pos - p) > 0.06 for p, _ in ticks):
            ticks.append((pos, f"{v:.3g}"))
    return ticks


def colour_bar_label(scale: str) -> str:
    return "of the peak (log)" if scale == "log" else f"photons ({scale})"


def _nice_step(raw: float) -> float:
    if not raw > 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)


class ColourBar(pg.PlotWidget):
    """A vertical colour bar: the colour map over [0, 1] with labelled ticks on its right axis."""

    def __init__(self, cmap: pg.ColorMap, label: str = "", parent=None) -> None:
        super().__init__(parent=parent)
        pi = self.plotItem
        pi.hideAxis("left")
        pi.hideAxis("bottom")
        pi.showAxis("right")
        pi.setLabel("right", label)
        _small_axes(pi, 7)
        pi.setMouseEnabled(x=False, y=False)
        pi.hideButtons()
        pi.setMenuEnabled(False)
        self.image = pg.ImageItem(np.linspace(0.0, 1.0, 256)[:, None])
        self.image.setColorMap(cmap)
        self.image.setLevels((0.0, 1.0))
        self.image.setRect(QtCore.QRectF(0.0, 0.0, 1.0, 1.0))
        pi.addItem(self.image)
        pi.setXRange(0.0, 1.0, padding=0)
        pi.setYRange(0.0, 1.0, padding=0)
        self.setFixedWidth(64)
        self.setMinimumHeight(80)
        self.ticks: list[tuple[float, str]] = []

    def set_colormap(self, cmap: pg.ColorMap) -> None:
        self.image.setColorMap(cmap)

    def set_ticks(self, ticks: list[tuple[float, str]], label: str | None = None) -> None:
        self.ticks = list(ticks)
        self.plotItem.getAxis("right").setTicks([self.ticks, []])
        if label is not None:
            self.plotItem.setLabel("right", label)


class SectionView(pg.PlotWidget):
    """One ortho-section as an ``ImageItem`` with µm axes. The centre of mass is marked by cyan
    ticks OUTSIDE the image (on its four borders), the ROI centre by grey ticks: nothing is drawn
    over the section, so the null stays visible."""

    TICK_FRACTION = 0.07    # tick length and margin, as a fraction of the section's extent

    def __init__(self, title: str, x_label: str, y_label: str, parent=None) -> None:
        super().__init__(parent=parent)
        self.plotItem.setTitle(title, size="9pt")
        self.plotItem.setLabel("bottom", x_label, units="µm")
        self.plotItem.setLabel("left", y_label, units="µm")
        # axis values already in µm; don't let pyqtgraph rescale to "mm"/"m" prefixes
        for ax in ("bottom", "left"):
            self.plotItem.getAxis(ax).enableAutoSIPrefix(False)
        _small_axes(self.plotItem, 7)
        self.image = pg.ImageItem()
        self.image.setColorMap(_cmap("inferno"))
        self.plotItem.addItem(self.image)
        self.marker = pg.PlotDataItem(connect="pairs", pen=pg.mkPen((0, 170, 220), width=2.5))
        self.roi_marker = pg.PlotDataItem(connect="pairs", pen=pg.mkPen((120, 120, 120), width=1.5))
        self.plotItem.addItem(self.roi_marker)
        self.plotItem.addItem(self.marker)
        self.plotItem.setAspectLocked(True)
        self.plotItem.invertY(True)          # rows downwards, like every image viewer
        self.setMinimumSize(120, 120)
        self.centre_of_mass_um: tuple[float, float] | None = None
        self.image_rect: QtCore.QRectF | None = None
        self.raw: np.ndarray | None = None

    def set_section(self, image: np.ndarray, dx_um: float, dy_um: float,
                    marker_px: tuple[float, float] | None,
                    shift_px: tuple[float, float] = (0.0, 0.0),
                    levels: tuple[float, float] | None = None, scale: str = "linear",
                    gamma: float = 0.5) -> None:
        """``image[row, col]`` in photons; ``dx_um``/``dy_um``: pixel sizes along columns/rows.

        Coordinates are relative to the ROI centre (0 µm: where the bead should be): the section's
        centre pixel ``n // 2`` sits at ``shift_px`` (col, row) pixels, and the centre of mass at
        ``marker_px`` (col, row) pixels. ``levels`` (photons; default: 0.5th percentile to max)
        and ``scale`` (:data:`SCALES`) choose how photons map onto the colour map."""
        image = np.asarray(image, dtype=float)
        self.raw = image
        ny, nx = image.shape
        if levels is None:
            levels = auto_levels([image])
        self.image.setImage(display_values(image, levels, scale, gamma), levels=(0.0, 1.0),
                            autoLevels=False)
        x0 = (shift_px[0] - nx // 2 - 0.5) * dx_um
        y0 = (shift_px[1] - ny // 2 - 0.5) * dy_um
        rect = QtCore.QRectF(x0, y0, nx * dx_um, ny * dy_um)
        self.image_rect = rect
        self.image.setRect(rect)
        m = self.TICK_FRACTION * max(rect.width(), rect.height())
        self.plotItem.setRange(rect.adjusted(-m, -m, m, m), padding=0)
        self.roi_marker.setData(*self._edge_ticks(rect, 0.0, 0.0, 0.6 * m))
        if marker_px is None or not all(np.isfinite(marker_px)):
            self.marker.setData([], [])
            self.centre_of_mass_um = None
        else:
            cx, cy = marker_px[0] * dx_um, marker_px[1] * dy_um
            self.marker.setData(*self._edge_ticks(rect, cx, cy, m))
            self.centre_of_mass_um = (cx, cy)

    @staticmethod
    def _edge_ticks(rect: QtCore.QRectF, cx: float, cy: float, length: float):
        """Four ticks just outside ``rect`` pointing at (cx, cy): two on the top and bottom
        borders at x = cx, two on the left and right borders at y = cy (pairs of points)."""
        left, right, top, bottom = rect.left(), rect.right(), rect.top(), rect.bottom()
        xs = [cx, cx, cx, cx, left - length, left, right, right + length]
        ys = [top - length, top, bottom, bottom + length, cy, cy, cy, cy]
        return np.array(xs), np.array(ys)


def auto_levels(images: Sequence[np.ndarray]) -> tuple[float, float]:
    """Levels over several images: the 0.5th percentile (the background) to the maximum."""
    finite = np.concatenate([np.asarray(i, dtype=float).ravel() for i in images])
    finite = finite[np.isfinite(finite)]
    lo, hi = (float(np.percentile(finite, 0.5)), float(finite.max())) if finite.size else (0.0, 1.0)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


class ProfilesView(QtWidgets.QWidget):
    """Line profiles through the bead centre: x and y through the xy section, z through the xz and
    yz sections (measured: solid; the ideal donut through the bead at the same peak: dashed).
    Legends sit below the plots, never over the points."""

    COLOURS = {"x": (30, 100, 200), "y": (230, 120, 20), "z_xz": (30, 100, 200),
               "z_yz": (230, 120, 20)}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.lateral = pg.PlotWidget()
        self.axial = pg.PlotWidget()
        self.curves: dict[str, pg.PlotDataItem] = {}
        self.ideal_curves: dict[str, pg.PlotDataItem] = {}
        for plot, label, keys in (
                (self.lateral, "x, y through the centre", ("x", "y")),
                (self.axial, "z through the centre", ("z_xz", "z_yz"))):
            pi = plot.plotItem
            pi.setLabel("bottom", label, units="µm")
            pi.setLabel("left", "photons")
            pi.getAxis("bottom").enableAutoSIPrefix(False)
            pi.getAxis("left").enableAutoSIPrefix(False)
            _small_axes(pi, 7)
            pi.showGrid(x=True, y=True, alpha=0.25)
            legend = legend_below(pi, columns=3)
            for key in keys:
                colour = self.COLOURS[key]
                name = {"x": "x", "y": "y", "z_xz": "xz", "z_yz": "yz"}[key]
                self.curves[key] = pi.plot([], [], pen=pg.mkPen(colour, width=2))
                self.ideal_curves[key] = pi.plot([], [], pen=pg.mkPen(
                    (40, 40, 40), width=1.5, style=QtCore.Qt.DashLine))
                self.ideal_curves[key].setZValue(5)     # on top of the measured curves
                legend.addItem(self.curves[key], name)
            sample = pg.PlotDataItem(pen=pg.mkPen((40, 40, 40), width=1.5,
                                                  style=QtCore.Qt.DashLine))
            legend.addItem(sample, "ideal")
            plot.setMinimumSize(150, 110)
            layout.addWidget(plot)
        self.last: dict[str, np.ndarray] = {}
        self.last_ideal: dict[str, np.ndarray] = {}

    def set_profiles(self, sections: np.ndarray, ideal: np.ndarray | None, pixel_um: float,
                     z_step_um: float, shift_px: tuple[float, float, float], log: bool) -> None:
        """``sections`` and ``ideal`` (3, n, n) in photons, centred on the bead (voxel n // 2),
        which sits at ``shift_px`` (x, y, z) from the ROI centre."""
        from autoalign.app.gui.reference import centre_profiles

        n = sections.shape[-1]
        idx = np.arange(n) - n // 2
        axis = {"x": (idx + shift_px[0]) * pixel_um, "y": (idx + shift_px[1]) * pixel_um,
                "z_xz": (idx + shift_px[2]) * z_step_um, "z_yz": (idx + shift_px[2]) * z_step_um}
        self.last = centre_profiles(sections)
        self.last_ideal = centre_profiles(ideal) if ideal is not None else {}
        floor = 0.1
        for key, curve in self.curves.items():
            y = np.maximum(self.last[key], floor) if log else self.last[key]
            curve.setData(axis[key], y)
            if key in self.last_ideal:
                yi = np.maximum(self.last_ideal[key], floor) if log else self.last_ideal[key]
                self.ideal_curves[key].setData(axis[key], yi)
            else:
                self.ideal_curves[key].setData([], [])
        for plot in (self.lateral, self.axial):
            plot.plotItem.setLogMode(y=bool(log))


def legend_below(plot_item: pg.PlotItem, columns: int = 3) -> pg.LegendItem:
    """A legend in its own row under the plot (outside the data area, so it covers no point)."""
    legend = pg.LegendItem(colCount=columns, labelTextSize="7pt", horSpacing=6, verSpacing=-6,
                           frame=False)
    plot_item.layout.addItem(legend, 4, 1)
    plot_item.layout.setRowSpacing(4, 0)
    return legend


class OrthoSectionsView(QtWidgets.QWidget):
    """The three live ortho-sections xy[y, x], xz[z, x], yz[z, y] (axes in µm from the ROI
    centre), one shared colour bar in photons, a linear / log / gamma scale, auto or fixed levels,
    and line profiles through the bead centre with the ideal donut dashed."""

    changed = QtCore.pyqtSignal()      # scale or levels changed by the user

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.last_sections: np.ndarray | None = None
        self.last_ideal: np.ndarray | None = None
        self.reference = None                 # app.gui.reference.IdealReference
        self.levels: tuple[float, float] = (0.0, 1.0)
        self._args: dict | None = None
        outer = QtWidgets.QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(2)
        row = QtWidgets.QHBoxLayout()
        row.setContentsMargins(2, 0, 2, 0)
        self.scale_combo = QtWidgets.QComboBox()
        for s in SCALES:
            self.scale_combo.addItem(s, s)
        self.scale_combo.setToolTip("Colour scale of the sections: linear, log (3 decades: deep "
                                    "nulls look different) or gamma")
        self.gamma_spin = QtWidgets.QDoubleSpinBox()
        self.gamma_spin.setRange(0.1, 3.0)
        self.gamma_spin.setSingleStep(0.1)
        self.gamma_spin.setValue(0.5)
        self.gamma_spin.setPrefix("γ ")
        self.gamma_spin.setToolTip("Gamma of the gamma scale")
        self.gamma_spin.setMaximumWidth(80)
        self.auto_check = QtWidgets.QCheckBox("auto levels")
        self.auto_check.setChecked(True)
        self.auto_check.setToolTip("Auto: background to the brightest pixel of the three sections; "
                                   "off: the fixed levels on the right (photons)")
        self.lo_spin = QtWidgets.QDoubleSpinBox()
        self.hi_spin = QtWidgets.QDoubleSpinBox()
        for spin, tip in ((self.lo_spin, "lowest level (photons)"),
                          (self.hi_spin, "highest level (photons)")):
            spin.setMaximumWidth(90)
            spin.setRange(-1e6, 1e7)
            spin.setDecimals(0)
            spin.setToolTip(tip)
            spin.setEnabled(False)
            spin.valueChanged.connect(self._redraw)
        self.hi_spin.setValue(1000)
        row.addWidget(QtWidgets.QLabel("Scale"))
        row.addWidget(self.scale_combo)
        row.addWidget(self.gamma_spin)
        row.addSpacing(8)
        row.addWidget(self.auto_check)
        row.addWidget(self.lo_spin)
        row.addWidget(QtWidgets.QLabel("–"))
        row.addWidget(self.hi_spin)
        row.addStretch(1)
        outer.addLayout(row)
        self.scale_combo.currentIndexChanged.connect(self._redraw)
        self.gamma_spin.valueChanged.connect(self._redraw)
        self.auto_check.toggled.connect(self._auto_toggled)

        images = QtWidgets.QHBoxLayout()
        images.setSpacing(0)
        self.xy = SectionView("xy (focal plane)", "x", "y")
        self.xz = SectionView("xz", "x", "z")
        self.yz = SectionView("yz", "y", "z")
        for v in (self.xy, self.xz, self.yz):
            images.addWidget(v, 1)
        self.colour_bar = ColourBar(_cmap("inferno"), "photons")
        images.addWidget(self.colour_bar)
        self.profiles = ProfilesView()
        split = QtWidgets.QSplitter(QtCore.Qt.Vertical)
        top = QtWidgets.QWidget()
        top.setLayout(images)
        split.addWidget(top)
        split.addWidget(self.profiles)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 2)
        split.setChildrenCollapsible(False)
        outer.addWidget(split, 1)
        self._update_controls()

    # --- state
    @property
    def scale(self) -> str:
        return str(self.scale_combo.currentData())

    def set_scale(self, scale: str) -> None:
        index = self.scale_combo.findData(scale)
        if index < 0:
            raise ValueError(f"scale {scale!r}: expected one of {SCALES}")
        self.scale_combo.setCurrentIndex(index)

    def cycle_scale(self) -> None:
        self.set_scale(SCALES[(SCALES.index(self.scale) + 1) % len(SCALES)])

    def set_fixed_levels(self, levels: tuple[float, float] | None) -> None:
        """Fixed levels (photons), or ``None`` for auto levels."""
        if levels is None:
            self.auto_check.setChecked(True)
            return
        lo, hi = float(levels[0]), float(levels[1])
        if not hi > lo:
            raise ValueError(f"levels {levels}: the highest must exceed the lowest")
        self.auto_check.setChecked(False)
        self.lo_spin.setValue(lo)
        self.hi_spin.setValue(hi)

    def set_reference(self, reference) -> None:
        """The ideal donut (:class:`app.gui.reference.IdealReference`) overlaid on the profiles."""
        self.reference = reference
        self._redraw()

    def _auto_toggled(self, auto: bool) -> None:
        if not auto:   # start the fixed levels from the auto levels now shown
            for spin, v in ((self.lo_spin, self.levels[0]), (self.hi_spin, self.levels[1])):
                spin.blockSignals(True)
                spin.setValue(v)
                spin.blockSignals(False)
        self._redraw()

    def _update_controls(self) -> None:
        self.gamma_spin.setEnabled(self.scale == "gamma")
        for spin in (self.lo_spin, self.hi_spin):
            spin.setEnabled(not self.auto_check.isChecked())

    def set_measurement(self, sections: np.ndarray, pixel_um: float, z_step_um: float,
                        centroid_px: tuple[float, float, float] | None,
                        shift_px: tuple[float, float, float] = (0.0, 0.0, 0.0),
                        background: float = 0.0) -> None:
        """``sections`` (3, n, n) photons; ``centroid_px``: (x, y, z) centre of mass in pixels /
        planes from the ROI centre; ``shift_px``: (x, y, z) position of the sections' centre voxel
        relative to the ROI centre (the loop re-centres the sections on the bead);
        ``background``: photons per pixel (the ideal profile is drawn on top of it)."""
        sections = np.asarray(sections, dtype=float)
        self.last_sections = sections
        self._args = dict(pixel_um=float(pixel_um), z_step_um=float(z_step_um),
                          centroid_px=centroid_px, shift_px=tuple(shift_px),
                          background=float(background))
        self._redraw()

    def _redraw(self, *_: object) -> None:
        self._update_controls()
        if self.last_sections is None or self._args is None:
            return
        a = self._args
        sections = self.last_sections
        if self.auto_check.isChecked():
            self.levels = auto_levels(list(sections))
        else:
            lo, hi = self.lo_spin.value(), self.hi_spin.value()
            self.levels = (lo, hi if hi > lo else lo + 1.0)
        scale, gamma = self.scale, float(self.gamma_spin.value())
        sx, sy, sz = a["shift_px"]
        c = a["centroid_px"]
        have = c is not None
        cx, cy, cz = c if have else (0.0, 0.0, 0.0)
        px, dz = a["pixel_um"], a["z_step_um"]
        kw = dict(levels=self.levels, scale=scale, gamma=gamma)
        self.xy.set_section(sections[0], px, px, (cx, cy) if have else None, (sx, sy), **kw)
        self.xz.set_section(sections[1], px, dz, (cx, cz) if have else None, (sx, sz), **kw)
        self.yz.set_section(sections[2], px, dz, (cy, cz) if have else None, (sy, sz), **kw)
        self.colour_bar.set_ticks(colour_bar_ticks(self.levels, scale, gamma),
                                  colour_bar_label(scale))
        self.last_ideal = None
        ref = self.reference
        if ref is not None and ref.sections.shape == sections.shape:
            from autoalign.app.gui.reference import ideal_like

            self.last_ideal = ideal_like(ref, sections, a["background"])
        self.profiles.set_profiles(sections, self.last_ideal, px, dz, a["shift_px"],
                                   log=scale == "log")
        self.changed.emit()


class SnapshotView(QtWidgets.QWidget):
    """A still of one state: a caption over its three sections side by side (for before/after)."""

    def __init__(self, title: str, parent=None) -> None:
        super().__init__(parent)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.setSpacing(1)
        self.caption = QtWidgets.QLabel(title)
        self.caption.setWordWrap(True)
        self.caption.setAlignment(QtCore.Qt.AlignCenter)
        layout.addWidget(self.caption)
        self.graphics = pg.GraphicsLayoutWidget()
        layout.addWidget(self.graphics, 1)
        self.images: list[pg.ImageItem] = []
        for col, name in enumerate(("xy", "xz", "yz")):
            vb = self.graphics.addViewBox(row=0, col=col, lockAspect=True, invertY=True,
                                          enableMouse=False)
            img = pg.ImageItem()
            img.setColorMap(_cmap("inferno"))
            vb.addItem(img)
            self.images.append(img)
            self.graphics.addLabel(name, row=1, col=col, size="8pt")
        self.setMinimumSize(180, 110)
        self.sections: np.ndarray | None = None
        self.text = title

    def set_state(self, sections: np.ndarray | None, caption: str,
                  levels: tuple[float, float] | None, scale: str, gamma: float = 0.5) -> None:
        self.sections = None if sections is None else np.asarray(sections, dtype=float)
        self.text = caption
        self.caption.setText(caption)
        for i, img in enumerate(self.images):
            if self.sections is None:
                img.clear()
            else:
                lv = levels or auto_levels(list(self.sections))
                img.setImage(display_values(self.sections[i], lv, scale, gamma), levels=(0, 1),
                             autoLevels=False)


class BeforeAfterView(QtWidgets.QWidget):
    """The first state (before correction) and the current state side by side, on the same
    photon levels and scale, so the two compare directly."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.before = SnapshotView("before: no state yet")
        self.after = SnapshotView("now: no state yet")
        layout.addWidget(self.before, 1)
        layout.addWidget(self.after, 1)
        self.colour_bar = ColourBar(_cmap("inferno"), "photons")
        layout.addWidget(self.colour_bar)
        self.states: dict[str, dict | None] = {"before": None, "after": None}

    def set_states(self, before: dict | None, after: dict | None, scale: str,
                   gamma: float = 0.5, levels: tuple[float, float] | None = None) -> None:
        """Each state: ``{"sections": (3, n, n) photons, "caption": str}`` or ``None``. Levels:
        fixed, or (``None``) auto over BOTH states."""
        self.states = {"before": before, "after": after}
        shown = [s["sections"] for s in (before, after) if s is not None]
        if levels is None and shown:
            levels = auto_levels([np.asarray(x) for s in shown for x in s])
        for view, state, empty in ((self.before, before, "before: no state yet"),
                                   (self.after, after, "now: no state yet")):
            if state is None:
                view.set_state(None, empty, None, scale, gamma)
            else:
                view.set_state(state["sections"], state["caption"], levels, scale, gamma)
        if levels is not None:
            self.colour_bar.set_ticks(colour_bar_ticks(levels, scale, gamma),
                                      colour_bar_label(scale))


class PhaseView(QtWidgets.QWidget):
    """The SLM panel, on a switch: what the SLM shows (vortex + correction wrapped to [0, 2π),
    grey levels as on the SLM) or the correction alone (the Zernike sum, unwrapped, radians,
    diverging colour map with a colour bar; the mask offset in the title)."""

    MAX_PIXELS = 320  # displayed size (the SLM has ~2 Mpx; show a strided view)
    MODES = {"slm": "SLM shows (wrapped, grey)", "correction": "Correction alone (unwrapped)"}

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        self.mode_combo = QtWidgets.QComboBox()
        for key, text in self.MODES.items():
            self.mode_combo.addItem(text, key)
        self.mode_combo.setToolTip("What the SLM panel shows: the phase on the SLM (wrapped, grey "
                                   "levels) or the correction alone (unwrapped, radians)")
        self.mode_combo.setSizeAdjustPolicy(
            QtWidgets.QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.mode_combo.setMinimumContentsLength(14)
        self.mode_combo.currentIndexChanged.connect(self._redraw)
        layout.addWidget(self.mode_combo)
        row = QtWidgets.QHBoxLayout()
        row.setSpacing(0)
        self.plot = pg.PlotWidget()
        pi = self.plot.plotItem
        pi.hideAxis("bottom")
        pi.hideAxis("left")
        self.image = pg.ImageItem()
        pi.addItem(self.image)
        pi.setAspectLocked(True)
        pi.invertY(True)
        self.plot.setMinimumSize(120, 120)
        self.colour_bar = ColourBar(_cmap("CET-L1"), "phase")
        row.addWidget(self.plot, 1)
        row.addWidget(self.colour_bar)
        layout.addLayout(row, 1)
        self.caption = QtWidgets.QLabel("")
        self.caption.setWordWrap(True)
        self.caption.setStyleSheet("font-size: 8pt")
        layout.addWidget(self.caption)
        self.plotItem = pi
        self.last_phase: np.ndarray | None = None        # the SLM's phase, wrapped, as shown
        self.last_correction_phase: np.ndarray | None = None
        self.correction = None                           # autoalign.correction.Correction
        self._raw: np.ndarray | None = None

    @property
    def mode(self) -> str:
        return str(self.mode_combo.currentData())

    def set_mode(self, mode: str) -> None:
        index = self.mode_combo.findData(mode)
        if index < 0:
            raise ValueError(f"SLM view {mode!r}: expected one of {list(self.MODES)}")
        self.mode_combo.setCurrentIndex(index)

    def toggle_mode(self) -> None:
        self.set_mode("correction" if self.mode == "slm" else "slm")

    @QtCore.pyqtSlot(object)
    def set_phase(self, phase_rad: np.ndarray) -> None:
        """The float phase (rad) sent to the SLM on its pupil grid."""
        phase = np.asarray(phase_rad, dtype=np.float32)
        if phase.ndim != 2 or phase.size == 0:
            return
        self._raw = phase
        step = max(1, int(math.ceil(max(phase.shape) / self.MAX_PIXELS)))
        shown = np.mod(phase[::step, ::step], 2 * np.pi)   # NaN (outside the pupil) stays NaN
        if phase.shape[0] == phase.shape[1]:
            shown = np.where(_outside_pupil(shown.shape[0]), np.nan, shown).astype(np.float32)
        self.last_phase = shown
        self._redraw()

    def set_correction(self, correction) -> None:
        """The loop's correction (:class:`autoalign.correction.Correction`), for the unwrapped
        view; drawn on the SLM phase's grid (64 x 64 until a phase arrives)."""
        self.correction = correction
        self._redraw()

    def _redraw(self, *_: object) -> None:
        if self.mode == "slm":
            self.image.setColorMap(_cmap("CET-L1"))
            self.colour_bar.set_colormap(_cmap("CET-L1"))
            self.colour_bar.set_ticks([(0.0, "0"), (0.5, "π"), (1.0, "2π")],
                                      "phase (rad) = grey level")
            self.caption.setText("mask + correction, wrapped 0 … 2π")
            if self.last_phase is not None:
                self.image.setImage(self.last_phase / (2 * np.pi), levels=(0.0, 1.0),
                                    autoLevels=False)
                self.image.setRect(QtCore.QRectF(0, 0, self.last_phase.shape[1],
                                                 self.last_phase.shape[0]))
            return
        from autoalign.simulation.phase import zernike_phase

        m = min(int(self._raw.shape[0]), self.MAX_PIXELS) if self._raw is not None else 64
        coeffs = dict(getattr(self.correction, "coefficients", {}) or {})
        phase = zernike_phase({int(k): float(v) for k, v in coeffs.items() if int(k) >= 1}, m)
        phase = np.where(_outside_pupil(m), np.nan, phase)
        self.last_correction_phase = phase
        span = float(np.nanmax(np.abs(phase))) if np.any(np.isfinite(phase)) else 0.0
        span = max(span, 0.1)
        cmap = _cmap("CET-D1")
        self.image.setColorMap(cmap)
        self.colour_bar.set_colormap(cmap)
        self.image.setImage((phase + span) / (2 * span), levels=(0.0, 1.0), autoLevels=False)
        self.image.setRect(QtCore.QRectF(0, 0, m, m))
        ticks = [((v + span) / (2 * span), f"{v:+.2g}") for v in np.linspace(-span, span, 5)]
        self.colour_bar.set_ticks(ticks, "correction (rad)")
        off = tuple(getattr(self.correction, "mask_offset", (0.0, 0.0)) or (0.0, 0.0))
        self.caption.setText(f"correction alone; mask offset ({off[0]:+.3f}, {off[1]:+.3f}) "
                             "pupil radii")


def _outside_pupil(m: int) -> np.ndarray:
    """Cells of an m x m pupil grid (cell centres spanning the diameter) outside the unit pupil."""
    c = -1 + (np.arange(m) + 0.5) * 2 / m
    return np.hypot(c[None, :], c[:, None]) > 1.0


class ModeBarChart(pg.PlotWidget):
    """Horizontal bars per Zernike mode (named): current correction and last prediction, rad."""

    def __init__(self, modes: Sequence[int], parent=None) -> None:
        super().__init__(parent=parent)
        self.plotItem.setTitle("Zernike modes: coefficient (rad)", size="9pt")
        self.plotItem.getAxis("bottom").enableAutoSIPrefix(False)
        _small_axes(self.plotItem, 7)
        self.plotItem.showGrid(x=True, y=False, alpha=0.3)
        self.plotItem.invertY(True)
        self.plotItem.setMouseEnabled(x=True, y=False)
        self.correction_bars: pg.BarGraphItem | None = None
        self.prediction_bars: pg.BarGraphItem | None = None
        self.modes: list[int] = []
        self.correction: dict[int, float] = {}
        self.prediction: dict[int, float] = {}
        self.base_modes: list[int] = sorted({int(m) for m in modes})   # the rows always shown
        self.plotItem.addItem(pg.InfiniteLine(0.0, angle=90, pen=pg.mkPen((0, 0, 0, 120))))
        self.legend = legend_below(self.plotItem, columns=2)
        for colour, name in (((30, 100, 200), "correction"), ((230, 120, 20), "last prediction")):
            self.legend.addItem(pg.BarGraphItem(x=[0], height=[1], width=1, brush=colour), name)
        self.set_modes(modes)
        self.setMinimumSize(220, 150)

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
        # a mode beyond the configured rows gets a row while a value of it is shown, and loses it
        # when none is (it never stays for the session)
        extra = (set(self.correction) | set(self.prediction)) - set(self.base_modes)
        extra = {m for m in extra if m >= 2 and (abs(self.correction.get(m, 0)) > 1e-9
                                                 or abs(self.prediction.get(m, 0)) > 1e-9)}
        rows = sorted(set(self.base_modes) | extra)
        if rows != self.modes:
            self.set_modes(rows)
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
    """Per-iteration history: residual RMS (predicted and true) and the measured quality plot: the
    MEASURED residual wavefront of each stack first (``quality_rad`` +- ``quality_sigma_rad``,
    :mod:`calibration.quality`; left axis, rad RMS, log scale) with the aligned threshold (dotted),
    the null depth second (right axis, log scale; values below ``NULL_FLOOR``, including a fitted
    0, are drawn at the floor) with the expected floor of the null for the bead (dashed), and a
    text slot for what limits the alignment.

    The x axis counts iterations done: the stack of iteration k (0-based) shows the state after k
    iterations. :meth:`set_current` adds the state on the SLM now (after the last iteration, or
    after a best-restore) as the last point (a star); the next record at that x replaces it."""

    NULL_FLOOR = 1e-4
    QUALITY_FLOOR = 1e-3   # rad: a measured residual below it is drawn at it

    def __init__(self, parent=None, horizontal: bool = True) -> None:
        super().__init__(parent)
        outer = QtWidgets.QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(2)
        plots = QtWidgets.QHBoxLayout() if horizontal else QtWidgets.QVBoxLayout()
        plots.setSpacing(2)
        self.residual = pg.PlotWidget()
        self.residual.plotItem.setTitle("Residual RMS per iteration", size="9pt")
        self.residual.plotItem.setLabel("left", "RMS (rad)")
        self.residual.plotItem.getAxis("left").enableAutoSIPrefix(False)
        self.residual.plotItem.showGrid(x=True, y=True, alpha=0.3)
        self.null = pg.PlotWidget()
        self.null.plotItem.setTitle("Measured residual, null (log)", size="9pt")
        # log10 of the figures on linear axes with our own ticks (pyqtgraph's log axis crowds the
        # labels within one decade): the measured residual on the left in rad, the null depth on
        # the right (its own view box, x linked) in %; decades labelled, 2..9 unlabelled
        self.null.plotItem.setLabel("left", "measured residual (rad RMS)")
        self.null.plotItem.getAxis("left").enableAutoSIPrefix(False)
        self.null.plotItem.showAxis("right")
        self.null.plotItem.setLabel("right", "null depth (centre / peak)")
        self.null.plotItem.showGrid(x=True, y=True, alpha=0.3)
        self.null_box = pg.ViewBox(enableMouse=False)
        self.null.plotItem.scene().addItem(self.null_box)
        self.null.plotItem.getAxis("right").linkToView(self.null_box)
        self.null_box.setXLink(self.null.plotItem)
        self.null.plotItem.vb.sigResized.connect(self._sync_null_box)
        for w in (self.residual, self.null):
            w.plotItem.setLabel("bottom", "iterations done")
            _small_axes(w.plotItem, 7)
            w.plotItem.getAxis("bottom").setTickSpacing(major=1, minor=1)
            w.setMinimumSize(180, 120)
            plots.addWidget(w)
        outer.addLayout(plots, 1)
        self.diagnosis_label = QtWidgets.QLabel("")
        self.diagnosis_label.setWordWrap(True)
        self.diagnosis_label.setTextInteractionFlags(QtCore.Qt.TextSelectableByMouse)
        self.diagnosis_label.setStyleSheet("font-size: 8pt")
        self.diagnosis_label.setToolTip("What limits the alignment (from the last run)")
        outer.addWidget(self.diagnosis_label)
        sym = dict(symbol="o", symbolSize=6)
        self.pred_curve = self.residual.plot([], [], pen=pg.mkPen((230, 120, 20), width=2),
                                             symbolBrush=(230, 120, 20), **sym)
        self.true_curve = self.residual.plot([], [], pen=pg.mkPen((20, 150, 60), width=2),
                                             symbolBrush=(20, 150, 60), **sym)
        # first: the measured residual (left axis), its error bars and the aligned threshold
        self.quality_curve = self.null.plot([], [], pen=pg.mkPen((120, 40, 160), width=2.5),
                                            symbolBrush=(120, 40, 160), symbol="o", symbolSize=7)
        self.quality_bars = pg.ErrorBarItem(x=np.zeros(0), y=np.zeros(0), top=np.zeros(0), bottom=np.zeros(0),
                                            beam=0.12, pen=pg.mkPen((120, 40, 160), width=1))
        self.null.plotItem.addItem(self.quality_bars)
        self.quality_now = self.null.plot([], [], pen=None, symbol="star", symbolSize=14,
                                          symbolBrush=(200, 30, 30), symbolPen="k")
        self.aligned_line = pg.InfiniteLine(angle=0, movable=False,
                                            pos=math.log10(QUALITY_ALIGNED_RAD),
                                            pen=pg.mkPen((120, 40, 160), width=1.2, style=QtCore.Qt.DotLine))
        self.null.plotItem.addItem(self.aligned_line)
        self.aligned_sample = pg.PlotDataItem(pen=pg.mkPen((120, 40, 160), width=1.2, style=QtCore.Qt.DotLine))
        # second: the null depth (right axis, its own view box)
        self.null_curve = pg.PlotDataItem([], [], pen=pg.mkPen((30, 100, 200), width=1.2,
                                                                style=QtCore.Qt.DashDotLine),
                                          symbolBrush=(30, 100, 200), symbol="t", symbolSize=5)
        self.null_box.addItem(self.null_curve)
        self.now_marker = pg.PlotDataItem([], [], pen=None, symbol="star", symbolSize=8,
                                          symbolBrush=(30, 100, 200), symbolPen="k")
        self.null_box.addItem(self.now_marker)
        self.floor_line = pg.InfiniteLine(angle=0, movable=False,
                                          pen=pg.mkPen((90, 90, 90), width=1.5,
                                                       style=QtCore.Qt.DashLine))
        self.floor_line.setVisible(False)
        self.null_box.addItem(self.floor_line)
        self.floor_band = pg.LinearRegionItem(orientation="horizontal", movable=False,
                                              brush=pg.mkBrush(120, 120, 120, 40),
                                              pen=pg.mkPen(None))
        self.floor_band.setVisible(False)
        self.floor_band.setZValue(-10)
        self.null_box.addItem(self.floor_band)
        self.floor_sample = pg.PlotDataItem(pen=pg.mkPen((90, 90, 90), width=1.5,
                                                         style=QtCore.Qt.DashLine))
        self.residual_legend = legend_below(self.residual.plotItem, columns=2)
        self.residual_legend.addItem(self.pred_curve, "predicted")
        self.residual_legend.addItem(self.true_curve, "true (simulated)")
        self.null_legend = legend_below(self.null.plotItem, columns=2)
        self.null_legend.addItem(self.quality_curve, "residual")
        self.null_legend.addItem(self.quality_now, "SLM now")
        self.null_legend.addItem(self.aligned_sample, f"aligned ≤ {QUALITY_ALIGNED_RAD:g}")
        self.null_legend.addItem(self.null_curve, "null (right)")
        self.floor_label = "bead floor"
        self.null_legend.addItem(self.floor_sample, self.floor_label)
        self.floor: float | None = None
        self.diagnosis = ""
        self.data: dict[str, list[float]] = {}
        self.current: dict | None = None
        self._fit_widths()
        self.clear()

    def _sync_null_box(self) -> None:
        """Keep the null's view box on the plot's data area (x linked, y its own)."""
        vb = self.null.plotItem.vb
        self.null_box.setGeometry(vb.sceneBoundingRect())
        self.null_box.linkedViewChanged(vb, self.null_box.XAxis)

    def clear(self) -> None:
        self.data = {"iteration": [], "null_depth": [], "predicted_residual_rms": [],
                     "quality_rad": [], "quality_sigma_rad": []}
        self.labels: list[str] = []
        self.true_residual: dict[int, float] = {}
        self.current = None
        self._redraw()

    def add(self, metrics: Mapping[str, float], label: str = "") -> None:
        """Add one iteration record's metrics (``app.loop.IterationRecord.metrics``): the state
        its stack saw, at x = the number of records so far (replaces a current-state point there)."""
        k = len(self.data["iteration"])
        if self.current is not None and self.current["x"] == k:
            self.current = None
        self.data["iteration"].append(k)
        self.labels.append(label)
        for key in ("null_depth", "predicted_residual_rms", "quality_rad", "quality_sigma_rad"):
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

    def set_current(self, metrics: Mapping[str, float], label: str) -> None:
        """The state on the SLM now, imaged after the last iteration (or after a best-restore):
        the last point, at x = the number of records."""
        k = len(self.data["iteration"])

        def value(key: str) -> float:
            v = metrics.get(key)
            return float("nan") if v is None else float(v)

        self.current = {"x": k, "null_depth": value("null_depth"), "quality_rad": value("quality_rad"),
                        "quality_sigma_rad": value("quality_sigma_rad"), "label": str(label),
                        "metrics": dict(metrics)}
        true = metrics.get("true_residual_rms")
        if true is not None and np.isfinite(true):
            self.true_residual[k] = float(true)
        self._redraw()

    def set_floor(self, floor: float | None, bead_diameter_um: float | None = None,
                  scatter: float | None = None) -> None:
        """The expected null floor for the bead (the null metric on the ideal donut through it,
        dashed) and, when given, the scatter of one noisy stack's null around it (grey band)."""
        self.floor = None if floor is None or not np.isfinite(floor) or floor < 0 else float(floor)
        self.floor_scatter = (float(scatter) if scatter is not None and np.isfinite(scatter)
                              and self.floor is not None else None)
        self.floor_line.setVisible(self.floor is not None)
        self.floor_band.setVisible(self.floor_scatter is not None)
        if self.floor is not None:
            self.floor_line.setPos(math.log10(max(self.floor, self.NULL_FLOOR)))
            bead = "" if bead_diameter_um is None else f" {1000 * bead_diameter_um:.0f} nm"
            pm = "" if self.floor_scatter is None else f" ± {100 * self.floor_scatter:.1g}"
            value = f"{100 * self.floor:.2g}" if self.floor > 0 else "0"
            # the scatter is the grey band; the label stays short (the plot's width is the legend's)
            self.floor_label = f"floor{bead}: {value} %"
            self.floor_line.setToolTip(f"null floor{bead}: {value}{pm} %")
            if self.floor_scatter is not None:
                lo = max(self.floor - self.floor_scatter, self.NULL_FLOOR)
                self.floor_band.setRegion((math.log10(lo),
                                           math.log10(self.floor + self.floor_scatter)))
        else:
            self.floor_label = "bead floor"
        self.null_legend.removeItem(self.floor_sample)
        self.null_legend.addItem(self.floor_sample, self.floor_label)
        self._fit_widths()
        self._redraw()

    def _fit_widths(self) -> None:
        """Each plot at least as wide as its axes and legend need (the view's own minimum is
        smaller: the scene was clipped on the right, the null's axis first)."""
        for w in (self.residual, self.null):
            need = w.plotItem.effectiveSizeHint(QtCore.Qt.MinimumSize).width()
            w.setMinimumWidth(max(180, int(math.ceil(need)) + 4))

    def set_diagnosis(self, text: str) -> None:
        """What limits the alignment, as one text (the run's stop reason and any diagnosis)."""
        self.diagnosis = str(text or "")
        self.diagnosis_label.setText(self.diagnosis)
        self.diagnosis_label.setToolTip(self.diagnosis or "What limits the alignment (from the last run)")

    def points(self) -> list[dict]:
        """Every point drawn, in order: x, measured residual (``quality_rad``, its sigma), null
        depth, label; the current state last."""
        d = self.data
        out = [{"x": x, "quality_rad": q, "quality_sigma_rad": qs, "null_depth": v, "label": lab, "current": False}
               for x, q, qs, v, lab in zip(d["iteration"], d["quality_rad"], d["quality_sigma_rad"],
                                           d["null_depth"], self.labels)]
        if self.current is not None:
            c = self.current
            out.append({"x": c["x"], "quality_rad": c["quality_rad"], "quality_sigma_rad": c["quality_sigma_rad"],
                        "null_depth": c["null_depth"], "label": c["label"], "current": True})
        return out

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
        pts = self.points()
        nd = [p["null_depth"] if not np.isfinite(p["null_depth"])
              else max(p["null_depth"], self.NULL_FLOOR) for p in pts]
        xs, ys = self._finite([p["x"] for p in pts], nd, positive=True)
        logs = [math.log10(v) for v in ys]
        self.null_curve.setData(xs, logs)
        if self.current is not None and xs and xs[-1] == self.current["x"]:
            self.now_marker.setData([xs[-1]], [logs[-1]])
        else:
            self.now_marker.setData([], [])
        # the measured residual: log10 of rad, error bars from value - sigma to value + sigma
        qx, qv, qlo, qhi = [], [], [], []
        for p in pts:
            v, sd = p["quality_rad"], p["quality_sigma_rad"]
            if not np.isfinite(v):
                continue
            sd = sd if np.isfinite(sd) else 0.0
            qx.append(p["x"])
            qv.append(math.log10(max(v, self.QUALITY_FLOOR)))
            qlo.append(math.log10(max(v - sd, self.QUALITY_FLOOR)))
            qhi.append(math.log10(max(v + sd, self.QUALITY_FLOOR)))
        self.quality_curve.setData(qx, qv)
        self.quality_bars.setData(x=np.asarray(qx, dtype=float), y=np.asarray(qv, dtype=float),
                                  top=np.asarray(qhi, dtype=float) - np.asarray(qv, dtype=float),
                                  bottom=np.asarray(qv, dtype=float) - np.asarray(qlo, dtype=float))
        if self.current is not None and qx and qx[-1] == self.current["x"]:
            self.quality_now.setData([qx[-1]], [qv[-1]])
        else:
            self.quality_now.setData([], [])
        xmax = max([1] + list(it) + [p["x"] for p in pts] + list(ks))
        for plot in (self.residual, self.null):   # side by side: the same x range, not linked
            plot.plotItem.setXRange(-0.3, xmax + 0.3, padding=0)
        qspan = qlo + qhi + [math.log10(QUALITY_ALIGNED_RAD)]
        lo = math.floor(min(qspan) + 1e-9)
        hi = max(math.ceil(max(qspan) - 1e-9), lo + 1)
        self.null.plotItem.setYRange(lo, hi, padding=0.1)
        major = [(float(k), self._rad(10.0 ** k)) for k in range(lo, hi + 1)]
        minor = [(k + math.log10(m), "") for k in range(lo, hi) for m in range(2, 10)]
        self.null.plotItem.getAxis("left").setTicks([major, minor])
        span = list(logs)
        if self.floor is not None:
            span.append(math.log10(max(self.floor, self.NULL_FLOOR)))
        if span:  # whole decades in view, so that there are labelled ticks
            lo = math.floor(min(span) + 1e-9)
            hi = max(math.ceil(max(span) - 1e-9), lo + 1)
            self.null_box.setYRange(lo, hi, padding=0.1)
            major = [(float(k), self._percent(10.0 ** k)) for k in range(lo, hi + 1)]
            minor = [(k + math.log10(m), "") for k in range(lo, hi) for m in range(2, 10)]
            self.null.plotItem.getAxis("right").setTicks([major, minor])

    @staticmethod
    def _rad(value: float) -> str:
        return f"{value:.0f}" if value >= 1 else f"{value:.{max(0, -math.floor(math.log10(value)))}f}"

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
