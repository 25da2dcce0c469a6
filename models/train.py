"""Training (``autoalign train``): Adam, loss = sum over the outputs of the batch-mean squared
error, fresh camera noise every epoch, validation every epoch (with a fixed noise seed, so the
epochs compare), best and last checkpoints, a CSV log, TensorBoard when installed, a progress
bar, ``resume`` (model, optimizer and schedule) and ``warm_start`` (weights only), CUDA when
present.

The learning rate follows a cosine decay from ``lr`` to ``lr / 50`` over the run by default
(``schedule='constant'`` keeps it fixed).

The optics lock of the model comes from the settings stored in the data file (the optics the
data were rendered for); the architecture default, the binning and whether to predict the mask
offset come from the ``settings`` passed in.

Loss: ``sum_k w_k mean_batch (pred_k - true_k)^2`` with ``w = 1`` for the Zernike modes (rad)
and ``w = offset_weight`` (default 25 = (0.05 rad / 0.01 pupil radii)^2, the ratio of the
targets squared) for the two mask-offset outputs (pupil radii), so that both heads are pulled
toward their targets alike.

Distributed: under ``torchrun --nproc_per_node N`` (environment ``WORLD_SIZE`` > 1) the model is
wrapped in DistributedDataParallel (gloo on CPU, nccl on CUDA), each rank draws its share of
every epoch's permutation through a ``DistributedSampler`` (same seed on every rank, the epoch
set with ``set_epoch``) and its own noise stream; rank 0 alone validates, logs and writes the
checkpoints; the others wait at a barrier. The batch size is per rank (effective batch
``N x batch``). On CUDA the forward pass runs under autocast (bf16 where supported, else fp16
with a gradient scaler); on CPU it stays float32.
"""
from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoalign.models.data import NoiseTransform, PSFDataset, compute_normalisation
from autoalign.models.networks import count_parameters
from autoalign.models.predictor import (
    CheckpointError, build_model, optics_lock, read_checkpoint, save_checkpoint,
)
from autoalign.simulation.dataset import code_version, dataset_settings
from autoalign.settings import load_settings

log = logging.getLogger(__name__)


def _device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


OFFSET_WEIGHT = 25.0


def loss_weights(n_modes: int, predict_offset: bool, offset_weight: float = OFFSET_WEIGHT) -> torch.Tensor:
    """Per-output loss weights: 1 per mode, ``offset_weight`` per offset output."""
    return torch.tensor([1.0] * n_modes + ([offset_weight] * 2 if predict_offset else []))


def evaluate_loss(model: torch.nn.Module, dataset: PSFDataset, n_out: int, batch: int,
                  device: torch.device, seed: int = 12345,
                  weights: torch.Tensor | None = None) -> tuple[float, np.ndarray]:
    """Loss (weighted sum over outputs of the mean squared error, :func:`loss_weights`) and
    per-output RMSE on ``dataset`` with noise drawn from a fixed seed."""
    model.eval()
    g = torch.Generator(device=dataset.device).manual_seed(seed)
    sq = torch.zeros(n_out, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for x, y in dataset.batches(batch, shuffle=False, generator=g):
            out = model(x.to(device)).float().cpu()
            sq += ((out - y[:, :n_out].cpu()) ** 2).sum(0).double()
            count += len(y)
    mse = (sq / max(count, 1)).numpy()
    w = np.ones(n_out) if weights is None else weights.double().numpy()
    return float((w * mse).sum()), np.sqrt(mse)


def _distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) without it."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _autocast(dev: torch.device) -> tuple[Any, Any]:
    """(autocast context factory, gradient scaler or None): mixed precision on CUDA only."""
    import contextlib

    if dev.type != "cuda":
        return contextlib.nullcontext, None
    if torch.cuda.is_bf16_supported():
        return (lambda: torch.autocast("cuda", dtype=torch.bfloat16)), None
    return (lambda: torch.autocast("cuda", dtype=torch.float16)), torch.amp.GradScaler("cuda")


