"""The SLM as a frameless full-screen PyQt5 window (1:1 pixels, 8-bit grey).

PyQt5 is imported inside the functions that need it (a heavy optional dependency: the converter and
the other backends work without it)."""
from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from autoalign.hardware.base import DeviceError, DeviceNotConnected, DeviceTimeout
from autoalign.hardware.slm.convert import PhaseToGrey
from autoalign.hardware.slm.device import ConvertingSLM
from autoalign.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["QtSLMWindow"]


def _qt_invoke(fn: Any, timeout_s: float = 10.0) -> Any:
    """Run ``fn()`` in the Qt application's (GUI) thread and return its result: directly when
    already there, else through a queued call that this thread waits for (``timeout_s``)."""
    from PyQt5 import QtCore

    app = QtCore.QCoreApplication.instance()
    if app is None:
        raise DeviceNotConnected("Qt SLM window: no QApplication (create one in the main thread first)")
    if QtCore.QThread.currentThread() is app.thread():
        return fn()
    invoker = _invoker()
    done = threading.Event()
    box: dict[str, Any] = {}

    def job() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc
        finally:
            done.set()

    invoker.call.emit(job)
    if not done.wait(timeout_s):
        raise DeviceTimeout(f"Qt SLM window: the GUI thread did not answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


_INVOKER: Any = None


def _invoker() -> Any:
    global _INVOKER
    from PyQt5 import QtCore

    if _INVOKER is None:

        class _Invoker(QtCore.QObject):
            call = QtCore.pyqtSignal(object)

            def __init__(self) -> None:
                super().__init__()
                self.call.connect(self._run, QtCore.Qt.QueuedConnection)

            @QtCore.pyqtSlot(object)  # a real slot: delivered in this object's (GUI) thread
            def _run(self, job: Any) -> None:
                job()

        inv = _Invoker()
        inv.moveToThread(QtCore.QCoreApplication.instance().thread())
        _INVOKER = inv
    return _INVOKER


class QtSLMWindow(ConvertingSLM):
    """The SLM as a frameless full-screen PyQt5 window on screen ``screen`` (index into
    ``QGuiApplication.screens()``), 1:1 pixels, 8-bit grey (``QImage.Format_Grayscale8``).

    It refuses to open on the screen of the application's visible main window, or on the primary
    screen when there is none, and on a screen whose size differs from the SLM's, unless
    ``force=True``. Safe to call from a worker thread: widget work runs in the GUI thread. Needs a
    ``QApplication`` (one is created when called from the main thread without one)."""

    def __init__(
        self,
        converter: PhaseToGrey,
        pixel_pitch_um: float,
        screen: int = 1,
        force: bool = False,
        name: str = "Qt SLM window",
    ) -> None:
        super().__init__(converter, pixel_pitch_um, name)
        self.screen_index = int(screen)
        self.force = bool(force)
        self._widget: Any = None
        self._qimage: Any = None

    @classmethod
    def from_settings(cls, settings: "Settings", force: bool = False) -> "QtSLMWindow":
        return cls(PhaseToGrey.from_settings(settings, name="Qt SLM window"), settings.slm.pixel_pitch_um,
                   screen=settings.slm.monitor, force=force)

    @property
    def widget(self) -> Any:
        """The QWidget (for tests: ``widget.grab()``), or ``None`` when closed."""
        return self._widget

    def _open(self) -> None:
        try:
            from PyQt5 import QtCore, QtWidgets
        except ImportError as exc:
            raise DeviceNotConnected(f"{self.name}: PyQt5 is not installed ({exc})") from exc
        if QtWidgets.QApplication.instance() is None:
            if threading.current_thread() is not threading.main_thread():
                raise DeviceNotConnected(f"{self.name}: no QApplication, and none can be created outside the main thread")
            self._own_app = QtWidgets.QApplication([])
        if not isinstance(QtCore.QCoreApplication.instance(), QtWidgets.QApplication):
            raise DeviceNotConnected(f"{self.name}: the running Qt application is not a QApplication (widgets needed)")
        self._widget = _qt_invoke(self._create_widget)

    def _create_widget(self) -> Any:
        from PyQt5 import QtCore, QtGui, QtWidgets

        screens = QtGui.QGuiApplication.screens()
        if not 0 <= self.screen_index < len(screens):
            raise DeviceNotConnected(
                f"{self.name}: slm.monitor = {self.screen_index}: no such screen "
                f"({len(screens)} screen(s): {', '.join(s.name() for s in screens)})"
            )
        screen = screens[self.screen_index]
        gui_screens = {w.screen() for w in QtWidgets.QApplication.topLevelWidgets()
                       if w.isVisible() and not getattr(w, "_is_slm_window", False)}
        gui_screens.discard(None)
        if not gui_screens:
            gui_screens = {QtGui.QGuiApplication.primaryScreen()}
        if screen in gui_screens and not self.force:
            raise DeviceError(
                f"{self.name}: slm.monitor = {self.screen_index} ('{screen.name()}') is the screen of the "
                "application window (or the primary screen); refusing to cover it. Choose the SLM's "
                "screen index, or open with force=True."
            )
        geo = screen.geometry()
        ratio = screen.devicePixelRatio()
        phys = (round(geo.width() * ratio), round(geo.height() * ratio))
        if phys != (self.shape[1], self.shape[0]) and not self.force:
            raise DeviceError(
                f"{self.name}: screen {self.screen_index} ('{screen.name()}') is {phys[0]} x {phys[1]} px, "
                f"the SLM settings say {self.shape[1]} x {self.shape[0]} (slm.width_px, slm.height_px); "
                "1:1 pixels are impossible. Fix the settings or open with force=True."
            )

        owner = self

        class _SLMWidget(QtWidgets.QWidget):
            _is_slm_window = True

            def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
                painter = QtGui.QPainter(self)
                img = owner._qimage
                if img is not None:
                    pix = QtGui.QPixmap.fromImage(img)
                    pix.setDevicePixelRatio(self.devicePixelRatioF())
                    painter.drawPixmap(0, 0, pix)
                painter.end()

        w = _SLMWidget()
        w.setWindowTitle(self.name)
        w.setWindowFlags(QtCore.Qt.FramelessWindowHint | QtCore.Qt.WindowStaysOnTopHint | QtCore.Qt.Window)
        w.setAttribute(QtCore.Qt.WA_OpaquePaintEvent)
        w.setCursor(QtCore.Qt.BlankCursor)
        if w.windowHandle() is None:
            w.create()
        if w.windowHandle() is not None:
            w.windowHandle().setScreen(screen)
        size = QtCore.QSize(round(self.shape[1] / ratio), round(self.shape[0] / ratio))
        w.setGeometry(QtCore.QRect(geo.topLeft(), size))
        w.setFixedSize(size)
        w.show()
        if phys == (self.shape[1], self.shape[0]):
            w.showFullScreen()
        return w

    def _close(self) -> None:
        widget, self._widget = self._widget, None
        if widget is not None:
            try:
                _qt_invoke(lambda: (widget.close(), widget.deleteLater()))
            except DeviceError:
                log.warning("%s: could not close the window", self.name, exc_info=True)
        self._qimage = None

    def _display(self, grey: np.ndarray, phase_rad: np.ndarray) -> None:
        from PyQt5 import QtGui

        if self._widget is None:
            raise DeviceNotConnected(f"{self.name}: the window is closed")
        data = np.ascontiguousarray(grey, dtype=np.uint8)
        h, w = data.shape
        img = QtGui.QImage(data.data, w, h, w, QtGui.QImage.Format_Grayscale8).copy()
        widget = self._widget

        def paint() -> None:
            self._qimage = img
            widget.repaint()

        _qt_invoke(paint)

    def grab_image(self) -> np.ndarray:
        """The window's pixels (uint8, height x width) as rendered by Qt (for tests/self-checks)."""
        from PyQt5 import QtGui

        self._require_open()

        def grab() -> np.ndarray:
            img = self._widget.grab().toImage().convertToFormat(QtGui.QImage.Format_Grayscale8)
            h, w, bpl = img.height(), img.width(), img.bytesPerLine()
            buf = img.constBits()
            buf.setsize(h * bpl)
            return np.frombuffer(buf, np.uint8).reshape(h, bpl)[:, :w].copy()

        return _qt_invoke(grab)
