"""The simulated microscope: one seeded object holding the hidden truth, rendering what the camera
sees from the grey image the (simulated) SLM shows.

Hidden truth
------------
* ``aberration``: the system aberration, Zernike coefficients Noll 1..``n_modes`` (radians), by
  default drawn from ``settings.simulation`` (``aberration_rms_rad`` spread randomly over
  ``aberration_modes``, root-sum-square exactly ``aberration_rms_rad``), seeded.
* ``mask_offset``: lateral misregistration of the SLM relative to the pupil (pupil radii, (x, y)):
  the phase at pupil point ``(u, v)`` is the SLM's at ``(u - ox, v - oy)`` (a vortex shown centred
  appears at ``(ox, oy)``, the ``mask_offset`` convention of :class:`PSFSimulator`).
* ``bead_um``: the gold bead's position (x, y, z) in micrometres, in stage coordinates; it
  random-walks by ``settings.simulation.drift_um_per_step`` (standard deviation per axis) at each
  acquisition (:meth:`new_acquisition`), so it eventually walks off.
* The stage: ``stage_xy_um`` and ``focus_um`` (moved by the simulated stages).

Rendering
---------
The pupil phase is decoded from the SLM's grey image with the SLM geometry
(:meth:`hardware.slm.convert.PhaseToGrey.decode_at`: pupil centre/radius, flips, split screen,
flatness, LUT, 8-bit wrapping all exercised) at the simulator's pupil nodes, shifted by
``mask_offset``; the hidden aberration is added, the beam's own mask is left out (the SLM makes
the vortex). The bead's lateral offset from the stage, ``d = bead - stage``, enters exactly as
tip/tilt ``pi NA d / lambda`` (Noll 2 for x, 3 for y; positive moves the image to +x/+y, so a bead
displaced by ``d`` is seen displaced by ``d / pixel`` pixels); focus as the plane's z relative to
the bead, ``z = focus - bead_z``. Then the bead's size (:func:`blur_by_bead`) and the camera
(:class:`CameraModel`: photons, shot and read noise, gain, offset, saturation), in ADU.

Units: micrometres, radians, pixels; arrays (z, y, x).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from autoalign.hardware.slm.convert import PhaseToGrey
from autoalign.settings import Settings, load_settings
from autoalign.simulation.noise import CameraModel, blur_by_bead
from autoalign.simulation.phase import fit_zernike, mask_phase, pupil_grid, zernike_phase
from autoalign.simulation.vectorial import PSFSimulator
from autoalign.simulation.zernike import CoefficientsLike, coefficients_to_array, rms

__all__ = ["SimulatedMicroscope", "draw_aberration", "simulator_for", "orient_image", "CAMERA_ORIENTATIONS"]

_SIMULATORS: dict[tuple, PSFSimulator] = {}


def simulator_for(settings: "Settings", n_modes: int = 22, dtype: torch.dtype = torch.float32) -> PSFSimulator:
    """A :class:`PSFSimulator` for the camera ROI and stack of ``settings`` (cached: building one
    costs ~0.5 s and it holds no per-call state), covering Noll 1..``n_modes``."""
    o, c, st = settings.optics, settings.camera, settings.stack
    key = (o.numerical_aperture, o.immersion_index, o.wavelength_um, o.beam, o.vortex_charge,
           o.tophat_radius, o.polarisation, o.linear_angle_deg, o.pupil_samples,
           c.pixel_size_um, c.roi_px, st.planes, st.z_step_um, int(n_modes), dtype)
    sim = _SIMULATORS.get(key)
    if sim is None:
        if len(_SIMULATORS) > 8:
            _SIMULATORS.clear()
        sim = _SIMULATORS[key] = PSFSimulator.from_settings(settings, n_modes=int(n_modes), dtype=dtype)
    return sim


CAMERA_ORIENTATIONS = ("identity", "mirror_x", "mirror_y", "rotate_180", "transpose")


#: the ``simulation`` keys of a true instrument that is exactly the settings
NOMINAL_INSTRUMENT = {"simulation.true_na_scale": 1.0, "simulation.true_wavelength_scale": 1.0,
                      "simulation.true_pixel_scale": 1.0, "simulation.true_bead_diameter_um": None}


def true_instrument(settings: "Settings") -> "Settings":
    """The settings of the instrument the simulated microscope really is: ``settings`` with the
    NA, wavelength and camera pixel size scaled by ``simulation.true_na_scale``,
    ``true_wavelength_scale``, ``true_pixel_scale`` and the bead of ``true_bead_diameter_um``.
    The loop and its models keep the settings they were given (what the user believes), so this
    is a sim-to-real mismatch; the truth metrics use the true instrument. The result's own
    ``true_*`` keys are nominal (applying it twice changes nothing)."""
    sim = settings.simulation
    over: dict[str, Any] = {}
    if sim.true_na_scale != 1.0:
        over["optics.numerical_aperture"] = settings.optics.numerical_aperture * sim.true_na_scale
        over["optics.back_aperture_radius_mm"] = settings.optics.back_aperture_radius_mm * sim.true_na_scale
    if sim.true_wavelength_scale != 1.0:
        over["optics.wavelength_um"] = settings.optics.wavelength_um * sim.true_wavelength_scale
    if sim.true_pixel_scale != 1.0:
        over["camera.pixel_size_um"] = settings.camera.pixel_size_um * sim.true_pixel_scale
    if sim.true_bead_diameter_um is not None:
        over["camera.bead_diameter_um"] = float(sim.true_bead_diameter_um)
    return settings.replace(**over, **NOMINAL_INSTRUMENT) if over else settings


def nominal_instrument(settings: "Settings") -> "Settings":
    """``settings`` whose simulated instrument is what they say (no :func:`true_instrument`
    mismatch): for the models the loop builds from its settings (the ideal reference, probes)."""
    return settings.replace(**NOMINAL_INSTRUMENT)


def orient_image(image: np.ndarray, orientation: str) -> np.ndarray:
    """The camera's view of ``image`` (last two axes y, x) for a camera mounted with
    ``orientation`` relative to the SLM/pupil frame: ``mirror_x`` (x -> -x), ``mirror_y``
    (y -> -y), ``rotate_180`` (both), ``transpose`` (x <-> y) or ``identity``. Mirrors are about
    the ROI's centre pixel ``n // 2`` (pixel i -> (n - i) mod n), so a centred bead stays centred."""
    a = np.asarray(image)
    if orientation == "identity":
        return a
    if orientation == "transpose":
        return np.swapaxes(a, -1, -2)
    if orientation not in CAMERA_ORIENTATIONS:
        raise ValueError(f"simulation.camera_orientation = {orientation!r}: expected one of "
                         f"{', '.join(CAMERA_ORIENTATIONS)}")
    if orientation in ("mirror_x", "rotate_180"):
        n = a.shape[-1]
        a = a[..., (n - np.arange(n)) % n]
    if orientation in ("mirror_y", "rotate_180"):
        n = a.shape[-2]
        a = a[..., (n - np.arange(n)) % n, :]
    return a


