"""``autoalign calibrate camera [DARK...]``: the camera's defect map (hot, dead, stuck and noisy
pixels) from dark frames.

Dark frames (the light blocked), from files or acquired:

* ``FILE...``: TIFF (tifffile; a multi-page or n-dimensional TIFF is a series of frames), ``.npy``,
  or anything ``autoalign analyse`` reads (its stacks' planes are the frames); several files are
  one series. A file given as ``flat=FILE`` holds flat frames (uniform light): pixels that
  respond to light at less than half the median are then dead too.
* no file: ``--backend sim`` (the default with the simulated hardware) records 50 dark frames of
  the simulated camera: a 320 x 320 sensor with 0.1 % hot pixels (stuck at full scale), 0.02 %
  dead and 0.05 % warm pixels at positions seeded by ``simulation.seed`` (the sensor that
  ``autoalign overview --sim`` images), and says how many of those it found;
  ``--backend micromanager`` snaps 50 frames from the configured camera: block the light first.

Per pixel the mean and variance over the frames are compared with the median over the sensor plus
8 scaled MADs (calibration/camera_defects.py). The map is written to ``--out`` (default
``camera_defects.npz`` next to the settings file, or in the user data folder for the packaged
defaults); an existing file that is not a defect map is replaced only with ``--force``. Frames in
which more than 2 % of the pixels look defective are refused (light reaching the camera?), unless
``--force``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: frames recorded when none are given
ACQUIRE_FRAMES = 50
#: more than this fraction of the pixels flagged: the frames are not dark
MAX_DEFECT_FRACTION = 0.02


def read_frames(path: Path, channel: str | None = None) -> np.ndarray:
    """Frames (n, ny, nx) from a TIFF, ``.npy`` or any recording ``read_recording`` reads."""
    from autoalign.files import UserError

    if not path.is_file():
        raise UserError(f"{path}: no such file (dark frames: TIFF, .npy, OBF/MSR or HDF5)")
    head = path.read_bytes()[:8]
    try:
        if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            import tifffile

            data = np.asarray(tifffile.imread(path))
        elif head[:6] == b"\x93NUMPY":
            data = np.asarray(np.load(path, allow_pickle=False))
        else:
            from autoalign.hardware.recorded import read_recording

            rec = read_recording(path, pixel_um=1.0, z_step_um=1.0, channel=channel)  # sizes do not matter here
            parts = [s.data for s in rec.stacks] + [im.image[None] for im in rec.images]
            if not parts:
                raise UserError(f"{path}: expected camera frames, found no image in this file")
            if len({p.shape[-2:] for p in parts}) > 1:
                raise UserError(f"{path}: expected frames of one size, found {sorted({p.shape[-2:] for p in parts})}")
            data = np.concatenate([np.asarray(p) for p in parts])
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a file the user must fix
        raise UserError(f"{path}: expected camera frames (TIFF, .npy, OBF/MSR, HDF5), found a file that cannot be "
                        f"read ({type(exc).__name__}: {exc})") from exc
    if data.ndim < 2 or data.dtype.kind not in "uif" or data.size == 0:
        raise UserError(f"{path}: expected camera frames (n, ny, nx) of numbers, found an array of shape {data.shape} "
                        f"({data.dtype})")
    return data.reshape((-1,) + data.shape[-2:]).astype(float)


def _files(args: argparse.Namespace) -> tuple[list[Path], list[Path]]:
    from autoalign.app.cli import cli_path

    dark, flat = [], []
    for f in args.files:
        if f.startswith("flat="):
            flat.append(Path(cli_path(f[5:]) or f[5:]))
        else:
            dark.append(Path(cli_path(f) or f))
    return dark, flat


def _stack(paths: list[Path], channel: str | None, what: str) -> np.ndarray:
    from autoalign.files import UserError

    parts = [read_frames(p, channel) for p in paths]
    shapes = sorted({p.shape[1:] for p in parts})
    if len(shapes) > 1:
        raise UserError(f"{what} of different sizes: " + ", ".join(f"{p.name} {q.shape[1]} x {q.shape[2]}"
                                                                  for p, q in zip(paths, parts)))
    return np.concatenate(parts)


def run_camera(args: argparse.Namespace) -> int:
    from autoalign.app.cli import cli_path, device_settings
    from autoalign.calibration.camera_defects import (
        DEAD,
        HOT,
        default_defect_map_path,
        is_defect_map_file,
        measure_defects,
    )
    from autoalign.files import OverwriteRefused, UserError, check_writable

    s = device_settings(args)
    out = Path(cli_path(args.out) or args.out) if args.out else default_defect_map_path(s)
    if out.exists() and not args.force and not is_defect_map_file(out):
        raise OverwriteRefused(f"{out}: exists and is not an autoalign camera defect map; choose another --out or "
                               "pass --force")
    check_writable(out, "camera defect map")
    log = sys.stderr if args.json else sys.stdout
    dark_paths, flat_paths = _files(args)
    truth = None
    saturation = float(2 ** int(s.camera.bit_depth) - 1)
    if flat_paths and not dark_paths:
        raise UserError("calibrate camera: flat frames need dark frames too (give the dark FILE... as well)")
    if dark_paths:
        dark = _stack(dark_paths, args.channel, "dark frames")
        flat = _stack(flat_paths, args.channel, "flat frames") if flat_paths else None
        if flat is not None and flat.shape[1:] != dark.shape[1:]:
            raise UserError(f"flat frames of {flat.shape[1]} x {flat.shape[2]} pixels for dark frames of "
                            f"{dark.shape[1]} x {dark.shape[2]}")
        source = ", ".join(p.name for p in dark_paths + flat_paths)
    elif s.hardware.backend == "simulated":
        from autoalign.simulation.field import DEFAULT_SHAPE, SensorDefects, dark_frames
        from autoalign.simulation.noise import CameraModel

        cam = CameraModel.from_settings(s)
        truth = SensorDefects.simulated_camera(DEFAULT_SHAPE, seed=int(s.simulation.seed))
        dark = dark_frames(cam, truth, ACQUIRE_FRAMES, np.random.default_rng(int(s.simulation.seed) + 1))
        flat = None
        source = (f"simulated camera ({DEFAULT_SHAPE[0]} x {DEFAULT_SHAPE[1]}, sensor seed {s.simulation.seed}), "
                  f"{ACQUIRE_FRAMES} dark frames")
    else:
        from autoalign.hardware.factory import open_devices

        print(f"recording {ACQUIRE_FRAMES} dark frames from the camera: the light must be blocked", file=log)
        with open_devices(s) as dev:
            dark = np.stack([np.asarray(dev.camera.snap(), dtype=float) for _ in range(ACQUIRE_FRAMES)])
            saturation = float(dev.camera.saturation_adu)
        flat = None
        source = f"{ACQUIRE_FRAMES} dark frames from the camera ({s.hardware.backend})"
    print(f"dark frames: {dark.shape[0]} of {dark.shape[1]} x {dark.shape[2]} pixels ({source})", file=log)
    try:
        dmap = measure_defects(dark, flat, saturation_adu=saturation, source=source)
    except ValueError as exc:
        raise UserError(f"calibrate camera: {exc}") from exc
    fraction = float(np.count_nonzero(dmap.flags)) / dmap.flags.size
    if fraction > MAX_DEFECT_FRACTION and not args.force:
        raise UserError(f"calibrate camera: {100 * fraction:.1f} % of the pixels look defective (> "
                        f"{100 * MAX_DEFECT_FRACTION:g} %): these do not look like dark frames (light reaching the "
                        "camera?); block the light and record again, or pass --force to keep the map")
    dmap.save(out, force=True)
    result: dict[str, Any] = {"defect_map": str(out), **dmap.to_dict()}
    lines = [f"camera defect map written to {out}: {dmap.summary()}"]
    if truth is not None:
        found_hot = int(np.count_nonzero(dmap.mask(HOT) & (truth.mask("hot") | truth.mask("warm"))))
        found_dead = int(np.count_nonzero(dmap.mask(DEAD) & truth.mask("dead")))
        false = int(np.count_nonzero(dmap.mask() & ~truth.mask()))
        n_hot = len(truth.hot) + len(truth.warm)
        result["simulated_truth"] = {"hot_and_warm": n_hot, "dead": len(truth.dead), "found_hot": found_hot,
                                     "found_dead": found_dead, "false": false}
        lines.append(f"  simulated sensor: found {found_hot} of {n_hot} hot/warm and {found_dead} of {len(truth.dead)} "
                     f"dead pixels; {false} good pixel(s) flagged")
    rows = dmap.positions()[:12]
    if len(rows):
        lines.append("  first defects (row, column: flags): " + ", ".join(
            f"({r}, {c}: {_words(int(dmap.flags[r - dmap.origin[0], c - dmap.origin[1]]))})" for r, c in rows))
    lines.append(f"  use it with 'autoalign overview FILE --defects {out.name}'")
    if args.json:
        for line in lines:
            print(line, file=log)
        print(json.dumps(result, indent=1, default=float))
    else:
        print("\n".join(lines))
    return 0


def _words(flags: int) -> str:
    from autoalign.calibration.camera_defects import DEAD, HOT, NOISY, STUCK

    names = [n for bit, n in ((HOT, "hot"), (DEAD, "dead"), (STUCK, "stuck"), (NOISY, "noisy")) if flags & bit]
    return "+".join(names) or "ok"
