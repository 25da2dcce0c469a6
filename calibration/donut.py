"""The donut the SLM is asked to make, and the references it is judged against.

* :func:`build_pupil_phase`: float phase (rad) that ``SLM.show`` takes for a :class:`Correction`;
  :func:`show_correction` shows it with the pupil moved by the correction's mask offset.
* :func:`slm_grid`: the pupil grid size of an SLM.
* :func:`ideal_reference`: the unaberrated donut seen through the measurement pipeline
  (noise-free), giving the correlation reference and the null-depth floor of the bead;
  :func:`reference_measurements`: the same pipeline with known aberrations.
* :func:`true_residual_rms`, :func:`true_null_depth`, :func:`true_mask_offset`: the simulated
  microscope's honest truth (None for real hardware).

Conventions: pupil coordinates unit radius at the NA; mask offset in pupil radii; Zernike Noll from
1, radians; sections xy[y, x], xz[z, x], yz[z, y].
"""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np

from autoalign.calibration import centroid as cen
from autoalign.calibration.measurement import analyse_stack
from autoalign.calibration.metrics import null_depth, true_focal_null_depth
from autoalign.correction import Correction
from autoalign.hardware.acquisition import acquire_stack
from autoalign.hardware.simulated import SimulatedCamera, SimulatedFocusStage, SimulatedSLM
from autoalign.settings import Settings
from autoalign.simulation import phase as ph
from autoalign.simulation.microscope import SimulatedMicroscope, nominal_instrument

log = logging.getLogger("autoalign.calibration.donut")


def build_pupil_phase(settings: Settings, correction: Correction, m: int) -> np.ndarray:
    """Float phase (rad) on the m x m pupil grid that ``SLM.show`` takes, in the SLM pupil's own
    frame: the beam's mask (vortex of the configured charge) centred, plus the Zernike correction,
    zero outside the pupil (:func:`simulation.phase.total_phase`). ``correction.mask_offset`` is
    NOT drawn into the grid: :func:`show_correction` moves the whole pupil on the SLM by it, so
    that the Zernike correction and the pupil's edge move with the vortex (a misregistered beam
    needs the whole pattern re-centred, not the vortex alone)."""
    return np.asarray(ph.total_phase(settings, m, coefficients=correction.coefficients or None), dtype=float)


def show_correction(slm: Any, settings: Settings, correction: Correction) -> np.ndarray:
    """Show vortex + ``correction`` on ``slm``: :func:`build_pupil_phase` on the SLM's grid, the
    pupil displaced by ``correction.mask_offset`` (pupil radii, sub-pixel; ``SLM.show(phase,
    shift=...)``). Returns the phase grid shown. Raises what ``slm.show`` raises (``SLMInputError``
    for a NaN phase or an unsafe shift: nothing shown)."""
    phase = build_pupil_phase(settings, correction, slm_grid(slm, settings))
    slm.show(phase, shift=tuple(float(a) for a in correction.mask_offset))
    return phase


def slm_grid(slm: Any, settings: Settings) -> int:
    """Size m of the m x m pupil grid a phase for ``slm`` is built on (the SLM's own when it
    says, else ``optics.pupil_samples``)."""
    for attr in ("pupil_samples", "pupil_grid_size", "m"):
        value = getattr(slm, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(settings.optics.pupil_samples)


def reference_measurements(settings: Settings, aberrations: list[dict[int, float]]) -> list[Any]:
    """Donuts through the measurement pipeline, noise-free, one per hidden aberration ({Noll:
    rad}): a simulated microscope with that aberration and no other fault, the configured bead and
    camera, the vortex on a simulated SLM, a stack acquired and analysed exactly like a
    measurement (:class:`calibration.measurement.Measurement`, photons, background kept)."""
    s = nominal_instrument(settings.replace(**{"hardware.backend": "simulated", "slm.backend": "simulated"}))
    # a PERFECT instrument as the settings describe it: none of the simulated microscope's hidden
    # faults or mismatches (they would raise the floor and let a faulty donut pass as aligned)
    mic = SimulatedMicroscope(s, aberration={}, mask_offset=(0.0, 0.0), bead_um=(0.0, 0.0, 0.0),
                              drift_um_per_step=0.0, noise=False, wrong_hand_fraction=0.0,
                              wrong_hand_phase_rad=0.0, slm_phase_scale=1.0, camera_orientation="identity",
                              higher_order_rms_rad=0.0)
    cam, focus, slm = SimulatedCamera(mic), SimulatedFocusStage(mic), SimulatedSLM(mic)
    for dev in (cam, focus, slm):
        dev.open()
    show_correction(slm, s, Correction())
    try:
        saturation = float(cam.saturation_adu)
    except Exception:  # noqa: BLE001
        saturation = None
    out = []
    for aberration in aberrations:
        mic.set_aberration(dict(aberration or {}))
        m = analyse_stack(acquire_stack(cam, focus, s), settings, saturation)
        if not m.valid:  # pragma: no cover - a donut near the ideal one is always a valid bead
            raise RuntimeError(f"reference donut {aberration} refused: {m.reason}")
        out.append(m)
    return out


def reference_measurement(settings: Settings, aberration: dict[int, float] | None = None) -> Any:
    """One donut through the measurement pipeline, noise-free (:func:`reference_measurements`)."""
    return reference_measurements(settings, [dict(aberration or {})])[0]


def ideal_reference(settings: Settings) -> dict[str, Any]:
    """The unaberrated donut through the measurement pipeline, noise-free
    (:func:`reference_measurement`). Returns ``{"sections": (3, n, n) background removed, xy peak
    1, "null_depth": the measured null-depth floor of the bead}``."""
    m = reference_measurement(settings)
    sections = m.sections - m.background_photons
    return {"sections": sections / max(float(sections[0].max()), 1e-12),
            "null_depth": null_depth(m.sections, m.background_photons)}


def truth_key(microscope: Any) -> bytes | None:
    """A digest of what the simulated truth depends on (the grey image on the SLM and the hidden
    aberration; the other hidden faults are fixed per microscope, the bead position does not
    matter): equal keys give equal :func:`true_residual_rms`, :func:`true_null_depth` and
    :func:`true_mask_offset`. None without a simulated microscope or an image."""
    image = getattr(microscope, "slm_image", None) if microscope is not None else None
    if image is None:
        return None
    digest = hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16)
    digest.update(np.asarray(getattr(microscope, "aberration", ()), dtype=float).tobytes())
    return digest.digest()


