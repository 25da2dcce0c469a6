"""Evaluation (``autoalign evaluate``): per-mode RMSE and R^2, per-sample RMS error, and the
report's check, the Pearson correlation between each (noisy) input and the PSF re-simulated from
the predicted coefficients (with the sample's own centring tip/tilt/defocus, mask offset and bead
blur), next to the same correlation for the true coefficients (the noise-limited ceiling).

Inputs get fresh camera noise drawn from ``seed`` (the test split is noise-free on disk), i.e. the
same noise model as in training."""
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


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    d = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / d) if d > 0 else float("nan")


def evaluate(checkpoint: str | Path, data: str | Path, split: str = "test", settings: Any = None,
             force: bool = False, seed: int = 0, limit: int | None = None, resimulate: int = 200,
             batch: int = 256, noise: bool = True) -> dict[str, Any]:
    """Metrics of ``checkpoint`` on a split of ``data``. ``resimulate``: number of samples for the
    correlation check (rendering costs ~10 ms each). Returns a JSON-ready dict plus the arrays
    ``_true`` and ``_pred`` (dropped by :func:`to_json`)."""
    data_settings = dataset_settings(data)
    ckpt = read_checkpoint(checkpoint)
    check_lock(ckpt, settings if settings is not None else data_settings, checkpoint, force)
    model = model_from_checkpoint(ckpt, checkpoint)
    binning = int(ckpt["binning"])
    transform = NoiseTransform.from_settings(data_settings, binning) if noise else None
    ds = PSFDataset(data, split, transform, binning, limit=limit)
    if len(ds) == 0:
        raise ValueError(f"{data}: split '{split}' is empty")
    modes = [int(m) for m in ckpt["modes"]]
    if ds.modes != modes:
        raise ValueError(f"{data}: modes {ds.modes} differ from the model's {modes}")
    J = len(modes)
    n_out = J + (2 if ckpt["predict_offset"] else 0)
    g = torch.Generator().manual_seed(seed)
    preds, trues = [], []
    with torch.no_grad():
        for x, y in ds.batches(batch, shuffle=False, generator=g):
            preds.append(model(x).numpy())
            trues.append(y[:, :n_out].numpy())
    pred = np.concatenate(preds).astype(np.float64)
    true = np.concatenate(trues).astype(np.float64)
    err = pred - true
    names = ds.info["label_names"][:n_out]
    rmse = np.sqrt((err**2).mean(0))
    var = true.var(0)
    r2 = 1 - (err**2).mean(0) / np.where(var > 0, var, np.nan)
    sample_rms = np.sqrt((err[:, :J] ** 2).sum(1))  # wavefront RMS of the residual (orthonormal)
    true_rms = np.sqrt((true[:, :J] ** 2).sum(1))
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "data": str(data), "split": split, "samples": int(len(ds)),
        "arch": ckpt["arch"], "noise": bool(noise), "seed": int(seed),
        "per_mode": {n: {"rmse": float(a), "r2": float(b)} for n, a, b in zip(names, rmse, r2)},
        "rmse_mean": float(rmse[:J].mean()), "rmse_max": float(rmse[:J].max()),
        "target_rmse_rad": 0.05, "meets_target": bool(rmse[:J].max() <= 0.05),
        "sample_rms_error": {"median": float(np.median(sample_rms)), "mean": float(sample_rms.mean()),
                             "p95": float(np.percentile(sample_rms, 95)), "max": float(sample_rms.max())},
        "true_rms": {"median": float(np.median(true_rms)), "max": float(true_rms.max())},
    }
    # per-sample error binned by the true aberration RMS (how accurate near convergence)
    bins = [0.0, 0.1, 0.25, 0.5, 0.75, 1.01]
    result["sample_rms_error_by_true_rms"] = [
        {"true_rms": [lo, hi], "samples": int(sel.sum()),
         "median": float(np.median(sample_rms[sel])) if sel.any() else None,
         "p95": float(np.percentile(sample_rms[sel], 95)) if sel.any() else None}
        for lo, hi in zip(bins[:-1], bins[1:]) for sel in [(true_rms >= lo) & (true_rms < hi)]
    ]
    if resimulate > 0:
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
