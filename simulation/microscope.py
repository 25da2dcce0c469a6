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
from autoalign.simulation.phase import fit_zernike, mask_phase
from autoalign.simulation.vectorial import PSFSimulator
from autoalign.simulation.zernike import CoefficientsLike, coefficients_to_array, rms

__all__ = ["SimulatedMicroscope", "draw_aberration", "simulator_for"]

_SIMULATORS: dict[tuple, PSFSimulator] = {}


def simulator_for(settings: "Settings") -> PSFSimulator:
    """A :class:`PSFSimulator` for the camera ROI and stack of ``settings`` (cached: building one
    costs ~0.5 s and it holds no per-call state)."""
    o, c, st = settings.optics, settings.camera, settings.stack
    key = (o.numerical_aperture, o.immersion_index, o.wavelength_um, o.beam, o.vortex_charge,
           o.tophat_radius, o.polarisation, o.linear_angle_deg, o.pupil_samples,
           c.pixel_size_um, c.roi_px, st.planes, st.z_step_um)
    sim = _SIMULATORS.get(key)
    if sim is None:
        if len(_SIMULATORS) > 8:
            _SIMULATORS.clear()
        sim = _SIMULATORS[key] = PSFSimulator.from_settings(settings)
    return sim


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
    ) -> None:
        s = load_settings(settings)
        self.settings = s
        sim_s = s.simulation
        self.seed = int(sim_s.seed if seed is None else seed)
        seq = np.random.SeedSequence(self.seed)
        ab_seq, drift_seq, noise_seq = seq.spawn(3)
        self._drift_rng = np.random.default_rng(drift_seq)
        self.noise_rng = np.random.default_rng(noise_seq)
        self.simulator = simulator_for(s)
        self.n_modes = self.simulator.n_modes
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
        """Phase (radians, wrapped to [0, 2 pi)) the SLM puts at the simulator's pupil nodes
        (shape of :meth:`PSFSimulator.pupil_coordinates`), misregistered by ``mask_offset``.
        Cached while the SLM image and offset are unchanged."""
        cache = self._pupil_cache
        if cache is not None and cache[0] == self._slm_version and cache[1] == self.mask_offset:
            return cache[2]
        u, v = self.simulator.pupil_coordinates()
        if self._slm_grey is None:
            phase = np.zeros(u.shape)
        else:
            phase = self.slm_geometry.decode_at(self._slm_grey, u, v, self.mask_offset)
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
                                             pupil_phase=self.pupil_phase(), include_mask=False)
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
                                         pupil_phase=self.pupil_phase(), include_mask=False)
        return blur_by_bead(inten, self.settings.camera.bead_diameter_um, self.pixel_size_um)[0]

    def _to_adu(self, intensity: np.ndarray) -> np.ndarray:
        cm = self.camera_model
        if self.noise:
            adu = cm.expose(intensity, self.noise_rng)
        else:
            adu = np.clip(cm.expected_electrons(intensity) * cm.gain_adu_per_electron + cm.offset_adu,
                          0, cm.saturation_adu)
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
