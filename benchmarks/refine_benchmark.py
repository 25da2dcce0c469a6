"""Model-based refinement: time per fit and the accuracy it adds over its warm start.

    python benchmarks/refine_benchmark.py --trials 8 --seed 200
    python benchmarks/refine_benchmark.py --trials 8 --variants      # + faster settings of the fit

Each trial: the simulated microscope (default settings, camera noise, 80 nm bead) with a fresh
hidden aberration (seed S + t, RMS ``--aberration-rms``), the vortex on the SLM, the bead
off-centre by up to half a pixel and 40 nm in z; one noisy stack. Warm starts:

* ``cnn``: the shipped network (``models.predictor.Predictor``) on the stack's ortho-sections,
  when its checkpoint loads for these settings;
* ``noisy``: the truth plus Gaussian noise of ``--start-noise`` rad per mode (a network-like
  error, independent of any checkpoint).

Printed per start: the median over modes and trials of the per-mode absolute error (Noll 5..15)
of the start and after refinement, their ratio (target <= 0.7), and the median time per fit
(target <= 1 s on 2 cores; the fit runs in one torch thread).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def trial(settings, seed, rms, starts, options_list, start_noise, predictor):
    from autoalign.calibration import centroid as cen
    from autoalign.calibration.refine import RefineStart, refine
    from autoalign.hardware.simulated import SimulatedSLM
    from autoalign.simulation.microscope import SimulatedMicroscope
    from autoalign.simulation.phase import total_phase

    s = settings.replace(**{"simulation.aberration_rms_rad": rms})
    mic = SimulatedMicroscope(s, seed=seed)
    slm = SimulatedSLM(mic)
    slm.open()
    slm.show(total_phase(s, slm.pupil_samples))
    rng = np.random.default_rng(seed + 10_000)
    p = s.camera.pixel_size_um
    mic.bead_um = (rng.uniform(-0.5, 0.5) * p, rng.uniform(-0.5, 0.5) * p, rng.uniform(-0.04, 0.04))
    n = s.stack.planes
    z = (np.arange(n) - n // 2) * s.stack.z_step_um
    stack = mic.render_stack(z)
    modes = list(s.model.modes)
    truth = {j: float(mic.aberration[j - 1]) for j in modes}
    out = {}
    for kind in starts:
        if kind == "cnn":
            c = s.camera
            photons = (stack - c.offset_adu) / (c.gain_adu_per_electron * c.quantum_efficiency)
            bg, _ = cen.background_and_noise(photons)
            sections = cen.centred_sections(photons, cen.robust_stack_centroid(photons), fill=bg)
            pred = predictor.predict(sections)
            start = {j: float(pred.coefficients.get(j, 0.0)) for j in modes}
        else:
            start = {j: v + float(rng.normal(0, start_noise)) for j, v in truth.items()}
        err0 = [abs(start[j] - truth[j]) for j in modes]
        for name, opts in options_list:
            t0 = time.perf_counter()
            r = refine(stack, z, s, RefineStart(coefficients=start), options=opts)
            dt = time.perf_counter() - t0
            err1 = [abs(r.coefficients[j] - truth[j]) for j in modes]
            out[(kind, name)] = (err0, err1, dt, r.crb_residual_rms, r.chi2_per_dof, r.valid)
    return out


def main(argv=None) -> int:
    import torch

    from autoalign.calibration.refine import RefineOptions
    from autoalign.settings import load_settings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seed", type=int, default=200)
    ap.add_argument("--aberration-rms", type=float, default=0.7)
    ap.add_argument("--start-noise", type=float, default=0.1, help="rad per mode of the 'noisy' start")
    ap.add_argument("--settings", default=None)
    ap.add_argument("--no-cnn", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also time faster fit settings")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = load_settings(args.settings)
    starts = ["noisy"]
    predictor = None
    if not args.no_cnn:
        try:
            from autoalign.models.predictor import Predictor

            predictor = Predictor.load(settings=settings)
            starts.insert(0, "cnn")
        except Exception as exc:  # noqa: BLE001 - the benchmark runs without a checkpoint
            print(f"(no CNN start: {type(exc).__name__}: {exc})")
    options = [("default", RefineOptions())]
    if args.variants:
        options += [
            ("float32", RefineOptions(dtype=torch.float32)),
            ("3 planes", RefineOptions(plane_offsets_um=(-0.4, 0.0, 0.4))),
            ("24 pupil nodes", RefineOptions(pupil_samples=24)),
            ("crop 24 px", RefineOptions(crop_px=24)),
            ("no uncertainties", RefineOptions(uncertainties=False)),
            ("fast (f32, 24 nodes, 3 planes, 40 it)", RefineOptions(dtype=torch.float32, pupil_samples=24,
                                                                    plane_offsets_um=(-0.4, 0.0, 0.4),
                                                                    max_iterations=40)),
        ]
    # one warm-up fit builds the cached simulators (not counted)
    trial(settings, args.seed - 1, args.aberration_rms, ["noisy"], options, args.start_noise, predictor)
    results: dict = {}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **k: x  # noqa: E731
    for t in tqdm(range(args.trials), desc="trials"):
        for key, val in trial(settings, args.seed + t, args.aberration_rms, starts, options, args.start_noise,
                              predictor).items():
            results.setdefault(key, []).append(val)
    print(f"\n{args.trials} trials, aberration {args.aberration_rms} rad RMS, modes {list(settings.model.modes)}, "
          f"{settings.camera.peak_photons:g} peak photons, {1000 * settings.camera.bead_diameter_um:g} nm bead, "
          f"torch threads 1")
    print(f"{'start':6s} {'fit':40s} {'start |err|':>12s} {'refined':>9s} {'ratio':>6s} {'time/fit':>9s} "
          f"{'CRB RMS':>8s} {'chi2/dof':>8s} {'valid':>6s}")
    for (kind, name), rows in results.items():
        e0 = float(np.median(np.concatenate([r[0] for r in rows])))
        e1 = float(np.median(np.concatenate([r[1] for r in rows])))
        dt = statistics.median(r[2] for r in rows)
        crb = statistics.median(r[3] for r in rows)
        chi2 = statistics.median(r[4] for r in rows)
        valid = sum(r[5] for r in rows)
        print(f"{kind:6s} {name:40s} {e0:12.4f} {e1:9.4f} {e1 / e0:6.3f} {dt:8.3f}s {crb:8.4f} {chi2:8.3f} "
              f"{valid:>3d}/{len(rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