def draw_aberration(
    rng: np.random.Generator, modes: Sequence[int], rms_rad: float, n_modes: int = 22
) -> np.ndarray:
    """Random Zernike coefficients (Noll 1..n_modes) over ``modes`` with root-sum-square exactly
    ``rms_rad`` (a random direction in the space of the given modes)."""
    out = np.zeros(n_modes)
    modes = [int(m) for m in modes if 1 <= int(m) <= n_modes]
    if not modes or rms_rad <= 0:
        return out
    values = rng.normal(size=len(modes))
    norm = float(np.sqrt(np.sum(values**2)))
    if norm == 0:
        return out
    out[np.array(modes) - 1] = values * (rms_rad / norm)
    return out


class SimulatedMicroscope:
    """The simulated microscope's hidden truth and its renderer (see the module docstring).

    Parameters
    ----------
    settings : Settings (or a path); optics, camera, stack, slm and simulation sections are used
    seed : overrides ``settings.simulation.seed`` (aberration draw, drift and noise, separate streams)
    aberration : hidden aberration {Noll: rad} or array; default drawn from the settings
    mask_offset : hidden SLM misregistration (pupil radii); default ``settings.simulation.mask_offset``
    bead_um : initial bead position (x, y, z) µm; default ``settings.simulation.bead_position_um``
    drift_um_per_step : overrides ``settings.simulation.drift_um_per_step``
    noise : False renders the mean ADU (no shot/read noise), for deterministic checks
    slm_geometry : the TRUE SLM geometry used to decode the SLM image (default: from
        ``settings.slm``); pass a different :class:`PhaseToGrey` to inject a misconfigured SLM
    image_transform : optional function applied to each rendered frame/stack (last two axes are
        y, x), e.g. ``lambda a: a[..., ::-1]`` for a mirrored camera
    wrong_hand_fraction, wrong_hand_phase_rad, slm_phase_scale, camera_orientation,
    higher_order_rms_rad : hidden faults, default ``settings.simulation`` (see the module
        docstring, "Hidden faults")
    """

    def __init__(
        self,
        settings: "Settings | str | None" = None,
        seed: int | None = None,
        aberration: CoefficientsLike | None = None,
        mask_offset: Sequence[float] | None = None,
        bead_um: Sequence[float] | None = None,
        drift_um_per_step: float | None = None,
        noise: bool = True,
        slm_geometry: "PhaseToGrey | None" = None,
        image_transform: Callable[[np.ndarray], np.ndarray] | None = None,
        wrong_hand_fraction: float | None = None,
        wrong_hand_phase_rad: float | None = None,
        slm_phase_scale: float | None = None,
        camera_orientation: str | None = None,
        higher_order_rms_rad: float | None = None,
    ) -> None:
        given = load_settings(settings)
        s = true_instrument(given)
        self.settings = s
        # what the camera's configuration says (Micro-Manager's pixel size calibration): the
        # settings' value, not the true instrument's
        self.reported_pixel_size_um = float(given.camera.pixel_size_um)
        sim_s = s.simulation
        self.seed = int(sim_s.seed if seed is None else seed)
        seq = np.random.SeedSequence(self.seed)
        ab_seq, drift_seq, noise_seq, high_seq = seq.spawn(4)  # the first three as before
        self._drift_rng = np.random.default_rng(drift_seq)
        self.noise_rng = np.random.default_rng(noise_seq)
        self.higher_order_rms_rad = float(
            sim_s.higher_order_rms_rad if higher_order_rms_rad is None else higher_order_rms_rad)
        high_modes = list(range(16, 29)) if sim_s.higher_order_modes is None else list(sim_s.higher_order_modes)
        bad = [m for m in list(sim_s.aberration_modes) + high_modes if not 1 <= int(m) <= 66]
        if bad:
            raise ValueError(f"{s.source}: simulation.aberration_modes/higher_order_modes contain {bad}: "
                             "expected Noll indices 1..66")
        needed = max([22, *sim_s.aberration_modes, *(high_modes if self.higher_order_rms_rad > 0 else [])])
        if aberration is not None:
            needed = max(needed, coefficients_to_array(aberration).shape[-1])
        self.simulator = simulator_for(s, n_modes=needed)
        self.n_modes = self.simulator.n_modes
        self.wrong_hand_fraction = float(sim_s.wrong_hand_fraction if wrong_hand_fraction is None
                                         else wrong_hand_fraction)
        self.wrong_hand_phase_rad = float(sim_s.wrong_hand_phase_rad if wrong_hand_phase_rad is None
                                          else wrong_hand_phase_rad)
        if not 0.0 <= self.wrong_hand_fraction <= 1.0:
            raise ValueError(f"wrong_hand_fraction = {self.wrong_hand_fraction}: expected 0..1")
        self.slm_phase_scale = float(sim_s.slm_phase_scale if slm_phase_scale is None else slm_phase_scale)
        if not (math.isfinite(self.slm_phase_scale) and self.slm_phase_scale > 0):
            raise ValueError(f"slm_phase_scale = {self.slm_phase_scale}: expected a finite number > 0")
        self.camera_orientation = str(sim_s.camera_orientation if camera_orientation is None
                                      else camera_orientation)
        if self.camera_orientation not in CAMERA_ORIENTATIONS:
            raise ValueError(f"camera_orientation = {self.camera_orientation!r}: expected one of "
                             f"{', '.join(CAMERA_ORIENTATIONS)}")
        self._pupil_field = self.simulator.pupil_field(self.wrong_hand_fraction, self.wrong_hand_phase_rad)
        self.camera_model = CameraModel.from_settings(s)
        self.pixel_size_um = float(s.camera.pixel_size_um)
        self.roi_px = int(s.camera.roi_px)
        o = s.optics
        self.wavelength_um = float(o.wavelength_um)
        self.numerical_aperture = float(o.numerical_aperture)
        if aberration is None:
            self.aberration = draw_aberration(
                np.random.default_rng(ab_seq), sim_s.aberration_modes, sim_s.aberration_rms_rad, self.n_modes
            )
        else:
            self.aberration = coefficients_to_array(aberration, self.n_modes).astype(float).copy()
        if aberration is None and self.higher_order_rms_rad > 0:
            self.aberration = self.aberration + draw_aberration(
                np.random.default_rng(high_seq), high_modes, self.higher_order_rms_rad, self.n_modes)
        off = sim_s.mask_offset if mask_offset is None else mask_offset
        self.mask_offset = (float(off[0]), float(off[1]))
        self._bead = np.array(sim_s.bead_position_um if bead_um is None else bead_um, dtype=float)
        if self._bead.shape != (3,) or not np.all(np.isfinite(self._bead)):
            raise ValueError(f"bead position {bead_um!r}: expected three finite numbers (x, y, z) µm")
        self.drift_um_per_step = float(sim_s.drift_um_per_step if drift_um_per_step is None else drift_um_per_step)
        self.noise = bool(noise)
        self.slm_geometry = slm_geometry if slm_geometry is not None else PhaseToGrey.from_settings(
            s, name="simulated SLM")
        self.image_transform = image_transform
        self.stage_xy_um: tuple[float, float] = (0.0, 0.0)
        self.focus_um: float = 0.0
        self.acquisitions = 0
        self.frames = 0
        # the SLM state (set by hardware.simulated.SimulatedSLM)
        self._slm_grey: np.ndarray | None = None
        self._slm_phase: np.ndarray | None = None
        self._slm_flips = (False, False)
        self._slm_version = 0
        self._pupil_cache: tuple[int, tuple[float, float], np.ndarray] | None = None
        self._applied_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ truth
    @property
    def bead_um(self) -> tuple[float, float, float]:
        """The bead's position (x, y, z) in micrometres (stage coordinates)."""
        return (float(self._bead[0]), float(self._bead[1]), float(self._bead[2]))

    @bead_um.setter
    def bead_um(self, value: Sequence[float]) -> None:
        arr = np.array(value, dtype=float)
        if arr.shape != (3,) or not np.all(np.isfinite(arr)):
            raise ValueError(f"bead position {value!r}: expected three finite numbers (x, y, z) µm")
        self._bead = arr

    def set_aberration(self, coefficients: CoefficientsLike) -> None:
        """Replace the hidden aberration ({Noll: rad} or array, Noll 1..n_modes)."""
        self.aberration = coefficients_to_array(coefficients, self.n_modes).astype(float).copy()
        self._applied_cache = None

    def new_acquisition(self) -> None:
        """Start an acquisition (a stack): the bead takes one random-walk step (drift)."""
        self.acquisitions += 1
        if self.drift_um_per_step > 0:
            self._bead = self._bead + self._drift_rng.normal(0.0, self.drift_um_per_step, size=3)

    def bead_offset_um(self) -> tuple[float, float, float]:
        """Bead minus stage (x, y) and bead z minus focus: where the bead sits in the camera frame."""
        return (self._bead[0] - self.stage_xy_um[0], self._bead[1] - self.stage_xy_um[1],
                self._bead[2] - self.focus_um)

    def applied_coefficients(self) -> np.ndarray:
        """Zernike coefficients (Noll 1..n_modes, radians) of what the SLM adds to the pupil beyond
        the beam's centred mask: a least-squares fit of the last phase shown (float, before
        wrapping) minus the mask, in the pupil frame (flips relative to the true geometry applied).
        Zeros before anything was shown. It ignores ``mask_offset`` and any centre/radius
        misconfiguration (exact when the SLM is registered)."""
        if self._slm_phase is None:
            return np.zeros(self.n_modes)
        if self._applied_cache is not None and self._applied_cache[0] == self._slm_version:
            return self._applied_cache[1].copy()
        phase = self._slm_phase
        fx = self._slm_flips[0] != self.slm_geometry.flip_x
        fy = self._slm_flips[1] != self.slm_geometry.flip_y
        if fx:
            phase = phase[:, ::-1]
        if fy:
            phase = phase[::-1, :]
        m = phase.shape[0]
        coef = fit_zernike(phase - mask_phase(self.settings.optics, m), self.n_modes)
        self._applied_cache = (self._slm_version, coef)
        return coef.copy()

    def residual_coefficients(self) -> np.ndarray:
        """True residual wavefront: hidden aberration + what the SLM applies (vortex excluded),
        Noll 1..n_modes, radians."""
        return self.aberration + self.applied_coefficients()

    def residual_rms(self, exclude: Sequence[int] = (1, 2, 3, 4)) -> float:
        """RMS (radians) of :meth:`residual_coefficients` without the ``exclude`` modes (default:
        piston, tip, tilt and defocus, which only move the focus)."""
        return float(rms(self.residual_coefficients(), exclude=exclude))

    def truth(self) -> dict[str, Any]:
        """The hidden state, for reports and tests."""
        return {
            "seed": self.seed,
            "aberration": {k + 1: float(v) for k, v in enumerate(self.aberration) if v != 0},
            "mask_offset": self.mask_offset,
            "bead_um": self.bead_um,
            "stage_xy_um": self.stage_xy_um,
            "focus_um": self.focus_um,
            "residual_rms_rad": self.residual_rms(),
            "wrong_hand_fraction": self.wrong_hand_fraction,
            "wrong_hand_phase_rad": self.wrong_hand_phase_rad,
            "slm_phase_scale": self.slm_phase_scale,
            "camera_orientation": self.camera_orientation,
        }

    # ------------------------------------------------------------------ the SLM
    def set_slm_image(
        self, grey: np.ndarray, phase_rad: np.ndarray | None = None, flips: tuple[bool, bool] | None = None
    ) -> None:
        """Called by the simulated SLM: the uint8 image now shown and the float phase it came from
        (``flips``: the SLM's configured flip_x, flip_y; default the true geometry's)."""
        grey = np.asarray(grey)
        if grey.shape != self.slm_geometry.shape:
            raise ValueError(f"SLM image of shape {grey.shape}: the simulated SLM is {self.slm_geometry.shape}")
        self._slm_grey = grey.copy()
        self._slm_phase = None if phase_rad is None else np.array(phase_rad, dtype=float)
        self._slm_flips = flips if flips is not None else (self.slm_geometry.flip_x, self.slm_geometry.flip_y)
        self._slm_version += 1
        self._pupil_cache = None
        self._applied_cache = None

    @property
    def slm_image(self) -> np.ndarray | None:
        return None if self._slm_grey is None else self._slm_grey.copy()

    def pupil_phase(self) -> np.ndarray:
        """Phase (radians) the SLM puts at the simulator's pupil nodes (shape of
        :meth:`PSFSimulator.pupil_coordinates`), misregistered by ``mask_offset``: the decoded
        grey level's phase in [0, 2 pi) times ``slm_phase_scale`` (the stroke actually delivered).
        Cached while the SLM image and offset are unchanged."""
        cache = self._pupil_cache
        if cache is not None and cache[0] == self._slm_version and cache[1] == self.mask_offset:
            return cache[2]
        u, v = self.simulator.pupil_coordinates()
        if self._slm_grey is None:
            phase = np.zeros(u.shape)
        else:
            phase = self.slm_phase_scale * self.slm_geometry.decode_at(self._slm_grey, u, v, self.mask_offset)
        self._pupil_cache = (self._slm_version, self.mask_offset, phase)
        return phase

    # ------------------------------------------------------------------ rendering
    def _coefficients(self) -> np.ndarray:
        c = self.aberration.copy()
        dx, dy, _ = self.bead_offset_um()
        scale = math.pi * self.numerical_aperture / self.wavelength_um
        c[1] += scale * dx
        c[2] += scale * dy
        return c

    def _far_away(self) -> bool:
        """The bead is so far laterally that nothing reaches the ROI (and the pupil quadrature
        would alias): render darkness."""
        dx, dy, _ = self.bead_offset_um()
        half_fov = 0.5 * self.roi_px * self.pixel_size_um
        margin = 4.0 * self.wavelength_um / self.numerical_aperture
        return max(abs(dx), abs(dy)) > half_fov + margin

    def intensity(self, z_um: Sequence[float] | np.ndarray) -> np.ndarray:
        """Noise-free normalised intensity (nz, n, n) seen with the focus at ``z_um`` (µm, stage
        coordinates), bead blur included (1 = the unaberrated donut's peak)."""
        z = np.asarray(z_um, dtype=float).ravel()
        n = self.roi_px
        if self._far_away():
            inten = np.zeros((len(z), n, n))
        else:
            # One torch thread: these small products gain little from two, and on a busy machine
            # torch's spinning worker threads make them ~10x slower.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                inten = self.simulator.stack(self._coefficients(), z_um=z - self._bead[2],
                                             pupil_phase=self.pupil_phase(), include_mask=False,
                                             pupil_field=self._pupil_field)
            finally:
                torch.set_num_threads(threads)
        return blur_by_bead(inten, self.settings.camera.bead_diameter_um, self.pixel_size_um)

    def intensity_per_plane(self, z_um: float) -> np.ndarray:
        """One plane through the simulator's public API (the generic path; same result as
        :meth:`intensity` within float32 rounding)."""
        n = self.roi_px
        if self._far_away():
            inten = np.zeros((1, n, n))
        else:
            inten = self.simulator.stack(self._coefficients(), z_um=[float(z_um) - self._bead[2]],
                                         pupil_phase=self.pupil_phase(), include_mask=False,
                                         pupil_field=self._pupil_field)
        return blur_by_bead(inten, self.settings.camera.bead_diameter_um, self.pixel_size_um)[0]

    def _to_adu(self, intensity: np.ndarray) -> np.ndarray:
        cm = self.camera_model
        if self.noise:
            adu = cm.expose(intensity, self.noise_rng)
        else:
            adu = np.clip(cm.expected_electrons(intensity) * cm.gain_adu_per_electron + cm.offset_adu,
                          0, cm.saturation_adu)
        adu = orient_image(adu, self.camera_orientation)
        if self.image_transform is not None:
            adu = np.asarray(self.image_transform(adu), dtype=float)
        return np.asarray(adu, dtype=float)

    def snap(self) -> np.ndarray:
        """One camera frame (n, n) ADU at the current stage and focus."""
        self.frames += 1
        return self._to_adu(self.intensity([self.focus_um])[0])

    def render_stack(self, z_um: Sequence[float] | np.ndarray) -> np.ndarray:
        """Frames (nz, n, n) ADU with the focus at each of ``z_um`` (the fast, batched path of a
        stack acquisition; the focus itself is moved by the caller)."""
        z = np.asarray(z_um, dtype=float).ravel()
        self.frames += len(z)
        return self._to_adu(self.intensity(z))

    # ------------------------------------------------------------------ honest metrics
    def _metric_simulator(self) -> PSFSimulator:
        """A float64 twin of :attr:`simulator` (same pupil nodes) for the metrics."""
        return simulator_for(self.settings, n_modes=self.n_modes, dtype=torch.float64)

    def _beam_field(self, sim: PSFSimulator) -> torch.Tensor:
        return sim.pupil_field(self.wrong_hand_fraction, self.wrong_hand_phase_rad)

    def _beam_plane(self, sim: PSFSimulator, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Exact intensity of the beam now produced (hidden aberration + delivered SLM phase +
        polarisation; no bead, no bead offset, no noise) at the points y x x of plane z (µm)."""
        return sim.intensity_at(x, y, z, self.aberration, pupil_phase=self.pupil_phase(),
                                include_mask=False, pupil_field=self._beam_field(sim))

    @staticmethod
    def _zoom_extremum(f: Callable[[np.ndarray, np.ndarray], np.ndarray], x0: float, y0: float,
                       half_um: float, tol_um: float, minimum: bool, points: int = 11) -> tuple[float, float, float]:
        """Local extremum of ``f`` (evaluated exactly on separable grids) by successive zooms
        (each round a ``points`` x ``points`` grid around the best point, shrunk 4x) until the
        grid step is below ``tol_um``. Returns (value, x, y)."""
        x, y = x0, y0
        best = float("nan")
        while True:
            gx = x + np.linspace(-half_um, half_um, points)
            gy = y + np.linspace(-half_um, half_um, points)
            vals = f(gx, gy)
            idx = np.argmin(vals) if minimum else np.argmax(vals)
            iy, ix = np.unravel_index(idx, vals.shape)
            x, y, best = float(gx[ix]), float(gy[iy]), float(vals[iy, ix])
            step = 2 * half_um / (points - 1)
            if step < tol_um:
                return best, x, y
            half_um = max(half_um / 4, 2 * step)
            half_um = min(half_um, 2 * step)

    def true_focus(self) -> dict[str, float]:
        """Where the beam now produced has its focus, from the hidden state (µm, in the beam's own
        frame, i.e. relative to the nominal focus of the unaberrated beam): the plane whose ring
        peak is brightest (coarse z scan, then a parabola through the best three planes of a
        10 nm scan) and the donut's centre in it (intensity centroid of the ring). Keys: x_um,
        y_um, z_um, ring_peak (normalised to the unaberrated peak)."""
        sim = self._metric_simulator()
        o = self.settings.optics
        lam_na = o.wavelength_um / o.numerical_aperture
        half = 1.6 * lam_na
        coords = np.linspace(-half, half, 49)
        zs = np.linspace(-1.6, 1.6, 33)
        planes = np.stack([self._beam_plane(sim, coords, coords, float(z)) for z in zs])
        peaks = planes.reshape(len(zs), -1).max(axis=1)
        k = int(np.argmax(peaks))
        fine = zs[k] + np.linspace(-0.1, 0.1, 21)
        fine_planes = np.stack([self._beam_plane(sim, coords, coords, float(z)) for z in fine])
        fp = fine_planes.reshape(len(fine), -1).max(axis=1)
        j = int(np.clip(np.argmax(fp), 1, len(fine) - 2))
        a, b, _ = np.polyfit(fine[j - 1:j + 2] - fine[j], fp[j - 1:j + 2], 2)
        z_f = float(fine[j] + (np.clip(-b / (2 * a), -0.01, 0.01) if a < 0 else 0.0))
        plane = self._beam_plane(sim, coords, coords, z_f)
        w = np.clip(plane - 0.2 * plane.max(), 0, None)
        yy, xx = np.meshgrid(coords, coords, indexing="ij")
        x_c, y_c = float((w * xx).sum() / w.sum()), float((w * yy).sum() / w.sum())
        return {"x_um": x_c, "y_um": y_c, "z_um": z_f, "ring_peak": float(plane.max())}

    def true_null_depth(self, tol_um: float = 5e-4, focus: dict[str, float] | None = None) -> float:
        """TRUE null depth of the beam actually produced (hidden aberration, the phase the SLM
        delivers with its stroke, offset, wrap and quantisation, the input polarisation), from the
        hidden state: the minimum intensity in the true focal plane near the donut's centre
        (:meth:`true_focus`), located by successive exact grid evaluations down to ``tol_um``
        (default 0.5 nm; every point its own Debye integral, no interpolation), over the ring's
        peak in that plane (also located by zooming). No bead, no noise, float64. A perfect system
        gives ~1e-10 or less (the quadrature of an exact vortex is dark by symmetry)."""
        sim = self._metric_simulator()
        f = self.true_focus() if focus is None else focus
        z = f["z_um"]
        plane_fn = lambda gx, gy: self._beam_plane(sim, gx, gy, z)  # noqa: E731
        o = self.settings.optics
        lam_na = o.wavelength_um / o.numerical_aperture
        # the minimum: start at the ring centroid, search +-0.25 lambda/NA
        start = 0.25 * lam_na
        coarse = np.linspace(-start, start, 25)
        vals = plane_fn(f["x_um"] + coarse, f["y_um"] + coarse)
        iy, ix = np.unravel_index(np.argmin(vals), vals.shape)
        step = coarse[1] - coarse[0]
        i_min, _, _ = self._zoom_extremum(plane_fn, f["x_um"] + coarse[ix], f["y_um"] + coarse[iy],
                                          step, tol_um, minimum=True)
        # the ring peak
        wide = np.linspace(-1.2 * lam_na, 1.2 * lam_na, 61)
        vals = plane_fn(f["x_um"] + wide, f["y_um"] + wide)
        iy, ix = np.unravel_index(np.argmax(vals), vals.shape)
        i_max, _, _ = self._zoom_extremum(plane_fn, f["x_um"] + wide[ix], f["y_um"] + wide[iy],
                                          wide[1] - wide[0], 1e-3, minimum=False)
        return float(max(i_min, 0.0) / i_max)

    def delivered_phase(self, m: int = 256) -> np.ndarray:
        """The phase (radians) the SLM delivers at the ``m x m`` pupil grid of
        :func:`simulation.phase.pupil_grid` (0 outside the pupil): the grey image decoded with the
        TRUE geometry (flips, centre, LUT, flatness, 8-bit levels), misregistered by
        ``mask_offset`` and scaled by ``slm_phase_scale``. Zero before anything was shown."""
        u, v, inside = pupil_grid(m)
        if self._slm_grey is None:
            return np.zeros((m, m))
        d = self.slm_phase_scale * self.slm_geometry.decode_at(self._slm_grey, u, v, self.mask_offset)
        return np.where(inside, d, 0.0)

    def true_residual_map(self, m: int = 256, edge_px: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
        """The residual wavefront (radians, ``m x m`` pupil grid, ``[v, u]``) and the pupil mask:
        delivered SLM phase (:meth:`delivered_phase`) + hidden aberration - the beam's ideal
        centred mask (vortex of ``optics.vortex_charge``), wrapped to (-pi, pi], with piston,
        tip, tilt and defocus (Noll 1-4) removed: the coefficients of Z2-Z4 maximise the pupil's
        coherent overlap ``|sum exp(i (r - c Z))|`` (the least-squares fit for small residuals,
        but immune to 2 pi wraps), piston is its phase. Those four only move the focus (the loop
        follows the bead with them). The outer ``edge_px`` SLM pixels of the pupil are left out:
        the SLM writes phase 0 to pixels whose centre lies outside the pupil, an artefact of
        the pixel grid worth ~0.04 rad RMS on a perfect system that no correction can change."""
        from scipy import optimize

        u, v, inside = pupil_grid(m)
        inside = inside & (np.hypot(u, v) <= 1.0 - float(edge_px) / self.slm_geometry.pupil_radius_px)
        r = self.delivered_phase(m) + zernike_phase(self.aberration, m) - mask_phase(self.settings.optics, m)
        field = np.exp(1j * r[inside])
        basis = np.stack([zernike_phase({j: 1.0}, m)[inside] for j in (2, 3, 4)])
        # start: least squares on the wrapped phase gradient (exact wherever no singularity)
        h = 2.0 / m
        rows, rhs = [], []
        for axis, j in ((1, 0), (0, 1)):
            wrapped = np.angle(np.exp(1j * np.diff(r, axis=axis))) / h
            both = inside & np.roll(inside, -1, axis=axis)
            sl = (slice(None), slice(0, m - 1)) if axis == 1 else (slice(0, m - 1), slice(None))
            ok = both[sl]
            um = (u[sl] + (h / 2 if axis == 1 else 0))[ok]
            vm = (v[sl] + (h / 2 if axis == 0 else 0))[ok]
            g = wrapped[ok]
            a = np.zeros((g.size, 3))
            a[:, j] = 2.0
            a[:, 2] = 4 * math.sqrt(3) * (um if axis == 1 else vm)
            rows.append(a)
            rhs.append(g)
        a, g = np.concatenate(rows), np.concatenate(rhs)
        keep = np.abs(g - np.median(g)) < 10 * (np.median(np.abs(g - np.median(g))) + 1e-9) + 1.0
        c0, *_ = np.linalg.lstsq(a[keep], g[keep], rcond=None)

        def loss(c: np.ndarray) -> float:
            return -float(np.abs(np.mean(field * np.exp(-1j * (c @ basis)))))

        c = optimize.minimize(loss, c0, method="Nelder-Mead",
                              options={"xatol": 1e-6, "fatol": 1e-12, "maxiter": 2000}).x
        f2 = field * np.exp(-1j * (c @ basis))
        piston = np.angle(np.mean(f2))
        out = np.zeros((m, m))
        out[inside] = np.angle(f2 * np.exp(-1j * piston))
        return out, inside

    def true_residual_rms(self, m: int = 256, edge_px: float = 1.5) -> float:
        """RMS (radians) over the unit pupil of :meth:`true_residual_map`: the difference between
        the phase the SLM actually delivers and what the hidden aberration and a centred vortex
        need, piston/tip/tilt/defocus removed. Unlike :meth:`residual_rms` (a difference of
        Zernike coefficients), it sees the mask offset, the SLM's stroke error, wrapping,
        quantisation, flips and modes beyond the Zernike basis. A perfect system reads the 8-bit
        quantisation floor ``2 pi / (grey_level_2pi sqrt 12)`` (0.0071 rad at 255 levels)."""
        res, inside = self.true_residual_map(m, edge_px)
        return float(np.sqrt(np.mean(res[inside] ** 2)))

    def residual_mask_offset(self, m: int = 400) -> tuple[float, float]:
        """Where the delivered vortex's singularity sits in the pupil (pupil radii, (x, y)),
        i.e. the residual mask offset after whatever shift the SLM shows: the grid plaquette of
        :meth:`delivered_phase` whose phase winds by ``2 pi sign(charge)`` nearest the centre,
        refined on a 4x finer local grid (resolution ~1/2000 of the pupil radius, near the SLM
        pixel). (nan, nan) without a vortex on the SLM."""
        o = self.settings.optics
        if o.beam != "vortex" or self._slm_grey is None:
            return (float("nan"), float("nan"))
        sign = 1 if o.vortex_charge > 0 else -1

        def locate(cx: float, cy: float, half: float, k: int) -> tuple[float, float] | None:
            c = np.linspace(-half, half, k)
            uu, vv = np.meshgrid(cx + c, cy + c, indexing="xy")
            ph = self.slm_phase_scale * self.slm_geometry.decode_at(self._slm_grey, uu, vv, self.mask_offset)
            w = lambda d: np.angle(np.exp(1j * d))  # noqa: E731
            wind = (w(ph[:-1, 1:] - ph[:-1, :-1]) + w(ph[1:, 1:] - ph[:-1, 1:])
                    + w(ph[1:, :-1] - ph[1:, 1:]) + w(ph[:-1, :-1] - ph[1:, :-1])) / (2 * np.pi)
            hits = np.argwhere(np.rint(wind) * sign > 0)
            if hits.size == 0:
                return None
            pu = (uu[:-1, :-1] + uu[:-1, 1:]) / 2
            pv = (vv[:-1, :-1] + vv[1:, :-1]) / 2
            d = [np.hypot(pu[i, j] - cx, pv[i, j] - cy) for i, j in hits]
            i, j = hits[int(np.argmin(d))]
            return float(pu[i, j]), float(pv[i, j])

        first = locate(0.0, 0.0, 0.9, m // 2 + 1)
        if first is None:
            return (float("nan"), float("nan"))
        fine = locate(first[0], first[1], 2.0 * 1.8 / (m // 2), 41)
        return fine if fine is not None else first

    def honest_metrics(self) -> dict[str, float]:
        """The true state of the beam from the hidden truth: ``true_null_depth``,
        ``true_residual_rms_rad``, ``residual_mask_offset`` (pupil radii, x and y and its length),
        and the hidden faults. Costs ~1 s (exact Debye evaluations)."""
        ox, oy = self.residual_mask_offset()
        return {
            "true_null_depth": self.true_null_depth(),
            "true_residual_rms_rad": self.true_residual_rms(),
            "residual_mask_offset_x": ox,
            "residual_mask_offset_y": oy,
            "residual_mask_offset": float(math.hypot(ox, oy)),
            "wrong_hand_fraction": self.wrong_hand_fraction,
            "slm_phase_scale": self.slm_phase_scale,
        }
