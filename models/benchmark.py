"""CPU inference timing of a checkpoint, end to end (section preparation + network, all heads).

``inference_benchmark`` times the :class:`Predictor` as the loop uses it (``autoalign benchmark``
prints it). ``inference_comparison`` times the eager and the TorchScript (traced + frozen)
engines side by side at 1 and 2 torch threads, in the same run; ONNX Runtime is timed only when
it is already installed (it is not a dependency). Run it as::

    python -m autoalign.models.benchmark [--checkpoint C] [--repeats 300] [--threads 1 2]
    python -m autoalign.models.benchmark --sharding 1024 [--workers 2]   # sharded generation speed-up

On a machine shared with other jobs the figures are noisy; the ratios within one run are what
compares.
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from autoalign.settings import load_settings

TARGET_SINGLE_MS = 2.0


def _test_triplet(settings: Any) -> np.ndarray:
    from autoalign.simulation import PSFSimulator

    sim = PSFSimulator.from_settings(settings)
    rng = np.random.default_rng(0)
    c = np.zeros(22)
    c[4:15] = rng.uniform(-0.2, 0.2, 11)
    photons = sim.orthosections(c) * settings.camera.peak_photons + settings.camera.background_photons
    return rng.poisson(photons).astype(np.float32)


def _time_single(fn: Any, x: np.ndarray, repeats: int, cpu: list[float] | None = None) -> np.ndarray:
    """Wall times (ms) of ``repeats`` calls; the calling thread's CPU times (ms) appended to
    ``cpu`` (with one torch thread all the work runs on it: the figure a free core would give on
    a machine shared with other jobs, where wall time includes waiting for a core)."""
    for _ in range(10):
        fn(x)
    out = []
    for _ in range(repeats):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn(x)
        out.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(1e3 * (time.thread_time() - c0))
    return 1e3 * np.asarray(out)


def inference_benchmark(checkpoint_path: str, settings: Any, repeats: int = 200, batch: int = 64,
                        batch_repeats: int = 20, force: bool = True, fast: bool = True) -> dict[str, Any]:
    """Time :meth:`Predictor.predict` on one triplet (preparation included; median and 90th
    percentile of ``repeats`` calls, ms) and :meth:`Predictor.predict_batch` on ``batch`` triplets
    (median, ms, and triplets/s), on the CPU with the current torch thread count. ``fast``: the
    predictor's TorchScript fast path (when it passes its check at load)."""
    from autoalign.models.networks import count_parameters
    from autoalign.models.predictor import Predictor

    settings = load_settings(settings)
    pred = Predictor.load(checkpoint_path, settings, force=force, device="cpu", fast=fast)
    one = _test_triplet(settings)
    many = np.repeat(one[None], batch, axis=0)
    single_ms = _time_single(pred.predict, one, repeats)
    pred.predict_batch(many)
    batched = []
    for _ in range(batch_repeats):
        t0 = time.perf_counter()
        pred.predict_batch(many)
        batched.append(time.perf_counter() - t0)
    batch_ms = 1e3 * float(np.median(batched))
    return {
        "checkpoint": str(pred.path), "arch": pred.arch, "parameters": count_parameters(pred.model),
        "engine": pred.engine, "outputs": len(pred.modes) + 2 * pred.predicts_offset,
        "threads": torch.get_num_threads(), "single_ms_median": float(np.median(single_ms)),
        "single_ms_p90": float(np.percentile(single_ms, 90)), "batch": batch, "batch_ms": batch_ms,
        "batch_triplets_per_s": batch / (batch_ms / 1e3), "target_single_ms": TARGET_SINGLE_MS,
        "meets_target": bool(np.median(single_ms) <= TARGET_SINGLE_MS),
    }


def inference_comparison(checkpoint_path: str | None, settings: Any = None, threads: tuple[int, ...] = (1, 2),
                         repeats: int = 300, force: bool = True) -> list[dict[str, Any]]:
    """Single-triplet end-to-end latency (median, p90, ms) for each engine (eager, TorchScript,
    ONNX Runtime if installed) and thread count, interleaved in one run. Also the share of the
    time spent in :func:`prepare_sections` (binning, background, scaling)."""
    from autoalign.models.data import prepare_sections
    from autoalign.models.predictor import Predictor

    settings = load_settings(settings)
    eager = Predictor.load(checkpoint_path, settings, force=force, fast=False)
    fast = Predictor.load(checkpoint_path, settings, force=force, fast=True)
    one = _test_triplet(settings)
    engines: list[tuple[str, Any]] = [("eager", eager.predict), (f"{fast.engine}", fast.predict)]
    if checkpoint_path is None and settings.model.fine_checkpoint:
        # the shipped coarse + fine pair as the loop runs it near alignment (both networks)
        from types import SimpleNamespace

        from autoalign.models.estimator import CNNEstimator

        for name, parallel in (("coarse+fine sequential", False), ("coarse+fine", True)):
            est = CNNEstimator(settings, fast, parallel=parallel)
            if est.estimate(SimpleNamespace(sections=one)).extras.get("stage") == "fine":
                engines.append((name, lambda x, est=est: est.estimate(SimpleNamespace(sections=x))))
    try:  # optional: only if already installed
        import onnxruntime as ort  # type: ignore[import-not-found]

        engines.append(("onnxruntime", _onnx_runner(eager, ort)))
    except Exception:  # noqa: BLE001 - not installed or export failed
        pass
    saved = torch.get_num_threads()
    rows = []
    try:
        for t in threads:
            torch.set_num_threads(t)
            prep = _time_single(lambda x: prepare_sections(torch.from_numpy(x), eager.binning), one, repeats)
            for name, fn in engines:
                cpu: list[float] = []
                ms = _time_single(fn, one, repeats, cpu)
                rows.append({"engine": name, "threads": t, "single_ms_median": float(np.median(ms)),
                             "single_ms_p90": float(np.percentile(ms, 90)),
                             "cpu_ms_median": float(np.median(cpu)) if t == 1 else None,
                             "prepare_ms_median": float(np.median(prep)),
                             "meets_target": bool(np.median(ms) <= TARGET_SINGLE_MS)})
    finally:
        torch.set_num_threads(saved)
    return rows


