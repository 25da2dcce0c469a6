"""Synthetic training data: random aberrations rendered to ortho-sections in the loop's frame,
written to HDF5 (``autoalign simulate``).

One sample
----------
1. Aberration: each mode of ``dataset.modes`` uniform in +-``max_coefficient_rad``, the whole
   vector scaled down when its RMS exceeds ``max_total_rms_rad``. A fraction of the samples is
   rescaled to a smaller total RMS (:data:`RMS_MIX`) so that the model also sees the small
   residual aberrations where the loop spends its last iterations.
2. Optional vortex-mask offset (x, y) uniform in +-``max_offset`` pupil radii (when > 0).
3. Bead diameter uniform in ``bead_diameter_range_um``; the sections are blurred by the bead.
4. Centring, i.e. the frame the loop sees: the noise-free blurred sections are rendered, their
   centroid found (:func:`calibration.centroid.section_centroid`) and the tip/tilt/defocus that
   moves the focus back by that displacement (:func:`calibration.optics.shift_to_zernike`) is
   added (twice, :data:`CENTRING_ITERATIONS`); a residual decentring uniform in +-``decentre_px`` (pixels laterally, planes axially)
   is added as tip/tilt/defocus too, and the sections are rendered again. The label is the
   aberration (the ``dataset.modes`` coefficients), not the centring terms.
5. Photon count at the unaberrated peak and background per pixel are drawn from
   ``peak_photons_range`` and ``background_photons_range`` and STORED; the noise is added when
   the data are loaded (fresh every epoch, :mod:`models.data`) unless ``bake_noise`` is asked.

File layout (HDF5)
------------------
For each split ``s`` in train, val, test (80/10/10 by default, ``dataset.val_fraction`` and
``dataset.test_fraction``), in sample order:

* ``s_img`` float32 (N, 3, n, n): xy[y, x], xz[z, x], yz[z, y]; normalised intensity (1 = the
  unaberrated beam's peak), or photons when the noise was baked in (attribute ``noise_baked``).
* ``s_labels`` float32 (N, J): the ``modes`` coefficients in radians, then the mask offset
  (x, y) in pupil radii when ``has_offset``.
* ``s_peak_photons``, ``s_background_photons``, ``s_bead_diameter_um`` float32 (N,).
* ``s_centring_rad`` float32 (N, 3): the tip, tilt, defocus (Noll 2, 3, 4) applied, radians.
* ``s_decentre_px`` float32 (N, 3): the residual decentring drawn (x, y pixels; z planes).

Attributes: ``format`` (:data:`DATASET_FORMAT`), ``modes``, ``label_names``, ``label_units``,
``has_offset``, ``count``, ``splits``, ``seed``, ``settings_yaml``, ``code_version``, ``n_px``,
``noise_baked``, ``image_units``, ``rms_mix``, ``created``, ``complete``.

Determinism: sample ``i`` depends only on the seed and its chunk (:data:`CHUNK` samples drawn
from ``numpy.random.default_rng([seed, chunk])``), so the file is the same for any number of
workers.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from autoalign.settings import Settings

DATASET_FORMAT = "autoalign-psf-dataset/1"
SPLITS = ("train", "val", "test")
CHUNK = 128  # samples per generation task (and per random stream)
# centroid -> tip/tilt/defocus iterations (one leaves ~0.6 planes RMS axially: Z4 is not a pure
# shift at high NA and the donut's centroid moves with the aberration; two leave ~0.2)
CENTRING_ITERATIONS = 2

# (fraction of samples, total RMS drawn uniformly in [0, scale * max_total_rms_rad]); the rest keep
# the plain draw (uniform modes, capped), whose RMS is mostly near the cap (with 11 modes in
# +-0.6 rad the uncapped RMS is ~1.15 rad). The mix rescales each vector to its drawn total, so a
# single mode of a mixed sample may exceed max_coefficient_rad slightly; the total never exceeds
# max_total_rms_rad.
RMS_MIX: tuple[tuple[float, float], ...] = ((0.2, 1.0), (0.1, 0.25))


class DatasetError(ValueError):
    """A data file that cannot be used (missing, corrupt, foreign or incomplete)."""


def code_version() -> str:
    """Package version and git commit (``0.1.0+3c33842``, ``-dirty`` when modified), best effort."""
    try:
        from importlib.metadata import version

        base = version("autoalign")
    except Exception:  # noqa: BLE001 - not installed
        base = "0.1.0"
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        if sha:
            return f"{base}+{sha}{'-dirty' if dirty else ''}"
    except Exception:  # noqa: BLE001 - no git
        pass
    return base


# ----------------------------------------------------------------------------------- sampling
def draw_aberrations(rng: np.random.Generator, count: int, n_modes: int, max_coefficient: float,
                     max_total_rms: float, rms_mix: tuple[tuple[float, float], ...] = RMS_MIX) -> np.ndarray:
    """Random coefficient vectors (count, n_modes), radians: uniform per mode in
    +-``max_coefficient``, scaled down to ``max_total_rms`` when above it; then the fractions of
    ``rms_mix`` are rescaled to a total RMS uniform in [0, scale * max_total_rms]."""
    c = rng.uniform(-max_coefficient, max_coefficient, (count, n_modes))
    total = np.sqrt((c**2).sum(axis=1))
    c *= np.minimum(1.0, max_total_rms / np.maximum(total, 1e-12))[:, None]
    u = rng.uniform(size=count)
    target = rng.uniform(size=count)
    start = 0.0
    for fraction, scale in rms_mix:
        sel = (u >= start) & (u < start + fraction)
        start += fraction
        total = np.sqrt((c[sel] ** 2).sum(axis=1))
        c[sel] *= (target[sel] * scale * max_total_rms / np.maximum(total, 1e-12))[:, None]
    return c


def _blur(sections: np.ndarray, diameter_um: float, pixel_size_um: float) -> np.ndarray:
    from autoalign.simulation.noise import blur_by_bead

    # blur_by_bead convolves the last two axes; the sections are sampled alike laterally and
    # axially when stack.z_step_um == camera.pixel_size_um (the default; otherwise approximate)
    return blur_by_bead(sections, diameter_um, pixel_size_um)


@dataclass
class _Job:
    settings_yaml: str
    seed: int
    chunk: int
    count: int
    bake_noise: bool


_WORKER_SIM: dict[str, Any] = {}


def _simulator(settings: "Settings") -> Any:
    from autoalign.simulation.vectorial import PSFSimulator

    key = settings.to_yaml()
    if key not in _WORKER_SIM:
        _WORKER_SIM.clear()
        n_modes = max(22, max(settings.dataset.modes, default=1))
        _WORKER_SIM[key] = PSFSimulator.from_settings(settings, n_modes=n_modes)
    return _WORKER_SIM[key]


def generate_chunk(settings: "Settings", seed: int, chunk: int, count: int,
                   bake_noise: bool = False) -> dict[str, np.ndarray]:
    """Generate ``count`` samples of chunk ``chunk`` (random stream ``[seed, chunk]``).

    Returns arrays ``img`` (count, 3, n, n) float32, ``labels`` (count, J), ``peak_photons``,
    ``background_photons``, ``bead_diameter_um``, ``centring_rad`` (count, 3), ``decentre_px``
    (count, 3)."""
    from autoalign.calibration.centroid import section_centroid
    from autoalign.calibration.optics import shift_to_zernike

    ds, cam, o = settings.dataset, settings.camera, settings.optics
    sim = _simulator(settings)
    rng = np.random.default_rng([int(seed), int(chunk)])
    modes = list(ds.modes)
    J = len(modes)
    aberr = draw_aberrations(rng, count, J, ds.max_coefficient_rad, ds.max_total_rms_rad)
    offsets = np.zeros((count, 2))
    if ds.max_offset > 0:
        offsets = rng.uniform(-ds.max_offset, ds.max_offset, (count, 2))
    bead = rng.uniform(*ds.bead_diameter_range_um, size=count)
    peak = rng.uniform(*ds.peak_photons_range, size=count)
    background = rng.uniform(*ds.background_photons_range, size=count)
    decentre = rng.uniform(-ds.decentre_px, ds.decentre_px, (count, 3))
    noise_rng = np.random.default_rng([int(seed), int(chunk), 1])

    coeffs = np.zeros((count, sim.n_modes))
    for k, m in enumerate(modes):
        coeffs[:, m - 1] = aberr[:, k]
    px, dz = cam.pixel_size_um, settings.stack.z_step_um
    centring = np.zeros((count, 3))
    for iteration in range(CENTRING_ITERATIONS):
        rendered = sim.orthosections_batch(coeffs, offsets, chunk=64)
        last = iteration == CENTRING_ITERATIONS - 1
        for i in range(count):
            c = section_centroid(_blur(rendered[i], bead[i], px))
            # move the focus back by the centroid's displacement (and, the last time, off by the
            # residual decentring)
            d = np.array([-c.x_px, -c.y_px, -c.z_px]) + (decentre[i] if last else 0.0)
            ttd = shift_to_zernike(d[0] * px, d[1] * px, d[2] * dz, o.numerical_aperture,
                                   o.immersion_index, o.wavelength_um)
            step = (ttd[2], ttd[3], ttd[4])
            centring[i] += step
            coeffs[i, 1:4] += step
    second = sim.orthosections_batch(coeffs, offsets, chunk=64)
    img = np.empty_like(second, dtype=np.float32)
    for i in range(count):
        img[i] = _blur(second[i], bead[i], px)
    if bake_noise:
        from autoalign.models.data import add_noise_numpy

        img = add_noise_numpy(img, peak, background, cam.quantum_efficiency, cam.read_noise_electrons,
                              noise_rng).astype(np.float32)
    labels = aberr if ds.max_offset <= 0 else np.concatenate([aberr, offsets], axis=1)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return {
        "img": f32(img), "labels": f32(labels), "peak_photons": f32(peak),
        "background_photons": f32(background), "bead_diameter_um": f32(bead),
        "centring_rad": f32(centring), "decentre_px": f32(decentre),
    }


def _run_job(job: _Job) -> tuple[int, dict[str, np.ndarray]]:
    """One chunk with one torch thread (in a worker process, or in-process with the caller's
    thread count restored afterwards)."""
    import torch
    import yaml

    from autoalign.settings import settings_from_dict

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        settings = settings_from_dict(yaml.safe_load(job.settings_yaml), source="<dataset job>")
        return job.chunk, generate_chunk(settings, job.seed, job.chunk, job.count, job.bake_noise)
    finally:
        torch.set_num_threads(threads)


def split_sizes(count: int, val_fraction: float, test_fraction: float) -> dict[str, int]:
    """Sizes of the train/val/test splits (val and test rounded, train the rest)."""
    n_val = int(round(count * val_fraction))
    n_test = int(round(count * test_fraction))
    return {"train": count - n_val - n_test, "val": n_val, "test": n_test}


def label_names(settings: "Settings") -> list[str]:
    names = [f"Z{m}" for m in settings.dataset.modes]
    if settings.dataset.max_offset > 0:
        names += ["offset_x", "offset_y"]
    return names


FIELDS = ("img", "labels", "peak_photons", "background_photons", "bead_diameter_um", "centring_rad",
          "decentre_px")


def write_dataset(settings: "Settings | str | None", count: int, out: str | Path, seed: int = 0,
                  workers: int | None = None, bake_noise: bool = False, progress: bool = True) -> Path:
    """Generate ``count`` samples and write them to ``out`` (HDF5), atomically: the data go to
    ``out + '.partial'`` which is renamed at the end (an interrupted run leaves no file under the
    final name). ``workers`` processes (default: all cores, at most the number of chunks)."""
    import h5py
    import yaml
    from tqdm import tqdm

    from autoalign.settings import load_settings

    settings = load_settings(settings)
    if count < 1:
        raise ValueError(f"count = {count}: expected at least 1 sample")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    sizes = split_sizes(count, settings.dataset.val_fraction, settings.dataset.test_fraction)
    starts = {"train": 0, "val": sizes["train"], "test": sizes["train"] + sizes["val"]}
    n = settings.camera.roi_px
    names = label_names(settings)
    syaml = settings.to_yaml()
    jobs = [_Job(syaml, seed, k, min(CHUNK, count - k * CHUNK), bake_noise)
            for k in range(math.ceil(count / CHUNK))]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    t0 = time.time()
    with h5py.File(tmp, "w") as f:
        f.attrs.update({
            "format": DATASET_FORMAT, "modes": np.asarray(settings.dataset.modes, dtype=np.int64),
            "label_names": json.dumps(names),
            "label_units": json.dumps(["rad"] * len(settings.dataset.modes)
                                      + ["pupil radii"] * (len(names) - len(settings.dataset.modes))),
            "has_offset": bool(settings.dataset.max_offset > 0), "count": int(count),
            "splits": json.dumps(sizes), "seed": int(seed), "settings_yaml": syaml,
            "code_version": code_version(), "n_px": int(n), "noise_baked": bool(bake_noise),
            "image_units": "photons (noise baked in)" if bake_noise
            else "normalised intensity (1 = unaberrated peak); noise added at load",
            "rms_mix": json.dumps(RMS_MIX), "chunk": CHUNK,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False,
        })
        dsets: dict[str, Any] = {}
        for split, size in sizes.items():
            shapes = {"img": (size, 3, n, n), "labels": (size, len(names)), "centring_rad": (size, 3),
                      "decentre_px": (size, 3)}
            for field in FIELDS:
                shape = shapes.get(field, (size,))
                chunks = (max(1, min(size, 64)),) + shape[1:] if size else None
                dsets[f"{split}_{field}"] = f.create_dataset(
                    f"{split}_{field}", shape=shape, dtype=np.float32, chunks=chunks)
        bar = tqdm(total=count, unit="sample", desc=f"simulate {out.name}", disable=not progress,
                   dynamic_ncols=True)

        def store(chunk: int, data: dict[str, np.ndarray]) -> None:
            g0 = chunk * CHUNK
            g1 = g0 + len(data["labels"])
            for split in SPLITS:
                a, b = max(g0, starts[split]), min(g1, starts[split] + sizes[split])
                if a >= b:
                    continue
                for field in FIELDS:
                    dsets[f"{split}_{field}"][a - starts[split]: b - starts[split]] = data[field][a - g0: b - g0]
            bar.update(g1 - g0)

        try:
            if workers == 1:
                for job in jobs:
                    store(*_run_job(job))
            else:
                import multiprocessing as mp

                with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                    for chunk, data in pool.map(_run_job, jobs):
                        store(chunk, data)
        finally:
            bar.close()
        f.attrs["complete"] = True
        f.attrs["generation_s"] = float(time.time() - t0)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------------- reading
def open_dataset(path: str | Path) -> Any:
    """Open a data file read-only after checking it is a complete autoalign data set; raises
    :class:`DatasetError` naming the file otherwise. Returns the open ``h5py.File``."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such data file")
    try:
        f = h5py.File(path, "r")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: not a readable HDF5 file ({exc})") from exc
    try:
        fmt = f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != DATASET_FORMAT:
            raise DatasetError(f"{path}: not an autoalign data set (format attribute {fmt!r}, expected "
                               f"{DATASET_FORMAT!r}); write one with 'autoalign simulate'")
        if not bool(f.attrs.get("complete", False)):
            raise DatasetError(f"{path}: incomplete data set (its generation was interrupted)")
        sizes = json.loads(f.attrs["splits"])
        missing = [f"{s}_{field}" for s in SPLITS for field in ("img", "labels") if f"{s}_{field}" not in f]
        if missing:
            raise DatasetError(f"{path}: data set is missing {', '.join(missing)}")
        for s in SPLITS:
            if f[f"{s}_img"].shape[0] != sizes[s] or f[f"{s}_labels"].shape[0] != sizes[s]:
                raise DatasetError(f"{path}: split '{s}' has inconsistent sizes")
    except DatasetError:
        f.close()
        raise
    except (KeyError, OSError, ValueError, TypeError) as exc:
        f.close()
        raise DatasetError(f"{path}: corrupt autoalign data set ({exc})") from exc
    return f


