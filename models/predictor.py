"""Checkpoints (save, verify, load with the optics lock) and the :class:`Predictor` the alignment
loop uses.

A checkpoint is a dict of plain Python values and tensors (``torch.load(path, weights_only=True)``
reads it): ``format`` (:data:`CHECKPOINT_FORMAT`), ``arch``, ``modes``, ``predict_offset``,
``n_outputs``, ``input_size``, ``binning``, ``normalisation`` {mean, std}, ``optics`` (the lock:
see :func:`optics_lock`), ``training`` (settings of the run), ``epoch``, ``best_val_loss``,
``history``, ``created``, ``code_version``, ``state_dict``, optionally ``optimizer_state`` and
``scheduler_state`` (absent from exported models), and ``sha256``: a digest of everything but
the optimizer/scheduler state, so a modified file is detected.

Sign convention: the prediction is the aberration present in the pupil (Noll -> radians); the
loop applies minus it.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autoalign.models.data import prepare_sections
from autoalign.models.networks import Normaliser, build_network
from autoalign.settings import load_settings

CHECKPOINT_FORMAT = "autoalign-checkpoint/1"
REPO_ROOT = Path(__file__).resolve().parent.parent
_UNHASHED = ("sha256", "optimizer_state", "scheduler_state")
# largest |TorchScript - eager| output accepted for the fast path (radians / pupil radii)
FAST_PATH_TOLERANCE = 1e-4
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, foreign, modified, or made for other optics."""


class AberrationModel(nn.Module):
    """Normalisation (per section, training-split constants) followed by the network."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.normaliser = Normaliser(mean, std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normaliser(x))


def build_model(arch: str, n_modes: int, predict_offset: bool, input_size: int,
                normalisation: dict[str, list[float]], dropout: float = 0.1) -> AberrationModel:
    net = build_network(arch, n_modes, predict_offset, input_size, dropout)
    return AberrationModel(net, normalisation["mean"], normalisation["std"])


# ------------------------------------------------------------------------------------ optics lock
def optics_lock(settings: Any) -> dict[str, Any]:
    """The settings a model is only valid for: optics, sampling and the mode list."""
    o, c = settings.optics, settings.camera
    return {
        "numerical_aperture": float(o.numerical_aperture),
        "immersion_index": float(o.immersion_index),
        "wavelength_um": float(o.wavelength_um),
        "beam": str(o.beam),
        "vortex_charge": int(o.vortex_charge),
        "polarisation": str(o.polarisation),
        "pixel_size_um": float(c.pixel_size_um),
        "z_step_um": float(settings.stack.z_step_um),
        "roi_px": int(c.roi_px),
        "planes": int(settings.stack.planes),
        "modes": [int(m) for m in settings.model.modes],
    }


def lock_differences(checkpoint_lock: dict[str, Any], settings_lock: dict[str, Any]) -> list[str]:
    """Human-readable lines, one per key that differs (floats to a relative 1e-6)."""
    lines = []
    for key in sorted(set(checkpoint_lock) | set(settings_lock)):
        a, b = checkpoint_lock.get(key, "<absent>"), settings_lock.get(key, "<absent>")
        same = (math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
                if isinstance(a, float) and isinstance(b, (int, float)) else a == b)
        if not same:
            lines.append(f"{key}: checkpoint {a!r}, settings {b!r}")
    return lines


# ------------------------------------------------------------------------------------ save / load
def _digest(ckpt: dict[str, Any]) -> str:
    h = hashlib.sha256()
    meta = {k: v for k, v in ckpt.items() if k not in _UNHASHED and k != "state_dict"}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for key in sorted(ckpt.get("state_dict", {})):
        t = ckpt["state_dict"][key]
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(ckpt: dict[str, Any], path: str | Path, include_optimizer: bool = True) -> Path:
    """Write ``ckpt`` (adds format, digest; atomically via a temporary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = dict(ckpt)
    ckpt["format"] = CHECKPOINT_FORMAT
    ckpt["state_dict"] = {k: v.detach().cpu().clone() for k, v in ckpt["state_dict"].items()}
    if not include_optimizer:
        ckpt.pop("optimizer_state", None)
        ckpt.pop("scheduler_state", None)
    ckpt["sha256"] = _digest(ckpt)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and verify a checkpoint file (weights_only); raises :class:`CheckpointError` naming
    the file when it is missing, unreadable, not an autoalign checkpoint or modified."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (train one with 'autoalign train')")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle/zip errors of every kind
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: not an autoalign checkpoint (format {found!r}, expected "
                              f"{CHECKPOINT_FORMAT!r})")
    required = ("arch", "modes", "predict_offset", "binning", "normalisation", "optics", "state_dict",
                "input_size", "sha256")
    missing = [k for k in required if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint is missing {', '.join(missing)}")
    try:
        digest = _digest(ckpt)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: corrupt checkpoint ({exc})") from exc
    if digest != ckpt["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch: the checkpoint was modified after it was "
                              "written (or is corrupt); refusing to use it")
    return ckpt


def check_lock(ckpt: dict[str, Any], settings: Any, path: str | Path, force: bool = False) -> list[str]:
    """Compare the checkpoint's optics lock with ``settings``; raise :class:`CheckpointError`
    listing every difference unless ``force`` (then the differences are returned)."""
    diffs = lock_differences(ckpt["optics"], optics_lock(settings))
    if diffs and not force:
        lines = "\n  ".join(diffs)
        raise CheckpointError(
            f"{path}: the model was trained for other settings ({len(diffs)} difference(s)):\n  {lines}\n"
            "Train a model for these settings (autoalign simulate + train) or force loading.")
    return diffs


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "<checkpoint>") -> AberrationModel:
    try:
        model = build_model(ckpt["arch"], len(ckpt["modes"]), bool(ckpt["predict_offset"]),
                            int(ckpt["input_size"]), ckpt["normalisation"])
        model.load_state_dict(ckpt["state_dict"])
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {ckpt.get('arch')!r} ({exc})") from exc
    return model.eval()


