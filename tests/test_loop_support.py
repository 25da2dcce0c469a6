"""Test support for the loop, calibration and collection tests (no tests here).

Devices are the REAL simulated devices (``hardware.factory.open_devices`` over
``simulation.microscope.SimulatedMicroscope``: hidden aberration, bead, stages, camera noise, SLM
decoding, fault injection). Test doubles remain only where a test needs something the simulated
hardware cannot do on purpose:

* ``OraclePredictor``: reads the microscope's hidden residual (tests the loop's LOGIC, not a model).
* ``ConstantPredictor``: a fixed (e.g. NaN, too large) prediction, for the refusal tests.
* ``LinearPredictor``: a physics-based linearised reader (least squares on the simulator's Jacobian
  of the normalised sections) that looks at the images, so flips of the camera show in its
  read-back (the self-check tests, without depending on a trained model).
* ``ScaledSLM``: the real simulated SLM behind a known phase-scale error (the poke calibration
  must find it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoalign.settings import load_settings
from autoalign.simulation.microscope import simulator_for
from autoalign.simulation.noise import blur_by_bead

ROI_SMALL = 32


def small_settings(n: int = ROI_SMALL, pixel: float = 0.05, step: float = 0.06, **extra):
    """A fast 32-px configuration (predictor-independent tests only: the shipped model needs the
    default 64-px optics)."""
    s = load_settings()
    over = {"camera.roi_px": n, "stack.planes": n, "camera.pixel_size_um": pixel, "stack.z_step_um": step,
            "model.binning": 1, "loop.edge_margin_px": 3, "optics.pupil_samples": 48,
            "model.fine_checkpoint": ""}  # the oracle predictors stand for the whole network side
    over.update(extra)
    return s.replace(**over)


def simulator(settings):
    return simulator_for(settings)


def sim_devices(settings, aberration=None, bead_um=(0.0, 0.0, 0.0), seed=0, noise=True, image_transform=None,
                mask_offset=(0.0, 0.0)):
    """Open the real simulated devices (no drift) with a hidden aberration {Noll: rad} (None: drawn
    from ``settings.simulation`` with ``seed``)."""
    s = settings.replace(**{"hardware.backend": "simulated", "slm.backend": "simulated",
                            "simulation.drift_um_per_step": 0.0})
    from autoalign.hardware.factory import open_devices

    kw = {} if aberration is None else {"aberration": dict(aberration)}  # None: drawn from the settings
    return open_devices(s, seed=seed, bead_um=tuple(bead_um), noise=noise, image_transform=image_transform,
                        mask_offset=tuple(mask_offset), **kw)


class ScaledSLM:
    """The real simulated SLM behind a phase-scale error: it writes ``gain`` x the commanded phase
    (a wrong 2 pi grey level). Everything else is the real device's."""

    def __init__(self, slm, gain: float):
        self._slm = slm
        self.gain = float(gain)

    def show(self, phase, shift=(0.0, 0.0)):
        self._slm.show(self.gain * np.asarray(phase, dtype=float), shift=shift)

    def __getattr__(self, name):
        return getattr(self._slm, name)


@dataclass
class _Prediction:
    coefficients: dict
    mask_offset: tuple | None = None


class OraclePredictor:
    """Reads the microscope's hidden residual (loop logic only; a stand-in for a perfect model)."""

    def __init__(self, microscope, modes=tuple(range(5, 16)), scale=1.0, noise_rad=0.0, seed=0):
        self.microscope, self.modes, self.scale = microscope, list(modes), scale
        self.predicts_offset = False
        self.noise_rad = noise_rad
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def predict(self, sections):
        self.calls += 1
        res = self.microscope.residual_coefficients()
        return _Prediction({m: self.scale * float(res[m - 1]) + self.noise_rad * self.rng.normal()
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
