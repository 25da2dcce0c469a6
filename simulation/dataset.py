"""Synthetic training data: random aberrations rendered to ortho-sections in the loop's frame,
written to HDF5 (``autoalign simulate``).

One sample
----------
1. Aberration over ``dataset.modes`` (labelled): an isotropic direction times a total RMS drawn
   from the mixture ``rms_mix`` of ``max_total_rms_rad`` (:func:`draw_aberrations`), so that the
   model sees both the far-off instrument (up to 2.2 rad RMS) and the loop's small residuals.
2. Unlabelled higher-order content over ``unlabelled_modes`` with a decaying spectrum
   (:func:`draw_higher_order`), rendered and stored but not labelled.
3. Vortex-mask offset (x, y) uniform in +-``max_offset`` pupil radii (labels when > 0).
4. Domain randomisation (:func:`draw_instrument`): NA, wavelength and pixel-size factors (per
   group of :data:`INSTRUMENT_GROUP` samples), wrong-hand polarisation fraction and SLM phase
   stroke (per sample); bead diameter; the sections are blurred by the bead on the true pixels.
5. Centring, i.e. the frame the loop sees: the noise-free blurred sections are rendered, their
   centroid found (:func:`simulation.centroid.section_centroid`, the loop's own centroid) and the
   tip/tilt/defocus that moves the focus back by that displacement (:func:`simulation.optics.shift_to_zernike`, with
   the NOMINAL optics, as the loop would) is added (twice, :data:`CENTRING_ITERATIONS`); a
   residual decentring uniform in +-``decentre_px`` (pixels laterally, planes axially) is added
   as tip/tilt/defocus too, and the sections are rendered again (:func:`render_samples`). The
   label is the aberration (the ``dataset.modes`` coefficients) and the offset, not the
   centring terms.
6. Photon count at the unaberrated peak and background per pixel are drawn from
   ``peak_photons_range`` and ``background_photons_range`` and STORED; the noise is added when
   the data are loaded (fresh every epoch, :class:`simulation.noise.NoiseTransform`) unless
   ``bake_noise`` is asked.

File layout (HDF5) -- this module is the one owner of the format (writing and reading)
------------------
For each split ``s`` in train, val, test (80/10/10 by default, ``dataset.val_fraction`` and
``dataset.test_fraction``), by global sample index:

* ``s_img`` float32 (N, 3, n, n): xy[y, x], xz[z, x], yz[z, y]; normalised intensity (1 = the
  nominal unaberrated beam's peak), or photons when the noise was baked in (``noise_baked``).
* ``s_labels`` float32 (N, J): the ``modes`` coefficients in radians, then the mask offset
  (x, y) in pupil radii when ``has_offset``.
* ``s_peak_photons``, ``s_background_photons``, ``s_bead_diameter_um`` float32 (N,).
* ``s_centring_rad`` float32 (N, 3): the tip, tilt, defocus (Noll 2, 3, 4) applied, radians.
* ``s_decentre_px`` float32 (N, 3): the residual decentring drawn (x, y pixels; z planes).
* ``s_instrument`` float32 (N, 5): :data:`INSTRUMENT_FIELDS`.
* ``s_higher_order_rad`` float32 (N, K): the ``unlabelled_modes`` coefficients, radians.

Attributes: ``format`` (:data:`DATASET_FORMAT`), ``modes``, ``label_names``, ``label_units``,
``has_offset``, ``count``, ``splits``, ``seed``, ``settings_yaml``, ``code_version``, ``n_px``,
``noise_baked``, ``image_units``, ``rms_mix``, ``instrument_fields``, ``unlabelled_modes``,
``created``, ``complete``; ``shard_files`` for a combined set.

Determinism and shards: sample ``i`` depends only on the seed and its chunk (:data:`CHUNK`
samples drawn from ``numpy.random.default_rng([seed, chunk])``), so the file is the same for any
number of workers or shards. :func:`write_shard` writes a contiguous run of whole chunks;
:func:`combine_shards` joins shards with HDF5 virtual data sets (no copy).
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
RMS_MIX: tuple[tuple[float, float], ...] = ((0.15, 0.15), (0.35, 0.5), (0.5, 1.0))
# samples per draw of NA, wavelength and pixel size (one simulator is built per draw, ~0.1 s)
INSTRUMENT_GROUP = 32


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
def draw_aberrations(rng: np.random.Generator, count: int, n_modes: int, max_total_rms: float,
                     rms_mix: tuple[tuple[float, float], ...] = RMS_MIX,
                     max_coefficient: float = 0.0) -> np.ndarray:
    """Random coefficient vectors (count, n_modes), radians: an isotropic direction (normalised
    Gaussian vector) times a total RMS (the vector's norm, the modes being RMS-normalised) drawn
    from the mixture ``rms_mix``: component ``(fraction, scale)`` draws the total uniformly in
    [0, scale * max_total_rms]. ``max_coefficient`` > 0 clips each mode to +-that afterwards."""
    direction = rng.normal(size=(count, n_modes))
    direction /= np.maximum(np.linalg.norm(direction, axis=1, keepdims=True), 1e-12)
    fractions = np.array([f for f, _ in rms_mix], dtype=float)
    scales = np.array([sc for _, sc in rms_mix], dtype=float)
    if fractions.size == 0 or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"rms_mix fractions {fractions.tolist()} must sum to 1")
    component = rng.choice(len(fractions), size=count, p=fractions / fractions.sum())
    total = rng.uniform(size=count) * scales[component] * max_total_rms
    c = direction * total[:, None]
    if max_coefficient > 0:
        c = np.clip(c, -max_coefficient, max_coefficient)
    return c


def draw_higher_order(rng: np.random.Generator, count: int, modes: list[int],
                      rms_range: tuple[float, float], decay: float) -> np.ndarray:
    """Unlabelled higher-order content (count, len(modes)), radians: a decaying spectrum, mode
    ``j`` of radial order ``n_j`` with standard deviation proportional to ``n_j**-decay``, the
    vector scaled to a total RMS uniform in ``rms_range``."""
    from autoalign.simulation.zernike import noll_to_nm

    if not modes:
        return np.zeros((count, 0))
    weight = np.array([float(noll_to_nm(j)[0]) ** -decay for j in modes])
    c = rng.normal(size=(count, len(modes))) * weight
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return c * rng.uniform(rms_range[0], rms_range[1], size=count)[:, None]


INSTRUMENT_FIELDS = ("na_scale", "wavelength_scale", "pixel_scale", "polarisation_impurity", "slm_stroke")


def draw_instrument(rng: np.random.Generator, count: int, ds: Any) -> np.ndarray:
    """Domain randomisation (count, 5): NA, wavelength and pixel-size scale factors, the
    wrong-hand polarisation fraction and the SLM phase stroke (see :data:`INSTRUMENT_FIELDS`).
    NA, wavelength and pixel size are shared by each group of :data:`INSTRUMENT_GROUP` samples
    (one simulator per group; the factors are drawn per group), the rest are per sample."""
    groups = math.ceil(count / INSTRUMENT_GROUP)
    per_group = np.stack([rng.uniform(*ds.na_scale_range, size=groups),
                          rng.uniform(*ds.wavelength_scale_range, size=groups),
                          rng.uniform(*ds.pixel_scale_range, size=groups)], axis=1)
    out = np.empty((count, 5))
    out[:, :3] = np.repeat(per_group, INSTRUMENT_GROUP, axis=0)[:count]
    out[:, 3] = rng.uniform(*ds.polarisation_impurity_range, size=count)
    out[:, 4] = rng.uniform(*ds.slm_stroke_range, size=count)
    return out


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


_WORKER_SIM: dict[Any, Any] = {}
_YAML_KEY: dict[int, tuple[Any, str]] = {}


def _simulator(settings: "Settings", na_scale: float = 1.0, wavelength_scale: float = 1.0,
               pixel_scale: float = 1.0, polarisation: str | None = None) -> Any:
    """A simulator for the settings' instrument with NA, wavelength and pixel size scaled (cached
    per process: the nominal one, and the last few randomised ones)."""
    from autoalign.simulation.vectorial import PSFSimulator

    o = settings.optics
    if id(settings) not in _YAML_KEY:  # settings are frozen; to_yaml() costs ~20 ms
        _YAML_KEY.clear()
        _YAML_KEY[id(settings)] = (settings, settings.to_yaml())
    key = (_YAML_KEY[id(settings)][1], round(na_scale, 9), round(wavelength_scale, 9), round(pixel_scale, 9),
           polarisation or o.polarisation)
    if key not in _WORKER_SIM:
        if len(_WORKER_SIM) > 8:
            _WORKER_SIM.clear()
        _WORKER_SIM[key] = PSFSimulator.from_settings(
            settings, n_modes=simulated_modes(settings),
            numerical_aperture=o.numerical_aperture * na_scale, wavelength_um=o.wavelength_um * wavelength_scale,
            pixel_size_um=settings.camera.pixel_size_um * pixel_scale, polarisation=polarisation or o.polarisation)
    return _WORKER_SIM[key]


def simulated_modes(settings: "Settings") -> int:
    """Noll modes 1..N that the data simulator covers (labelled and unlabelled)."""
    ds = settings.dataset
    return max(22, max(ds.modes, default=1), max(ds.unlabelled_modes, default=1))


_OPPOSITE_HAND = {"circular_plus": "circular_minus", "circular_minus": "circular_plus"}


def slm_mask_phase(sim: Any, offsets: np.ndarray, stroke: np.ndarray) -> Any:
    """The vortex phase the SLM delivers (B, 2, Na, Nc) at the simulator's pupil nodes: the
    wrapped vortex ``mod(l atan2(v - oy, u - ox), 2 pi)`` centred at the mask offset, times the
    SLM's phase stroke (1 = the grey levels deliver exactly 2 pi; 0.9 = 10 % short, leaving a
    step of 0.2 pi at the wrap)."""
    import torch

    from autoalign.simulation.pupil import beam_phase

    o = sim.optics
    u, v = (torch.as_tensor(a, dtype=sim.rdtype) for a in sim.pupil_coordinates())
    ox = torch.as_tensor(offsets[:, 0], dtype=sim.rdtype)[:, None, None, None]
    oy = torch.as_tensor(offsets[:, 1], dtype=sim.rdtype)[:, None, None, None]
    phase = beam_phase(u, v, o.beam, o.vortex_charge, o.tophat_radius, ox, oy)
    phase = torch.remainder(phase, 2 * math.pi)
    return phase * torch.as_tensor(stroke, dtype=sim.rdtype)[:, None, None, None]


def render_samples(settings: "Settings", coeffs: np.ndarray, offsets: np.ndarray, instrument: np.ndarray,
                   impure: bool = True) -> np.ndarray:
    """Noise-free ortho-sections (B, 3, n, n) of the given aberrations (B, n_modes, column k =
    Noll k+1), mask offsets (B, 2) and instrument draws (B, 5, :data:`INSTRUMENT_FIELDS`),
    normalised to the NOMINAL instrument's unaberrated peak. The SLM stroke scales the vortex
    phase (the aberration is in the beam, not on the SLM); with ``impure`` the wrong circular
    hand is mixed in incoherently, ``(1 - f) I_right + f I_wrong``, both on the right hand's
    intensity scale."""
    import torch

    nominal = _simulator(settings)
    out = np.empty((len(coeffs), 3, settings.camera.roi_px, settings.camera.roi_px), dtype=np.float32)
    keys = [tuple(row) for row in np.round(instrument[:, :3], 12)]
    start = 0
    while start < len(coeffs):  # runs of samples that share NA, wavelength and pixel size
        stop = start + 1
        while stop < len(coeffs) and keys[stop] == keys[start]:
            stop += 1
        sl = slice(start, stop)
        na, wl, px = instrument[start, :3]
        sim = _simulator(settings, na, wl, px)
        c = torch.as_tensor(coeffs[sl], dtype=sim.rdtype)
        o = torch.as_tensor(offsets[sl], dtype=sim.rdtype)
        mask = slm_mask_phase(sim, offsets[sl], instrument[sl, 4])
        scale = sim._peak / nominal._peak  # back to the nominal instrument's scale
        with torch.no_grad():
            img = sim.orthosections_torch(c, o, pupil_phase=mask, include_mask=False).numpy() * scale
            f = instrument[sl, 3]
            hand = _OPPOSITE_HAND.get(settings.optics.polarisation)
            if impure and hand is not None and np.any(f > 0):
                wrong = _simulator(settings, na, wl, px, polarisation=hand)
                w = wrong.orthosections_torch(c, o, pupil_phase=mask, include_mask=False).numpy()
                w *= wrong._peak / nominal._peak
                img = (1 - f)[:, None, None, None] * img + f[:, None, None, None] * w
        out[sl] = img
        start = stop
    return out


def generate_chunk(settings: "Settings", seed: int, chunk: int, count: int,
                   bake_noise: bool = False) -> dict[str, np.ndarray]:
    """Generate ``count`` samples of chunk ``chunk`` (random stream ``[seed, chunk]``).

    Returns arrays ``img`` (count, 3, n, n) float32, ``labels`` (count, J), ``peak_photons``,
    ``background_photons``, ``bead_diameter_um``, ``centring_rad`` (count, 3), ``decentre_px``
    (count, 3), ``instrument`` (count, 5), ``higher_order_rad`` (count, K)."""
    from autoalign.simulation.centroid import section_centroid
    from autoalign.simulation.optics import shift_to_zernike

    ds, cam, o = settings.dataset, settings.camera, settings.optics
    n_sim = simulated_modes(settings)
    rng = np.random.default_rng([int(seed), int(chunk)])
    modes = list(ds.modes)
    extra = list(ds.unlabelled_modes)
    J = len(modes)
    aberr = draw_aberrations(rng, count, J, ds.max_total_rms_rad, tuple(tuple(m) for m in ds.rms_mix),
                             ds.max_coefficient_rad)
    offsets = np.zeros((count, 2))
    if ds.max_offset > 0:
        offsets = rng.uniform(-ds.max_offset, ds.max_offset, (count, 2))
    bead = rng.uniform(*ds.bead_diameter_range_um, size=count)
    peak = rng.uniform(*ds.peak_photons_range, size=count)
    background = rng.uniform(*ds.background_photons_range, size=count)
    decentre = rng.uniform(-ds.decentre_px, ds.decentre_px, (count, 3))
    higher = draw_higher_order(rng, count, extra, tuple(ds.higher_order_rms_range_rad), ds.higher_order_decay)
    instrument = draw_instrument(rng, count, ds)
    noise_rng = np.random.default_rng([int(seed), int(chunk), 1])

    coeffs = np.zeros((count, n_sim))
    for k, m in enumerate(modes):
        coeffs[:, m - 1] = aberr[:, k]
    for k, m in enumerate(extra):
        coeffs[:, m - 1] += higher[:, k]
    # the loop converts centroids with the NOMINAL pixel size and optics (it does not know the
    # instrument's deviation); the bead blurs on the TRUE pixel grid
    px, dz = cam.pixel_size_um, settings.stack.z_step_um
    true_px = px * instrument[:, 2]
    centring = np.zeros((count, 3))
    for iteration in range(CENTRING_ITERATIONS):
        rendered = render_samples(settings, coeffs, offsets, instrument, impure=False)
        last = iteration == CENTRING_ITERATIONS - 1
        for i in range(count):
            c = section_centroid(_blur(rendered[i], bead[i], true_px[i]))
            # move the focus back by the centroid's displacement (and, the last time, off by the
            # residual decentring)
            d = np.array([-c.x_px, -c.y_px, -c.z_px]) + (decentre[i] if last else 0.0)
            ttd = shift_to_zernike(d[0] * px, d[1] * px, d[2] * dz, o.numerical_aperture,
                                   o.immersion_index, o.wavelength_um)
            step = (ttd[2], ttd[3], ttd[4])
            centring[i] += step
            coeffs[i, 1:4] += step
    second = render_samples(settings, coeffs, offsets, instrument, impure=True)
    img = np.empty_like(second, dtype=np.float32)
    for i in range(count):
        img[i] = _blur(second[i], bead[i], true_px[i])
    if bake_noise:
        from autoalign.simulation.noise import add_noise_numpy

        img = add_noise_numpy(img, peak, background, cam.quantum_efficiency, cam.read_noise_electrons,
                              noise_rng).astype(np.float32)
    labels = aberr if ds.max_offset <= 0 else np.concatenate([aberr, offsets], axis=1)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return {
        "img": f32(img), "labels": f32(labels), "peak_photons": f32(peak),
        "background_photons": f32(background), "bead_diameter_um": f32(bead),
        "centring_rad": f32(centring), "decentre_px": f32(decentre), "instrument": f32(instrument),
        "higher_order_rad": f32(higher.reshape(count, len(extra))),
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
          "decentre_px", "instrument", "higher_order_rad")


def field_shapes(settings: "Settings", size: int) -> dict[str, tuple[int, ...]]:
    """Shape of each per-sample field for ``size`` samples."""
    n = settings.camera.roi_px
    return {"img": (size, 3, n, n), "labels": (size, len(label_names(settings))), "peak_photons": (size,),
            "background_photons": (size,), "bead_diameter_um": (size,), "centring_rad": (size, 3),
            "decentre_px": (size, 3), "instrument": (size, len(INSTRUMENT_FIELDS)),
            "higher_order_rad": (size, len(settings.dataset.unlabelled_modes))}


def dataset_attributes(settings: "Settings", count: int, seed: int, bake_noise: bool) -> dict[str, Any]:
    """The HDF5 attributes of a data set (or shard) generated from these settings."""
    names = label_names(settings)
    n_modes = len(settings.dataset.modes)
    sizes = split_sizes(count, settings.dataset.val_fraction, settings.dataset.test_fraction)
    return {
        "format": DATASET_FORMAT, "modes": np.asarray(settings.dataset.modes, dtype=np.int64),
        "label_names": json.dumps(names),
        "label_units": json.dumps(["rad"] * n_modes + ["pupil radii"] * (len(names) - n_modes)),
        "has_offset": bool(settings.dataset.max_offset > 0), "count": int(count),
        "splits": json.dumps(sizes), "seed": int(seed), "settings_yaml": settings.to_yaml(),
        "code_version": code_version(), "n_px": int(settings.camera.roi_px), "noise_baked": bool(bake_noise),
        "image_units": "photons (noise baked in)" if bake_noise
        else "normalised intensity (1 = unaberrated peak); noise added at load",
        "rms_mix": json.dumps(settings.dataset.rms_mix), "chunk": CHUNK,
        "instrument_fields": json.dumps(list(INSTRUMENT_FIELDS)),
        "unlabelled_modes": json.dumps(list(settings.dataset.unlabelled_modes)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "complete": False,
    }


def _refuse_existing(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists; choose another --out or pass --force to overwrite it")


def write_dataset(settings: "Settings | str | None", count: int, out: str | Path, seed: int = 0,
                  workers: int | None = None, bake_noise: bool = False, progress: bool = True,
                  force: bool = False) -> Path:
    """Generate ``count`` samples and write them to ``out`` (HDF5), atomically: the data go to
    ``out + '.partial'`` which is renamed at the end (an interrupted run leaves no file under the
    final name). ``workers`` processes (default: all cores, at most the number of chunks). An
    existing ``out`` is refused unless ``force``."""
    import h5py
    from tqdm import tqdm

    from autoalign.settings import load_settings

    settings = load_settings(settings)
    if count < 1:
        raise ValueError(f"count = {count}: expected at least 1 sample")
    out = Path(out)
    _refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    sizes = split_sizes(count, settings.dataset.val_fraction, settings.dataset.test_fraction)
    starts = {"train": 0, "val": sizes["train"], "test": sizes["train"] + sizes["val"]}
    syaml = settings.to_yaml()
    jobs = [_Job(syaml, seed, k, min(CHUNK, count - k * CHUNK), bake_noise)
            for k in range(math.ceil(count / CHUNK))]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    t0 = time.time()
    with h5py.File(tmp, "w") as f:
        f.attrs.update(dataset_attributes(settings, count, seed, bake_noise))
        dsets: dict[str, Any] = {}
        for split, size in sizes.items():
            for field, shape in field_shapes(settings, size).items():
                chunks = (max(1, min(size, 64)),) + shape[1:] if size and all(shape[1:]) else None
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

        _run_and_seal(f, jobs, workers, store, bar, t0)
    os.replace(tmp, out)
    return out


def _run_and_seal(f: Any, jobs: list[_Job], workers: int, store: Any, bar: Any, t0: float) -> None:
    """Run the chunk jobs into the open HDF5 file ``f`` (progress ``bar``, closed in any case),
    then mark it complete with its generation time (seconds since ``t0``)."""
    try:
        _run_jobs(jobs, workers, store)
    finally:
        bar.close()
    f.attrs["complete"] = True
    f.attrs["generation_s"] = float(time.time() - t0)


def _run_jobs(jobs: list[_Job], workers: int, store: Any) -> None:
    """Run the chunk jobs in ``workers`` processes (in-process for 1), storing results in order."""
    if workers == 1:
        for job in jobs:
            store(*_run_job(job))
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        for chunk, data in pool.map(_run_job, jobs):
            store(chunk, data)


# ----------------------------------------------------------------------------------- shards
SHARD_FORMAT = "autoalign-psf-shard/1"


def parse_shard(text: str) -> tuple[int, int]:
    """``'i/N'`` -> (i, N) with 0 <= i < N; ValueError naming the value otherwise."""
    try:
        i, n = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text!r}: expected 0 <= i < N")
    return i, n


def shard_path(out: str | Path, shard: int, shards: int) -> Path:
    """File of shard ``shard`` of ``shards`` for the combined data set ``out``:
    ``DIR/NAME.shard-0003-of-0008.h5`` next to it."""
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{shard:04d}-of-{shards:04d}.h5")


def shard_range(count: int, shard: int, shards: int) -> tuple[int, int]:
    """Global sample range [start, stop) of a shard: whole chunks of :data:`CHUNK` samples split
    as evenly as possible, so a sample's content (stream ``[seed, chunk]``) does not depend on
    the number of shards."""
    n_chunks = math.ceil(count / CHUNK)
    c0, c1 = (shard * n_chunks) // shards, ((shard + 1) * n_chunks) // shards
    return min(count, c0 * CHUNK), min(count, c1 * CHUNK)


def write_shard(settings: "Settings | str | None", count: int, out: str | Path, shard: int, shards: int,
                seed: int = 0, workers: int = 1, bake_noise: bool = False, progress: bool = True,
                force: bool = False) -> Path:
    """Write shard ``shard`` of ``shards`` of the ``count``-sample data set ``out`` (to
    :func:`shard_path`), atomically (``.partial`` then rename). Independent of the other shards:
    run them anywhere (processes, machines) and join them with :func:`combine_shards`."""
    import h5py
    from tqdm import tqdm

    from autoalign.settings import load_settings

    settings = load_settings(settings)
    if count < 1:
        raise ValueError(f"count = {count}: expected at least 1 sample")
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: expected 0 <= shard < shards")
    path = shard_path(out, shard, shards)
    _refuse_existing(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    start, stop = shard_range(count, shard, shards)
    syaml = settings.to_yaml()
    jobs = [_Job(syaml, seed, k, min(CHUNK, count - k * CHUNK), bake_noise)
            for k in range(start // CHUNK, math.ceil(stop / CHUNK))]
    t0 = time.time()
    with h5py.File(tmp, "w") as f:
        attrs = dataset_attributes(settings, count, seed, bake_noise)
        attrs.update({"format": SHARD_FORMAT, "shard": int(shard), "shards": int(shards),
                      "start": int(start), "stop": int(stop)})
        f.attrs.update(attrs)
        dsets = {}
        for field, shape in field_shapes(settings, stop - start).items():
            chunks = (max(1, min(shape[0], 64)),) + shape[1:] if shape[0] and all(shape[1:]) else None
            dsets[field] = f.create_dataset(field, shape=shape, dtype=np.float32, chunks=chunks)
        bar = tqdm(total=stop - start, unit="sample", desc=f"shard {shard}/{shards}", disable=not progress,
                   dynamic_ncols=True)

        def store(chunk: int, data: dict[str, np.ndarray]) -> None:
            a = chunk * CHUNK - start
            for field in FIELDS:
                dsets[field][a: a + len(data["labels"])] = data[field]
            bar.update(len(data["labels"]))

        _run_and_seal(f, jobs, max(1, min(workers, len(jobs) or 1)), store, bar, t0)
    os.replace(tmp, path)
    return path


def combine_shards(out: str | Path, shards: int, force: bool = False) -> Path:
    """Join the ``shards`` shard files of ``out`` into the data set ``out`` WITHOUT copying: each
    ``split_field`` is an HDF5 virtual data set mapping onto the shards (relative file names, so
    the folder can be moved as a whole). The split is by global sample index (train = the first
    80 %, ...), whatever the shard boundaries. Checks that every shard is present, complete and
    from the same settings, seed and count; raises :class:`DatasetError` naming the file otherwise."""
    import h5py

    out = Path(out)
    _refuse_existing(out, force)
    paths = [shard_path(out, i, shards) for i in range(shards)]
    metas = []
    for i, p in enumerate(paths):
        if not p.exists():
            partial = p.with_name(p.name + ".partial")
            raise DatasetError(f"{p}: shard {i}/{shards} missing"
                               + (" (still being written, or interrupted)" if partial.exists() else ""))
        try:
            with h5py.File(p, "r") as f:
                a = dict(f.attrs)
                shapes = {k: f[k].shape for k in FIELDS if k in f}
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{p}: not a readable HDF5 file ({exc})") from exc
        dec = lambda v: v.decode() if isinstance(v, bytes) else v  # noqa: E731
        if dec(a.get("format")) != SHARD_FORMAT or not bool(a.get("complete", False)):
            raise DatasetError(f"{p}: not a complete autoalign shard")
        if int(a["shard"]) != i or int(a["shards"]) != shards:
            raise DatasetError(f"{p}: is shard {a['shard']}/{a['shards']}, expected {i}/{shards}")
        metas.append((a, shapes))
    first = metas[0][0]
    for (a, _), p in zip(metas, paths):
        for key in ("count", "seed", "settings_yaml", "noise_baked"):
            if a[key] != first[key]:
                raise DatasetError(f"{p}: {key} differs from {paths[0]} (shards of different runs)")
    count = int(first["count"])
    bounds = [(int(a["start"]), int(a["stop"])) for a, _ in metas]
    if bounds[0][0] != 0 or bounds[-1][1] != count or any(b[1] != c[0] for b, c in zip(bounds, bounds[1:])):
        raise DatasetError(f"{out}: shard ranges {bounds} do not tile 0..{count}")
    sizes = json.loads(first["splits"])
    starts = {"train": 0, "val": sizes["train"], "test": sizes["train"] + sizes["val"]}
    tmp = out.with_name(out.name + ".partial")
    with h5py.File(tmp, "w") as f:
        attrs = {k: v for k, v in first.items() if k not in ("shard", "shards", "start", "stop")}
        attrs.update({"format": DATASET_FORMAT, "complete": True,
                      "shard_files": json.dumps([p.name for p in paths]),
                      "generation_s": float(sum(float(a.get("generation_s", 0.0)) for a, _ in metas))})
        f.attrs.update(attrs)
        for split in SPLITS:
            s0, s1 = starts[split], starts[split] + sizes[split]
            for field in FIELDS:
                tail = metas[0][1][field][1:]
                layout = h5py.VirtualLayout(shape=(s1 - s0,) + tail, dtype=np.float32)
                for p, (a0, a1), (_, shapes) in zip(paths, bounds, metas):
                    lo, hi = max(a0, s0), min(a1, s1)
                    if lo >= hi:
                        continue
                    src = h5py.VirtualSource(p.name, field, shape=shapes[field])
                    layout[lo - s0: hi - s0] = src[lo - a0: hi - a0]
                f.create_virtual_dataset(f"{split}_{field}", layout, fillvalue=np.nan)
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
        for name in json.loads(f.attrs.get("shard_files", "[]")):
            if not (path.parent / name).exists():
                raise DatasetError(f"{path}: its shard {path.parent / name} is missing (a combined data set "
                                   "reads its shards in place: keep them next to it)")
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


def read_split(path: str | Path, split: str, fields: tuple[str, ...] = ("labels", "peak_photons", "background_photons"),
               limit: int | None = None) -> dict[str, np.ndarray]:
    """The per-sample ``fields`` of one split (the first ``limit`` samples) as arrays; a field
    absent from an older file is left out. Raises :class:`DatasetError` naming the file."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    path = Path(path)
    with open_dataset(path) as f:
        try:
            n = f[f"{split}_labels"].shape[0] if limit is None else min(limit, f[f"{split}_labels"].shape[0])
            return {k: f[f"{split}_{k}"][:n] for k in fields if f"{split}_{k}" in f}
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise DatasetError(f"{path}: cannot read split '{split}' ({exc})") from exc


def iter_split_images(path: str | Path, split: str, limit: int | None = None,
                      block: int = 2048) -> Iterator[np.ndarray]:
    """The images (N, 3, n, n) of one split in blocks of ``block`` samples (bounded memory)."""
    path = Path(path)
    with open_dataset(path) as f:
        try:
            d = f[f"{split}_img"]
            n = d.shape[0] if limit is None else min(limit, d.shape[0])
            for a in range(0, n, block):
                yield d[a: min(n, a + block)]
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise DatasetError(f"{path}: cannot read split '{split}' ({exc})") from exc


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    for a in range(0, n, size):
        yield slice(a, min(n, a + size))