def resolve_checkpoint_path(path: str | Path | None, settings: Any) -> Path:
    p = Path(path if path is not None else settings.model.checkpoint)
    return p if p.is_absolute() else REPO_ROOT / p


# ------------------------------------------------------------------------------------ predictor
@dataclass(frozen=True)
class Prediction:
    """Aberration read off the sections: {Noll: rad} (the aberration present; apply minus it),
    and the vortex-mask offset (x, y) in pupil radii when the model predicts it."""

    coefficients: dict[int, float]
    mask_offset: tuple[float, float] | None = None


class Predictor:
    """A trained model bound to the settings it was checked against.

    ``Predictor.load(path=None, settings=None, force=False, device=None, fast=True)``; ``.modes``,
    ``.predicts_offset``, ``.predict(sections (3, n, n) photons) -> Prediction``,
    ``.predict_batch((B, 3, n, n)) -> (B, J[+2])``.

    Fast path: with ``fast`` the network is traced, frozen and optimised for inference with
    TorchScript at load and used
    only when its outputs on a probe batch match the eager model's (max abs difference <=
    :data:`FAST_PATH_TOLERANCE`); otherwise (or when tracing fails) the eager model is used and
    the reason logged. ``.engine`` says which: ``'torchscript'`` or ``'eager'``."""

    def __init__(self, model: AberrationModel, checkpoint: dict[str, Any], path: Path,
                 device: torch.device, differences: list[str] | None = None, fast: bool = True) -> None:
        self.model = model.to(device).eval()
        self.checkpoint_info = {k: v for k, v in checkpoint.items()
                                if k not in ("state_dict", "optimizer_state", "scheduler_state")}
        self.path = path
        self.device = device
        self.modes: list[int] = [int(m) for m in checkpoint["modes"]]
        self.predicts_offset: bool = bool(checkpoint["predict_offset"])
        self.binning: int = int(checkpoint["binning"])
        self.section_px: int = int(checkpoint["optics"]["roi_px"])
        self.arch: str = str(checkpoint["arch"])
        self.lock_differences = differences or []
        self.engine = "eager"
        self.fast_path_difference: float | None = None
        self._runner: Any = self.model
        self._pairs: dict[int, Any] = {}  # ParallelPair.make's cache: id(second) -> pair
        if fast:
            self._try_fast_path()

    def _try_fast_path(self) -> None:
        """Trace + freeze the model; keep it only if it reproduces the eager outputs."""
        m = self.section_px // self.binning
        g = torch.Generator().manual_seed(0)
        probe = torch.rand(4, 3, m, m, generator=g).to(self.device)
        try:
            with torch.inference_mode(False), torch.no_grad():
                traced = torch.jit.freeze(torch.jit.trace(self.model, probe[:1], check_trace=False))
                try:  # batch norm folded into the convolutions, MKLDNN where it pays (~15 % faster)
                    traced = torch.jit.optimize_for_inference(traced)
                except Exception as exc:  # noqa: BLE001 - keep the frozen module
                    log.info("%s: optimize_for_inference skipped (%s)", self.path, exc)
                ref = self.model(probe)
                got = traced(probe)
                got1 = traced(probe[:1])
        except Exception as exc:  # noqa: BLE001 - any tracing problem: eager fallback
            log.info("%s: TorchScript fast path unavailable (%s); using the eager model", self.path, exc)
            return
        diff = float(max((got - ref).abs().max(), (got1 - ref[:1]).abs().max()))
        self.fast_path_difference = diff
        if not diff <= FAST_PATH_TOLERANCE:
            log.info("%s: TorchScript model differs from the eager one by %.3g (> %.1g); using the "
                     "eager model", self.path, diff, FAST_PATH_TOLERANCE)
            return
        self._runner = traced
        self.engine = "torchscript"

    @classmethod
    def load(cls, path: str | Path | None = None, settings: Any = None, force: bool = False,
             device: str | torch.device | None = None, fast: bool = True) -> "Predictor":
        """Load ``path`` (None: ``settings.model.checkpoint``; relative paths from the repository
        root), verify it and refuse it when made for other optics unless ``force``."""
        settings = load_settings(settings)
        p = resolve_checkpoint_path(path, settings)
        ckpt = read_checkpoint(p)
        diffs = check_lock(ckpt, settings, p, force)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return cls(model_from_checkpoint(ckpt, p), ckpt, p, dev, diffs, fast=fast)

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (3, self.section_px, self.section_px):
            raise ValueError(f"expected ortho-sections of shape (B, 3, {self.section_px}, {self.section_px}),"
                             f" got {x.shape[1:] if x.ndim == 4 else x.shape}")
        return x

    @torch.inference_mode()
    def predict_batch(self, sections_photons: np.ndarray) -> np.ndarray:
        """(B, 3, n, n) photons -> (B, J) radians (+ 2 offset columns, pupil radii)."""
        x = prepare_sections(torch.from_numpy(self._check(sections_photons)), self.binning)
        return self._runner(x.to(self.device)).cpu().numpy().astype(np.float64)

    def predict(self, sections_photons: np.ndarray) -> Prediction:
        """One triplet (3, n, n) in photons (background included) -> :class:`Prediction`."""
        x = np.asarray(sections_photons)
        if x.ndim != 3:
            raise ValueError(f"expected ortho-sections of shape (3, n, n), got {x.shape}")
        return self.to_prediction(self.predict_batch(x[None])[0])

    def to_prediction(self, out: np.ndarray) -> Prediction:
        """One row of :meth:`predict_batch` as a :class:`Prediction`."""
        J = len(self.modes)
        coeffs = {m: float(v) for m, v in zip(self.modes, out[:J])}
        offset = (float(out[J]), float(out[J + 1])) if self.predicts_offset else None
        return Prediction(coeffs, offset)


