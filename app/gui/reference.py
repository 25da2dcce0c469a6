"""The ideal donut the window compares a measurement with, and the null metric it uses.

The ideal is the simulator's unaberrated beam for the current optics (vortex, top-hat or plain
spot, as ``optics.beam`` says) on the camera's ROI and the stack's planes, blurred by the bead
exactly as the simulated microscope blurs it (:func:`simulation.noise.blur_by_bead`, plane by
plane), in the camera's mean photons (``camera.peak_photons`` at the unaberrated peak plus
``camera.background_photons``), noise-free. Its null depth, measured as the loop measures a stack
(background = the stack's median, :func:`calibration.centroid.background_and_noise`, then the
loop's null metric), is the floor a perfect correction reaches with this bead: a finite bead fills
the null. (The median of a 64-plane stack lies above the true background, because the donut's
tails cover much of it; the loop subtracts it from every stack, so the floor does too.)

Conventions: stacks ``(z, y, x)``; sections ``xy[y, x]``, ``xz[z, x]``, ``yz[z, y]`` through the
centre voxel ``n // 2``; lengths in µm.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable

import numpy as np


def null_metric() -> Callable[..., float]:
    """The null-depth metric of the loop: ``null_depth(sections, background) -> centre / peak``.

    One place imports it, so a move of the function changes one line here."""
    from autoalign.calibration.metrics import null_depth

    return null_depth


@dataclass(frozen=True)
class IdealReference:
    """The unaberrated donut seen through the bead, noise-free.

    ``sections``: (3, n, n) xy[y, x], xz[z, x], yz[z, y] through the beam's focus, with the
    background the loop would estimate removed, scaled so that the xy section's brightest 3 x 3
    mean (the peak of the null metric) is 1.
    ``null_depth_floor``: the loop's null metric on these sections (centre / peak), noise-free.
    ``null_depth_scatter``: the standard deviation of that metric over stacks of the same ideal
    donut with the camera's shot and read noise (one stack's null scatters this much around the
    floor; a point within it is "at the floor")."""

    sections: np.ndarray
    null_depth_floor: float
    bead_diameter_um: float
    pixel_um: float
    z_step_um: float
    beam: str
    null_depth_scatter: float = float("nan")


_CACHE: dict[tuple, IdealReference] = {}
_LOCK = threading.Lock()


def _key(settings: Any) -> tuple:
    o, c, st = settings.optics, settings.camera, settings.stack
    return (o.numerical_aperture, o.immersion_index, o.wavelength_um, o.beam, o.vortex_charge,
            o.tophat_radius, o.polarisation, o.linear_angle_deg, o.pupil_samples,
            c.pixel_size_um, c.roi_px, c.bead_diameter_um, c.peak_photons, c.background_photons,
            st.planes, st.z_step_um)


def peak_of(xy: np.ndarray) -> float:
    """The brightest 3 x 3 mean of a section (the peak the null metric divides by)."""
    from scipy import ndimage

    return float(ndimage.uniform_filter(np.asarray(xy, dtype=float), 3, mode="nearest").max())


NOISE_DRAWS = 8   # noisy stacks of the ideal donut drawn for the scatter of its null depth


def ideal_reference(settings: Any) -> IdealReference:
    """The ideal donut for ``settings`` (cached per optics, camera, bead and stack; ~0.2 s the
    first time). Raises ``ValueError`` when the stack is not cubic (ortho-sections need
    ``stack.planes == camera.roi_px``)."""
    key = _key(settings)
    with _LOCK:
        cached = _CACHE.get(key)
    if cached is not None:
        return cached
    import torch

    from autoalign.calibration.centroid import background_and_noise
    from autoalign.simulation.microscope import simulator_for
    from autoalign.simulation.noise import CameraModel, blur_by_bead

    c, st = settings.camera, settings.stack
    if int(st.planes) != int(c.roi_px):
        raise ValueError(f"stack.planes = {st.planes} and camera.roi_px = {c.roi_px}: the ideal "
                         "ortho-sections need a cubic stack (equal numbers)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        simulator = simulator_for(settings)
        stack = simulator.stack({}, include_mask=True)      # unaberrated, the mask centred
    finally:
        torch.set_num_threads(threads)
    stack = blur_by_bead(stack, float(c.bead_diameter_um), float(c.pixel_size_um))
    camera = CameraModel.from_settings(settings)
    photons = camera.expected_electrons(stack) / camera.quantum_efficiency
    background, _ = background_and_noise(photons)
    h = photons.shape[0] // 2
    sections = np.stack([photons[h], photons[:, h, :], photons[:, :, h]]).astype(float)
    metric = null_metric()
    floor = float(metric(sections, background))
    scatter = _noisy_scatter(stack, camera, metric)
    sections = (sections - background) / max(peak_of(sections[0] - background), 1e-300)
    ref = IdealReference(sections=sections, null_depth_floor=floor, null_depth_scatter=scatter,
                         bead_diameter_um=float(c.bead_diameter_um), pixel_um=float(c.pixel_size_um),
                         z_step_um=float(st.z_step_um), beam=str(settings.optics.beam))
    with _LOCK:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = ref
    return ref


def _noisy_scatter(intensity: np.ndarray, camera: Any, metric: Callable[..., float]) -> float:
    """Standard deviation of the null metric over :data:`NOISE_DRAWS` noisy exposures of the
    normalised ``intensity`` stack (fixed seed: the same figure every time)."""
    from autoalign.calibration.centroid import background_and_noise

    rng = np.random.default_rng(12345)
    h = intensity.shape[0] // 2
    values = []
    for _ in range(NOISE_DRAWS):
        adu = camera.expose(intensity, rng)
        photons = (adu - camera.offset_adu) / (camera.gain_adu_per_electron
                                               * camera.quantum_efficiency)
        background, _ = background_and_noise(photons)
        sections = np.stack([photons[h], photons[:, h, :], photons[:, :, h]])
        values.append(metric(sections, background))
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    return float(np.std(values, ddof=1)) if values.size > 1 else float("nan")


def ideal_like(reference: IdealReference, sections: np.ndarray, background: float) -> np.ndarray:
    """The ideal sections in the photons of a measurement: scaled to the measured xy peak (above
    ``background``, the same 3 x 3 peak as the null metric) with the background added back, so the
    two compare shape and null depth at equal peak."""
    peak = peak_of(np.asarray(sections[0], dtype=float) - background)
    return reference.sections * max(peak, 0.0) + background


def centre_profiles(sections: np.ndarray) -> dict[str, np.ndarray]:
    """Line profiles through the centre voxel ``n // 2`` of (3, n, n) sections: ``x`` and ``y``
    through the xy section, ``z_xz`` (along z through the xz section at x = centre) and ``z_yz``."""
    s = np.asarray(sections, dtype=float)
    c = s.shape[-1] // 2
    return {"x": s[0, c, :], "y": s[0, :, c], "z_xz": s[1, :, c], "z_yz": s[2, :, c]}


__all__ = ["IdealReference", "ideal_reference", "ideal_like", "centre_profiles", "null_metric",
           "peak_of"]
