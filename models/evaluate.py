"""Evaluation (``autoalign evaluate``): per-mode RMSE and R^2, per-sample RMS error, and the
report's check, the Pearson correlation between each (noisy) input and the PSF re-simulated from
the predicted coefficients (with the sample's own centring tip/tilt/defocus, mask offset and bead
blur), next to the same correlation for the true coefficients (the noise-limited ceiling).

Inputs get fresh camera noise drawn from ``seed`` (the test split is noise-free on disk), i.e. the
same noise model as in training.

Targets (:data:`TARGETS`): mean per-mode RMSE <= 0.05 rad, worst mode <= 0.08 rad, mask-offset
RMSE <= 0.01 pupil radii. A target is only declared met or missed on at least
:data:`MIN_SAMPLES_FOR_TARGET` samples; on fewer the verdict is "not judged".

A model is evaluated on the outputs it shares with the data set (by label name: ``Z5``...,
``offset_x``, ``offset_y``), so a Noll 5..22 model can be compared with a 5..15 one on 5..15 data.

:func:`robustness` renders fresh samples with one domain-randomised factor at a time held at the
edge of its range (the others nominal) and reports per-mode and offset RMSE for each.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoalign.models.data import NoiseTransform, PSFDataset
from autoalign.models.predictor import check_lock, model_from_checkpoint, read_checkpoint
from autoalign.simulation.dataset import dataset_settings

TARGETS = {"rmse_mean_rad": 0.05, "rmse_max_rad": 0.08, "offset_rmse": 0.01}
MIN_SAMPLES_FOR_TARGET = 500


def verdict(rmse_mean: float, rmse_max: float, offset_rmse: float | None, samples: int) -> dict[str, Any]:
    """Target verdicts: ``True``/``False`` per target, or ``None`` ("not judged") below
    :data:`MIN_SAMPLES_FOR_TARGET` samples."""
    judged = samples >= MIN_SAMPLES_FOR_TARGET
    out: dict[str, Any] = {
        "rmse_mean": bool(rmse_mean <= TARGETS["rmse_mean_rad"]) if judged else None,
        "rmse_max": bool(rmse_max <= TARGETS["rmse_max_rad"]) if judged else None,
        "offset": (bool(offset_rmse <= TARGETS["offset_rmse"]) if judged else None)
        if offset_rmse is not None else None,
        "judged": judged, "samples": int(samples), "min_samples": MIN_SAMPLES_FOR_TARGET,
    }
    checks = [v for k, v in out.items() if k in ("rmse_mean", "rmse_max", "offset") and v is not None]
    out["all_met"] = bool(all(checks)) if judged else None
    return out


def verdict_text(v: bool | None) -> str:
    return f"not judged (< {MIN_SAMPLES_FOR_TARGET} samples)" if v is None else ("met" if v else "MISSED")


def output_names(ckpt: dict[str, Any]) -> list[str]:
    """Label names of a checkpoint's outputs: ``Z<noll>``... then ``offset_x``, ``offset_y``."""
    names = [f"Z{int(m)}" for m in ckpt["modes"]]
    return names + (["offset_x", "offset_y"] if ckpt["predict_offset"] else [])


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    d = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else float("nan")


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", settings: Any = None,
             force: bool = False, seed: int = 0, limit: int | None = None, resimulate: int = 200,
             batch: int = 256, noise: bool = True, max_true_rms: float | None = None) -> dict[str, Any]:
    """Metrics of ``checkpoint`` on a split of ``data``. ``max_true_rms``: only the samples whose
    true aberration RMS over the evaluated modes is at most this (radians; e.g. the range where
    the loop's later iterations work). ``resimulate``: number of samples for the
    correlation check (rendering costs ~10 ms each). Returns a JSON-ready dict plus the arrays
    ``_true`` and ``_pred`` (dropped by :func:`to_json`)."""
    data_settings = dataset_settings(data)
    ckpt = read_checkpoint(checkpoint)
    # the optics must match; the mode lists may differ (evaluated on the shared outputs)
    base = settings if settings is not None else data_settings
    modes_of_model = [int(m) for m in ckpt["modes"]]
    check_lock(ckpt, base.replace(**{"model.modes": modes_of_model, "dataset.modes": modes_of_model}),
               checkpoint, force)
    model = model_from_checkpoint(ckpt, checkpoint)
    binning = int(ckpt["binning"])
    transform = NoiseTransform.from_settings(data_settings, binning) if noise else None
    ds = PSFDataset(data, split, transform, binning, limit=limit)
    if len(ds) == 0:
        raise ValueError(f"{data}: split '{split}' is empty")
    model_names = output_names(ckpt)
    data_names = list(ds.info["label_names"])
    names = [n for n in model_names if n in data_names]
    if not any(n.startswith("Z") for n in names):
        raise ValueError(f"{data}: no mode in common with the model (data {data_names}, model {model_names})")
    out_cols = [model_names.index(n) for n in names]
    lab_cols = [data_names.index(n) for n in names]
    modes = [int(n[1:]) for n in names if n.startswith("Z")]
    J = len(modes)
    n_out = len(names)
    g = torch.Generator().manual_seed(seed)
    preds, trues = [], []
    with torch.no_grad():
        for x, y in ds.batches(batch, shuffle=False, generator=g):
            preds.append(model(x).numpy()[:, out_cols])
            trues.append(y.numpy()[:, lab_cols])
    pred = np.concatenate(preds).astype(np.float64)
    true = np.concatenate(trues).astype(np.float64)
    if max_true_rms is not None:
        keep = np.sqrt((true[:, :J] ** 2).sum(1)) <= max_true_rms
        pred, true = pred[keep], true[keep]
        resimulate = 0  # the re-simulation check needs the unfiltered sample order
        if len(true) == 0:
            raise ValueError(f"{data}: no sample with a true RMS <= {max_true_rms} rad")
    err = pred - true
    rmse = np.sqrt((err**2).mean(0))
    var = true.var(0)
    r2 = 1 - (err**2).mean(0) / np.where(var > 0, var, np.nan)
    sample_rms = np.sqrt((err[:, :J] ** 2).sum(1))  # wavefront RMS of the residual (orthonormal)
    true_rms = np.sqrt((true[:, :J] ** 2).sum(1))
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "data": str(data), "split": split, "samples": int(len(true)),
        "max_true_rms": max_true_rms,
        "arch": ckpt["arch"], "noise": bool(noise), "seed": int(seed),
        "per_mode": {n: {"rmse": float(a), "r2": float(b)} for n, a, b in zip(names, rmse, r2)},
        "rmse_mean": float(rmse[:J].mean()), "rmse_max": float(rmse[:J].max()),
        "offset_rmse": float(np.sqrt((err[:, J:] ** 2).mean())) if n_out > J else None,
        "modes_evaluated": modes, "outputs_not_in_data": [n for n in model_names if n not in names],
        "targets": TARGETS,
        "sample_rms_error": {"median": float(np.median(sample_rms)), "mean": float(sample_rms.mean()),
                             "p95": float(np.percentile(sample_rms, 95)), "max": float(sample_rms.max())},
        "true_rms": {"median": float(np.median(true_rms)), "max": float(true_rms.max())},
    }
    result["verdict"] = verdict(result["rmse_mean"], result["rmse_max"], result["offset_rmse"], len(true))
    result["meets_target"] = result["verdict"]["all_met"]
    # per-sample error binned by the true aberration RMS (how accurate near convergence)
    bins = [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5]
    result["sample_rms_error_by_true_rms"] = [
        {"true_rms": [lo, hi], "samples": int(sel.sum()),
         "median": float(np.median(sample_rms[sel])) if sel.any() else None,
         "p95": float(np.percentile(sample_rms[sel], 95)) if sel.any() else None}
        for lo, hi in zip(bins[:-1], bins[1:]) for sel in [(true_rms >= lo) & (true_rms < hi)]
    ]
    if resimulate > 0 and ds.info["modes"] == modes:
        result["correlation"] = _correlations(ds, data_settings, pred, true, modes, ckpt, resimulate, seed)
    result["_true"], result["_pred"], result["_names"] = true, pred, names
    return result


