"""Loop (CNN) vs the classical modal sensorless AO baseline on the same hidden aberrations.

Prints, per iteration, the true residual RMS (median and 95th percentile over trials) and the
number of stacks acquired, for both correctors, and the stacks each needs to reach a residual.

    python benchmarks/loop_vs_baseline.py --trials 10 --iterations 3 --baseline-iterations 4 --seed 100

Both run on the real simulated devices of ``hardware.factory`` (the simulated microscope with
camera noise), trial ``t`` with seed ``S + t`` and the same hidden aberration for both correctors
(RMS ``--aberration-rms A[:B]``, uniform in [A, B] per trial). ``--predictor oracle`` replaces the
CNN by the microscope's hidden truth (loop logic only: NOT a model figure).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(settings, corrector, iterations, seed, rms, predictor_kind, predictor_cache, bias, checkpoint=None):
    from autoalign.app.commands.align import trial_rms
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.hardware.factory import open_devices

    s2 = settings.replace(**{"simulation.seed": seed, "simulation.aberration_rms_rad": trial_rms(rms, seed),
                             "hardware.backend": "simulated", "slm.backend": "simulated"})
    with open_devices(s2) as dev:
        pred = None
        if corrector == "model":
            if predictor_kind == "oracle":
                from tests.test_loop_support import OraclePredictor

                pred = OraclePredictor(dev.microscope)
            else:
                if "model" not in predictor_cache:
                    from autoalign.models.predictor import Predictor

                    predictor_cache["model"] = Predictor.load(checkpoint, settings=settings)
                pred = predictor_cache["model"]
        options = {"bias_rad": bias} if corrector == "modal" else {}
        loop = AlignmentLoop(dev, s2, make_estimator(corrector, s2, pred, **options), truth_metrics=False)
        loop.zero_slm()
        rows = [(0, loop.true_residual_rms(), 0)]
        for k in range(iterations):
            loop.correct_once(iteration=k)
            rows.append((k + 1, loop.true_residual_rms(), loop.stacks_acquired))
        return rows


def stacks_to_reach(all_rows, level):
    """Median over trials of the stacks acquired when the residual first fell below ``level``."""
    out = []
    for rows in all_rows:
        hit = [s for _, r, s in rows if r is not None and r <= level]
        out.append(hit[0] if hit else np.inf)
    return float(np.median(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default=None)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--baseline-iterations", type=int, default=4)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--aberration-rms", default="0.7:1.0", metavar="A[:B]")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default model.checkpoint)")
    p.add_argument("--bias", type=float, default=0.5, help="modal bias, rad")
    p.add_argument("--predictor", choices=["model", "oracle"], default="model")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    from autoalign.settings import load_settings

    s = load_settings(args.settings)
    cache: dict = {}
    results = {}
    for corrector, iters in (("model", args.iterations), ("modal", args.baseline_iterations)):
        t0 = time.perf_counter()
        rows = [one(s, corrector, iters, args.seed + t, args.aberration_rms, args.predictor, cache, args.bias,
                    args.checkpoint) for t in range(args.trials)]
        results[corrector] = {"rows": rows, "wall_s": time.perf_counter() - t0}
        label = "CNN loop" if args.predictor == "model" else "ORACLE loop (not a model figure)"
        print(f"\n{label if corrector == 'model' else 'modal baseline (2N+1 stacks per iteration)'}: "
              f"{args.trials} trials, {results[corrector]['wall_s']:.0f} s")
        print(f"{'iter':>4} {'stacks':>7} {'residual median':>16} {'residual p95':>13}")
        for k in range(iters + 1):
            res = [r[k][1] for r in rows]
            st = np.median([r[k][2] for r in rows])
            print(f"{k:>4} {st:>7.0f} {np.median(res):>16.4f} {np.percentile(res, 95):>13.4f}")
    print("\nstacks to reach a residual (median over trials; inf = not reached):")
    for level in (0.5, 0.3, 0.15, 0.1, 0.05):
        a = stacks_to_reach(results["model"]["rows"], level)
        b = stacks_to_reach(results["modal"]["rows"], level)
        ratio = b / a if np.isfinite(a) and np.isfinite(b) and a > 0 else float("nan")
        print(f"  <= {level:.2f} rad: loop {a:>5} stacks, baseline {b:>5} stacks, ratio {ratio:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
