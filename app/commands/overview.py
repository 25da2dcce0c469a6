"""``autoalign overview FILE`` or ``autoalign overview --sim``: the beads of an overview image,
accepted or rejected with the reason, and the best-isolated bead to align on.

The overview comes from a file (TIFF / OME-TIFF, Imspector .obf/.msr, HDF5 as ``autoalign analyse``
reads them, or a 2-D ``.npy`` with ``--pixel-um``): the image the file calls an overview, else
its first 2-D image, else the brightest plane of its first z-stack. With ``--sim``: a simulated
bead field (simulation/field.py: ``--beads`` beads at random positions at least ``--min-spacing``
apart, ``--close-pairs`` of them in pairs 1.0-1.5 µm apart, the settings' optics and camera; the
simulated camera's sensor, seeded by ``simulation.seed``: 0.1 % hot pixels at full scale, 0.02 %
dead, 0.05 % warm, the sensor ``autoalign calibrate camera`` maps), and the truth is compared.

Beads are found with scikit-image (``blob_log`` on the background-subtracted, median-filtered
image; sub-pixel centroids in a disc of 1.1 lambda/NA), hot pixels (one-pixel spikes) ignored,
and each bead judged: at the edge, saturated, too dim (SNR below ``loop.min_snr`` or a quarter of
the median bead), cluster (1.7 x the median bead), a neighbour closer than ``--min-distance``
(default half the camera ROI plus lambda/NA: a neighbour stays out of the loop's ROI). The table
is printed; the PNG (beads marked and labelled) and the JSON are written to ``--out`` (default
``overview_<name>``: ``.png`` and ``.json``). Positions are µm in the overview's frame, its
centre pixel at ``--centre-um`` (the stage position when it was taken).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from autoalign.app.cli import add_settings_argument


def register(sub: Any) -> None:
    from autoalign.app.cli import non_negative_float, non_negative_int, positive_float, positive_int

    p = sub.add_parser("overview", help="beads of an overview image: accepted, rejected (why), the one to align on",
                       description=__doc__)
    add_settings_argument(p)
    p.add_argument("file", nargs="?", default=None, metavar="FILE",
                   help="overview image (TIFF, OME-TIFF, .obf/.msr, HDF5, 2-D .npy)")
    p.add_argument("--sim", action="store_true", help="a simulated bead field instead of a file")
    p.add_argument("--pixel-um", type=positive_float, default=None, metavar="UM",
                   help="pixel size, µm (default: the file's; --sim: camera.pixel_size_um)")
    p.add_argument("--channel", default=None, help="use this channel of the file (name or a unique part of it)")
    p.add_argument("--centre-um", type=float, nargs=2, default=(0.0, 0.0), metavar=("X", "Y"),
                   help="stage position of the overview's centre pixel, µm (default 0 0)")
    p.add_argument("--defects", default=None, metavar="FILE",
                   help="camera defect map ('autoalign calibrate camera') to repair first; the overview must be "
                   "the map's sensor region")
    j = p.add_argument_group("bead selection (default: from the settings' optics and camera)")
    j.add_argument("--min-distance", type=positive_float, default=None, metavar="UM",
                   help="a neighbour closer than this rejects both beads, µm (default half the ROI + lambda/NA)")
    j.add_argument("--edge-margin", type=non_negative_float, default=None, metavar="UM",
                   help="beads closer than this to the border are rejected, µm (default the centroid disc, "
                   "1.1 lambda/NA)")
    j.add_argument("--min-snr", type=positive_float, default=None, metavar="SNR",
                   help="peak above background in noise sigmas (default loop.min_snr)")
    g = p.add_argument_group("simulated field (--sim)")
    g.add_argument("--beads", type=positive_int, default=12, metavar="N", help="beads in the field (default 12)")
    g.add_argument("--seed", type=non_negative_int, default=0, help="seed of the bead positions and noise (default 0)")
    g.add_argument("--field-px", type=int, default=320, choices=range(64, 2049), metavar="N",
                   help="overview size, pixels (64..2048, default 320)")
    g.add_argument("--min-spacing", type=non_negative_float, default=1.0, metavar="UM",
                   help="least distance between simulated beads, µm (default 1.0)")
    g.add_argument("--close-pairs", type=non_negative_int, default=2, metavar="N",
                   help="pairs of beads 1.0-1.5 µm apart (default 2)")
    g.add_argument("--hot-fraction", type=non_negative_float, default=0.001, metavar="F",
                   help="fraction of hot pixels, stuck at full scale (default 0.001)")
    g.add_argument("--aberration-rms", type=non_negative_float, default=0.0, metavar="RAD",
                   help="field-constant aberration, RMS over simulation.aberration_modes (default 0)")
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="write PREFIX.png and PREFIX.json (default ./overview_<file name> or ./overview_sim)")
    p.add_argument("--force", action="store_true", help="replace outputs even when autoalign did not write them")
    p.add_argument("--all", action="store_true", help="list the hot pixels in the table too")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.set_defaults(func=run)


def load_overview(path: Path, pixel_um: float | None, channel: str | None) -> tuple[np.ndarray, float, list[str]]:
    """(image, pixel size µm, notes) of the overview in a file (see the module docstring)."""
    from autoalign.files import UserError

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    notes: list[str] = []
    if path.read_bytes()[:6] == b"\x93NUMPY":
        image = np.asarray(np.load(path, allow_pickle=False))
        if image.ndim != 2:
            raise UserError(f"{path}: expected a 2-D overview, found an array of shape {image.shape}")
        if pixel_um is None:
            raise UserError(f"{path}: a .npy file carries no pixel size; pass --pixel-um")
        return image, float(pixel_um), notes
    from autoalign.hardware.recorded import read_recording

    rec = read_recording(path, pixel_um=pixel_um, channel=channel)
    notes += rec.notes
    images = sorted(rec.images, key=lambda im: im.kind != "overview")
    for im in images:
        if im.kind == "slm":
            continue
        px = im.pixel_um
        if px is None:
            if pixel_um is None:
                raise UserError(f"{path}: the image {im.name or ''!r} carries no pixel size; pass --pixel-um")
            px = (float(pixel_um), float(pixel_um))
        if not np.isclose(px[0], px[1], rtol=1e-3):
            raise UserError(f"{path}: the overview's pixels are not square ({px[0]:g} x {px[1]:g} µm)")
        notes.append(f"overview: the image {im.name or 'in the file'!r} ({im.kind})")
        return np.asarray(im.image), float(px[1]), notes
    if rec.stacks:
        st = rec.stacks[0]
        plane = int(np.argmax([np.percentile(p, 99.9) for p in st.data]))
        notes.append(f"overview: plane {plane} of {st.data.shape[0]} (the brightest) of the z-stack {st.name!r}")
        return np.asarray(st.data[plane]), float(st.pixel_um), notes
    raise UserError(f"{path}: expected an overview image, found no 2-D image and no z-stack in this file")


def _check_out(path: Path, force: bool) -> None:
    from autoalign.calibration.beads import OVERVIEW_FORMAT
    from autoalign.files import OverwriteRefused, png_software

    if force or not path.exists():
        return
    if path.suffix == ".png":
        ours = (png_software(path) or "").startswith("autoalign")
    else:
        try:
            ours = json.loads(path.read_text(encoding="utf-8")).get("format") == OVERVIEW_FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
    if not ours:
        raise OverwriteRefused(f"{path}: exists and was not written by autoalign overview; choose another --out or "
                               "pass --force")


def run(args: argparse.Namespace) -> int:
    from autoalign.app.cli import cli_path
    from autoalign.calibration.beads import OverviewOptions, detect_beads, plot_overview
    from autoalign.files import UserError, check_writable
    from autoalign.settings import load_settings

    if bool(args.file) == bool(args.sim):
        raise UserError("overview: give an overview FILE or --sim (one of them)")
    s = load_settings(args.settings)
    log = sys.stderr if args.json else sys.stdout
    name = "sim" if args.sim else Path(args.file).stem
    prefix = Path(cli_path(args.out) or args.out) if args.out else Path.cwd() / f"overview_{name}"
    if prefix.suffix in (".png", ".json"):
        prefix = prefix.with_suffix("")
    png, js = prefix.with_name(prefix.name + ".png"), prefix.with_name(prefix.name + ".json")
    for out in (png, js):
        _check_out(out, args.force)
        check_writable(out, "overview output")
    truth = None
    if args.sim:
        from autoalign.simulation.field import DEFAULT_SHAPE, SensorDefects, simulate_field
        from autoalign.simulation.microscope import draw_aberration

        ab = draw_aberration(np.random.default_rng(args.seed), s.simulation.aberration_modes, args.aberration_rms)
        n = int(args.field_px)
        # the simulated camera's sensor ('calibrate camera' maps it), its top-left n x n pixels
        sensor = SensorDefects.simulated_camera((max(n, DEFAULT_SHAPE[0]), max(n, DEFAULT_SHAPE[1])),
                                                seed=int(s.simulation.seed), hot_fraction=args.hot_fraction)
        try:
            field = simulate_field(s, n_beads=args.beads, seed=args.seed, shape=(n, n),
                                   min_spacing_um=args.min_spacing, close_pairs=min(args.close_pairs, args.beads // 2),
                                   defects=sensor.crop((n, n)), aberration=ab, pixel_size_um=args.pixel_um)
        except ValueError as exc:
            raise UserError(f"overview --sim: {exc}") from exc
        assert field.image is not None
        image, pixel, notes = field.image, field.pixel_size_um, [
            f"simulated field: {args.beads} beads, seed {args.seed}; the simulated camera (sensor seed "
            f"{s.simulation.seed}): {len(field.defects.hot)} hot, {len(field.defects.dead)} dead, {len(field.defects.warm)} "
            f"warm pixels; aberration {args.aberration_rms:g} rad RMS"]
        centre = field.centre_um
        truth = field
        source = "simulated bead field"
        if tuple(args.centre_um) != (0.0, 0.0):
            notes.append("--centre-um is ignored with --sim (the simulated field is centred on 0, 0)")
    else:
        path = Path(cli_path(args.file) or args.file)
        image, pixel, notes = load_overview(path, args.pixel_um, args.channel)
        centre = (float(args.centre_um[0]), float(args.centre_um[1]))
        source = str(path)
    defects = None
    if args.defects:
        from autoalign.calibration.camera_defects import DefectMap

        dmap = DefectMap.load(cli_path(args.defects) or args.defects)
        try:
            defects = dmap.window(image.shape)
        except ValueError as exc:
            raise UserError(f"{args.defects}: {exc}") from exc
        notes.append(f"defect map {args.defects}: {dmap.summary()}")
    opt = OverviewOptions.from_settings(s, min_distance_um=args.min_distance, edge_margin_um=args.edge_margin,
                                        min_snr=args.min_snr)
    if not args.sim:  # a file's full scale is its integer type's (a float image: not tested)
        from dataclasses import replace

        kind = np.asarray(image).dtype
        opt = replace(opt, saturation_adu=float(np.iinfo(kind).max) if kind.kind in "ui" else None)
    image = np.asarray(image, dtype=float)
    try:
        result = detect_beads(image, pixel, opt, centre_um=centre, defects=defects, source=source)
    except ValueError as exc:
        raise UserError(f"overview: {exc}") from exc
    result.notes[:0] = notes
    data = result.to_dict()
    if truth is not None:
        data["simulated_truth"] = truth.truth()
        data["simulated_truth"]["comparison"] = _compare(result, truth)
    plot_overview(image, result, png, title=f"autoalign overview: {Path(source).name if not args.sim else source}")
    from autoalign.files import atomic_write_text

    atomic_write_text(js, json.dumps(data, indent=1))
    if args.json:
        print(json.dumps(data, indent=1))
    else:
        print(f"overview {image.shape[1]} x {image.shape[0]} pixels of {pixel * 1000:.1f} nm ({source}); background "
              f"{result.background_adu:.1f}, noise {result.noise_adu:.2f} ADU; neighbours closer than "
              f"{opt.min_distance_um:g} µm, edge margin {opt.edge_um:.2f} µm, SNR >= {opt.min_snr:g}")
        print("\n".join(result.table(hot_pixels=args.all)))
        print(result.summary())
        for note in result.notes:
            print("note: " + note)
        if truth is not None:
            c = data["simulated_truth"]["comparison"]
            print(f"truth: {c['beads']} beads; {c['found']} found; {c['false']} false detection(s); chosen: "
                  + (f"centroid {c['chosen_error_nm']:.1f} nm from the true bead (an aberrated PSF's centroid is not "
                     f"its bead's position), true nearest neighbour {c['chosen_true_nearest_um']:.2f} µm"
                     if c.get("chosen_error_nm") is not None else "none"))
    print(f"written: {png}, {js}", file=log)
    return 0


def _compare(result: Any, field: Any) -> dict[str, Any]:
    """The detection against the simulated truth (a bead matched within 0.25 µm; within the
    centroid disc for a bead rejected at the edge, whose disc is cut). The chosen bead's error is
    from the true bead position: with an aberration it includes the PSF's own centroid offset."""
    truth = field.beads_um[:, :2]
    beads = result.beads
    edge = result.options.edge_um
    false = 0
    for b in beads:
        d = np.hypot(truth[:, 0] - b.x_um, truth[:, 1] - b.y_um)
        false += int(d.min() >= (edge if b.edge_um < edge else 0.25))
    found = sum(int(any(np.hypot(b.x_um - t[0], b.y_um - t[1]) < 0.25 for b in beads)) for t in truth)
    out: dict[str, Any] = {"beads": int(len(truth)), "found": int(found), "false": int(false)}
    ch = result.chosen
    if ch is not None:
        d = np.hypot(truth[:, 0] - ch.x_um, truth[:, 1] - ch.y_um)
        j = int(np.argmin(d))
        out.update({"chosen_error_nm": float(d[j]) * 1000,
                    "chosen_true_nearest_um": float(field.nearest_neighbour_um()[j])})
    return out
