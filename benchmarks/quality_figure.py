"""Which measured figure tells an aligned donut from an aberrated one (issue 24, item 1)?

    python benchmarks/quality_figure.py                      # 100 states, seed 2400, ~6 min on one core
    python benchmarks/quality_figure.py --states 40 --save /tmp/q.npz
    python benchmarks/quality_figure.py --load /tmp/q.npz    # re-score saved states, no simulation

Each state ``k`` draws a hidden aberration on the simulated microscope (``hardware.factory``,
default settings: 64 px, camera noise, 2000 peak photons, 80 nm bead): a random direction over
the model's modes (``model.modes``, Noll 5..22) with RMS uniform in ``--rms`` (0..1 rad), and a
fresh noise seed. With the vortex alone on the SLM ONE stack is acquired and analysed through the
loop's own path (``AlignmentLoop.acquire`` -> ``metrics``, the ``refined`` estimator's
``estimate``), so every figure is what the window would show. The TRUE residual is the simulated
microscope's delivered-phase residual (``true_residual_rms``, hidden from the loop).

Candidates (:func:`candidates`; each also says whether it would call the state "aligned" at its
threshold):

* ``null``: the measured null depth (``calibration.metrics.null_depth``: darkest patch near the
  centre, quadratic refinement); aligned at ``null <= floor + loop.floor_margin``;
* ``centre``: the intensity at the EXPECTED null position (the bead's centroid, sub-pixel, by
  the same 3 x 3 quadratic surface), over the peak; ``axis``: the mean intensity along the
  expected null line (the z axis through the centroid, +- the ring's depth of focus) in the
  xz and yz sections, over the peak (:func:`axis_null`); both aligned within the
  ideal donut's value + ``loop.floor_margin``;
* ``1-corr``: one minus the correlation of the three sections with the ideal donut for this bead
  (the loop's ``correlation_ideal``); aligned at ``corr >= loop.aligned_min_correlation``;
* ``shape``: the correlation corrected for the photon noise (the correlation a noise-free stack
  of the same donut would have) and read as an equivalent residual in rad RMS
  (:func:`calibration.quality.shape_residual`);
* ``fit``: the model fit's residual wavefront (the refined estimate's ``residual_rms``) when the
  fit explains the data (NaN otherwise), aligned at ``residual + 2 sigma <= ALIGNED_RAD`` with
  sigma its Cramér–Rao bound;
* ``score``: the loop's measured score ``null + 1 - corr``;
* ``quality``: the measured quality figure the loop and the window show
  (:func:`calibration.quality.quality_figure`: the fit's residual where the fit explains the
  data, else the shape's), aligned at :func:`calibration.quality.is_aligned_quality`.

Printed: per figure the Spearman rank correlation with the true residual over all states, the
states above 0.1 rad that it calls aligned, and the states below 0.03 rad that it calls aligned.
One torch thread.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: states with a true residual above this (rad RMS) must never read "aligned"
ABERRATED_RAD = 0.1
#: states with a true residual below this (rad RMS) should read "aligned"
ALIGNED_TRUE_RAD = 0.03


def open_bench(settings: Any = None, corrector: str = "refined", predictor: Any = None) -> Any:
    """An ``AlignmentLoop`` on fresh simulated devices (the vortex alone on the SLM; no truth in its
    metrics: :func:`measure_state` reads the true residual itself). Returns ``(loop, devices)``; close the devices when done."""
    from autoalign.app.estimators import make_estimator
    from autoalign.app.loop import AlignmentLoop
    from autoalign.hardware.factory import open_devices
    from autoalign.settings import load_settings

    s = load_settings(settings).replace(**{"hardware.backend": "simulated", "slm.backend": "simulated"})
    dev = open_devices(s)
    est = make_estimator(corrector, s, predictor)
    loop = AlignmentLoop(dev, s, est, truth_metrics=False)
    loop.zero_slm()
    return loop, dev


def measure_state(loop: Any, seed: int, rms_rad: float, delivered_truth: bool = True) -> dict[str, Any]:
    """One state: a hidden aberration of ``rms_rad`` (random direction over ``model.modes``, drawn
    from ``seed``), a fresh noise stream, one stack through the loop's path. Returns the loop's
    metrics, the estimate's figures, the sections and the truth: ``true_residual_rms`` is the
    delivered-phase residual (the 8-bit SLM included, ~0.5 s) or, with ``delivered_truth``
    False, the RMS of the hidden aberration plus what the SLM applies (Zernike coefficients)."""
    from autoalign.calibration import donut
    from autoalign.simulation.microscope import draw_aberration

    mic = loop.microscope
    modes = [int(m) for m in loop.settings.model.modes]
    seq = np.random.SeedSequence([24, int(seed)])
    ab_seq, noise_seq = seq.spawn(2)
    mic.set_aberration(draw_aberration(np.random.default_rng(ab_seq), modes, float(rms_rad), mic.n_modes))
    mic.noise_rng = np.random.default_rng(noise_seq)
    mic.bead_um = (0.0, 0.0, 0.0)
    mic.stage_xy_um, mic.focus_um = (0.0, 0.0), 0.0
    t0 = time.perf_counter()
    m = loop.acquire()
    est = loop.estimator.estimate(m) if m.valid else None
    metrics = loop.metrics(m, None if est is None else est.coefficients, est)
    metrics["true_residual_rms"] = float(donut.true_residual_rms(mic) if delivered_truth else mic.residual_rms())
    rec: dict[str, Any] = {
        "seed": int(seed), "rms_drawn": float(rms_rad), "valid": bool(m.valid),
        "sections": np.asarray(m.sections, dtype=np.float32), "background": float(m.background_photons),
        "centre_zyx": tuple(float(c) for c in (m.centre_zyx or (math.nan,) * 3)),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "estimate": None if est is None else {
            "valid": bool(est.valid), "residual_rms": float(est.residual_rms or math.nan),
            "extras": _plain_extras(est.extras), "uncertainty": dict(est.uncertainty or {})},
        "elapsed_s": time.perf_counter() - t0,
    }
    return rec


def _plain_extras(extras: dict[str, Any]) -> dict[str, Any]:
    keep = ("refine", "fit_skipped", "fit_refused", "network", "measured_null", "null_floor")
    return {k: extras[k] for k in keep if k in extras}


def measure_states(n: int, seed: int = 2400, rms: tuple[float, float] = (0.0, 1.0), settings: Any = None,
                   loop: Any = None, progress: bool = False) -> tuple[list[dict[str, Any]], Any]:
    """``n`` random states (RMS uniform in ``rms``, seeds ``seed + k``). Returns (records, loop)."""
    own = loop is None
    dev = None
    if own:
        loop, dev = open_bench(settings)
    rng = np.random.default_rng([24, int(seed)])
    lo, hi = rms
    draws = rng.uniform(lo, hi, size=int(n))
    out = []
    try:
        for k, a in enumerate(draws):
            rec = measure_state(loop, seed + k, float(a))
            out.append(rec)
            if progress:
                t = rec["metrics"].get("true_residual_rms", math.nan)
                print(f"state {k:3d}: drawn {a:.3f} rad, true {t:.3f} rad, {rec['elapsed_s']:.1f} s",
                      file=sys.stderr, flush=True)
    finally:
        if dev is not None:
            dev.close()
    return out, loop


# ---------------------------------------------------------------------------- candidates
def _quadratic_at(patch: np.ndarray, x: float, y: float) -> float:
    """The least-squares quadratic surface through a 3 x 3 patch, at (x, y) from its centre (px)."""
    c = np.arange(3) - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    a = np.stack([np.ones(9), xx.ravel(), yy.ravel(), xx.ravel() ** 2, yy.ravel() ** 2, (xx * yy).ravel()], axis=1)
    coef, *_ = np.linalg.lstsq(a, patch.ravel(), rcond=None)
    return float(coef @ np.array([1.0, x, y, x * x, y * y, x * y]))


def _peak(xy: np.ndarray) -> float:
    from scipy import ndimage

    return float(ndimage.uniform_filter(xy, 3, mode="nearest").max())


def centre_null(sections: np.ndarray, background: float, frac_yx: tuple[float, float]) -> float:
    """The xy intensity at the EXPECTED null position (the bead's centroid, ``frac_yx`` px from the
    re-centred section's centre pixel), by the 3 x 3 quadratic surface, over the peak (brightest
    3 x 3 mean)."""
    xy = np.asarray(sections[0], dtype=float) - background
    c = xy.shape[0] // 2
    peak = _peak(xy)
    if peak <= 0:
        return math.nan
    return max(_quadratic_at(xy[c - 1: c + 2, c - 1: c + 2], float(frac_yx[1]), float(frac_yx[0])), 0.0) / peak


def axis_null(sections: np.ndarray, background: float, settings: Any) -> float:
    """Mean intensity along the expected null line (the z axis through the centroid, 3 px wide,
    +- lambda n / NA^2 around the focus) in the xz and yz sections, over the xy peak."""
    s = np.asarray(sections, dtype=float) - background
    n = s.shape[1]
    c = n // 2
    peak = _peak(s[0])
    if peak <= 0:
        return math.nan
    o = settings.optics
    k = max(1, int(round(o.wavelength_um * o.immersion_index / o.numerical_aperture ** 2 / settings.stack.z_step_um)))
    zs = slice(max(c - k, 0), min(c + k + 1, n))
    line = np.concatenate([s[1][zs, c - 1: c + 2].mean(axis=1), s[2][zs, c - 1: c + 2].mean(axis=1)])
    return float(max(line.mean(), 0.0) / peak)


def candidates(rec: dict[str, Any], ref: dict[str, Any], settings: Any) -> dict[str, tuple[float, bool]]:
    """{figure: (value, aligned?)} for one measured state (``ref``: :func:`reference`)."""
    from autoalign.calibration import quality as q

    met = rec["metrics"]
    lp = settings.loop
    margin = float(lp.floor_margin)
    sections, bg = np.asarray(rec["sections"], dtype=float), rec["background"]
    centre = rec["centre_zyx"]
    frac = tuple(c - round(c) for c in centre)
    out: dict[str, tuple[float, bool]] = {}
    null = met.get("null_depth", math.nan)
    out["null"] = (null, bool(null <= ref["null_floor"] + margin))
    c = centre_null(sections, bg, (frac[1], frac[2]))
    out["centre"] = (c, bool(c <= ref["centre_floor"] + margin))
    a = axis_null(sections, bg, settings)
    out["axis"] = (a, bool(a <= ref["axis_floor"] + margin))
    corr = met.get("correlation_ideal", math.nan)
    out["1-corr"] = (1.0 - corr, bool(corr >= float(lp.aligned_min_correlation)))
    shape = q.shape_residual(sections, bg, ref["ideal_sections"], settings, centre)
    out["shape"] = (shape.value, q.is_aligned_quality(shape))
    fit = q.fit_residual(_estimate_like(rec))
    out["fit"] = (fit.value if fit is not None else math.nan,
                  q.is_aligned_quality(fit) if fit is not None else False)
    out["score"] = (met.get("score", math.nan), False)
    # what the loop recorded (AlignmentLoop.metrics); recomputed for states saved without it
    fig = q.Quality.from_metrics(met) or q.quality_figure(sections, bg, ref["ideal_sections"], settings,
                                                          _estimate_like(rec), centre)
    out["quality"] = (fig.value, q.is_aligned_quality(fig))
    return out


class _EstimateLike:
    def __init__(self, e: dict[str, Any]) -> None:
        self.valid = e["valid"]
        self.residual_rms = e["residual_rms"]
        self.extras = e["extras"]
        self.uncertainty = e["uncertainty"]


def _estimate_like(rec: dict[str, Any]) -> Any:
    return None if rec["estimate"] is None else _EstimateLike(rec["estimate"])


def reference(loop_or_settings: Any) -> dict[str, Any]:
    """The ideal donut of the settings and each candidate's value for it (the floors)."""
    from autoalign.calibration.donut import ideal_reference

    settings = getattr(loop_or_settings, "settings", loop_or_settings)
    ideal = ideal_reference(settings)
    sec = ideal["sections"]
    return {"ideal_sections": sec, "null_floor": float(ideal["null_depth"]),
            "centre_floor": centre_null(sec, 0.0, (0.0, 0.0)), "axis_floor": axis_null(sec, 0.0, settings)}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation of the finite pairs (ties: average ranks)."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan
    return float(stats.spearmanr(x[ok], y[ok]).statistic)