def _correlations(ds: PSFDataset, settings: Any, pred: np.ndarray, true: np.ndarray, modes: list[int],
                  ckpt: dict[str, Any], count: int, seed: int) -> dict[str, Any]:
    from autoalign.simulation.dataset import _blur, _simulator

    with open_split(ds) as (img, peak, bg):
        n = min(count, len(ds))
        sim = _simulator(settings)
        rng = np.random.default_rng(seed)
        J = len(modes)
        coeffs = {}
        for name, source in (("predicted", pred), ("true", true)):
            c = np.zeros((n, sim.n_modes))
            c[:, 1:4] = ds.meta["centring_rad"][:n]
            for k, m in enumerate(modes):
                c[:, m - 1] = source[:n, k]
            coeffs[name] = c
        offsets = true[:n, J:J + 2] if true.shape[1] >= J + 2 else None
        if offsets is None and ds.has_offset:
            offsets = ds.labels[:n, J:J + 2].numpy()
        cam = settings.camera
        from autoalign.models.data import add_noise_numpy

        noisy = add_noise_numpy(img[:n], peak[:n], bg[:n], cam.quantum_efficiency, cam.read_noise_electrons, rng)
        noisy -= bg[:n, None, None, None]
        out = {}
        for name, c in coeffs.items():
            psf = sim.orthosections_batch(c, offsets, chunk=64)
            r = [_pearson(noisy[i], _blur(psf[i], ds.meta["bead_diameter_um"][i], cam.pixel_size_um))
                 for i in range(n)]
            out[name] = {"median": float(np.median(r)), "p5": float(np.percentile(r, 5)),
                         "mean": float(np.mean(r))}
        out["samples"] = int(n)
        return out


