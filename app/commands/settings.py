"""autoalign settings: start your own settings file from the packaged defaults (--write FILE), or
print the settings a command would use, merged over the defaults with paths resolved (--show)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from autoalign.app.cli import add_settings_argument, cli_path


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("settings", help="write a copy of the default settings, or show those in use",
                              description=__doc__)
    add_settings_argument(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", metavar="FILE", default=None,
                       help="write a commented copy of the packaged default settings to FILE, to edit")
    group.add_argument("--show", action="store_true",
                       help="print the effective settings (file merged over the defaults, paths resolved)")
    p.add_argument("--force", action="store_true", help="with --write: replace FILE if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from autoalign.files import atomic_write_text, check_writable, refuse_overwrite
    from autoalign.settings import DEFAULT_SETTINGS_PATH, SETTINGS_FORMAT_VERSION, load_settings

    if args.write:
        out = refuse_overwrite(cli_path(args.write), args.force, "settings file")
        check_writable(out, "settings file")
        atomic_write_text(out, DEFAULT_SETTINGS_PATH.read_text(encoding="utf-8"))
        print(f"wrote {out}: the packaged defaults; keep only the keys you change (relative paths in it "
              f"are relative to its folder), then pass --settings {out}", file=sys.stderr)
        return 0
    settings = load_settings(args.settings)
    print(f"# effective settings from {settings.source}")
    print(f"format_version: {SETTINGS_FORMAT_VERSION}")
    print(settings.to_yaml(), end="")
    return 0
