"""autoalign: closed-loop alignment of a STED depletion donut (simulated microscope or real devices).

Every command takes --settings FILE; without it ./settings.yaml is used when present, else the
packaged defaults, and the command says which on one line ('autoalign settings --write FILE' starts
your own). Errors end in one line saying what to do: exit status 2 for a problem with the input, 1
for a device or runtime failure, 130 for Ctrl-C (finished work is kept); --debug shows the traceback.
"""
# For developers: each subcommand lives in app/commands/<name>.py and defines
# register(subparsers) -> None; its parser sets func(args) -> int.
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import textwrap
import threading
import traceback
from pathlib import Path
from typing import Any
from collections.abc import Callable

from autoalign.settings import SettingsError, load_settings

log = logging.getLogger("autoalign.cli")

# Subcommand modules, in help order. A module listed here that does not exist yet is skipped.
COMMAND_MODULES = [
    "report",      # simulation report (figure of ideal and aberrated donuts)
    "benchmark",   # simulator and inference speed/accuracy
    "simulate",    # write a training data set
    "train",
    "evaluate",
    "align",       # closed loop, headless
    "collect",     # bead-walk data collection
    "calibrate",   # poke calibration, convention self-check, instrument calibration from beads
    "analyse",     # analyse a recorded measurement (TIFF, OME-TIFF, .obf/.msr, HDF5)
    "overview",    # beads of an overview image: accepted, rejected (why), the one to align on
    "gui",
    "settings",    # write a copy of the default settings / show the settings in use
]

EXIT_OK, EXIT_FAILURE, EXIT_USER, EXIT_INTERRUPTED = 0, 1, 2, 130


# ----------------------------------------------------------------------------- argument types
def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum`` (the message states the accepted range)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def float_in(low: float | None = None, high: float | None = None, low_open: bool = True,
             high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in the interval given (``low_open``: ``> low`` else ``>= low``;
    ``high_open``: ``< high`` else ``<= high``); the message states the interval."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    rule = " and ".join(parts) or "finite"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {rule}, got {text!r}") from None
        ok = value == value and abs(value) != float("inf")
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a number {rule}, got {text}")
        return value
    parse.__name__ = f"number {rule}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
positive_float = float_in(0.0)
non_negative_float = float_in(0.0, low_open=False)
gain_float = float_in(0.0, 1.0)


# ----------------------------------------------------------------------------- parser
def _plain(text: str | None) -> str | None:
    """Help text without RST markup (``x`` -> x, :class:`x` -> x)."""
    if not text or text is argparse.SUPPRESS:
        return text
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


class _ParagraphFormatter(argparse.HelpFormatter):
    """Re-wraps each paragraph of a description, keeping blank lines and bullet lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in re.split(r"\n\s*\n", textwrap.dedent(text).strip()):
            lines = para.splitlines()
            if any(ln.lstrip().startswith(("* ", "- ")) for ln in lines) or any(ln.startswith("    ") for ln in lines):
                out.append("\n".join(indent + ln for ln in lines))
            else:
                out.append(textwrap.fill(" ".join(ln.strip() for ln in lines), width, break_on_hyphens=False,
                                         initial_indent=indent, subsequent_indent=indent))
        return "\n\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoalign", description=_plain(__doc__),
                                     formatter_class=_ParagraphFormatter)
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"autoalign.app.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"autoalign.app.commands.{name}":
                continue
            raise
        module.register(sub)
    helps = {}
    for action in sub._choices_actions:
        action.help = _plain(action.help)
        helps[action.dest] = action.help
    for command, p in sub.choices.items():
        p.formatter_class = _ParagraphFormatter
        p.description = _plain(p.description or helps.get(command) or "")
        for action in p._actions:
            action.help = _plain(action.help)
        _add_common(p, top=False)
    return parser


def _add_common(parser: argparse.ArgumentParser, top: bool) -> None:
    """-v / --debug, accepted before or after the command name."""
    suffix = "" if top else "_sub"
    parser.add_argument("-v", "--verbose", action="count", default=0, dest=f"verbose{suffix}",
                        help="more log output (-v: progress messages, -vv: debug)")
    parser.add_argument("--debug", action="store_true", dest=f"debug{suffix}",
                        help="show the full traceback when a command fails")


def add_settings_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--settings`` option every subcommand shares."""
    parser.add_argument("--settings", default=None, metavar="FILE",
                        help="settings YAML (default: ./settings.yaml if present, else the packaged "
                        "defaults); may hold only the keys that differ from the defaults")


def cli_path(text: str | None) -> str | None:
    """A path given on the command line, made absolute against the current directory."""
    if text is None:
        return None
    return str(Path(os.path.expanduser(text)).absolute())


