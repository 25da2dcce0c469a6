"""Stacks to reach a true residual: the CNN loop vs the classical modal sensorless-AO baselines.

    python benchmarks/loop_vs_baseline.py --trials 8 --seed 200 --json out/loop_vs_baseline.json

For each trial ``t`` (seed ``S + t``, hidden aberration of RMS uniform in ``--aberration-rms A:B``
over Noll 5..15, default camera noise, the real simulated devices of ``hardware.factory``) every
corrector starts from the same aberration: the CNN loop (``--predictor oracle``: the microscope's
hidden truth instead, loop logic only, NOT a model figure), the 2N+1 modal baseline and the N+1
modal baseline (``calibration.modal.ModalEstimator``, correlation with the ideal donut, tuned
biases, see ``docs/baseline.md``). Each runs ``AlignmentLoop.correct_once`` until the TRUE
residual (``AlignmentLoop.true_residual_rms``: the simulated microscope's hidden aberration plus
what the SLM shows, Noll >= 5) reaches the smallest level or its round budget is spent; the
stacks counted are ``AlignmentLoop.stacks_acquired`` (every acquisition, the probes included).
Reported: per trial and median, the stacks at which the true residual first fell to <= 0.5, 0.3,
0.15, 0.1, 0.05 rad, and the ratio baseline / CNN per level (inf: not reached).

``--small``: the 32-px test optics (a quick check of the baselines; the CNN needs the default
optics). ``--combine A.json B.json``: the tables of earlier runs together (e.g. two batches of
seeds). ``--characterise``: the metric study of ``docs/baseline.md`` instead (curvature per mode and bias
on the noise-free ideal donut, and the metrics' noise on repeated noisy stacks).
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

LEVELS = (0.5, 0.3, 0.15, 0.1, 0.05)


def run_trial(settings, corrector: str, seed: int, rms_spec: str, rounds: int, predictor_kind: str,
              cache: dict, modal_options: dict, checkpoint=None) -> list[tuple[int, float, int]]:
    """Rows (round, true residual rad, stacks acquired so far) of one corrector on one trial."""
    from autoalign.app.commands.align import trial_rms
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.hardware.factory import open_devices

    s2 = settings.replace(**{"simulation.seed": seed, "simulation.aberration_rms_rad": trial_rms(rms_spec, seed),
                             "hardware.backend": "simulated", "slm.backend": "simulated"})
    with open_devices(s2) as dev:
        if corrector == "model":
            if predictor_kind == "oracle":
                from tests.test_loop_support import OraclePredictor

                pred = OraclePredictor(dev.microscope)
            else:
                if "model" not in cache:
                    from autoalign.models.predictor import Predictor

                    cache["model"] = Predictor.load(checkpoint, settings=settings)
                pred = cache["model"]
            est = make_estimator("model", s2, pred)
        else:
            est = make_estimator("modal", s2, **modal_options[corrector])
        loop = AlignmentLoop(dev, s2, est, truth_metrics=False)
        loop.zero_slm()
        rows = [(0, float(loop.true_residual_rms()), 0)]
        for k in range(rounds):
            loop.correct_once(iteration=k)
            rows.append((k + 1, float(loop.true_residual_rms()), int(loop.stacks_acquired)))
            if rows[-1][1] <= min(LEVELS):  # only to save time: later rows cannot change stacks-to-level
                break
        return rows


def stacks_to(rows, level: float) -> float:
    """Stacks acquired when the true residual first fell to <= ``level`` (inf: never)."""
    hit = [s for _, r, s in rows if r <= level]
    return float(hit[0]) if hit else float("inf")


def characterise(settings, biases=(0.3, 0.6, 1.0), repeats: int = 8) -> dict:
    """Curvature (2 M0 - M+ - M-) / (2 b^2) and asymmetry (M+ - M-) / (2 b) per metric, mode and
    bias on the noise-free ideal donut; the metrics' standard deviation over ``repeats`` noisy
    stacks, unaberrated and with a 0.5 rad aberration."""
    from autoalign.calibration.modal import METRICS, SimulatedProbeHost, metric_value
    from autoalign.correction import Correction

    host = SimulatedProbeHost(settings, noise=False)
    ideal, cam = host.ideal_sections(), host.settings.camera

    def metrics(h, corr=None):
        m = h.probe(Correction(corr or {})) if corr is not None else h.acquire()
        return np.array([metric_value(k, m, ideal, cam) for k in METRICS])

    m0 = metrics(host, {})
    out: dict = {"metrics": list(METRICS), "curvature": {}, "noise": {}}
    print(f"curvature c = (2 M0 - M+ - M-) / (2 b^2) per mode (noise-free ideal donut); metrics {METRICS}")
    for j in settings.model.modes:
        row = {}
        for b in biases:
            mp, mm = metrics(host, {j: b}), metrics(host, {j: -b})
            row[b] = {"curvature": ((2 * m0 - mp - mm) / (2 * b * b)).tolist(), "slope": ((mp - mm) / (2 * b)).tolist()}
        out["curvature"][int(j)] = row
        print(f"  Noll {j:>2}: " + "  ".join(f"b={b}: " + " ".join(f"{v:+.3f}" for v in row[b]["curvature"])
                                            for b in biases), flush=True)
    for label, ab in (("unaberrated", {}), ("0.5 rad", {5: 0.25, 7: -0.25, 9: 0.2, 11: 0.2, 12: -0.15})):
        h = SimulatedProbeHost(settings, aberration=ab, noise=True, seed=3)
        vals = np.array([metrics(h) for _ in range(repeats)])
        out["noise"][label] = {"mean": vals.mean(0).tolist(), "std": vals.std(0, ddof=1).tolist()}
        print(f"  noise ({label}, {repeats} stacks): std " + " ".join(f"{v:.2e}" for v in vals.std(0, ddof=1)))
    return out


def ratio(baseline: float, cnn: float) -> float:
    """baseline / CNN stacks (inf: the baseline never got there; NaN: the CNN did not either)."""
    if not np.isfinite(cnn) or cnn <= 0:
        return float("nan")
    return baseline / cnn if np.isfinite(baseline) else float("inf")


def report(results: dict, correctors: list[str], predictor: str = "model") -> None:
    """Print per-trial and median stacks to each level, and the median ratios to the CNN."""
    label = {"model": "CNN" if predictor == "model" else "ORACLE", "2n+1": "2N+1", "n+1": "N+1"}
    for corrector in correctors:
        r = results[corrector]
        start = [rows[0][1] for rows in r["rows"]]
        final = [rows[-1][1] for rows in r["rows"]]
        print(f"\n{label[corrector]} ({r['wall_s']:.0f} s): start residual {min(start):.3f}..{max(start):.3f}, "
              f"final median {np.median(final):.3f} max {max(final):.3f} rad")
        trials = len(r["rows"])
        print(f"  {'level':>6} " + " ".join(f"{'t' + str(t):>5}" for t in range(trials)) + f" {'median':>7}")
        for lv in LEVELS:
            v = r["stacks_to"][str(lv)]
            print(f"  {lv:>6.2f} " + " ".join(f"{x:>5.0f}" for x in v) + f" {np.median(v):>7.0f}")
    if "model" not in correctors:
        return
    print(f"\nmedian stacks of the {label['model']} loop, and baseline / {label['model']} ratio of the medians:")
    print(f"  {'level':>6} " + " ".join(f"{label[c]:>8}" for c in correctors))
    for lv in LEVELS:
        med = {c: float(np.median(results[c]["stacks_to"][str(lv)])) for c in correctors}
        cells = [f"{med[c]:>4.0f}" if c == "model" else f"{ratio(med[c], med['model']):>7.1f}x" for c in correctors]
        print(f"  {lv:>6.2f} " + " ".join(f"{x:>8}" for x in cells))


def combine(paths: list[str]) -> tuple[dict, list[str]]:
    """Results of several runs' JSON files, trials concatenated in the order given."""
    merged: dict = {}
    correctors: list[str] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        for c, r in data["results"].items():
            if c not in merged:
                correctors.append(c)
                merged[c] = {"rows": [], "wall_s": 0.0, "stacks_to": {str(lv): [] for lv in LEVELS}}
            merged[c]["rows"] += r["rows"]
            merged[c]["wall_s"] += r["wall_s"]
            for lv in LEVELS:
                merged[c]["stacks_to"][str(lv)] += [float(v) for v in r["stacks_to"][str(lv)]]
    return merged, correctors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", default=None)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--seed", type=int, default=200)
    p.add_argument("--aberration-rms", default="0.7:1.0", metavar="A[:B]")
    p.add_argument("--rounds", type=int, default=5, help="CNN iterations per trial")
    p.add_argument("--baseline-rounds", type=int, default=12, help="modal rounds per trial")
    p.add_argument("--checkpoint", default=None, help="model checkpoint (default model.checkpoint)")
    p.add_argument("--predictor", choices=["model", "oracle"], default="model")
    p.add_argument("--bias", type=float, default=0.6, help="modal bias b, rad")
    p.add_argument("--max-step", type=float, default=1.0, help="modal step clip, units of b")
    p.add_argument("--step-gain", type=float, default=0.7)
    p.add_argument("--correctors", default="model,2n+1,n+1")
    p.add_argument("--small", action="store_true", help="32-px test optics (quick check; no CNN)")
    p.add_argument("--characterise", action="store_true", help="the metric study instead")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="print the tables of earlier runs' JSON files together")
    p.add_argument("--json", default=None, help="write the results here (e.g. out/loop_vs_baseline.json)")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from autoalign.settings import load_settings

    if args.combine:
        results, correctors = combine(args.combine)
        print(f"stacks to reach a true residual, {len(results[correctors[0]]['rows'])} trials from {args.combine}")
        report(results, correctors)
        return 0
    s = load_settings(args.settings)
    if args.small:
        from tests.test_loop_support import small_settings

        s = small_settings()
    if args.characterise:
        result = characterise(s)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=1))
        return 0
    correctors = [c.strip() for c in args.correctors.split(",") if c.strip()]
    if args.small and args.predictor == "model" and "model" in correctors:
        correctors.remove("model")
        print("--small: the shipped model needs the default 64-px optics: CNN left out (use --predictor oracle)")
    common = {"bias_rad": args.bias, "max_step": args.max_step, "step_gain": args.step_gain}
    modal_options = {"2n+1": dict(common, scheme="2n+1"), "n+1": dict(common, scheme="n+1")}
    from tqdm import tqdm

    cache: dict = {}
    results: dict = {}
    for corrector in correctors:
        t0 = time.perf_counter()
        rounds = args.rounds if corrector == "model" else args.baseline_rounds
        rows = [run_trial(s, corrector, args.seed + t, args.aberration_rms, rounds, args.predictor, cache,
                          modal_options, args.checkpoint)
                for t in tqdm(range(args.trials), desc=corrector, file=sys.stderr)]
        results[corrector] = {"rows": rows, "wall_s": time.perf_counter() - t0,
                              "stacks_to": {str(lv): [stacks_to(r, lv) for r in rows] for lv in LEVELS}}
    print(f"\nstacks to reach a true residual, {args.trials} trials (seeds {args.seed}..{args.seed + args.trials - 1}, "
          f"aberration {args.aberration_rms} rad RMS; inf = not reached)")
    report(results, correctors, args.predictor)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
