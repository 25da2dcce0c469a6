"""``autoalign benchmark``: simulator speed and accuracy against brute-force quadrature of the
Debye integral in the same run, and (when a checkpoint exists) CNN inference time."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from autoalign.app.cli import add_settings_argument
from autoalign.settings import load_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("benchmark", help="simulator and inference speed / accuracy", description=__doc__)
    add_settings_argument(p)
    from autoalign.app.cli import positive_int

    p.add_argument("--batch", type=positive_int, default=256, help="ortho-section triplets per batch, >= 1 (default 256)")
    p.add_argument("--repeats", type=positive_int, default=3, help="timing repeats (the best is kept), >= 1 (default 3)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads, >= 1 (default: all)")
    p.add_argument("--device", default="cpu", help="torch device of the simulator (cpu, cuda; default cpu)")
    p.add_argument("--skip-model", action="store_true", help="do not time the CNN")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def _best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def simulator_benchmark(settings, batch: int = 256, repeats: int = 3, seed: int = 0, device: str = "cpu") -> dict:
    """Triplets/s and stacks/s of the matrix-Fourier simulator on ``device`` (results copied back
    to host memory, as a user gets them); brute-force quadrature speed (numpy, CPU) on a sample of
    points and the maximum relative error of the fast result against it."""
    from autoalign.simulation import PSFSimulator, debye_quadrature
    from autoalign.simulation.zernike import rms

    sim = PSFSimulator.from_settings(settings, device=device)
    rng = np.random.default_rng(seed)
    coeffs = np.zeros((batch, 15))
    coeffs[:, 4:15] = rng.uniform(-0.5, 0.5, (batch, 11))
    coeffs *= np.minimum(1.0, 1.0 / np.maximum(rms(coeffs), 1e-9))[:, None]  # <= 1 rad RMS
    sim.orthosections_batch(coeffs[:8])  # warm-up
    t_batch = _best_time(lambda: sim.orthosections_batch(coeffs, chunk=batch), repeats)
    t_stack = _best_time(lambda: sim.stack(coeffs[0]), repeats)

    # brute force: the three sections of a few triplets on a sub-grid, timed per point
    n = sim.n_px
    sub = slice(None, None, 4)
    coords, z = sim.coords_um, sim.z_um
    x, y = np.meshgrid(coords[sub], coords[sub])
    xz, zz = np.meshgrid(coords[sub], z[sub])
    errors: list[float] = []  # a NaN anywhere stays NaN (max() would silently drop it)
    points = 0
    t0 = time.perf_counter()
    for k in range(3):
        fast = sim.orthosections(coeffs[k])
        for s, (px, py, pz) in enumerate([(x, y, 0 * x), (xz, 0 * xz, zz), (0 * xz, xz, zz)]):
            ref = (np.abs(debye_quadrature(sim.optics, px, py, pz, coeffs[k])) ** 2).sum(0) / sim._peak
            errors.append(float(np.abs(fast[s][sub, sub] - ref).max() / ref.max()))
            points += px.size
    t_ref_point = (time.perf_counter() - t0) / points
    worst = float(np.max(errors))
    sample = sim.orthosections_batch(coeffs[:16])
    # on an accelerator: the same batch on the CPU, element by element (float32 both)
    cpu_difference = None
    if sim.device.type != "cpu":
        on_cpu = PSFSimulator.from_settings(settings, device="cpu").orthosections_batch(coeffs[:16])
        cpu_difference = float(np.max(np.abs(sample - on_cpu)) / np.max(np.abs(on_cpu)))
    ref_triplet_s = t_ref_point * 3 * n * n
    ref_stack_s = t_ref_point * len(z) * n * n
    return {
        "section_px": n,
        "planes": len(z),
        "pupil_samples": sim.pupil_samples,
        "batch": batch,
        "device": str(sim.device) + (f" ({torch.cuda.get_device_name(sim.device)})" if sim.device.type == "cuda" else ""),
        "threads": torch.get_num_threads(),
        "triplets_per_s": batch / t_batch,
        "stacks_per_s": 1.0 / t_stack,
        "bruteforce_triplets_per_s": 1.0 / ref_triplet_s,
        "bruteforce_stacks_per_s": 1.0 / ref_stack_s,
        "speedup_triplets": (batch / t_batch) * ref_triplet_s,
        "speedup_stacks": ref_stack_s / t_stack,
        "max_relative_error": worst,
        "non_finite_outputs": int(np.count_nonzero(~np.isfinite(sample))),
        "max_relative_difference_to_cpu": cpu_difference,
    }


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = load_settings(args.settings)
    result = {"simulator": simulator_benchmark(settings, args.batch, args.repeats, device=args.device)}
    if not args.skip_model:
        from autoalign.models.benchmark import inference_benchmark
        from autoalign.models.predictor import resolve_checkpoint_path

        ckpt = resolve_checkpoint_path(None, settings)
        if ckpt.exists():
            result["inference"] = inference_benchmark(str(ckpt), settings)
        else:
            result["inference"] = None
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = result["simulator"]
    print(f"Simulator: {s['section_px']}x{s['section_px']} px sections, {s['planes']} planes, "
          f"{s['pupil_samples']} pupil samples, batch {s['batch']}, {s['device']}, {s['threads']} torch threads")
    print(f"  {'':28s}{'fast':>12s}{'brute force':>14s}{'ratio':>10s}")
    print(f"  {'ortho-section triplets / s':28s}{s['triplets_per_s']:12.1f}"
          f"{s['bruteforce_triplets_per_s']:14.4f}{s['speedup_triplets']:10.0f}x")
    print(f"  {'64-plane stacks / s':28s}{s['stacks_per_s']:12.2f}"
          f"{s['bruteforce_stacks_per_s']:14.5f}{s['speedup_stacks']:10.0f}x")
    print(f"  max relative error vs brute-force quadrature: {s['max_relative_error']:.2e}"
          + (f"; non-finite outputs: {s['non_finite_outputs']}" if s["non_finite_outputs"] else ""))
    if s["max_relative_difference_to_cpu"] is not None:
        print(f"  max relative difference to the same batch on the CPU: {s['max_relative_difference_to_cpu']:.2e}")
    inf = result.get("inference")
    if inf:
        print("Inference:")
        for k, v in inf.items():
            print(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
    elif not args.skip_model:
        print("Inference: no checkpoint found (train one or check model.checkpoint)")
    return 0
