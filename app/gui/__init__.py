"""The alignment application (PyQt5 + pyqtgraph): :class:`MainWindow` over an
:class:`AlignWorker` that owns the devices and the loop in its own thread. See ``docs/gui.md``."""
from __future__ import annotations

import os
import sys
from typing import Any


def simulated_settings(settings: Any) -> Any:
    """The settings with the simulated microscope and the simulated SLM selected."""
    return settings.replace(**{"hardware.backend": "simulated", "slm.backend": "simulated"})


def ensure_qt_platform(headless: bool) -> None:
    """Use Qt's offscreen platform when asked to, or when there is no display at all."""
    if "QT_QPA_PLATFORM" in os.environ:
        return
    no_display = sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    if headless or no_display:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"


#: The shared libraries Qt's xcb platform plugin (the PyQt5 wheel's ``libqxcb.so`` and
#: ``libQt5XcbQpa``) loads, with the Debian/Ubuntu package of each. A minimal Debian lacks
#: some (typically libxcb-icccm4, libxcb-keysyms1, libxcb-xinerama0), and Qt then only says
#: "Could not load the Qt platform plugin xcb".
QT_XCB_LIBRARIES = (
    ("libxcb.so.1", "libxcb1"), ("libX11-xcb.so.1", "libx11-xcb1"), ("libX11.so.6", "libx11-6"),
    ("libxcb-icccm.so.4", "libxcb-icccm4"), ("libxcb-image.so.0", "libxcb-image0"),
    ("libxcb-keysyms.so.1", "libxcb-keysyms1"), ("libxcb-randr.so.0", "libxcb-randr0"),
    ("libxcb-render-util.so.0", "libxcb-render-util0"), ("libxcb-render.so.0", "libxcb-render0"),
    ("libxcb-shape.so.0", "libxcb-shape0"), ("libxcb-shm.so.0", "libxcb-shm0"),
    ("libxcb-sync.so.1", "libxcb-sync1"), ("libxcb-xfixes.so.0", "libxcb-xfixes0"),
    ("libxcb-xinerama.so.0", "libxcb-xinerama0"), ("libxcb-xkb.so.1", "libxcb-xkb1"),
    ("libxcb-util.so.1", "libxcb-util1"), ("libxkbcommon.so.0", "libxkbcommon0"),
    ("libxkbcommon-x11.so.0", "libxkbcommon-x11-0"), ("libfontconfig.so.1", "libfontconfig1"),
    ("libGL.so.1", "libgl1"), ("libdbus-1.so.3", "libdbus-1-3"),
)


def _loadable(soname: str) -> bool:
    """Whether the dynamic loader finds ``soname`` (and what it needs): ``dlopen`` searches as
    Qt's plugin loader will (``LD_LIBRARY_PATH``, the ``ldconfig`` cache, the system folders)."""
    import ctypes

    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def missing_qt_xcb_libraries(loadable: Any = None) -> list[tuple[str, str]]:
    """``(soname, Debian package)`` of each :data:`QT_XCB_LIBRARIES` entry that cannot be loaded."""
    loadable = loadable or _loadable
    return [(lib, pkg) for lib, pkg in QT_XCB_LIBRARIES if not loadable(lib)]


def qt_xcb_problem(environ: Any = None, loadable: Any = None) -> str | None:
    """On Linux, when Qt will use its xcb plugin (``QT_QPA_PLATFORM`` unset or ``xcb``, and a
    ``DISPLAY``), the one line saying which libraries it lacks and which packages to install; None
    when nothing is missing or another platform is used. Call it before the ``QApplication``."""
    env = os.environ if environ is None else environ
    if not sys.platform.startswith("linux"):
        return None
    platform = (env.get("QT_QPA_PLATFORM") or "").strip()
    if platform not in ("", "xcb") or not env.get("DISPLAY"):
        return None
    missing = missing_qt_xcb_libraries(loadable)
    if not missing:
        return None
    libs = ", ".join(lib for lib, _ in missing)
    packages = " ".join(pkg for _, pkg in missing)
    return (f"the window cannot open on the X display {env.get('DISPLAY')}: Qt's xcb platform plugin needs "
            f"{libs}, not installed here; install them (Debian/Ubuntu) with 'sudo apt-get install {packages}', "
            "or run headless with QT_QPA_PLATFORM=offscreen")


def enable_high_dpi() -> None:
    """Scale the window with the screen (4K, fractional scaling): Qt's high-DPI attributes, which
    must be set before the ``QApplication`` exists (does nothing once it does)."""
    from PyQt5 import QtCore, QtGui, QtWidgets

    if QtWidgets.QApplication.instance() is not None:
        return
    QtCore.QCoreApplication.setAttribute(QtCore.Qt.AA_EnableHighDpiScaling, True)
    QtCore.QCoreApplication.setAttribute(QtCore.Qt.AA_UseHighDpiPixmaps, True)
    policy = getattr(QtCore.Qt, "HighDpiScaleFactorRoundingPolicy", None)
    if policy is not None and hasattr(QtGui.QGuiApplication,
                                      "setHighDpiScaleFactorRoundingPolicy"):   # Qt >= 5.14
        QtGui.QGuiApplication.setHighDpiScaleFactorRoundingPolicy(policy.PassThrough)


