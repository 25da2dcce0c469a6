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
* attributes: ``format`` (:data:`BEADWALK_FORMAT`), ``format_version`` (:data:`BEADWALK_FORMAT_VERSION`),
  ``settings_yaml``, ``created``, ``units``, ``layout``. Written once when the file is created and
  never rewritten.

Safety: a run appends only to a file of this kind and version (files of the first version, which
carried only ``layout``, are recognised by it) recorded with the same settings where they change
what the data mean (:data:`APPEND_MUST_MATCH`: the optics, camera, stack and SLM, the model, the
labelled modes, the simulated instrument, the hardware backend; the refusal names the keys that
differ). The others (:data:`APPEND_MAY_DIFFER` and every key not in :data:`APPEND_MUST_MATCH`: the
loop's iterations, gain and refusal thresholds, the fit, the stage limits, the Micro-Manager
connection, ``simulation.seed``) may differ; ``settings_yaml`` keeps the first run's. A run that
appends draws new random states: with a seed, the random aberrations come from the seed and the
rounds already in the file (never a repeat of the first run's). An exclusive lock file
``<file>.lock`` (host, pid) keeps a second writer out, and a lock left by a killed process is
taken over. A new file is built under a temporary name and renamed into place. ``round`` is
appended last in every round, so a round cut short by a kill is recognised (other datasets
longer than ``round``) and trimmed before the next append.
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
import yaml

from autoalign.app.callbacks import notify
from autoalign.app.loop import LoopStopped, RefusedError
from autoalign.calibration.quality import Quality
from autoalign.correction import Correction
from autoalign.files import UserError
from autoalign.hardware.base import DeviceError

log = logging.getLogger("autoalign.collect")

N_MODES = 22
BEADWALK_FORMAT = "autoalign-beadwalk"
#: Version of the bead-walk file layout written and understood here.
BEADWALK_FORMAT_VERSION = 1
_LEGACY_LAYOUT = "autoalign bead-walk collection v1"
#: Settings that change what the recorded data mean: runs appending to one file must agree on them
#: (a name ending in "." is a whole section).
APPEND_MUST_MATCH = ("optics.", "camera.", "stack.", "slm.", "model.", "dataset.modes", "simulation.",
                     "hardware.backend", "hardware.micromanager.config_file",
                     "hardware.micromanager.camera_device")
#: ... except these, which may differ (the random draws, which screen shows the SLM's image).
APPEND_MAY_DIFFER = ("simulation.seed", "slm.backend", "slm.monitor")
_ROW_DATASETS = ("stack", "sections", "prediction", "applied", "random_aberration", "correction_after",
                 "stage_xy_um", "centroid_um", "focus_um", "timestamp", "decision")
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


class CollectionFileError(UserError, ValueError):
    """A file ``collect`` will not append to (foreign, newer, other settings or shape). The message
    names the file, the problem and what to do; it is a user error (exit status 2)."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = d
    return out


def _named(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in names)


def settings_differences(stored_yaml: str, settings: Any, may_differ: tuple[str, ...] = APPEND_MAY_DIFFER,
                         must_match: tuple[str, ...] | None = APPEND_MUST_MATCH) -> list[str]:
    """Dotted keys whose value differs between a stored settings YAML and ``settings``
    (``key: stored -> now``), among ``must_match`` (None: every key), ignoring ``may_differ``."""
    try:
        stored = yaml.safe_load(stored_yaml) or {}
    except yaml.YAMLError:
        return ["settings_yaml: the stored settings are not readable YAML"]
    stored.pop("format_version", None)
    then, now = _flatten(stored), _flatten(settings.to_dict())
    out = []
    for key in sorted(set(then) | set(now)):
        if _named(key, may_differ) or (must_match is not None and not _named(key, must_match)):
            continue
        a, b = then.get(key, "<absent>"), now.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} in the file, {b!r} now")
    return out


def _check_format(f: h5py.File, p: Path, hint: str) -> int:
    """The bead-walk format version of an open file, or :class:`CollectionFileError`."""
    fmt = f.attrs.get("format")
    layout = f.attrs.get("layout")
    if fmt is None and layout == _LEGACY_LAYOUT:
        version = 1
    elif fmt != BEADWALK_FORMAT:
        found = f"format {fmt!r}" if fmt is not None else "no format attribute"
        raise CollectionFileError(f"{p}: not an autoalign bead-walk file ({found}, datasets "
                                  f"{sorted(f.keys())[:6]}); {hint}")
    else:
        version = int(f.attrs.get("format_version", 0))
    if version > BEADWALK_FORMAT_VERSION:
        raise CollectionFileError(f"{p}: bead-walk format version {version} is newer than this autoalign "
                                  f"understands ({BEADWALK_FORMAT_VERSION}); upgrade autoalign")
    if version < 1:
        raise CollectionFileError(f"{p}: bead-walk format version {version!r} is not valid; {hint}")
    missing = [n for n in (*_ROW_DATASETS, "round") if n not in f]
    if missing:
        raise CollectionFileError(f"{p}: bead-walk file lacks datasets {missing}; {hint}")
    return version


def open_bead_walk(path: str | Path) -> h5py.File:
    """Open a bead-walk file for reading after checking its format name and version
    (:class:`CollectionFileError` with a clear message otherwise). Use as a context manager; rows
    beyond ``len(f["round"])`` belong to an unfinished round and are to be ignored."""
    p = Path(path)
    if not p.is_file() or not h5py.is_hdf5(str(p)):
        raise CollectionFileError(f"{p}: not an HDF5 file (expected a bead-walk file from 'autoalign collect')")
    f = h5py.File(p, "r")
    try:
        _check_format(f, p, "expected a bead-walk file from 'autoalign collect'")
    except BaseException:
        f.close()
        raise
    return f


def check_collection_file(path: str | Path, settings: Any, stack_shape: tuple[int, int, int]) -> int:
    """Check that ``collect`` may append to ``path``; returns its complete rounds (0 when the file
    does not exist). Raises :class:`CollectionFileError` when it is not an HDF5 file, not a bead-walk
    file, of a newer format version, of another stack shape, or made with other settings."""
    p = Path(path)
    if not p.exists():
        return 0
    if p.is_dir():
        raise CollectionFileError(f"{p}: is a folder; --out needs an HDF5 file name")
    hint = "collect appends only to its own bead-walk files; choose a new --out file"
    try:
        ok = h5py.is_hdf5(str(p))
    except OSError as exc:
        raise CollectionFileError(f"{p}: cannot read it ({exc}); {hint}") from exc
    if not ok:
        raise CollectionFileError(f"{p}: not an HDF5 file; {hint}")
    try:
        with h5py.File(p, "r") as f:
            _check_format(f, p, hint)
            if tuple(f["stack"].shape[1:]) != tuple(stack_shape):
                raise CollectionFileError(f"{p}: holds stacks of shape {tuple(f['stack'].shape[1:])}, this run "
                                          f"acquires {tuple(stack_shape)}; choose a new --out file")
            diffs = settings_differences(str(f.attrs.get("settings_yaml", "")), settings)
            if diffs:
                shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
                raise CollectionFileError(f"{p}: recorded with other settings ({len(diffs)} key(s) differ: {shown}); "
                                          "these change what the recorded data mean; append with the same "
                                          "values or choose a new --out file")
            return int(f["round"].shape[0])
    except CollectionFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CollectionFileError(f"{p}: unreadable bead-walk file ({type(exc).__name__}: {exc}); {hint}") from exc


class CollectionFile:
    """Append-only HDF5 writer; the file is opened, appended and closed for every round.

    An existing file must pass :func:`check_collection_file`; a new one is created under a temporary
    name and renamed into place. The caller holds the file's lock (:class:`BeadWalk` does)."""

    def __init__(self, path: str | Path, settings: Any, stack_shape: tuple[int, int, int]) -> None:
        self.path = Path(path)
        self.settings = settings
        self.stack_shape = tuple(int(v) for v in stack_shape)
        if not self.path.exists():
            from autoalign.files import atomic_path

            with atomic_path(self.path) as tmp, h5py.File(tmp, "w") as f:
                self._create(f)
            return
        check_collection_file(self.path, settings, self.stack_shape)
        with h5py.File(self.path, "a") as f:
            rows = int(f["round"].shape[0])
            longer = [n for n in _ROW_DATASETS if f[n].shape[0] > rows]
            longer += [f"metrics/{n}" for n in f["metrics"] if f["metrics"][n].shape[0] > rows]
            if longer:  # a round cut short by a kill: its partial rows go
                log.warning("%s: trimming an unfinished round (datasets %s longer than 'round', %d rows)",
                            self.path, longer, rows)
                for n in longer:
                    f[n].resize(rows, axis=0)
            # a file from an older version: add the metrics it lacks (NaN for its rows)
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
        f.attrs["layout"] = _LEGACY_LAYOUT
        f.attrs["format"] = BEADWALK_FORMAT
        f.attrs["format_version"] = BEADWALK_FORMAT_VERSION

    def rounds(self) -> int:
        with h5py.File(self.path, "r") as f:
            return int(f["round"].shape[0])

    def append(self, row: dict[str, Any]) -> None:
        """Append one round and flush; ``round`` goes last (it marks the round complete). Ctrl-C is
        held back until the round is written."""
        from autoalign.files import deferred_interrupt

        with deferred_interrupt(), h5py.File(self.path, "a") as f:
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
            _append(f["decision"], str(row["decision"]))
            for name in METRICS:
                _append(f["metrics"][name], float(row["metrics"].get(name, math.nan)))
            f.flush()
            _append(f["round"], int(row["round"]))
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
        self.seed = seed
        self.rng = np.random.default_rng(seed)   # re-seeded in run() past the file's rounds
        self.apply_model = apply_model
        self.stop_reason = ""
        self.written = 0
        self.start_rounds = 0          # rounds the file held before this run
        self.interrupted = False
        #: show a tqdm progress bar (ETA with ``rounds``; a running counter until the bead walks off)
        self.progress = False

    def stop(self) -> None:
        self.loop.stop()

    def run(self) -> int:
        """Collect until done; returns the number of rounds written by this run. Holds the file's
        lock throughout; Ctrl-C (``interrupted``) and device failures end the walk with every
        finished round kept (see :attr:`stop_reason`)."""
        from autoalign.files import FileLock

        lock = FileLock(self.out_path)
        with lock:
            if lock.stale_info:
                log.warning("%s: took over a stale lock left by process %s on %s (it no longer runs)",
                            self.out_path, lock.stale_info.get("pid"), lock.stale_info.get("host"))
            return self._run_locked()

    def _run_locked(self) -> int:
        from tqdm import tqdm

        loop, s = self.loop, self.loop.settings
        n = s.camera.roi_px
        writer = CollectionFile(self.out_path, s, (s.stack.planes, n, n))
        start = writer.rounds()
        if self.seed is not None and start:   # a continuation: new random states, not the first run's again
            self.rng = np.random.default_rng([int(self.seed), start])
        loop.clear_stop()
        total = self.rounds or 0
        modes = list(s.dataset.modes)
        i = 0
        self.start_rounds = start
        loop.log("bead walk: writing to %s (%s)", self.out_path,
                 f"it holds {start} round(s); appending" if start else "a new file")
        self._have_model = False
        if self.apply_model is not None and not loop.estimator.probes:  # one-stack estimators only
            try:
                loop.estimator.prepare()
                self._have_model = True
            except Exception as exc:  # noqa: BLE001 - collecting raw data needs no model
                loop.log("bead walk: no model (%s); recording without predictions", exc, level=logging.WARNING)
        bar = tqdm(total=self.rounds, unit="round", desc="bead walk", disable=not self.progress,
                   dynamic_ncols=True)
        try:
            while self.rounds is None or i < self.rounds:
                loop.check_stop()
                done = self._round(writer, start + i, modes, i + 1)
                if done:
                    break
                i += 1
                bar.update(1)
                notify(self.callbacks, "on_progress", i, total)
            else:
                self.stop_reason = f"{i} rounds done"
        except LoopStopped:
            self.stop_reason = "stopped by request"
        except KeyboardInterrupt:
            self.stop_reason = "interrupted (Ctrl-C)"
            self.interrupted = True
        except DeviceError as exc:
            self.stop_reason = f"device failure: {exc}"
            loop.last_error = exc
        finally:
            bar.close()
        loop.log("bead walk finished: %d round(s) written, %d in the file: %s", self.written,
                 self.start_rounds + self.written, self.stop_reason)
        return self.written

    def _round(self, writer: CollectionFile, index: int, modes: list[int], number: int = 0) -> bool:
        """One round, stored as row ``index`` of the file; ``number`` counts this run's rounds from 1
        (the log and the progress bar)."""
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
        est = None
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
            metrics = loop.metrics(m, prediction, est)
        x, y = m.stack.xy_position_um
        writer.append({
            "stack": m.stack.data, "sections": m.sections, "prediction": prediction,
            "applied": applied.coefficients, "random_aberration": rand,
            "correction_after": loop.correction.coefficients, "stage_xy_um": (x, y),
            "focus_um": float(np.mean(m.stack.z_positions_um)), "centroid_um": m.offset_um,
            "timestamp": time.time(), "round": index, "decision": decision, "metrics": metrics,
        })
        self.written += 1
        of = f"/{self.rounds}" if self.rounds else ""
        q = Quality.from_metrics(metrics)   # the measured residual first, then the null
        seen = f"measured {q.text()}; " if q is not None else ""
        null = metrics.get("null_depth")
        if null is not None and math.isfinite(null):
            seen += f"null {null:.4f}; "
        loop.log("bead walk round %d%s: %s%s (row %d of the file)", number or index + 1, of, seen, decision, index)
        return False


__all__ = ["BeadWalk", "CollectionFile", "CollectionFileError", "check_collection_file", "open_bead_walk", "settings_differences",
           "random_aberration", "N_MODES", "BEADWALK_FORMAT", "BEADWALK_FORMAT_VERSION", "APPEND_MUST_MATCH",
           "APPEND_MAY_DIFFER"]
