"""``autoalign calibrate instrument FILE...``: the instrument's optics measured from bead stacks.

One or more bead z-stacks (any file ``autoalign analyse`` reads) are fitted together: the
instrument parameters (effective NA, the pupil's fill factor, apodisation and radial amplitude,
its decentration, the axial scale, the lateral drift per µm of focus, the bead diameter; the pixel
scale only when asked: the stage poke measures the pixel size) are shared, each stack keeps its
own aberration, position, photons and background. Each parameter is reported with its one-sigma
uncertainty (the larger of the Fisher and the block-sandwich estimate) and the fit's deviance
before and after; the instrument file is written for ``analyse --instrument``, the simulator and
the data-set generator.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

#: instrument parameters fitted by default (see calibration.psf_fit.INSTRUMENT_PARAMETERS)
DEFAULT_FREE = ("numerical_aperture", "inv_fill2", "decentration_x", "decentration_y", "axial_scale",
                "drift_x_per_um", "drift_y_per_um", "bead_diameter_um")
"""(apodisation, amplitude_r4 and amplitude_r6 are not fitted by default: on the real widefield
stack, free together with the fill factor, they trade against each other (sigmas of 3 to 60, far
larger than their values) and improve the deviance by 0.003 only)"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The instrument calibration's own options (the optics flags come from ``analyse``)."""
    p.add_argument("--free", default=",".join(DEFAULT_FREE), metavar="NAMES",
                   help="instrument parameters to fit, comma-separated (default: " + ",".join(DEFAULT_FREE)
                   + "; add pixel_scale to fit the pixel size too)")


def run_instrument(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from autoalign.app.cli import cli_path
    from autoalign.app.commands.analyse import optics_from_args
    from autoalign.calibration.psf_fit import INSTRUMENT_PARAMETERS, FitOptions, fit_stacks
    from autoalign.files import OverwriteRefused, UserError
    from autoalign.hardware.recorded import read_recording
    from autoalign.simulation.instrument import DEFAULT_INSTRUMENT_FILE, INSTRUMENT_FORMAT

    if not args.files:
        raise UserError("calibrate instrument: give one or more bead stacks (TIFF, OME-TIFF, .obf/.msr, HDF5)")
    free = tuple(n.strip() for n in args.free.split(",") if n.strip())
    unknown = sorted(set(free) - set(INSTRUMENT_PARAMETERS))
    if unknown:
        raise UserError(f"--free: unknown parameter(s) {', '.join(unknown)}; expected some of "
                        f"{', '.join(sorted(INSTRUMENT_PARAMETERS))}")
    out = Path(cli_path(args.out) or "") if args.out else Path.cwd() / DEFAULT_INSTRUMENT_FILE
    if out.exists() and not args.force and INSTRUMENT_FORMAT not in out.read_text(encoding="utf-8", errors="replace")[:400]:
        raise OverwriteRefused(f"{out}: exists and is not an autoalign instrument file; choose another --out or "
                               "pass --force")
    ins, cam, said = optics_from_args(args)
    log = sys.stderr if args.json else sys.stdout
    for line in said:
        print(line, file=log)
    stacks = []
    for f in args.files:
        rec = read_recording(Path(cli_path(f) or f), pixel_um=args.pixel_um, z_step_um=args.z_step_um,
                             channel=args.channel)
        if not rec.stacks:
            raise UserError(f"{f}: no z-stack in this file (the instrument calibration fits bead z-stacks)")
        stacks += rec.stacks
    modes = tuple(range(5, args.max_noll + 1))
    progress = (lambda s: print("  " + s, file=log, flush=True)) if not args.json else None  # noqa: E731
    base = fit_stacks(stacks, cam, ins, FitOptions(modes=modes, z_range_um=args.z_range_um,
                                                      plane_step=args.plane_step, uncertainties=False),
                      progress=progress)
    cal = fit_stacks(stacks, cam, ins, FitOptions(modes=modes, z_range_um=args.z_range_um, plane_step=args.plane_step,
                                                     free_instrument=free), progress=progress)
    source = ", ".join(Path(f).name for f in args.files)
    fitted = replace(cal.instrument, source=source, uncertainty={k: float(v) for k, v in cal.instrument_sigma.items()},
                     nominal={"numerical_aperture": ins.numerical_aperture, "immersion_index": ins.immersion_index,
                              "wavelength_um": ins.wavelength_um})
    fitted.save(out)
    nominal = ins.flat()
    rows = []
    for k, v in cal.instrument_values.items():
        rows.append({"parameter": k, "value": v, "sigma": cal.instrument_sigma.get(k, math.nan),
                     "nominal": nominal.get(k, math.nan)})
    result = {"instrument_file": str(out), "stacks": [s.name for s in stacks], "parameters": rows,
              "before": [{"deviance_per_dof": s.deviance_per_dof, "model_error_fraction": s.model_error_fraction,
                          "valid": s.valid} for s in base.stacks],
              "after": [{"deviance_per_dof": s.deviance_per_dof, "model_error_fraction": s.model_error_fraction,
                         "valid": s.valid, "verdict": s.verdict} for s in cal.stacks]}
    if args.json:
        print(json.dumps(result, indent=1, default=float))
        return 0
    print(f"instrument calibrated from {len(stacks)} stack(s) in {base.elapsed_s + cal.elapsed_s:.0f} s:")
    print(f"  {'parameter':<20} {'nominal':>9} {'fitted':>9} {'sigma':>8}")
    for r in rows:
        print(f"  {r['parameter']:<20} {r['nominal']:>9.4f} {r['value']:>9.4f} {r['sigma']:>8.4f}")
    for b, a in zip(base.stacks, cal.stacks):
        print(f"  {a.name}: deviance/dof {b.deviance_per_dof:.3f} -> {a.deviance_per_dof:.3f}, model error "
              f"{100 * b.model_error_fraction:.1f} % -> {100 * a.model_error_fraction:.1f} %")
        print("    " + a.verdict)
    print(f"instrument file written: {out} (use it with 'autoalign analyse --instrument {out.name} ...')")
    return 0
