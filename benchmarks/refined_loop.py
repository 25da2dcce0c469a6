"""Closed loop with the ``refined`` estimator (CNN + model-based fit) vs the CNN alone (``model``).

    python benchmarks/refined_loop.py --trials 4 --iterations 3 --seed 100 --aberration-rms 0.7:1.0
    python benchmarks/refined_loop.py --trials 3 --fault wrong_hand_fraction=0.02 --fault wrong_hand_phase_rad=0.8

Each trial ``t`` (seed ``S + t``, hidden aberration RMS uniform in [A, B], the same for both
estimators) runs the current ``app.loop.AlignmentLoop`` on the simulated devices of
``hardware.factory`` (default settings: 64 px, camera noise, 80 nm bead) for ``--iterations``
calls of ``correct_once``, from the vortex alone. After every iteration the HONEST metrics of the
simulated microscope are read (independent of the loop): ``true_residual_rms()`` (RMS of the
phase the SLM delivers + the hidden aberration, Noll >= 5 removed only of 1-4) and
``true_null_depth()`` (exact focal null, no bead); plus the wall time of the iteration and its
decision. Prints one row per trial and iteration, then the median over trials per iteration.
One torch thread.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(settings, kind, iterations, seed, rms, predictor, faults):
    from autoalign.app.commands.align import trial_rms
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.hardware.factory import open_devices

    s2 = settings.replace(**{"simulation.seed": seed, "simulation.aberration_rms_rad": trial_rms(rms, seed),
                             "hardware.backend": "simulated", "slm.backend": "simulated"})
    rows = []
    with open_devices(s2, **faults) as dev:
        est = make_estimator(kind, s2, predictor)
        loop = AlignmentLoop(dev, s2, est, truth_metrics=False)
        loop.zero_slm()
        mic = dev.microscope
        rows.append(dict(it=0, residual=mic.true_residual_rms(), null=mic.true_null_depth(), dt=0.0,
                         decision="start", valid=None, extra=""))
        for k in range(iterations):
            t0 = time.perf_counter()
            r = loop.correct_once(iteration=k)
            dt = time.perf_counter() - t0
            e = r.estimate
            extra = ""
            if e is not None and e.extras.get("refine"):
                fit = e.extras["refine"]
                dis = max((abs(v) for v in e.extras.get("disagreement", {}).values()), default=0.0)
                names = ",".join(d["name"] for d in e.extras.get("diagnoses", [])) or "-"
                extra = (f"chi2 {fit['chi2_per_dof']:.2f} p {fit['structure_p']:.0e} "
                         f"f {fit['wrong_hand_fraction']:.4f} fit {fit['elapsed_s']:.2f}s "
                         f"max|fit-net| {dis:.3f} diag {names}")
            rows.append(dict(it=k + 1, residual=mic.true_residual_rms(), null=mic.true_null_depth(), dt=dt,
                             decision=r.decision[:40], valid=None if e is None else e.valid, extra=extra))
    return rows


def main(argv=None) -> int:
    import torch

    from autoalign.settings import load_settings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=None)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--seed", type=int, default=100)
    ap.add_argument("--aberration-rms", default="0.7:1.0", metavar="A[:B]")
    ap.add_argument("--estimators", default="model,refined")
    ap.add_argument("--fault", action="append", default=[], metavar="KEY=VALUE",
                    help="hidden fault of the simulated microscope (SimulatedMicroscope keyword), repeatable")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = load_settings(args.settings)
    faults = {}
    for f in args.fault:
        key, _, value = f.partition("=")
        faults[key] = float(value)
    from autoalign.models.predictor import Predictor

    predictor = Predictor.load(settings=settings)
    kinds = args.estimators.split(",")
    results: dict[str, list[list[dict]]] = {k: [] for k in kinds}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **k: x  # noqa: E731
    for t in tqdm(range(args.trials), desc="trials"):
        for kind in kinds:
            rows = one(settings, kind, args.iterations, args.seed + t, args.aberration_rms, predictor, faults)
            results[kind].append(rows)
            for r in rows:
                print(f"trial {t} {kind:8s} it {r['it']} true residual {r['residual']:.4f} rad  true null "
                      f"{r['null']:.2e}  {r['dt']:5.2f} s  valid {r['valid']}  {r['decision']}  {r['extra']}",
                      flush=True)
    print(f"\n{args.trials} trials, aberration {args.aberration_rms} rad, faults {faults or 'none'}; "
          "median over trials (true residual rad / true null / s per iteration)")
    print(f"{'it':>3s} " + " ".join(f"{k + ' residual':>18s} {k + ' null':>14s} {k + ' s/it':>12s}" for k in kinds))
    for i in range(args.iterations + 1):
        cells = []
        for kind in kinds:
            rr = [trial[i] for trial in results[kind] if len(trial) > i]
            cells.append(f"{statistics.median(r['residual'] for r in rr):18.4f} "
                         f"{statistics.median(r['null'] for r in rr):14.2e} "
                         f"{statistics.median(r['dt'] for r in rr):12.2f}")
        print(f"{i:3d} " + " ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