class open_split:
    """Context manager giving (images, peak, background) of a data set's split as numpy arrays
    (noise-free intensities, full resolution)."""

    def __init__(self, ds: PSFDataset) -> None:
        self.ds = ds

    def __enter__(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from autoalign.simulation.dataset import open_dataset

        self.f = open_dataset(self.ds.path)
        s = self.ds.split
        n = len(self.ds)
        return (self.f[f"{s}_img"][:n].astype(np.float64), self.ds.peak.numpy().astype(np.float64),
                self.ds.background.numpy().astype(np.float64))

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def to_json(result: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in result.items() if not k.startswith("_")}, indent=2)


def plot_scatter(result: dict[str, Any], png_path: str | Path, max_points: int = 2000) -> Path:
    """Predicted vs true scatter per output, in one PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true, pred, names = result["_true"], result["_pred"], result["_names"]
    k = true.shape[1]
    cols = min(4, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.3 * rows), dpi=80, squeeze=False)
    sel = slice(0, max_points)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= k:
            ax.axis("off")
            continue
        lim = float(max(np.abs(true[:, i]).max(), 1e-3)) * 1.05
        ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=0.8)
        ax.scatter(true[sel, i], pred[sel, i], s=1.5, alpha=0.4, rasterized=True)
        m = result["per_mode"][names[i]]
        ax.set_title(f"{names[i]}: RMSE {m['rmse']:.3f}", fontsize=8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.tick_params(labelsize=6)
    fig.supxlabel("true (rad)", fontsize=8)
    fig.supylabel("predicted (rad)", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


def plot_error_hist(result: dict[str, Any], png_path: str | Path) -> Path:
    """Histogram of the per-sample residual RMS error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true, pred = result["_true"], result["_pred"]
    J = len([n for n in result["_names"] if n.startswith("Z")])
    e = np.sqrt(((pred - true)[:, :J] ** 2).sum(1))
    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.hist(e, bins=60)
    ax.set_xlabel("per-sample residual RMS (rad)")
    ax.set_ylabel("samples")
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)


# ------------------------------------------------------------------------------------ robustness
# (name, dataset key, edge values): one factor at a time at the edge of its training range
ROBUSTNESS_FACTORS: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("NA", "na_scale_range", (0.98, 1.02)),
    ("wavelength", "wavelength_scale_range", (0.99, 1.01)),
    ("pixel size", "pixel_scale_range", (0.95, 1.05)),
    ("wrong-hand polarisation", "polarisation_impurity_range", (0.03,)),
    ("SLM stroke", "slm_stroke_range", (0.85, 1.05)),
    ("bead diameter (um)", "bead_diameter_range_um", (0.04, 0.1)),
    ("background (photons/px)", "background_photons_range", (20.0,)),
    ("peak photons", "peak_photons_range", (300.0,)),
    ("decentring (px)", "decentre_px", (0.5,)),
)
# the nominal instrument: every randomised factor at its nominal value
NOMINAL = {"na_scale_range": [1.0, 1.0], "wavelength_scale_range": [1.0, 1.0], "pixel_scale_range": [1.0, 1.0],
           "polarisation_impurity_range": [0.0, 0.0], "slm_stroke_range": [1.0, 1.0], "decentre_px": 0.0}