def true_residual_rms(microscope: Any) -> float | None:
    """True residual wavefront RMS (rad, piston/tip/tilt/defocus removed) on the simulated
    microscope, else None: the microscope's delivered-phase metric (``true_residual_rms``: what the
    SLM actually delivers, stroke, mask offset, wrap and quantisation included, against what the
    hidden aberration and a centred vortex need; a perfect system reads the 8-bit floor ~0.007
    rad), or the Zernike-coefficient difference (``residual_rms``) of a microscope without it."""
    if microscope is None:
        return None
    for name in ("true_residual_rms", "residual_rms"):
        fn = getattr(microscope, name, None)
        if fn is None:
            continue
        try:
            return float(fn())
        except Exception:  # noqa: BLE001 - a report, never a failure
            log.debug("%s failed", name, exc_info=True)
            return None
    return None


def true_mask_offset(microscope: Any) -> tuple[float, float] | None:
    """Where the delivered vortex's singularity sits relative to the beam (pupil radii, (x, y)) on
    the simulated microscope (``residual_mask_offset``), else None."""
    fn = getattr(microscope, "residual_mask_offset", None)
    if fn is None:
        return None
    try:
        x, y = fn()
        return (float(x), float(y))
    except Exception:  # noqa: BLE001 - a report, never a failure
        log.debug("residual_mask_offset failed", exc_info=True)
        return None


def true_null_depth(microscope: Any, settings: Settings) -> float | None:
    """TRUE null depth of the beam now on the SLM (simulated microscope only, else None): the
    microscope's own exact metric when it has one (``true_null_depth``: minimum in the true focal
    plane by exact Debye evaluations, no interpolation floor, polarisation and the delivered SLM
    phase included), else centre over peak of the beam's rendered focal plane refined on a cubic
    spline (:func:`true_focal_null_depth`, ~5e-4 floor)."""
    mic = microscope
    if mic is None:
        return None
    exact = getattr(mic, "true_null_depth", None)
    if exact is not None:
        try:
            return float(exact())
        except Exception:  # noqa: BLE001 - a report, never a failure
            log.debug("true_null_depth failed", exc_info=True)
            return None
    if not hasattr(mic, "pupil_phase") or not hasattr(mic, "aberration"):
        return None
    try:
        z = (np.arange(settings.stack.planes) - settings.stack.planes // 2) * settings.stack.z_step_um
        coeffs = np.asarray(mic.aberration, dtype=float)
        # the microscope's own renderer, without the bead's offset (tip/tilt), blur or noise
        inten = mic.simulator.stack(coeffs, z_um=z, pupil_phase=mic.pupil_phase(), include_mask=False)
        inten = np.asarray(inten, dtype=float)
        centre = cen.robust_stack_centroid(inten + 1e-6)
        return true_focal_null_depth(cen.centred_sections(inten, centre, fill=0.0)[0])
    except Exception:  # noqa: BLE001 - a report, never a failure
        log.debug("true_null_depth failed", exc_info=True)
        return None


__all__ = ["build_pupil_phase", "show_correction", "slm_grid", "ideal_reference", "reference_measurement",
           "reference_measurements", "true_residual_rms", "true_null_depth", "true_mask_offset"]