def install_excepthook(window: Any) -> Any:
    """An exception escaping a Qt slot would abort the process (PyQt5 >= 5.5 calls qFatal when
    no ``sys.excepthook`` is set): log it in the window instead, and keep the application alive."""
    import traceback

    previous = sys.excepthook

    def hook(exc_type, exc, tb) -> None:  # noqa: ANN001
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(text)
        try:
            window.log.add(f"ERROR (unexpected, the application continues): "
                           f"{exc_type.__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the window may be gone
            previous(exc_type, exc, tb)

    sys.excepthook = hook
    return previous


def run_app(settings: Any, screenshot: str | None = None, auto_align: int = 0,
            gain: float | None = None, timeout_s: float = 300.0, corrector: str | None = None) -> int:
    """Open the window and run the Qt event loop; returns the exit code.

    With ``screenshot``: run ``auto_align`` iterations (after an initial acquisition), save a PNG
    of the window to ``screenshot`` and quit (1 when anything failed or ``timeout_s`` passed).
    ``corrector``: ``"refined"``, ``"model"`` (the CNN) or ``"modal"`` (the classical baseline) to
    start with (None: ``settings.loop.corrector``)."""
    ensure_qt_platform(headless=screenshot is not None)
    problem = qt_xcb_problem()   # before any QApplication: Qt's own message names no library
    if problem:
        print(f"autoalign gui: {problem}", file=sys.stderr)
        return 1
    from PyQt5 import QtCore, QtWidgets

    from autoalign.app.gui.main_window import MainWindow
    from autoalign.app.gui.worker import AlignWorker

    enable_high_dpi()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    app.setApplicationName("autoalign")
    window = MainWindow(settings, worker=AlignWorker(settings, corrector=corrector))
    previous_hook = install_excepthook(window)
    if screenshot is not None:
        window.resize(1400, 900)   # the documented size, whatever the (offscreen) screen says
    try:
        window.show()
        if screenshot is None:
            return int(app.exec_())
        return _screenshot_mode(app, window, screenshot, auto_align, gain, timeout_s)
    finally:
        sys.excepthook = previous_hook


def _screenshot_mode(app: Any, window: Any, screenshot: str, auto_align: int,
                     gain: float | None, timeout_s: float) -> int:
    """Acquire, auto-align, save a PNG of the window, close it; returns the exit code."""
    from PyQt5 import QtCore

    # a local event loop, not app.exec_()/app.quit(): quitting the application would leave Qt's
    # "quit now" flag set and break any later event loop in the same process (tests)
    loop = QtCore.QEventLoop()
    state = {"code": 0, "stage": "open"}

    def shoot() -> None:
        if state["stage"] == "closed":
            return
        if not window.save_screenshot(screenshot):
            state["code"] = 1
        state["stage"] = "closed"
        window.close()
        loop.quit()

    def step(task: str, result: Any) -> None:
        failed = result is None and task in {t for t, _ in window.errors}
        if failed:
            state["code"] = 1
        if state["stage"] == "open" and task == "open":
            if not window.loop_ready:
                state["code"] = 1
                QtCore.QTimer.singleShot(200, shoot)
                return
            state["stage"] = "acquire"
            window.acquire()
        elif state["stage"] == "acquire" and task == "acquire":
            if auto_align > 0:
                state["stage"] = "run"
                window.auto_align(iterations=auto_align, gain=gain)
            else:
                state["stage"] = "done"
                QtCore.QTimer.singleShot(300, shoot)
        elif state["stage"] == "run" and task == "run":
            state["stage"] = "done"
            QtCore.QTimer.singleShot(500, shoot)   # let the last plots repaint

    window.task_finished.connect(step)

    def give_up() -> None:
        if state["stage"] == "closed":
            return
        window.log.add(f"ERROR: screenshot mode timed out after {timeout_s:.0f} s")
        state["code"] = 1
        shoot()

    timer = QtCore.QTimer()
    timer.setSingleShot(True)
    timer.timeout.connect(give_up)
    timer.start(int(timeout_s * 1000))
    loop.exec_()
    timer.stop()
    window.task_finished.disconnect(step)
    return state["code"]


__all__ = ["run_app", "simulated_settings", "ensure_qt_platform", "install_excepthook",
           "enable_high_dpi", "qt_xcb_problem", "missing_qt_xcb_libraries", "QT_XCB_LIBRARIES"]