def robustness(checkpoint: str | Path, settings: Any = None, count: int = 500, seed: int = 7,
               force: bool = False, progress: bool = True, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Per-mode and offset RMSE (noisy inputs) on ``count`` fresh samples per row: the nominal
    instrument (NA, wavelength, pixel size at nominal, no wrong-hand light, SLM stroke 1, no
    decentring; bead, background and photons drawn from their ranges as in training), then one
    factor of :data:`ROBUSTNESS_FACTORS` at a time at each edge of its range. Aberrations,
    offsets and unlabelled content are drawn as in training (``settings.dataset``).
    ``cache_dir``: keep each row's rendered samples there (``robustness_<row>.npz``, reused when
    the settings, seed and count match), so that several checkpoints compare on the same samples
    without re-rendering."""
    from tqdm import tqdm

    from autoalign.settings import load_settings
    from autoalign.simulation.noise import NoiseTransform

    settings = load_settings(settings)
    ckpt = read_checkpoint(checkpoint)
    modes_of_model = [int(m) for m in ckpt["modes"]]
    check_lock(ckpt, settings.replace(**{"model.modes": modes_of_model}), checkpoint, force)
    model = model_from_checkpoint(ckpt, checkpoint)
    binning = int(ckpt["binning"])
    names = output_names(ckpt)
    J = len(ckpt["modes"])
    rows = [("nominal", None, None)] + [(name, key, v) for name, key, edges in ROBUSTNESS_FACTORS for v in edges]
    base = {f"dataset.{k}": v for k, v in NOMINAL.items()}
    out_rows = []
    transform = NoiseTransform.from_settings(settings, binning)
    from autoalign.models.data import bin_sections, prepare_sections

    bar = tqdm(total=len(rows) * count, unit="sample", desc="robustness", disable=not progress)
    for r, (name, key, value) in enumerate(rows):
        over = dict(base)
        if key is not None:
            over[f"dataset.{key}"] = value if key == "decentre_px" else [value, value]
        s = settings.replace(**over)
        preds, trues = [], []
        for k, d in _robustness_chunks(s, seed, r, count, cache_dir, bar):
            g = torch.Generator().manual_seed(seed + 31 * r + k)
            x = bin_sections(torch.from_numpy(d["img"]), binning)
            photons = transform(x, torch.from_numpy(d["peak_photons"]), torch.from_numpy(d["background_photons"]), g)
            with torch.no_grad():
                preds.append(model(prepare_sections(photons, 1)).numpy())
            trues.append(d["labels"])
        pred = np.concatenate(preds).astype(np.float64)
        true = np.concatenate(trues).astype(np.float64)
        data_names = [f"Z{m}" for m in s.dataset.modes] + (["offset_x", "offset_y"] if s.dataset.max_offset > 0 else [])
        cols = [(i, data_names.index(nm)) for i, nm in enumerate(names) if nm in data_names]
        err = np.stack([pred[:, i] - true[:, j] for i, j in cols], axis=1)
        rmse = np.sqrt((err**2).mean(0))
        shared = [names[i] for i, _ in cols]
        n_modes = sum(1 for nm in shared if nm.startswith("Z"))
        off = float(np.sqrt((err[:, n_modes:] ** 2).mean())) if len(shared) > n_modes else None
        out_rows.append({
            "factor": name, "value": value, "samples": int(len(true)),
            "rmse_mean": float(rmse[:n_modes].mean()), "rmse_max": float(rmse[:n_modes].max()),
            "worst_mode": shared[int(np.argmax(rmse[:n_modes]))], "offset_rmse": off,
            "per_output": {nm: float(v) for nm, v in zip(shared, rmse)},
            "verdict": verdict(float(rmse[:n_modes].mean()), float(rmse[:n_modes].max()), off, len(true)),
        })
    bar.close()
    return {"checkpoint": str(checkpoint), "count": int(count), "seed": int(seed), "rows": out_rows,
            "targets": TARGETS, "modes": [int(m) for m in ckpt["modes"]][:J]}


def _robustness_chunks(s: Any, seed: int, row: int, count: int, cache_dir: str | Path | None,
                       bar: Any) -> list[tuple[int, dict[str, np.ndarray]]]:
    """The samples of one robustness row as (start, arrays) chunks, rendered or from the cache."""
    import hashlib

    from autoalign.simulation.dataset import CHUNK, generate_chunk

    keys = ("img", "labels", "peak_photons", "background_photons")
    key = hashlib.sha256(f"{s.to_yaml()}|{seed}|{row}|{count}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"robustness_{row:02d}_{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        with np.load(path) as z:
            bar.update(count)
            return [(0, {k: z[k] for k in keys})]
    chunks = []
    for k in range(0, count, CHUNK):
        d = generate_chunk(s, seed, 10_000 * row + k // CHUNK, min(CHUNK, count - k))
        chunks.append((k, {name: d[name] for name in keys}))
        bar.update(len(d["labels"]))
    whole = {name: np.concatenate([c[name] for _, c in chunks]) for name in keys}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **whole)
    return [(0, whole)]  # one block: the noise stream is the same cached or not


def robustness_table(result: dict[str, Any]) -> str:
    """Markdown table of :func:`robustness`."""
    lines = ["| factor | value | samples | mean RMSE (rad) | worst mode (rad) | offset RMSE (pupil radii) |",
             "|---|---|---|---|---|---|"]
    for row in result["rows"]:
        off = "-" if row["offset_rmse"] is None else f"{row['offset_rmse']:.4f}"
        val = "-" if row["value"] is None else f"{row['value']:g}"
        lines.append(f"| {row['factor']} | {val} | {row['samples']} | {row['rmse_mean']:.4f} | "
                     f"{row['rmse_max']:.4f} ({row['worst_mode']}) | {off} |")
    return "\n".join(lines)