def _onnx_runner(pred: Any, ort: Any) -> Any:
    import io

    from autoalign.models.data import prepare_sections

    m = pred.section_px // pred.binning
    buf = io.BytesIO()
    torch.onnx.export(pred.model, torch.zeros(1, 3, m, m), buf, input_names=["x"], output_names=["y"])
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        inp = prepare_sections(x[None], pred.binning)
        return sess.run(None, {"x": inp})[0]

    return run


def sharding_benchmark(count: int = 1024, workers: int = 2, settings_path: str | None = None,
                       seed: int = 0) -> dict[str, Any]:
    """Wall time of ``autoalign simulate --shard`` with one worker process (shard 0/1) against
    ``workers`` independent processes (shards i/workers) started together, same samples; also
    the CPU seconds the processes used (the machine's other load shows as wall >> CPU)."""
    import os
    import resource
    import subprocess
    import sys
    import tempfile

    def run(n: int, folder: str) -> tuple[float, float]:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "autoalign.app.cli", "simulate", "--count", str(count), "--seed", str(seed),
               "--out", f"{folder}/d.h5", "--quiet"] + (["--settings", settings_path] if settings_path else [])
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen(cmd + ["--shard", f"{i}/{n}"], env=env, stdout=subprocess.DEVNULL)
                 for i in range(n)]
        if any(p.wait() != 0 for p in procs):
            raise RuntimeError("a shard worker failed")
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        one_wall, one_cpu = run(1, a)
        many_wall, many_cpu = run(workers, b)
    return {"count": count, "workers": workers, "one_worker_s": one_wall, "workers_s": many_wall,
            "speedup": one_wall / many_wall, "one_worker_cpu_s": one_cpu, "workers_cpu_s": many_cpu,
            "samples_per_s_one": count / one_wall, "samples_per_s_workers": count / many_wall,
            "cpu_bound_speedup": workers * one_cpu / many_cpu,
            "load_average": os.getloadavg()[0], "cpu_count": os.cpu_count(), "target_speedup": 1.8}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: settings model.checkpoint")
    p.add_argument("--settings", default=None)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sharding", type=int, default=None, metavar="COUNT",
                   help="instead: sharded generation, 1 vs --workers processes, COUNT samples")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    if a.sharding:
        r = sharding_benchmark(a.sharding, a.workers, a.settings)
        print(f"sharded generation of {r['count']} samples ({r['cpu_count']} cores, load average "
              f"{r['load_average']:.1f} at the end):")
        print(f"  1 worker : {r['one_worker_s']:.1f} s wall ({r['samples_per_s_one']:.1f} samples/s), "
              f"{r['one_worker_cpu_s']:.1f} s CPU")
        print(f"  {r['workers']} workers: {r['workers_s']:.1f} s wall ({r['samples_per_s_workers']:.1f} samples/s), "
              f"{r['workers_cpu_s']:.1f} s CPU")
        print(f"  speed-up {r['speedup']:.2f}x wall (target >= {r['target_speedup']}x); CPU-bound bound "
              f"{r['cpu_bound_speedup']:.2f}x = {r['workers']} x (CPU of 1 worker / CPU of {r['workers']}), "
              f"what free cores would give")
        return 0
    rows = inference_comparison(a.checkpoint, a.settings, tuple(a.threads), a.repeats)
    print(f"one measurement end to end (prepare + network, all heads), target <= {TARGET_SINGLE_MS} ms")
    import os

    print(f"  (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU ms = the calling thread's "
          "CPU time, 1 thread only)")
    print(f"  {'engine':24s}{'threads':>8s}{'median ms':>11s}{'p90 ms':>9s}{'CPU ms':>9s}{'prepare ms':>12s}")
    for r in rows:
        cpu = "-" if r["cpu_ms_median"] is None else f"{r['cpu_ms_median']:.3f}"
        print(f"  {r['engine']:24s}{r['threads']:8d}{r['single_ms_median']:11.3f}{r['single_ms_p90']:9.3f}"
              f"{cpu:>9s}{r['prepare_ms_median']:12.3f}")
    base = {r["threads"]: r["single_ms_median"] for r in rows if r["engine"] == "eager"}
    for r in rows:
        if r["engine"] != "eager":
            print(f"  {r['engine']} / eager at {r['threads']} thread(s): "
                  f"{r['single_ms_median'] / base[r['threads']]:.2f}x the time")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
