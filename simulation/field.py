"""A simulated bead field: an overview image (and z-stacks) of many gold beads on a slide, seen
through the project's PSF simulator and camera model, with fixed camera defects.

For the bead detection (``calibration/beads.py``), the camera-defect map
(``calibration/camera_defects.py``), their tests, benchmarks and dry runs.

* :func:`random_positions`: N bead positions in a field, a minimum spacing between any two
  (Poisson-disc rejection sampling), optionally a number of close pairs at a chosen distance.
* :class:`SensorDefects`: camera pixels that lie, at fixed positions of the sensor (seeded):
  ``hot`` pixels stuck at full scale, ``dead`` pixels that read the offset (no signal, no noise),
  ``warm`` pixels with extra dark current (Poisson electrons per frame).
* :class:`FieldSimulator`: renders the beads. Each bead is a patch of the vectorial PSF
  (:class:`~autoalign.simulation.vectorial.PSFSimulator`, ``patch_px`` pixels square) centred on
  the bead's nearest pixel, the sub-pixel remainder exact as tip/tilt ``pi NA d / lambda`` (as the
  simulated microscope moves a bead), the focus as the plane's z relative to the bead, blurred by
  the bead's size (:func:`~autoalign.simulation.noise.blur_by_bead`), scaled by the bead's
  brightness; the camera (:class:`~autoalign.simulation.noise.CameraModel`: photons, background,
  shot and read noise, offset, saturation) and then the sensor's defects.
* :func:`simulate_field`: a seeded :class:`BeadField` in one call (the truth with the image).
* :func:`dark_frames`, :func:`flat_frames`: what the same sensor records with the light blocked
  and under uniform light (for ``autoalign calibrate camera --sim``).

Coordinates: images (y, x) = (row, column); positions (x, y[, z]) in micrometres in the field's
frame, whose centre pixel ``[ny // 2, nx // 2]`` is at ``centre_um``: ``x = cx + (col - nx // 2)
pixel``, ``y = cy + (row - ny // 2) pixel``. The aberration may depend on the position
(a callable ``(x_um, y_um) -> coefficients``, for field-dependent aberrations).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from autoalign.settings import Settings, load_settings
from autoalign.simulation.noise import CameraModel, blur_by_bead
from autoalign.simulation.vectorial import PSFSimulator
from autoalign.simulation.zernike import coefficients_to_array

__all__ = ["SensorDefects", "FieldSimulator", "BeadField", "random_positions", "simulate_field", "dark_frames",
           "flat_frames", "DEFAULT_SHAPE", "SIM_HOT_FRACTION", "SIM_DEAD_FRACTION", "SIM_WARM_FRACTION"]

#: default overview size (pixels): 320 x 320 at the default 40 nm pixel = 12.8 µm square
DEFAULT_SHAPE = (320, 320)

#: the simulated camera's defects (fractions of the pixels): hot (stuck at full scale), dead, warm
SIM_HOT_FRACTION, SIM_DEAD_FRACTION, SIM_WARM_FRACTION = 0.001, 0.0002, 0.0005

AberrationLike = Any  # {Noll: rad}, an array (Noll 1..), or a callable (x_um, y_um) -> one of those


# ----------------------------------------------------------------------------- positions
def random_positions(
    n: int,
    extent_um: tuple[float, float],
    rng: np.random.Generator,
    min_spacing_um: float = 0.0,
    margin_um: float = 0.0,
    close_pairs: int = 0,
    pair_distance_um: tuple[float, float] = (1.0, 1.5),
    isolation_um: float | None = None,
    max_tries: int = 20000,
) -> np.ndarray:
    """``n`` bead positions (x, y) in µm inside ``extent_um`` = (width, height) centred on 0, at
    least ``margin_um`` from its border and ``min_spacing_um`` from each other.

    ``close_pairs`` of the beads come in pairs at a distance drawn uniformly in
    ``pair_distance_um`` (random direction), each pair at least ``isolation_um`` (default: the
    larger pair distance) from every other bead, so each pair is a clean case of "one neighbour".
    Raises :class:`ValueError` when the beads do not fit (say which constraint to relax)."""
    if n < 0 or close_pairs < 0 or 2 * close_pairs > n:
        raise ValueError(f"random_positions: n = {n}, close_pairs = {close_pairs}: expected 0 <= 2 pairs <= n")
    w, h = (float(v) for v in extent_um)
    lo_x, hi_x = -0.5 * w + margin_um, 0.5 * w - margin_um
    lo_y, hi_y = -0.5 * h + margin_um, 0.5 * h - margin_um
    if hi_x <= lo_x or hi_y <= lo_y:
        raise ValueError(f"random_positions: margin {margin_um} µm leaves no room in {w} x {h} µm")
    d_lo, d_hi = (float(v) for v in pair_distance_um)
    if close_pairs and not (0 < d_lo <= d_hi):
        raise ValueError(f"pair_distance_um = {pair_distance_um}: expected 0 < low <= high")
    iso = max(d_hi, min_spacing_um) if isolation_um is None else float(isolation_um)
    pts: list[tuple[float, float]] = []
    paired: list[bool] = []

    def far_enough(p: tuple[float, float], spacing: float, spacing_pair: float) -> bool:
        for q, is_pair in zip(pts, paired):
            d = math.hypot(p[0] - q[0], p[1] - q[1])
            if d < (spacing_pair if is_pair else spacing):
                return False
        return True

    tries = 0
    while len(pts) < 2 * close_pairs:
        tries += 1
        if tries > max_tries:
            raise ValueError(f"random_positions: cannot place {close_pairs} isolated close pairs in {w} x {h} µm "
                             f"(isolation {iso} µm); use a larger field or fewer pairs")
        a = (rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y))
        d, ang = rng.uniform(d_lo, d_hi), rng.uniform(0, 2 * math.pi)
        b = (a[0] + d * math.cos(ang), a[1] + d * math.sin(ang))
        if not (lo_x <= b[0] <= hi_x and lo_y <= b[1] <= hi_y):
            continue
        if far_enough(a, iso, iso) and far_enough(b, iso, iso):
            pts += [a, b]
            paired += [True, True]
    while len(pts) < n:
        tries += 1
        if tries > max_tries:
            raise ValueError(f"random_positions: cannot place {n} beads {min_spacing_um} µm apart in {w} x {h} µm "
                             f"(placed {len(pts)}); use a larger field, fewer beads or a smaller spacing")
        p = (rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y))
        if far_enough(p, min_spacing_um, iso):
            pts.append(p)
            paired.append(False)
    return np.array(pts, dtype=float).reshape(n, 2)


# ----------------------------------------------------------------------------- sensor defects
@dataclass(frozen=True)
class SensorDefects:
    """Pixels of a sensor that lie, at fixed positions (rows, columns; int arrays (K, 2)).

    hot : stuck at full scale (the ADC's maximum) in every frame
    dead : read the camera offset in every frame (no signal, no noise)
    warm : extra dark current, ``warm_electrons`` (K,) mean electrons per frame (Poisson)
    """

    shape: tuple[int, int]
    hot: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), int))
    dead: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), int))
    warm: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), int))
    warm_electrons: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @classmethod
    def random(cls, shape: tuple[int, int], hot_fraction: float = 0.001, dead_fraction: float = 0.0,
               warm_fraction: float = 0.0, warm_electrons: tuple[float, float] = (20.0, 200.0),
               seed: int = 0) -> "SensorDefects":
        """Defects at random, distinct pixels (seeded: the same seed gives the same sensor): a
        fraction of the pixels hot, dead and warm (dark current uniform in ``warm_electrons``)."""
        ny, nx = (int(v) for v in shape)
        for name, f in (("hot_fraction", hot_fraction), ("dead_fraction", dead_fraction),
                        ("warm_fraction", warm_fraction)):
            if not 0.0 <= f <= 0.1:
                raise ValueError(f"{name} = {f}: expected 0 .. 0.1")
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5E2504]))
        # one permutation of the pixels; each kind takes its pixels from its own third of it, so
        # the hot pixels of a seed stay where they are whatever the other fractions
        n = ny * nx
        order = rng.permutation(n)
        counts = [min(int(round(f * n)), n // 3) for f in (hot_fraction, dead_fraction, warm_fraction)]
        picks = [order[k * (n // 3):k * (n // 3) + c] for k, c in enumerate(counts)]
        rc = [np.stack(np.unravel_index(p, (ny, nx)), axis=1).astype(int).reshape(-1, 2) for p in picks]
        lo, hi = warm_electrons
        warm_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x3A53]))
        return cls((ny, nx), rc[0], rc[1], rc[2], warm_rng.uniform(lo, hi, size=counts[2]))

    @classmethod
    def simulated_camera(cls, shape: tuple[int, int] = (320, 320), seed: int = 0,
                         hot_fraction: float = SIM_HOT_FRACTION) -> "SensorDefects":
        """The simulated camera's sensor (``autoalign calibrate camera``, ``autoalign overview --sim``):
        :data:`SIM_HOT_FRACTION` hot (full scale), :data:`SIM_DEAD_FRACTION` dead and
        :data:`SIM_WARM_FRACTION` warm pixels, seeded by ``seed`` (``simulation.seed``)."""
        return cls.random(shape, hot_fraction, SIM_DEAD_FRACTION, SIM_WARM_FRACTION, seed=seed)

    def crop(self, shape: tuple[int, int]) -> "SensorDefects":
        """The defects of the sensor's top-left window of ``shape`` pixels (a camera ROI)."""
        ny, nx = int(shape[0]), int(shape[1])
        if ny > self.shape[0] or nx > self.shape[1]:
            raise ValueError(f"a window of {ny} x {nx} pixels on a sensor of {self.shape[0]} x {self.shape[1]}")

        def keep(rc: np.ndarray) -> np.ndarray:
            return (rc[:, 0] < ny) & (rc[:, 1] < nx)

        w = keep(self.warm)
        return SensorDefects((ny, nx), self.hot[keep(self.hot)], self.dead[keep(self.dead)], self.warm[w],
                             self.warm_electrons[w])

    def mask(self, kind: str = "any") -> np.ndarray:
        """Boolean mask of the sensor: ``hot``, ``dead``, ``warm`` or ``any``."""
        m = np.zeros(self.shape, bool)
        for k in (("hot", "dead", "warm") if kind == "any" else (kind,)):
            rc = getattr(self, k)
            if len(rc):
                m[rc[:, 0], rc[:, 1]] = True
        return m

    def apply(self, adu: np.ndarray, camera: CameraModel, rng: np.random.Generator | None) -> np.ndarray:
        """The frames ``adu`` (..., ny, nx) as this sensor records them (a copy): warm pixels
        gain their dark electrons (Poisson, or the mean without ``rng``), dead pixels read the
        offset, hot pixels full scale."""
        out = np.array(adu, dtype=float, copy=True)
        if out.shape[-2:] != self.shape:
            raise ValueError(f"frames of {out.shape[-2:]} pixels on a sensor of {self.shape}")
        if len(self.warm):
            lead = out.shape[:-2]
            mean = np.broadcast_to(self.warm_electrons, lead + (len(self.warm),))
            e = rng.poisson(mean).astype(float) if rng is not None else np.array(mean, float)
            r, c = self.warm[:, 0], self.warm[:, 1]
            out[..., r, c] = np.clip(np.round(out[..., r, c] + e * camera.gain_adu_per_electron), 0,
                                     camera.saturation_adu)
        if len(self.dead):
            out[..., self.dead[:, 0], self.dead[:, 1]] = camera.offset_adu
        if len(self.hot):
            out[..., self.hot[:, 0], self.hot[:, 1]] = camera.saturation_adu
        return out


def dark_frames(camera: CameraModel, defects: SensorDefects, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """``n_frames`` dark frames (n, ny, nx) ADU: no light (no background either), read noise,
    offset, the sensor's defects."""
    dark = replace(camera, background_photons=0.0)
    frames = dark.expose(np.zeros((int(n_frames),) + tuple(defects.shape)), rng)
    return defects.apply(frames, camera, rng)


def flat_frames(camera: CameraModel, defects: SensorDefects, n_frames: int, rng: np.random.Generator,
                photons: float = 1000.0) -> np.ndarray:
    """``n_frames`` frames (n, ny, nx) ADU under uniform light of ``photons`` per pixel."""
    flat = replace(camera, background_photons=float(photons))
    frames = flat.expose(np.zeros((int(n_frames),) + tuple(defects.shape)), rng)
    return defects.apply(frames, camera, rng)


# ----------------------------------------------------------------------------- rendering
@dataclass
class BeadField:
    """A simulated overview and its truth (see :func:`simulate_field`).

    image : (ny, nx) ADU (None when only the truth was drawn)
    beads_um : (n, 3) bead positions (x, y, z), µm, in the field frame
    brightness : (n,) scattering of each bead relative to the nominal bead
    """

    image: np.ndarray | None
    beads_um: np.ndarray
    brightness: np.ndarray
    pixel_size_um: float
    centre_um: tuple[float, float]
    defects: SensorDefects
    camera: CameraModel
    beam: str
    seed: int = 0
    focus_um: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        return self.defects.shape

    def pixel_of(self, xy_um: np.ndarray) -> np.ndarray:
        """(row, col) pixel coordinates (float) of positions (..., 2) = (x, y) µm."""
        xy = np.asarray(xy_um, dtype=float)
        ny, nx = self.shape
        col = nx // 2 + (xy[..., 0] - self.centre_um[0]) / self.pixel_size_um
        row = ny // 2 + (xy[..., 1] - self.centre_um[1]) / self.pixel_size_um
        return np.stack([row, col], axis=-1)

    def nearest_neighbour_um(self) -> np.ndarray:
        """(n,) distance (µm, lateral) from each bead to its nearest other bead (inf for one bead)."""
        xy = self.beads_um[:, :2]
        if len(xy) < 2:
            return np.full(len(xy), np.inf)
        d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        return d.min(axis=1)

    def truth(self) -> dict[str, Any]:
        return {"beads_um": self.beads_um.tolist(), "brightness": self.brightness.tolist(),
                "pixel_size_um": self.pixel_size_um, "centre_um": list(self.centre_um), "shape": list(self.shape),
                "hot_pixels": int(len(self.defects.hot)), "dead_pixels": int(len(self.defects.dead)),
                "warm_pixels": int(len(self.defects.warm)), "beam": self.beam, "seed": self.seed}


class FieldSimulator:
    """Renders bead fields on a camera of ``shape`` pixels (see the module docstring).

    settings : optics, camera (pixel size, photons, noise, bead diameter) from these
    shape : (ny, nx) overview size, pixels
    pixel_size_um : default ``camera.pixel_size_um``
    beam : the beam scanning the beads (default ``optics.beam``; ``none``: a confocal/widefield spot)
    aberration : {Noll: rad}, array or callable (x_um, y_um) -> coefficients (default none)
    patch_px : rendered extent of one bead's PSF, pixels (128 at 40 nm: the tails beyond are
        below 1e-3 of the peak)
    """

    def __init__(self, settings: "Settings | str | None" = None, shape: tuple[int, int] = DEFAULT_SHAPE,
                 pixel_size_um: float | None = None, beam: str | None = None,
                 aberration: AberrationLike = None, patch_px: int = 128, centre_um: tuple[float, float] = (0.0, 0.0),
                 pupil_samples: int | None = None) -> None:
        s = load_settings(settings)
        self.settings = s
        self.shape = (int(shape[0]), int(shape[1]))
        self.pixel_size_um = float(s.camera.pixel_size_um if pixel_size_um is None else pixel_size_um)
        self.beam = str(s.optics.beam if beam is None else beam)
        self.camera = CameraModel.from_settings(s)
        self.bead_diameter_um = float(s.camera.bead_diameter_um)
        self.patch_px = int(patch_px)
        self.centre_um = (float(centre_um[0]), float(centre_um[1]))
        over: dict[str, Any] = {"n_px": self.patch_px, "z_um": [0.0], "pixel_size_um": self.pixel_size_um,
                                "beam": self.beam}
        if pupil_samples is not None:
            over["pupil_samples"] = int(pupil_samples)
        self.simulator = PSFSimulator.from_settings(s, **over)
        self.aberration = aberration
        o = s.optics
        self._tip_per_um = math.pi * o.numerical_aperture / o.wavelength_um

    # -------------------------------------------------------------- one bead
    def _coefficients(self, x_um: float, y_um: float) -> np.ndarray:
        ab = self.aberration
        if callable(ab):
            ab = ab(x_um, y_um)
        return coefficients_to_array({} if ab is None else ab, self.simulator.n_modes).astype(float)

    def psf(self, dx_px: float = 0.0, dy_px: float = 0.0, z_um: Sequence[float] = (0.0,),
            at_um: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
        """Noise-free normalised intensity (nz, patch, patch) of one nominal bead displaced by
        (dx, dy) pixels from the patch's centre pixel ``patch // 2``, with the focus ``z_um`` from
        the bead (the aberration of the field point ``at_um``), bead blur included."""
        import torch

        c = self._coefficients(*at_um)
        c[1] += self._tip_per_um * dx_px * self.pixel_size_um
        c[2] += self._tip_per_um * dy_px * self.pixel_size_um
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small products: one thread is faster on a shared machine
        try:
            inten = self.simulator.stack(c, z_um=np.asarray(z_um, dtype=float).ravel())
        finally:
            torch.set_num_threads(threads)
        return blur_by_bead(inten, self.bead_diameter_um, self.pixel_size_um)

    # -------------------------------------------------------------- many beads
    def pixel_of(self, xy_um: np.ndarray) -> np.ndarray:
        xy = np.asarray(xy_um, dtype=float)
        ny, nx = self.shape
        return np.stack([ny // 2 + (xy[..., 1] - self.centre_um[1]) / self.pixel_size_um,
                         nx // 2 + (xy[..., 0] - self.centre_um[0]) / self.pixel_size_um], axis=-1)

    def intensity(self, beads_um: np.ndarray, brightness: np.ndarray | None = None,
                  focus_um: Sequence[float] = (0.0,)) -> np.ndarray:
        """Noise-free normalised intensity (nz, ny, nx) of the beads (n, 2 or 3: x, y[, z] µm) with
        the focus at each of ``focus_um`` (the plane's z relative to bead ``z``)."""
        beads = np.asarray(beads_um, dtype=float).reshape(-1, np.shape(beads_um)[-1] if np.size(beads_um) else 2)
        if beads.shape[1] == 2:
            beads = np.concatenate([beads, np.zeros((len(beads), 1))], axis=1)
        b = np.ones(len(beads)) if brightness is None else np.asarray(brightness, dtype=float).ravel()
        focus = np.asarray(focus_um, dtype=float).ravel()
        ny, nx = self.shape
        p, h = self.patch_px, self.patch_px // 2
        canvas = np.zeros((len(focus), ny + 2 * p, nx + 2 * p))
        for (x, y, z), bright in zip(beads, b):
            row, col = self.pixel_of(np.array([x, y]))
            ri, ci = int(round(row)), int(round(col))
            if not (-h <= ri < ny + h and -h <= ci < nx + h):
                continue  # nothing of it reaches the field
            patch = self.psf(col - ci, row - ri, focus - z, at_um=(x, y))
            r0, c0 = ri - h + p, ci - h + p
            canvas[:, r0:r0 + p, c0:c0 + p] += bright * patch
        return canvas[:, p:p + ny, p:p + nx]

    def render(self, beads_um: np.ndarray, rng: np.random.Generator | None, brightness: np.ndarray | None = None,
               defects: SensorDefects | None = None, focus_um: Sequence[float] = (0.0,)) -> np.ndarray:
        """Frames (nz, ny, nx) in ADU: :meth:`intensity` through the camera (shot and read noise;
        the mean without ``rng``) and the sensor's ``defects``."""
        inten = self.intensity(beads_um, brightness, focus_um)
        cam = self.camera
        if rng is None:
            adu = np.clip(cam.expected_electrons(inten) * cam.gain_adu_per_electron + cam.offset_adu, 0,
                          cam.saturation_adu)
        else:
            adu = cam.expose(inten, rng)
        return defects.apply(adu, cam, rng) if defects is not None else adu


def simulate_field(
    settings: "Settings | str | None" = None,
    n_beads: int = 10,
    seed: int = 0,
    shape: tuple[int, int] = DEFAULT_SHAPE,
    min_spacing_um: float = 1.0,
    close_pairs: int = 0,
    pair_distance_um: tuple[float, float] = (1.0, 1.5),
    margin_um: float = 0.0,
    hot_fraction: float = 0.001,
    dead_fraction: float = 0.0,
    warm_fraction: float = 0.0,
    sensor_seed: int | None = None,
    brightness_spread: float = 0.0,
    z_spread_um: float = 0.0,
    beam: str | None = None,
    aberration: AberrationLike = None,
    pixel_size_um: float | None = None,
    noise: bool = True,
    simulator: FieldSimulator | None = None,
    beads_um: np.ndarray | None = None,
    defects: SensorDefects | None = None,
) -> BeadField:
    """A seeded simulated overview of ``n_beads`` beads (see the module docstring).

    The positions are drawn by :func:`random_positions` over the whole image (``margin_um`` from
    its border, ``min_spacing_um`` apart, ``close_pairs`` pairs at ``pair_distance_um``), unless
    ``beads_um`` (n, 2 or 3) gives them. ``brightness_spread``: relative standard deviation of the
    beads' brightness (log-normal); ``z_spread_um``: standard deviation of their heights. The
    sensor's defects are seeded by ``sensor_seed`` (default ``seed``): the same sensor seed gives
    the same hot pixels whatever the beads, as on a real camera; ``defects`` gives the sensor
    instead (e.g. ``SensorDefects.simulated_camera().crop(shape)``)."""
    sim = simulator or FieldSimulator(settings, shape=shape, pixel_size_um=pixel_size_um, beam=beam,
                                      aberration=aberration)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xBEAD]))
    ny, nx = sim.shape
    extent = (nx * sim.pixel_size_um, ny * sim.pixel_size_um)
    if beads_um is None:
        xy = random_positions(n_beads, extent, rng, min_spacing_um=min_spacing_um, margin_um=margin_um,
                              close_pairs=close_pairs, pair_distance_um=pair_distance_um)
        # random_positions centres the extent on 0; the field's centre pixel is at centre_um
        xy = xy + np.array(sim.centre_um) - 0.5 * sim.pixel_size_um * ((np.array([nx, ny]) + 1) % 2)
        z = rng.normal(0.0, z_spread_um, size=len(xy)) if z_spread_um > 0 else np.zeros(len(xy))
        beads = np.concatenate([xy, z[:, None]], axis=1)
    else:
        beads = np.asarray(beads_um, dtype=float)
        if beads.ndim != 2 or beads.shape[1] not in (2, 3):
            raise ValueError(f"beads_um of shape {beads.shape}: expected (n, 2) or (n, 3) (x, y[, z]) µm")
        if beads.shape[1] == 2:
            beads = np.concatenate([beads, np.zeros((len(beads), 1))], axis=1)
    n = len(beads)
    if brightness_spread > 0:
        s2 = math.log(1 + brightness_spread**2)
        bright = rng.lognormal(-0.5 * s2, math.sqrt(s2), size=n)
    else:
        bright = np.ones(n)
    if defects is None:
        defects = SensorDefects.random(sim.shape, hot_fraction, dead_fraction, warm_fraction,
                                       seed=int(seed if sensor_seed is None else sensor_seed))
    elif defects.shape != sim.shape:
        raise ValueError(f"a sensor of {defects.shape} pixels for a field of {sim.shape}")
    noise_rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x0015E])) if noise else None
    image = sim.render(beads, noise_rng, bright, defects)[0]
    return BeadField(image=image, beads_um=beads, brightness=bright, pixel_size_um=sim.pixel_size_um,
                     centre_um=sim.centre_um, defects=defects, camera=sim.camera, beam=sim.beam, seed=int(seed))