def score_table(records: list[dict[str, Any]], settings: Any, ref: dict[str, Any] | None = None
                ) -> dict[str, dict[str, float]]:
    """Per candidate: ``spearman`` (with the true residual, over the states where the figure is
    defined), ``defined`` (states), ``false_aligned`` (true > :data:`ABERRATED_RAD` called aligned),
    ``aberrated`` (how many such states), ``true_aligned`` (true < :data:`ALIGNED_TRUE_RAD` called
    aligned) and ``aligned_states``."""
    ref = ref if ref is not None else reference(settings)
    truth = np.array([r["metrics"].get("true_residual_rms", math.nan) for r in records])
    rows = [candidates(r, ref, settings) for r in records]
    table: dict[str, dict[str, float]] = {}
    for name in rows[0]:
        v = np.array([row[name][0] for row in rows])
        al = np.array([row[name][1] for row in rows])
        table[name] = {"spearman": spearman(v, truth), "defined": float(np.isfinite(v).sum()),
                       "false_aligned": float(np.sum(al & (truth > ABERRATED_RAD))),
                       "aberrated": float(np.sum(truth > ABERRATED_RAD)),
                       "true_aligned": float(np.sum(al & (truth < ALIGNED_TRUE_RAD))),
                       "aligned_states": float(np.sum(truth < ALIGNED_TRUE_RAD))}
    return table


