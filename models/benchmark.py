"""CPU inference timing of a checkpoint (printed by ``autoalign benchmark``)."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from autoalign.settings import load_settings


def inference_benchmark(checkpoint_path: str, settings: Any, repeats: int = 200, batch: int = 64,
                        batch_repeats: int = 20, force: bool = True) -> dict[str, Any]:
    """Time :meth:`Predictor.predict` on one triplet (preparation included; median and 90th
    percentile of ``repeats`` calls, ms) and :meth:`Predictor.predict_batch` on ``batch`` triplets
    (median, ms, and triplets/s), on the CPU with the current torch thread count."""
    from autoalign.models.networks import count_parameters
    from autoalign.models.predictor import Predictor
    from autoalign.simulation import PSFSimulator

    settings = load_settings(settings)
    pred = Predictor.load(checkpoint_path, settings, force=force, device="cpu")
    sim = PSFSimulator.from_settings(settings)
    rng = np.random.default_rng(0)
    c = np.zeros(22)
    c[4:15] = rng.uniform(-0.2, 0.2, 11)
    photons = sim.orthosections(c) * settings.camera.peak_photons + settings.camera.background_photons
    one = rng.poisson(photons).astype(np.float32)
    many = np.repeat(one[None], batch, axis=0)
    for _ in range(10):
        pred.predict(one)
    single = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        pred.predict(one)
        single.append(time.perf_counter() - t0)
    pred.predict_batch(many)
    batched = []
    for _ in range(batch_repeats):
        t0 = time.perf_counter()
        pred.predict_batch(many)
        batched.append(time.perf_counter() - t0)
    single_ms = 1e3 * np.asarray(single)
    batch_ms = 1e3 * float(np.median(batched))
    return {
        "checkpoint": str(pred.path), "arch": pred.arch, "parameters": count_parameters(pred.model),
        "threads": torch.get_num_threads(), "single_ms_median": float(np.median(single_ms)),
        "single_ms_p90": float(np.percentile(single_ms, 90)), "batch": batch, "batch_ms": batch_ms,
        "batch_triplets_per_s": batch / (batch_ms / 1e3), "target_single_ms": 2.0,
        "meets_target": bool(np.median(single_ms) <= 2.0),
    }