class _Fork(nn.Module):
    """``first(x)`` and ``second(x)``, the second on an inter-op thread (``torch.jit.fork``)."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        future = torch.jit.fork(self.second, x)
        return self.first(x), torch.jit.wait(future)


class ParallelPair:
    """Two predictors read on the same triplet in one call (the coarse + fine pair of
    :class:`autoalign.models.estimator.CNNEstimator`): the sections are prepared once and both
    networks, traced together, frozen and optimised for inference, run concurrently
    (``torch.jit.fork``; on 2 cores one each). Measured on this project's 2-core machine
    (``python -m autoalign.models.benchmark``): 2.1-2.5 ms for both against 2.9 ms one after the other
    on 1 thread and 5 ms on 2.

    Kept only when its outputs match the two eager models on a probe batch (max abs difference <=
    :data:`FAST_PATH_TOLERANCE`). :meth:`make` returns None (and logs why) otherwise, or when the
    two cannot share one input (other device, sections or binning); a pair once made is reused
    (cached on ``first``), so the estimators of successive trials share it."""

    def __init__(self, first: Predictor, second: Predictor) -> None:
        self.first, self.second = first, second
        m = first.section_px // first.binning
        probe = torch.rand(4, 3, m, m, generator=torch.Generator().manual_seed(1)).to(first.device)
        pair = _Fork(first.model, second.model).eval()
        with torch.inference_mode(False), torch.no_grad():
            module = torch.jit.freeze(torch.jit.trace(pair, probe[:1], check_trace=False))
            try:
                module = torch.jit.optimize_for_inference(module)
            except Exception as exc:  # noqa: BLE001 - keep the frozen module
                log.info("coarse + fine: optimize_for_inference skipped (%s)", exc)
            ref = (first.model(probe), second.model(probe))
            got, got1 = module(probe), module(probe[:1])
        diff = max(float((g - r).abs().max()) for g, r in zip(got, ref))
        diff = max(diff, *(float((g - r[:1]).abs().max()) for g, r in zip(got1, ref)))
        if not diff <= FAST_PATH_TOLERANCE:
            raise ValueError(f"the traced pair differs from the eager networks by {diff:.3g}")
        self._module = module

    @classmethod
    def make(cls, first: Any, second: Any) -> "ParallelPair | None":
        if not (isinstance(first, Predictor) and isinstance(second, Predictor)):
            return None
        why = ("different devices" if first.device != second.device else
               "different sections or binning" if (first.section_px, first.binning)
               != (second.section_px, second.binning) else "")
        if not why:
            cached = first._pairs.get(id(second))
            if cached is not None and cached.second is second:
                return cached  # type: ignore[no-any-return]
            try:
                first._pairs[id(second)] = pair = cls(first, second)
                return pair
            except Exception as exc:  # noqa: BLE001 - any tracing problem: one after the other
                why = str(exc)
        log.info("coarse + fine run one after the other (%s)", why)
        return None

    @torch.inference_mode()
    def predict(self, sections_photons: np.ndarray) -> tuple[Prediction, Prediction]:
        """One triplet (3, n, n) in photons -> (first's, second's) :class:`Prediction`."""
        x = np.asarray(sections_photons)
        if x.ndim != 3:
            raise ValueError(f"expected ortho-sections of shape (3, n, n), got {x.shape}")
        inp = prepare_sections(torch.from_numpy(self.first._check(x[None])), self.first.binning)
        a, b = self._module(inp.to(self.first.device))
        return (self.first.to_prediction(a.cpu().numpy().astype(np.float64)[0]),
                self.second.to_prediction(b.cpu().numpy().astype(np.float64)[0]))


def export_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Copy a checkpoint without its optimizer/scheduler state (for shipping)."""
    ckpt = read_checkpoint(src)
    ckpt["exported"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    return save_checkpoint(ckpt, dst, include_optimizer=False)


def checkpoint_bytes(ckpt: dict[str, Any]) -> int:
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.tell()