class _TB:
    def __init__(self, logdir: Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(logdir))
            except Exception as exc:  # noqa: BLE001 - tensorboard missing or broken
                log.info("TensorBoard logging off (%s)", exc)

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train(data: str | Path, out_dir: str | Path, settings: Any = None, arch: str | None = None,
          epochs: int = 15, batch: int = 64, lr: float = 1e-3, resume: str | Path | None = None,
          warm_start: str | Path | None = None, seed: int = 0, device: str | None = None,
          schedule: str = "cosine", limit: int | None = None, progress: bool = True,
          tensorboard: bool = True, export: str | Path | None = None,
          dropout: float = 0.1, offset_weight: float = OFFSET_WEIGHT,
          stop_after: int | None = None, predict_offset: bool | None = None,
          max_minutes: float | None = None, data_on_device: bool = False) -> dict[str, Any]:
    """Train a model on ``data`` and write ``best.pt``, ``last.pt``, ``log.csv`` and ``tb/`` to
    ``out_dir``. ``export``: also write the best model without optimizer state there. Returns a
    summary (best epoch and validation loss, per-mode validation RMSE, time). ``resume``
    continues model, optimizer, schedule, epoch count, history and best loss; ``epochs`` <= 0
    takes the resumed run's own total. ``predict_offset``: train the mask-offset head (default:
    ``settings.model.predict_offset``; a resumed run keeps its own). ``stop_after``: stop after that epoch (the schedule still
    spans ``epochs``; continue later with ``resume``). ``max_minutes``: a wall-clock budget for
    this call: the cosine schedule advances by ``max(step / total_steps, elapsed / budget)`` and
    the run stops (validating and saving the partial epoch) when the budget is spent, so a time-
    boxed run (a lent GPU) still ends at the low learning rate; such a run is not bit-exactly
    resumable (the schedule depends on the clock). ``data_on_device``: hold the training split and
    draw its noise on the training device (CUDA: removes the CPU from the loop; the noise stream
    then differs from the CPU one). Runs distributed under torchrun (module docstring)."""
    from tqdm import tqdm


    settings = load_settings(settings)
    t_start = time.time()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    rank, world, local_rank = _distributed()
    if max_minutes and world > 1:
        raise ValueError("max_minutes under torchrun: the ranks' clocks would give them different learning "
                         "rates; give --epochs instead")
    dev = _device(device)
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    main = rank == 0
    progress = progress and main
    out = Path(out_dir)
    if main:
        out.mkdir(parents=True, exist_ok=True)

    data_settings = dataset_settings(data)
    resume_ckpt = read_checkpoint(resume) if resume else None
    warm_ckpt = read_checkpoint(warm_start) if warm_start else None
    if epochs <= 0:
        epochs = (int(resume_ckpt.get("training", {}).get("epochs", 0)) or int(resume_ckpt["epoch"])
                  if resume_ckpt is not None else 15)
    base = resume_ckpt or warm_ckpt
    arch = arch or (base["arch"] if base else settings.model.architecture)
    binning = int(base["binning"]) if base else settings.model.binning
    transform = NoiseTransform.from_settings(data_settings, binning)
    train_ds = PSFDataset(data, "train", transform, binning, limit=limit)
    val_ds = PSFDataset(data, "val", transform, binning)
    if len(train_ds) == 0 or len(val_ds) == 0:
        raise ValueError(f"{data}: the train and val splits must not be empty")
    modes = train_ds.modes
    if list(settings.model.modes) != modes:
        log.warning("data modes %s differ from model.modes %s: training on the data's modes",
                    modes, settings.model.modes)
    if resume_ckpt is not None:
        predict_offset = bool(resume_ckpt["predict_offset"])
    elif predict_offset is None:
        predict_offset = bool(settings.model.predict_offset)
    if predict_offset and not train_ds.has_offset:
        raise ValueError(f"{data}: predicting the mask offset needs a data set with the offset "
                         "(dataset.max_offset > 0)")
    n_out = len(modes) + (2 if predict_offset else 0)
    input_size = train_ds.images.shape[-1]
    lock = optics_lock(data_settings.replace(**{"model.modes": modes, "dataset.modes": modes}))

    if base is not None:
        # a warm start may change the mode list (only the weights that fit are taken)
        ignore = ("modes",) if resume_ckpt is None else ()
        if {k: v for k, v in base["optics"].items() if k not in ignore} != {
                k: v for k, v in lock.items() if k not in ignore}:
            raise CheckpointError(f"{resume or warm_start}: made for other optics/modes than {data}")
        normalisation = base["normalisation"]
    else:
        normalisation = compute_normalisation(train_ds, seed=seed)
    model = build_model(arch, len(modes), predict_offset, input_size, normalisation, dropout).to(dev)
    weights = loss_weights(len(modes), predict_offset, offset_weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    sampler = None
    if world > 1:
        sampler = torch.utils.data.DistributedSampler(
            range(len(train_ds)), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    steps_per_epoch = math.ceil((len(sampler) if sampler is not None else len(train_ds)) / batch)
    total_steps = max(1, epochs * steps_per_epoch)
    budget_s = None if not max_minutes else 60.0 * float(max_minutes)
    t_budget = t_start  # the budget is for the whole call, data loading included
    clock: dict[str, float] = {}  # "t0": when the first epoch starts (the schedule's time origin)

    def progress_fraction(step: int) -> float:
        frac = min(step, total_steps) / total_steps
        if budget_s is not None and "t0" in clock:
            left = max(budget_s - (clock["t0"] - t_budget), 1.0)
            frac = max(frac, min(1.0, (time.time() - clock["t0"]) / left))
        return frac

    if schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress_fraction(s))))
    elif schedule == "constant":
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    else:
        raise ValueError(f"schedule {schedule!r}: expected cosine or constant")

    start_epoch, best, history = 0, math.inf, []
    if resume_ckpt is not None:
        if resume_ckpt["arch"] != arch:
            raise CheckpointError(f"{resume}: architecture {resume_ckpt['arch']} differs from {arch}")
        model.load_state_dict(resume_ckpt["state_dict"])
        if "optimizer_state" not in resume_ckpt:
            raise CheckpointError(f"{resume}: no optimizer state (an exported model): use --warm-start")
        optimizer.load_state_dict(resume_ckpt["optimizer_state"])
        if "scheduler_state" in resume_ckpt:
            sched.load_state_dict(resume_ckpt["scheduler_state"])
        start_epoch = int(resume_ckpt["epoch"])
        best = float(resume_ckpt.get("best_val_loss", math.inf))
        history = list(resume_ckpt.get("history", []))
    elif warm_ckpt is not None:
        own = model.state_dict()
        loaded = {k: v for k, v in warm_ckpt["state_dict"].items() if k in own and own[k].shape == v.shape}
        skipped = sorted(set(own) - set(loaded))
        own.update(loaded)
        model.load_state_dict(own)
        if skipped:
            log.warning("warm start: %d tensors not taken from %s (shape or name differs): %s",
                        len(skipped), warm_start, ", ".join(skipped[:6]))

    net = model  # the module whose state is saved and evaluated (DDP wraps it for training)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)
    autocast, scaler = _autocast(dev)
    weights_dev = weights.to(dev)
    on_device = bool(data_on_device) and dev.type != "cpu"
    if on_device:
        train_ds.to(dev)
        val_ds.to(dev)

    training_info = {
        "data": str(data), "data_count": int(train_ds.info["count"]), "data_seed": int(train_ds.info["seed"]),
        "train_samples": len(train_ds), "val_samples": len(val_ds), "epochs": int(epochs),
        "batch": int(batch), "lr": float(lr), "schedule": schedule, "seed": int(seed),
        "device": str(dev), "threads": int(torch.get_num_threads()), "dropout": float(dropout),
        "loss": "weighted sum over outputs of batch-mean squared error", "offset_weight": float(offset_weight),
        "warm_start": str(warm_start or ""), "resumed_from": str(resume or ""), "world_size": int(world),
        "noise": "Poisson + Gaussian read noise at load, fresh every epoch"
                 + (f" (drawn on {dev})" if on_device else ""),
        "max_minutes": float(max_minutes or 0.0),
    }

    # the code that runs is the code at the start (later commits do not change a running process)
    started_code_version = code_version()

    def checkpoint(epoch: int, val_rmse: list[float], elapsed: float) -> dict[str, Any]:
        return {
            "arch": arch, "modes": modes, "predict_offset": predict_offset, "n_outputs": n_out,
            "input_size": int(input_size), "binning": binning, "normalisation": normalisation,
            "optics": lock, "training": training_info, "epoch": epoch, "best_val_loss": best,
            "val_rmse": val_rmse, "history": history, "train_seconds": elapsed,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "code_version": started_code_version,
            "parameters": count_parameters(net),
            "state_dict": net.state_dict(), "optimizer_state": optimizer.state_dict(),
            "scheduler_state": sched.state_dict(),
        }

    csv_path = out / "log.csv"
    new_csv = not (resume_ckpt is not None and csv_path.exists())
    tb = _TB(out / "tb", tensorboard and main)
    g = torch.Generator(device=dev) if on_device else torch.Generator()
    out_of_time = False
    log.info("training %s (%d parameters) on %d samples (%d val), %d epochs, batch %d, %s",
             arch, count_parameters(model), len(train_ds), len(val_ds), epochs, batch, dev)
    elapsed0 = float(resume_ckpt.get("train_seconds", 0.0)) if resume_ckpt else 0.0
    best_epoch = int(resume_ckpt.get("best_epoch", 0)) if resume_ckpt else 0
    import contextlib

    with (open(csv_path, "w" if new_csv else "a", newline="") if main else contextlib.nullcontext()) as fh:
        writer = csv.writer(fh) if main else None
        if new_csv and main:
            writer.writerow(["epoch", "train_loss", "val_loss", "val_rmse_mean", "val_rmse_max", "lr",
                             "seconds"] + [f"val_rmse_{n}" for n in train_ds.info["label_names"][:n_out]])
        clock["t0"] = time.time()
        for epoch in range(start_epoch + 1, min(epochs, stop_after or epochs) + 1):
            t0 = time.time()
            # every epoch's permutation, noise and dropout come from (seed, epoch, rank) alone, so a
            # resumed run continues exactly as an uninterrupted one would
            g.manual_seed(seed + 1000 * epoch + 7919 * rank)
            torch.manual_seed(seed + 1000 * epoch + 7919 * rank + 1)
            model.train()
            total, seen = 0.0, 0
            if sampler is not None:
                sampler.set_epoch(epoch)
                batches = train_ds.batches(batch, generator=g, indices=torch.tensor(list(sampler), device=train_ds.device))
            else:
                batches = train_ds.batches(batch, shuffle=True, generator=g)
            bar = tqdm(batches, total=steps_per_epoch,
                       desc=f"epoch {epoch}/{epochs}", disable=not progress, dynamic_ncols=True, leave=False)
            for x, y in bar:
                x, y = x.to(dev), y[:, :n_out].to(dev)
                with autocast():
                    pred = model(x)
                loss = (weights_dev * ((pred.float() - y) ** 2).mean(dim=0)).sum()
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                sched.step()
                total += loss.item() * len(y)
                seen += len(y)
                bar.set_postfix(loss=f"{total / seen:.4f}")
                if budget_s is not None and time.time() - t_budget >= budget_s:
                    out_of_time = True
                    break
            bar.close()
            train_loss = total / max(seen, 1)
            if world > 1:  # batch-norm statistics: every rank takes rank 0's (the saved model's)
                for buf in net.buffers():
                    torch.distributed.broadcast(buf, 0)
            if not main:  # rank 0 validates, logs and saves; the others wait for it
                torch.distributed.barrier()
                continue
            val_loss, val_rmse = evaluate_loss(net, val_ds, n_out, 256, dev, weights=weights)
            dt = time.time() - t0
            lr_now = optimizer.param_groups[0]["lr"]
            row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                   "val_rmse_mean": float(val_rmse.mean()), "val_rmse_max": float(val_rmse.max()),
                   "lr": lr_now, "seconds": dt}
            history.append(row)
            writer.writerow([epoch, f"{train_loss:.6g}", f"{val_loss:.6g}", f"{val_rmse.mean():.6g}",
                             f"{val_rmse.max():.6g}", f"{lr_now:.3g}", f"{dt:.1f}"]
                            + [f"{v:.5g}" for v in val_rmse])
            fh.flush()
            for k in ("train_loss", "val_loss", "val_rmse_mean", "lr"):
                tb.scalar(k, row[k], epoch)
            elapsed = elapsed0 + time.time() - t_start
            improved = val_loss < best
            if improved:
                best, best_epoch = val_loss, epoch
            ck = checkpoint(epoch, [float(v) for v in val_rmse], elapsed)
            ck["best_epoch"] = best_epoch
            save_checkpoint(ck, out / "last.pt")
            if improved:
                save_checkpoint(ck, out / "best.pt")
            msg = (f"epoch {epoch}/{epochs}: train {train_loss:.4f}, val {val_loss:.4f}, val RMSE mean "
                   f"{val_rmse.mean():.4f} max {val_rmse.max():.4f} rad, lr {lr_now:.2g}, {dt:.0f} s"
                   + (" *" if improved else ""))
            log.info(msg)
            if progress:
                tqdm.write(msg)
            if world > 1:
                torch.distributed.barrier()
            if out_of_time:
                msg = f"time budget of {max_minutes} min spent: stopped after {seen} samples of epoch {epoch}"
                log.info(msg)
                if progress:
                    tqdm.write(msg)
                break
    tb.close()
    if world > 1:
        torch.distributed.barrier()
    if not main:
        return {"rank": rank, "world_size": world, "state_dict": net.state_dict()}
    if export:
        from autoalign.models.predictor import export_checkpoint

        export_checkpoint(out / "best.pt", export)
    best_row = next((r for r in history if r["epoch"] == best_epoch), history[-1] if history else {})
    return {
        "arch": arch, "parameters": count_parameters(net), "epochs": epochs, "best_epoch": best_epoch,
        "best_val_loss": best, "best_val_rmse_mean": best_row.get("val_rmse_mean"),
        "train_samples": len(train_ds), "seconds": time.time() - t_start, "out_dir": str(out),
        "history": history, "rank": rank, "world_size": world,
    }


def plot_history(csv_path: str | Path, png_path: str | Path) -> Path:
    """Training curve (train/val loss and mean val RMSE per epoch) from ``log.csv`` to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(open(csv_path)))
    ep = [int(r["epoch"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2), dpi=90)
    ax[0].semilogy(ep, [float(r["train_loss"]) for r in rows], label="train (noisy, dropout)")
    ax[0].semilogy(ep, [float(r["val_loss"]) for r in rows], label="validation")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("loss (sum of MSE, rad$^2$)")
    ax[0].legend()
    ax[1].plot(ep, [float(r["val_rmse_mean"]) for r in rows], label="mean over modes")
    ax[1].plot(ep, [float(r["val_rmse_max"]) for r in rows], label="worst mode")
    ax[1].axhline(0.05, color="k", ls=":", lw=1, label="target 0.05 rad")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation RMSE (rad)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return Path(png_path)