def dataset_info(path: str | Path) -> dict[str, Any]:
    """Attributes of a data file as plain Python values (checked as in :func:`open_dataset`)."""
    with open_dataset(path) as f:
        a = f.attrs
        dec = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        return {
            "format": dec(a["format"]), "modes": [int(m) for m in a["modes"]],
            "label_names": json.loads(a["label_names"]), "label_units": json.loads(a["label_units"]),
            "has_offset": bool(a["has_offset"]), "count": int(a["count"]),
            "splits": json.loads(a["splits"]), "seed": int(a["seed"]),
            "settings_yaml": dec(a["settings_yaml"]), "code_version": dec(a["code_version"]),
            "n_px": int(a["n_px"]), "noise_baked": bool(a["noise_baked"]),
            "generation_s": float(a.get("generation_s", float("nan"))),
        }


def dataset_settings(path: str | Path) -> "Settings":
    """The settings a data file was generated with."""
    import yaml

    from autoalign.settings import load_settings, settings_from_dict

    stored = yaml.safe_load(dataset_info(path)["settings_yaml"])
    # the settings schema grows: keys added since the file was written take today's defaults,
    # keys since removed are dropped; everything the file recorded (optics, camera...) is kept
    merged = load_settings().to_dict()

    def update(dst: dict, src: dict) -> None:
        for key, value in src.items():
            if key in dst:
                if isinstance(dst[key], dict) and isinstance(value, dict):
                    update(dst[key], value)
                else:
                    dst[key] = value

    if isinstance(stored, dict):
        update(merged, stored)
    return settings_from_dict(merged, source=f"{path} (attrs)")


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))
