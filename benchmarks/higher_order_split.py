"""Where the residual lies after the closed loop: the true delivered-phase residual of each trial
projected on Noll 5..15, 16..22 and 23..36 (least squares on the pupil grid of the simulated
microscope's residual map), for the clean case and for extra content in Noll 16..22.

Issue 12's target: with 0.25 rad in Noll 16..22 the 5..15 residual stays within 1.3x the clean
case, and 16..22 are corrected to the same median.

    python benchmarks/higher_order_split.py [--trials 6] [--seed 1000] [--settings S] [--corrector model|refined]
"""
from __future__ import annotations

import argparse

import numpy as np

from autoalign.app.estimators import make_estimator
from autoalign.app.loop import AlignmentLoop
from autoalign.app.trials import HiddenErrors, trial_settings
from autoalign.hardware.factory import open_devices
from autoalign.settings import load_settings
from autoalign.simulation.phase import zernike_phase

GROUPS = {"5..15": range(5, 16), "16..22": range(16, 23), "23..36": range(23, 37)}
CASES = {"clean, 0.6 rad in 5..15": HiddenErrors(aberration_rms="0.6"),
         "+ 0.25 rad in 16..22": HiddenErrors(aberration_rms="0.6", higher_order_rms=0.25, higher_order_max_noll=22)}


def split(microscope, m: int = 192) -> dict[str, float]:
    """RMS (rad) of the residual map's projection on each group of modes, and of what is left."""
    res, inside = microscope.true_residual_map(m)
    modes = [j for g in GROUPS.values() for j in g]
    basis = np.stack([zernike_phase({j: 1.0}, m)[inside] for j in modes], axis=1)
    c, *_ = np.linalg.lstsq(basis, res[inside], rcond=None)
    out = {name: float(np.sqrt(sum(c[modes.index(j)] ** 2 for j in g))) for name, g in GROUPS.items()}
    out["total"] = float(np.sqrt(np.mean(res[inside] ** 2)))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--settings", default=None)
    p.add_argument("--corrector", choices=["model", "refined"], default=None,
                   help="default: the settings' loop.corrector")
    a = p.parse_args(argv)
    base = load_settings(a.settings)
    corrector = a.corrector or base.loop.corrector
    print(f"corrector {corrector}, {a.trials} trials from seed {a.seed}, up to {a.iterations} iterations")
    medians = {}
    for label, errors in CASES.items():
        rows = []
        for seed in range(a.seed, a.seed + a.trials):
            s = trial_settings(base, errors, seed)
            with open_devices(s) as dev:
                loop = AlignmentLoop(dev, s, make_estimator(corrector, s), truth_metrics=True)
                loop.zero_slm()
                loop.run(a.iterations)
                rows.append(split(dev.microscope))
        medians[label] = {k: float(np.median([r[k] for r in rows])) for k in rows[0]}
        print(f"{label:26s} " + "  ".join(f"{k} {v:.4f}" for k, v in medians[label].items()), flush=True)
    clean, extra = medians.values()
    print(f"5..15 residual with 16..22 content / clean: {extra['5..15'] / clean['5..15']:.2f}x (target <= 1.3x); "
          f"16..22 residual {extra['16..22']:.4f} vs the clean case's {clean['16..22']:.4f} rad (median)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
