"""Bead-walk data collection (``autoalign collect``): the report's automated loop, round after
round, each round appended to an HDF5 file and flushed, so the file is readable after the process
is killed (even ``kill -9``) and a later run appends to the same file.

One round: zero the SLM (vortex only, plus an optional fresh random aberration: labelled data),
acquire, centre (stage beyond the threshold, else SLM tip/tilt/defocus), acquire the centred stack,
predict, apply the model's correction. Stops after ``rounds`` rounds, when the bead walks off (no
bead / bead at the edge), on a stop request or on a device failure.

File layout (one row per round along axis 0 of every dataset; Noll-indexed arrays have column
``k`` = Noll ``k + 1`` up to :data:`N_MODES`):

* ``stack`` (N, nz, ny, nx) uint16/float32 ADU: the centred stack; ``sections`` (N, 3, n, n)
  float32 photons (re-centred ortho-sections, the model's input)
* ``prediction`` (N, J) float32 rad (NaN when there was none); ``applied`` (N, J) the correction on
  the SLM during the stack (includes the random aberration); ``random_aberration`` (N, J) the
  aberration added on purpose; ``correction_after`` (N, J) the correction left on the SLM
* ``stage_xy_um`` (N, 2), ``focus_um`` (N,), ``centroid_um`` (N, 3), ``timestamp`` (N,) unix
  seconds, ``round`` (N,), ``decision`` (N,) text, ``metrics/<name>`` (N,)
* attributes: ``settings_yaml``, ``created``, ``units``, ``layout``.
"""
from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from autoalign.app.callbacks import notify
from autoalign.app.loop import LoopStopped, RefusedError
from autoalign.correction import Correction
from autoalign.hardware.base import DeviceError

log = logging.getLogger("autoalign.collect")

N_MODES = 22
METRICS = ("null_depth", "correlation_ideal", "predicted_residual_rms", "photons", "true_residual_rms",
           "true_null_depth")


def _vec(coeffs: dict[int, float] | None) -> np.ndarray:
    out = np.full(N_MODES, np.nan if coeffs is None else 0.0, dtype=np.float32)
    for k, v in (coeffs or {}).items():
        if 1 <= int(k) <= N_MODES:
            out[int(k) - 1] = v
    return out


def _append(ds: h5py.Dataset, value: Any) -> None:
    ds.resize(ds.shape[0] + 1, axis=0)
    ds[-1] = value


