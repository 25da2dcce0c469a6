"""Test support for the loop, calibration and collection tests (no tests here).

* ``FakeScope``: a small, fast stand-in for the simulated microscope (hidden Zernike aberration,
  bead position, stage, camera noise) rendered with the foundation's PSFSimulator from the phase the
  fake SLM shows. Camera wrappers inject mirrored/swapped/reversed images and failures.
* ``OraclePredictor``: reads the hidden truth (tests loop LOGIC only; blind to camera flips).
* ``LinearPredictor``: a physics-based linearised reader (least squares on the simulator's Jacobian
  of the normalised sections), which sees the images, so flips in the camera show in its read-back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from app.settings import load_settings
from hardware.base import DeviceError, SLMInputError, Stack
from simulation.noise import CameraModel, blur_by_bead
from simulation.vectorial import PSFSimulator
from simulation.zernike import coefficients_to_array

_SIMS: dict = {}


def small_settings(n: int = 32, pixel: float = 0.05, step: float = 0.06, **extra):
    s = load_settings()
    over = {"camera.roi_px": n, "stack.planes": n, "camera.pixel_size_um": pixel, "stack.z_step_um": step,
            "model.binning": 1, "loop.edge_margin_px": 3, "optics.pupil_samples": 48}
    over.update(extra)
    return s.replace(**over)


def simulator(settings) -> PSFSimulator:
    key = (settings.camera.roi_px, settings.camera.pixel_size_um, settings.stack.planes,
           settings.stack.z_step_um, settings.optics.pupil_samples, settings.optics.vortex_charge)
    if key not in _SIMS:
        _SIMS[key] = PSFSimulator.from_settings(settings)
    return _SIMS[key]


@dataclass
class FakeScope:
    settings: object
    aberration: dict = field(default_factory=dict)
    bead_um: tuple = (0.0, 0.0, 0.0)
    seed: int = 0
    noise: bool = True

    def __post_init__(self):
        self.sim = simulator(self.settings)
        self.rng = np.random.default_rng(self.seed)
        self.stage_xy = [0.0, 0.0]
        self.focus = 0.0
        self.slm_correction = None
        self.stage_sign = (1.0, 1.0, 1.0)
        self.camera_model = CameraModel.from_settings(self.settings)
        self.vortex_charge_on_slm = self.settings.optics.vortex_charge  # wrong handedness: flip it

    # truth
    def residual_coefficients(self) -> dict:
        out = dict(self.aberration)
        corr = self.slm_correction or {}
        for k, v in corr.items():
            out[k] = out.get(k, 0.0) + v
        return out

    def residual_rms(self) -> float:
        return float(math.sqrt(sum(v * v for k, v in self.residual_coefficients().items() if k >= 5)))

    def render(self, z_positions):
        s = self.settings
        o = s.optics
        dx = self.bead_um[0] - self.stage_xy[0]
        dy = self.bead_um[1] - self.stage_xy[1]
        lateral = math.pi * o.numerical_aperture / o.wavelength_um
        coeffs = coefficients_to_array(self.aberration, self.sim.n_modes).copy()
        coeffs[1] += lateral * dx
        coeffs[2] += lateral * dy
        z = np.asarray(z_positions) - self.bead_um[2]
        corr = self.slm_correction or {}
        for k, v in corr.items():
            if k < self.sim.n_modes + 1:
                coeffs[k - 1] += v
        phase = None
        if self.vortex_charge_on_slm != o.vortex_charge:  # wrong handedness: add -2 l atan2
            u, v = self.sim.pupil_coordinates()
            phase = -2 * o.vortex_charge * np.arctan2(v, u)
        inten = self.sim.stack(coeffs, z_um=z, pupil_phase=phase)
        inten = blur_by_bead(inten, s.camera.bead_diameter_um, s.camera.pixel_size_um)
        if not self.noise:
            return self.camera_model.expected_electrons(inten) * self.camera_model.gain_adu_per_electron \
                + self.camera_model.offset_adu
        return self.camera_model.expose(inten, self.rng)


class FakeSLM:
    def __init__(self, scope: FakeScope, fail_after: int | None = None, gain: float = 1.0):
        self.scope = scope
        self.gain = gain  # phase scale error of the SLM (poke calibration must find it)
        self.shown = []
        self.fail_after = fail_after
        self.pupil_samples = scope.settings.optics.pupil_samples

    def show(self, phase):
        phase = np.asarray(phase, dtype=float)
        if phase.shape != (self.pupil_samples, self.pupil_samples) or not np.all(np.isfinite(phase)):
            raise SLMInputError("bad phase")
        if self.fail_after is not None and len(self.shown) >= self.fail_after:
            raise DeviceError("fake SLM: connection lost")
        self.shown.append(phase.copy())
        corr = _decode_correction(phase, self.scope.settings)
        self.scope.slm_correction = {k: self.gain * v for k, v in corr.items()}

    @property
    def phase_rad(self):
        return self.shown[-1] if self.shown else None


def _decode_correction(phase, settings):
    """Project the shown phase (minus the vortex) on Zernikes: what the SLM really adds."""
    from app.loop import _pupil_grid
    from simulation.zernike import zernike_basis

    m = phase.shape[0]
    u, v, inside = _pupil_grid(m)
    rho, th = np.hypot(u, v), np.arctan2(v, u)
    vort = settings.optics.vortex_charge * th
    resid = phase - vort  # build_pupil_phase does not wrap
    basis = zernike_basis(22, np.minimum(rho, 1), th)
    a = basis[:, inside].T
    coef, *_ = np.linalg.lstsq(a, resid[inside], rcond=None)
    return {k + 1: float(c) for k, c in enumerate(coef) if k >= 1}


class FakeCamera:
    def __init__(self, scope, transform=None, fail_after=None):
        self.scope = scope
        self.transform = transform
        self.fail_after = fail_after
        self.stacks = 0
        self.pixel_size_um = scope.settings.camera.pixel_size_um
        self.saturation_adu = float(2 ** scope.settings.camera.bit_depth - 1)


class FakeFocus:
    def __init__(self, scope):
        self.scope = scope

    @property
    def position_um(self):
        return self.scope.focus

    def move_to(self, z):
        self.scope.focus = float(z)


class FakeXY:
    def __init__(self, scope, fail=False):
        self.scope = scope
        self.fail = fail

    @property
    def position_um(self):
        return tuple(self.scope.stage_xy)

    def move_to(self, x, y):
        if self.fail:
            raise DeviceError("fake xy: stage timeout")
        self.scope.stage_xy = [float(x), float(y)]


def fake_acquire_stack(camera, focus, settings):
    """Stand-in for hardware.acquisition.acquire_stack on the fake devices."""
    scope = camera.scope
    if camera.fail_after is not None and camera.stacks >= camera.fail_after:
        raise DeviceError("fake camera: lost connection")
    camera.stacks += 1
    n = settings.stack.planes
    z = focus.position_um + (np.arange(n) - n // 2) * settings.stack.z_step_um
    data = scope.render(z)
    if camera.transform is not None:
        data = camera.transform(data)
    return Stack(np.asarray(data, dtype=float), settings.camera.pixel_size_um, settings.stack.z_step_um,
                 z, tuple(scope.stage_xy))


def fake_devices(settings, aberration=None, bead_um=(0.0, 0.0, 0.0), seed=0, transform=None,
                 camera_fail_after=None, slm_fail_after=None, noise=True):
    scope = FakeScope(settings, dict(aberration or {}), tuple(bead_um), seed, noise)
    return SimpleNamespace(camera=FakeCamera(scope, transform, camera_fail_after), focus=FakeFocus(scope),
                           xy=FakeXY(scope), slm=FakeSLM(scope, slm_fail_after), microscope=scope)


@dataclass
class _Prediction:
    coefficients: dict
    mask_offset: tuple | None = None


class OraclePredictor:
    """Reads the hidden residual (tests the loop's logic; a stand-in for a perfect model)."""

    def __init__(self, scope, modes=tuple(range(5, 16)), scale=1.0, noise_rad=0.0, seed=0):
        self.scope, self.modes, self.scale = scope, list(modes), scale
        self.predicts_offset = False
        self.noise_rad = noise_rad
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def predict(self, sections):
        self.calls += 1
        res = self.scope.residual_coefficients()
        return _Prediction({m: self.scale * res.get(m, 0.0) + self.noise_rad * self.rng.normal()
                            for m in self.modes})


class ConstantPredictor:
    def __init__(self, coefficients, modes=tuple(range(5, 16))):
        self.coefficients = dict(coefficients)
        self.modes = list(modes)
        self.predicts_offset = False

    def predict(self, sections):
        return _Prediction(dict(self.coefficients))


class LinearPredictor:
    """Least squares on the simulator's Jacobian of the sum-normalised ortho-sections at the
    ideal donut. Convention-faithful reader that looks at the images (for the self-check tests)."""

    def __init__(self, settings, modes=(5, 6, 7, 8, 11), step=0.1):
        self.modes = list(modes)
        self.predicts_offset = False
        sim = simulator(settings)
        bead = lambda x: blur_by_bead(x, settings.camera.bead_diameter_um, settings.camera.pixel_size_um)  # noqa
        ideal = bead(sim.orthosections({}))
        self.norm = lambda s: (s / s.sum()).ravel()
        self.ideal = self.norm(ideal)
        cols = []
        for m in self.modes:
            plus = self.norm(bead(sim.orthosections({m: step})))
            minus = self.norm(bead(sim.orthosections({m: -step})))
            cols.append((plus - minus) / (2 * step))
        self.jac = np.stack(cols, axis=1)

    def predict(self, sections):
        s = np.asarray(sections, dtype=float)
        s = np.clip(s - np.median(s), 0, None)
        coef, *_ = np.linalg.lstsq(self.jac, self.norm(s) - self.ideal, rcond=None)
        return _Prediction({m: float(c) for m, c in zip(self.modes, coef)})