def format_table(table: dict[str, dict[str, float]], n: int) -> str:
    lines = [f"{n} states; true residual = the simulated microscope's delivered-phase residual (rad RMS)",
             f"{'figure':>8s} {'Spearman':>9s} {'defined':>8s} {'aligned >0.1 rad':>17s} {'aligned <0.03 rad':>18s}"]
    for name, row in table.items():
        lines.append(f"{name:>8s} {row['spearman']:9.3f} {row['defined']:8.0f} "
                     f"{row['false_aligned']:8.0f} of {row['aberrated']:<5.0f} "
                     f"{row['true_aligned']:9.0f} of {row['aligned_states']:<5.0f}")
    return "\n".join(lines)


def save(path: str, records: list[dict[str, Any]]) -> None:
    import pickle

    with open(path, "wb") as f:
        pickle.dump(records, f)


def load(path: str) -> list[dict[str, Any]]:
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)  # noqa: S301 - the benchmark's own file


def main(argv: list[str] | None = None) -> int:
    import torch

    from autoalign.settings import load_settings

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default=None)
    ap.add_argument("--states", type=int, default=100)
    ap.add_argument("--seed", type=int, default=2400)
    ap.add_argument("--rms", default="0:1", metavar="A:B", help="hidden aberration RMS range, rad")
    ap.add_argument("--save", default=None, help="pickle the measured states here")
    ap.add_argument("--load", default=None, help="score states saved with --save (no simulation)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    settings = load_settings(args.settings)
    if args.load:
        records = load(args.load)
    else:
        lo, _, hi = args.rms.partition(":")
        records, _ = measure_states(args.states, args.seed, (float(lo), float(hi or lo)), settings,
                                    progress=not args.quiet)
        if args.save:
            save(args.save, records)
    print(format_table(score_table(records, settings), len(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
