"""The ``autoalign`` command. Each subcommand lives in ``app/commands/<name>.py`` and defines
``register(subparsers) -> None``; its parser sets ``func(args) -> int``.

Every subcommand takes ``--settings FILE`` (default: the repository's ``settings.yaml``).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from autoalign.settings import SettingsError, load_settings

# Subcommand modules, in help order. A module listed here that does not exist yet is skipped.
COMMAND_MODULES = [
    "report",      # simulation report (figure of ideal and aberrated donuts)
    "benchmark",   # simulator and inference speed/accuracy
    "simulate",    # write a training data set
    "train",
    "evaluate",
    "align",       # closed loop, headless
    "collect",     # bead-walk data collection
    "calibrate",   # poke calibration and convention self-check
    "gui",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoalign", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"autoalign.app.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"autoalign.app.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def add_settings_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--settings`` option every subcommand shares."""
    parser.add_argument("--settings", default=None, help="settings YAML (default: settings.yaml)")


def device_settings(args: argparse.Namespace, **overrides: Any) -> Any:
    """Settings for a command that opens devices: ``args.settings`` with ``hardware.backend``
    from ``args.backend`` ('sim' or 'micromanager'), ``model.checkpoint`` from
    ``args.checkpoint`` when given, and any further dotted-key ``overrides``."""
    over: dict[str, Any] = {
        "hardware.backend": "micromanager" if args.backend == "micromanager" else "simulated"
    }
    if getattr(args, "checkpoint", None):
        over["model.checkpoint"] = args.checkpoint
    over.update(overrides)
    return load_settings(args.settings).replace(**over)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        print(f"autoalign: settings error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("autoalign: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