def device_settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """Settings for a command that opens devices: ``args.settings`` with ``hardware.backend``
    from ``args.backend`` ('sim' or 'micromanager'; None keeps the settings' own), ``model.checkpoint``
    from ``args.checkpoint`` when given (relative to the current directory), and any further
    dotted-key ``overrides``."""

    over: dict[str, Any] = {}
    backend = getattr(args, "backend", None)
    if backend is not None:
        over["hardware.backend"] = "micromanager" if backend == "micromanager" else "simulated"
    if getattr(args, "checkpoint", None):
        over["model.checkpoint"] = cli_path(args.checkpoint)
    over.update(overrides)
    settings = load_settings(args.settings)
    return settings.replace(**over) if over else settings


# ----------------------------------------------------------------------------- error boundary
def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def _one_line(exc: BaseException, limit: int = 400) -> str:
    """The exception's message on one line (long library messages cut, see --debug)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + " ... (--debug shows all)"


def describe_error(exc: BaseException) -> tuple[str, int]:
    """(message, exit status) for an exception reaching the command line."""
    from autoalign.files import UserError

    names = _names(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C); finished work was kept", EXIT_INTERRUPTED
    if isinstance(exc, SettingsError):
        return f"settings error: {str(exc).strip()}", EXIT_USER  # one problem per line
    if "CheckpointError" in names:
        text = _one_line(exc)
        hint = "; give a valid one with --checkpoint or model.checkpoint"
        if "autoalign train" not in text:
            hint += ", or train one with 'autoalign train'"
        return f"model checkpoint error: {text}{hint}", EXIT_USER
    if "DeviceError" in names:
        return (f"device error: {_one_line(exc)}; check that the device is switched on and connected and "
                "that the settings' hardware section names it"), EXIT_FAILURE
    if isinstance(exc, UserError):
        return _one_line(exc), EXIT_USER
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError,
                        FileExistsError)):
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}{exc.strerror or exc}; check the path and its permissions", EXIT_USER
    if isinstance(exc, OSError) and getattr(exc, "errno", None) is not None:
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        return f"{where}{exc.strerror or exc}", EXIT_FAILURE
    return (f"unexpected error: {type(exc).__name__}: {_one_line(exc)} (run again with --debug for the "
            "traceback and report it)"), EXIT_FAILURE


def _announce_settings(args: argparse.Namespace) -> None:
    from autoalign.settings import DEFAULT_SETTINGS_PATH, DEMO_MICROMANAGER_SETTINGS_PATH, resolve_settings_path

    if getattr(args, "demo_micromanager", False):
        args.settings = str(DEMO_MICROMANAGER_SETTINGS_PATH)
    path, how = resolve_settings_path(args.settings)
    if getattr(args, "demo_micromanager", False):
        how = "--demo-micromanager: Micro-Manager demo devices, simulated SLM, a wiring demo"
    args.settings_how = how
    if path.resolve() == DEFAULT_SETTINGS_PATH:
        # None keeps a command's own meaning of "no settings given" (evaluate: the data set's settings)
        args.settings = None
        note = getattr(args, "settings_when_absent", None)
        if note:
            print(f"autoalign {args.command}: settings: {note}", file=sys.stderr)
            return
    else:
        args.settings = str(path)
    print(f"autoalign {args.command}: settings {path} ({how})", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = max(args.verbose, getattr(args, "verbose_sub", 0))
    debug = args.debug or getattr(args, "debug_sub", False)
    level = logging.DEBUG if (debug or verbose >= 2) else logging.INFO if verbose == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    previous_hook = threading.excepthook
    if not debug:
        threading.excepthook = _quiet_thread_exception
    try:
        if hasattr(args, "settings"):
            _announce_settings(args)
        return int(args.func(args) or 0)
    except BaseException as exc:  # noqa: BLE001 - the one error boundary of the command line
        if isinstance(exc, SystemExit):
            raise
        message, status = describe_error(exc)
        if debug:
            traceback.print_exc()
        print(f"autoalign {getattr(args, 'command', '')}: {message}".replace("autoalign : ", "autoalign: "),
              file=sys.stderr)
        return status
    finally:
        threading.excepthook = previous_hook


def _quiet_thread_exception(hook_args: Any) -> None:
    """A library's background thread failed (e.g. a device bridge closing after a failed connect):
    one INFO line instead of a traceback; the command's own error says what went wrong."""
    name = getattr(hook_args.thread, "name", "?")
    log.info("background thread %s ended with %s: %s (--debug shows the traceback)", name,
             getattr(hook_args.exc_type, "__name__", "error"), hook_args.exc_value)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