class CollectionFile:
    """Append-only HDF5 writer; the file is opened, appended and closed for every round."""

    def __init__(self, path: str | Path, settings: Any, stack_shape: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.settings = settings
        self.stack_shape = tuple(int(v) for v in stack_shape)
        with h5py.File(self.path, "a") as f:
            if "stack" not in f:
                self._create(f)
            elif tuple(f["stack"].shape[1:]) != self.stack_shape:
                raise ValueError(f"{self.path}: holds stacks of shape {f['stack'].shape[1:]}, "
                                 f"this run acquires {self.stack_shape}")
            else:  # a file from an older version: add the metrics it lacks (NaN for its rows)
                rows = int(f["round"].shape[0])
                for name in METRICS:
                    if name not in f["metrics"]:
                        f["metrics"].create_dataset(name, data=np.full(rows, np.nan), maxshape=(None,),
                                                    chunks=(256,))

    def _create(self, f: h5py.File) -> None:
        nz, ny, nx = self.stack_shape
        n = nx
        dtype = np.uint16 if self.settings.camera.bit_depth <= 16 else np.float32
        f.create_dataset("stack", (0, nz, ny, nx), maxshape=(None, nz, ny, nx), dtype=dtype,
                         chunks=(1, nz, ny, nx), compression="gzip", compression_opts=1)
        f.create_dataset("sections", (0, 3, n, n), maxshape=(None, 3, n, n), dtype=np.float32,
                         chunks=(1, 3, n, n))
        for name in ("prediction", "applied", "random_aberration", "correction_after"):
            f.create_dataset(name, (0, N_MODES), maxshape=(None, N_MODES), dtype=np.float32, chunks=(64, N_MODES))
        f.create_dataset("stage_xy_um", (0, 2), maxshape=(None, 2), dtype=np.float64, chunks=(64, 2))
        f.create_dataset("centroid_um", (0, 3), maxshape=(None, 3), dtype=np.float64, chunks=(64, 3))
        for name in ("focus_um", "timestamp"):
            f.create_dataset(name, (0,), maxshape=(None,), dtype=np.float64, chunks=(256,))
        f.create_dataset("round", (0,), maxshape=(None,), dtype=np.int64, chunks=(256,))
        f.create_dataset("decision", (0,), maxshape=(None,), dtype=h5py.string_dtype(), chunks=(256,))
        g = f.create_group("metrics")
        for name in METRICS:
            g.create_dataset(name, (0,), maxshape=(None,), dtype=np.float64, chunks=(256,))
        f.attrs["settings_yaml"] = self.settings.to_yaml()
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        f.attrs["units"] = "stack: ADU; sections: photons; coefficients: rad (column k = Noll k+1); um"
        f.attrs["layout"] = "autoalign bead-walk collection v1"

    def rounds(self) -> int:
        with h5py.File(self.path, "r") as f:
            return int(f["round"].shape[0])

    def append(self, row: dict[str, Any]) -> None:
        with h5py.File(self.path, "a") as f:
            data = np.asarray(row["stack"], dtype=float)
            if f["stack"].dtype == np.uint16:
                data = np.clip(np.round(data), 0, 65535)
            _append(f["stack"], data)
            _append(f["sections"], np.asarray(row["sections"], dtype=np.float32))
            for name in ("prediction", "applied", "random_aberration", "correction_after"):
                _append(f[name], _vec(row.get(name)))
            _append(f["stage_xy_um"], np.asarray(row["stage_xy_um"], dtype=float))
            _append(f["centroid_um"], np.asarray(row["centroid_um"], dtype=float))
            _append(f["focus_um"], float(row["focus_um"]))
            _append(f["timestamp"], float(row["timestamp"]))
            _append(f["round"], int(row["round"]))
            _append(f["decision"], str(row["decision"]))
            for name in METRICS:
                _append(f["metrics"][name], float(row["metrics"].get(name, math.nan)))
            f.flush()


def random_aberration(modes: list[int], rms: float, rng: np.random.Generator) -> dict[int, float]:
    """Uniform per mode, scaled to the requested total RMS."""
    if rms <= 0:
        return {}
    c = rng.uniform(-1, 1, len(modes))
    c *= rms / max(float(np.linalg.norm(c)), 1e-12)
    return {int(m): float(v) for m, v in zip(modes, c)}


class BeadWalk:
    """The bead walk over an :class:`app.loop.AlignmentLoop` (see the module docstring)."""

    def __init__(self, loop: Any, out_path: str | Path, rounds: int | None = None,
                 random_aberration_rms: float = 0.0, callbacks: Any = None, seed: int | None = None,
                 apply_model: bool = True) -> None:
        self.loop = loop
        self.out_path = Path(out_path)
        self.rounds = rounds
        self.random_rms = float(random_aberration_rms)
        self.callbacks = callbacks if callbacks is not None else loop.callbacks
        self.rng = np.random.default_rng(seed)
        self.apply_model = apply_model
        self.stop_reason = ""
        self.written = 0

    def stop(self) -> None:
        self.loop.stop()

    def run(self) -> int:
        """Collect until done; returns the number of rounds written by this run."""
        loop, s = self.loop, self.loop.settings
        n = s.camera.roi_px
        writer = CollectionFile(self.out_path, s, (s.stack.planes, n, n))
        start = writer.rounds()
        loop.clear_stop()
        total = self.rounds or 0
        modes = list(s.dataset.modes)
        i = 0
        loop.log("bead walk: writing to %s (starting at round %d)", self.out_path, start)
        self._have_model = False
        if self.apply_model is not None and not loop.estimator.probes:  # one-stack estimators only
            try:
                loop.estimator.prepare()
                self._have_model = True
            except Exception as exc:  # noqa: BLE001 - collecting raw data needs no model
                loop.log("bead walk: no model (%s); recording without predictions", exc, level=logging.WARNING)
        try:
            while self.rounds is None or i < self.rounds:
                loop.check_stop()
                done = self._round(writer, start + i, modes)
                i += 1
                notify(self.callbacks, "on_progress", i, total)
                if done:
                    break
            else:
                self.stop_reason = f"{i} rounds done"
        except LoopStopped:
            self.stop_reason = "stopped by request"
        except DeviceError as exc:
            self.stop_reason = f"device failure: {exc}"
            loop.last_error = exc
        loop.log("bead walk finished after %d round(s): %s", self.written, self.stop_reason)
        return self.written

    def _round(self, writer: CollectionFile, index: int, modes: list[int]) -> bool:
        loop = self.loop
        rand = random_aberration(modes, self.random_rms, self.rng)
        loop.apply(Correction(dict(rand)))               # zero the SLM (+ the labelled aberration)
        first = loop.centre()                            # acquire, stage / tip-tilt-defocus
        if not first.valid and ("no bead" in first.reason or "edge" in first.reason):
            self.stop_reason = f"bead walked off ({first.reason})"
            return True
        loop.check_stop()
        m = loop.acquire()                               # the centred stack
        applied = loop.correction.copy()
        prediction = None
        decision = "recorded"
        metrics: dict[str, float] = {}
        if not m.valid:
            decision = f"refused: {m.reason}"
            metrics = loop.metrics(m)
        else:
            try:
                if self._have_model:
                    est = loop.estimator.estimate(m)
                    coeffs = prediction = est.coefficients
                    problem = loop.check_estimate(est)
                    if problem:
                        decision = f"refused: {problem}"
                    elif self.apply_model:
                        loop.apply(applied.plus({k: -v for k, v in coeffs.items() if k >= 5}))
                        decision = "recorded, correction applied"
            except (LoopStopped, DeviceError):
                raise
            except (RefusedError, Exception) as exc:  # noqa: BLE001
                decision = f"refused: {exc}"
            metrics = loop.metrics(m, prediction)
        x, y = m.stack.xy_position_um
        writer.append({
            "stack": m.stack.data, "sections": m.sections, "prediction": prediction,
            "applied": applied.coefficients, "random_aberration": rand,
            "correction_after": loop.correction.coefficients, "stage_xy_um": (x, y),
            "focus_um": float(np.mean(m.stack.z_positions_um)), "centroid_um": m.offset_um,
            "timestamp": time.time(), "round": index, "decision": decision, "metrics": metrics,
        })
        self.written += 1
        loop.log("bead walk round %d: %s", index, decision)
        return False


__all__ = ["BeadWalk", "CollectionFile", "random_aberration", "N_MODES"]
