"""autoalign analyse FILE: read a recorded measurement (TIFF / OME-TIFF z-stack, Imspector .obf /
.msr with z-stacks or xy/xz/yz section scans and channels, the project's bead-walk HDF5), fit the
instrument model to it on its native pixels, compare with an independent phase retrieval (beams
without a mask), and write a report PNG (data, model, residual, profiles, Zernike estimates with
error bars, the validity verdict and what limits it) and a JSON.

Optics: --instrument FILE (from 'autoalign calibrate instrument') or the flags, else the settings'
optics; the command says on one line where each value came from. Voxel sizes: from the file's
metadata when present, else --pixel-um / --z-step-um (which also override the file).
Camera: --offset-adu, --electrons-per-adu, --read-noise-e, else the settings' camera.
Exit status 0 when every measurement was analysed (whether or not the model explains it: the
verdict says), 2 for a file or flag problem."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from autoalign.app.cli import add_settings_argument


def add_optics_arguments(p: argparse.ArgumentParser) -> None:
    """The optics, camera and voxel flags shared by ``analyse`` and ``calibrate instrument``."""
    from autoalign.app.cli import float_in, positive_float

    g = p.add_argument_group("optics (default: --instrument, else the settings' optics)")
    g.add_argument("--instrument", default=None, metavar="FILE",
                   help="instrument file from 'autoalign calibrate instrument' (its NA, pupil, axial scale, bead)")
    g.add_argument("--na", type=float_in(0.0, 1.7), default=None, metavar="NA", help="numerical aperture, 0 < NA <= 1.7")
    g.add_argument("--immersion-index", type=float_in(1.0, 2.0, low_open=False), default=None, metavar="N",
                   help="refractive index of the immersion medium (water 1.33, oil 1.518)")
    g.add_argument("--wavelength-um", type=float_in(0.2, 2.0), default=None, metavar="UM",
                   help="wavelength of the detected light, µm (emission for fluorescence)")
    g.add_argument("--beam", choices=["none", "vortex", "tophat"], default=None,
                   help="the phase mask of the beam imaged: none (a focus or a fluorescent bead), vortex (2-D STED "
                   "donut), tophat (z-STED); default: the settings' optics.beam")
    g.add_argument("--polarisation", choices=["unpolarised", "circular_plus", "circular_minus", "linear_x",
                                              "linear_y"], default=None,
                   help="unpolarised for a fluorescent bead in widefield (default for --beam none); the beam's "
                   "polarisation otherwise (default: the settings')")
    g.add_argument("--bead-diameter-um", type=float_in(0.0, 5.0, low_open=False), default=None, metavar="UM",
                   help="bead diameter, µm (default: the instrument's, else camera.bead_diameter_um)")
    v = p.add_argument_group("voxel size (default: the file's metadata)")
    v.add_argument("--pixel-um", type=positive_float, default=None, metavar="UM",
                   help="lateral pixel size in the sample, µm (overrides the file)")
    v.add_argument("--z-step-um", type=positive_float, default=None, metavar="UM",
                   help="plane spacing, µm (overrides the file)")
    c = p.add_argument_group("camera (default: the settings' camera)")
    c.add_argument("--offset-adu", type=float_in(0.0, None, low_open=False), default=None, metavar="ADU",
                   help="camera offset (ADU of a dark pixel)")
    c.add_argument("--electrons-per-adu", type=positive_float, default=None, metavar="E",
                   help="camera conversion factor, electrons per ADU (1 / gain)")
    c.add_argument("--read-noise-e", type=float_in(0.0, None, low_open=False), default=None, metavar="E",
                   help="camera read noise, electrons RMS")
    p.add_argument("--channel", default=None, help="analyse only this channel (name or a unique part of it)")
    p.add_argument("--max-noll", type=int, default=37, choices=range(11, 67), metavar="J",
                   help="fit Noll 5..J (default 37, 11..66)")
    p.add_argument("--z-range-um", type=positive_float, default=2.5, metavar="UM",
                   help="planes within this distance of the bead's focus are fitted (default 2.5)")
    p.add_argument("--plane-step", type=int, default=2, choices=range(1, 11), metavar="K",
                   help="fit every K-th plane (default 2)")


def optics_from_args(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """(Instrument, CameraCounts, lines saying where each value came from)."""
    from dataclasses import replace

    from autoalign.calibration.psf_fit import CameraCounts
    from autoalign.settings import load_settings
    from autoalign.simulation.instrument import Instrument

    from autoalign.app.cli import cli_path

    from autoalign.simulation.instrument import DEFAULT_INSTRUMENT_FILE
    from autoalign.files import UserError

    settings = load_settings(args.settings)
    said: list[str] = []
    flags = {"numerical_aperture": args.na, "immersion_index": args.immersion_index, "wavelength_um": args.wavelength_um}
    path = args.instrument
    if path is None and Path(DEFAULT_INSTRUMENT_FILE).is_file():  # the calibration of this folder, if it fits
        found = Instrument.load(DEFAULT_INSTRUMENT_FILE)
        if not found.nominal_mismatch(**flags):
            path = DEFAULT_INSTRUMENT_FILE
            said.append(f"instrument: ./{DEFAULT_INSTRUMENT_FILE} found (calibrated from {found.source or 'beads'}; "
                        "pass --instrument to choose another)")
    if path:
        ins = Instrument.load(cli_path(path) or "")
        wrong = ins.nominal_mismatch(**flags)
        if wrong:
            raise UserError(f"{path}: this instrument was calibrated for other optics than the flags say: "
                            + "; ".join(wrong) + " (recalibrate, or drop the flags)")
        said.append(f"instrument: {path} (NA {ins.numerical_aperture:.4f}, axial scale "
                    f"{ins.axial_scale:.4f}, bead {1000 * ins.bead_diameter_um:.0f} nm)")
        if ins.source == "":
            ins = replace(ins, source=str(path))
        flags = {}
    else:
        ins = Instrument.from_settings(settings)
        said.append("instrument: nominal (no instrument file: an ideal pupil at the NA given; "
                    "'autoalign calibrate instrument' measures yours)")
    over: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    for flag, key in (("bead_diameter_um", "bead_diameter_um"), ("polarisation", "polarisation")):
        value = getattr(args, flag)
        if value is not None:
            over[key] = value
    beam = args.beam or settings.optics.beam
    if args.polarisation is None and beam == "none" and not path:
        over["polarisation"] = "unpolarised"
    ins = replace(ins, **over) if over else ins
    src = lambda flag, key: "instrument file" if path else (  # noqa: E731
        "flag" if getattr(args, flag) is not None else "settings optics." + key)
    said.append(f"optics: NA {ins.numerical_aperture:g} ({src('na', 'numerical_aperture')}), immersion "
                f"{ins.immersion_index:g} ({src('immersion_index', 'immersion_index')}), wavelength "
                f"{ins.wavelength_um:g} µm ({src('wavelength_um', 'wavelength_um')}), beam {beam} "
                f"({'flag' if args.beam else 'settings optics.beam'}), {ins.polarisation}")
    cam = CameraCounts.from_settings(settings)
    cam = CameraCounts(offset_adu=cam.offset_adu if args.offset_adu is None else args.offset_adu,
                       electrons_per_adu=cam.electrons_per_adu if args.electrons_per_adu is None
                       else args.electrons_per_adu,
                       read_noise_e=cam.read_noise_e if args.read_noise_e is None else args.read_noise_e)
    said.append(f"camera: offset {cam.offset_adu:g} ADU, {cam.electrons_per_adu:g} e-/ADU, read noise "
                f"{cam.read_noise_e:g} e- (" + ", ".join(
                    f"{n} {'flag' if getattr(args, f) is not None else 'settings'}"
                    for n, f in (("offset", "offset_adu"), ("gain", "electrons_per_adu"), ("read noise", "read_noise_e")))
                + ")")
    return ins, cam, said + [f"beam: {beam}"]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("analyse", help="analyse a recorded measurement (TIFF, OME-TIFF, .obf/.msr, HDF5)",
                              description=__doc__)
    add_settings_argument(p)
    p.add_argument("file", metavar="FILE", help="the recording to analyse (never modified)")
    add_optics_arguments(p)
    p.add_argument("--out", default=None, metavar="DIR",
                   help="folder for the report PNG and JSON (default: ./analysis_<file name>); files in it are "
                   "replaced only when autoalign wrote them")
    p.add_argument("--no-retrieval", action="store_true", help="skip the independent phase retrieval")
    p.add_argument("--scan-detection", choices=["confocal", "direct"], default="confocal",
                   help="section scans (.obf/.msr): confocal (default: the signal is the illumination times the "
                   "detection PSF through the pinhole, a bead scanned by a STED / confocal microscope) or direct "
                   "(the data are the illumination itself). Each channel's beam follows its name: excitation / "
                   "confocal / Gaussian channels are a focus (beam none), the others --beam")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    p.set_defaults(func=run)


def _beam(args: argparse.Namespace) -> str:
    from autoalign.settings import load_settings

    return str(args.beam or load_settings(args.settings).optics.beam)


def run(args: argparse.Namespace) -> int:
    from autoalign.app.analysis import AnalysisOptions, analyse_recording, summary_lines
    from autoalign.app.analysis_report import write_report
    from autoalign.app.cli import cli_path
    from autoalign.files import OverwriteRefused, atomic_write_text, png_software
    from autoalign.hardware.recorded import read_recording
    from autoalign.settings import load_settings

    path = Path(cli_path(args.file) or "")
    ins, cam, said = optics_from_args(args)
    rec = read_recording(path, pixel_um=args.pixel_um, z_step_um=args.z_step_um, channel=args.channel)
    log = sys.stderr if args.json else sys.stdout
    for line in said:
        print(line, file=log)
    for st in rec.stacks:
        print(f"{st.name or 'stack'}: {st.data.shape[0]} x {st.data.shape[1]} x {st.data.shape[2]} voxels, "
              f"pixel {st.pixel_x_um:.4f} µm ({st.provenance.get('pixel_x_um', 'unknown')}), z step "
              f"{st.z_step_um:.4f} µm ({st.provenance.get('z_um', 'unknown')})", file=log)
    for note in rec.notes:
        print("note: " + note, file=log)
    out_dir = Path(cli_path(args.out) or "") if args.out else Path.cwd() / f"analysis_{path.stem}"
    out_dir.mkdir(parents=True, exist_ok=True)
    beam = _beam(args)
    options = AnalysisOptions(max_noll=args.max_noll, z_range_um=args.z_range_um, plane_step=args.plane_step,
                              retrieval=not args.no_retrieval, beam=beam)
    js = out_dir / f"{path.stem}.json"
    if js.exists() and '"written_by": "autoalign analyse"' not in js.read_text(encoding="utf-8", errors="replace")[:200]:
        raise OverwriteRefused(f"{js}: exists and was not written by autoalign analyse; choose another --out")
    results: dict[str, Any] = {"written_by": "autoalign analyse", "file": str(path), "format": rec.format,
                               "optics": said, "notes": rec.notes,
                               "stacks": [], "scans": []}
    progress = (lambda s: print("  " + s, file=log, flush=True)) if not args.json else None  # noqa: E731
    analyses = analyse_recording(rec, ins, cam, options, progress=progress) if rec.stacks else []
    for i, a in enumerate(analyses):
        png = out_dir / f"{path.stem}_{i}.png" if len(analyses) > 1 else out_dir / f"{path.stem}.png"
        if png.exists() and not (png_software(png) or "").startswith("autoalign"):
            raise OverwriteRefused(f"{png}: exists and was not written by autoalign; choose another --out")
        write_report(a, png, title=f"{path.name}: {a.stack.name or 'z-stack'}")
        entry = a.to_json()
        entry["report_png"] = str(png)
        results["stacks"].append(entry)
        for line in summary_lines(a):
            print(line, file=log)
        print(f"  report: {png}", file=log)
    for scans in rec.scans:
        from autoalign.app.analysis import analyse_scans
        from autoalign.app.analysis_report import write_sections_report

        fit, entry = analyse_scans(scans, ins, beam, progress, settings=load_settings(args.settings),
                                   confocal=args.scan_detection == "confocal")
        png = out_dir / f"{path.stem}_{(scans.channel or 'scans').replace(' ', '_')}.png"
        if png.exists() and not (png_software(png) or "").startswith("autoalign"):
            raise OverwriteRefused(f"{png}: exists and was not written by autoalign; choose another --out")
        write_sections_report(fit, entry, png, title=f"{path.name}: {scans.channel or scans.name}")
        entry["report_png"] = str(png)
        entry["summary"].append(f"  report: {png}")
        results["scans"].append(entry)
        for line in entry["summary"]:
            print(line, file=log)
    atomic_write_text(js, json.dumps(_finite(results), indent=1))
    print(f"results: {js}", file=log)
    if args.json:
        print(json.dumps(_finite(results)))
    return 0


def _finite(obj: Any) -> Any:
    """JSON without NaN / inf (as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return _finite(obj.item())
    return obj
