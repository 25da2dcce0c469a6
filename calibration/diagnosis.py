"""Fault diagnosis: what limits the donut when Zernike correction cannot fix it, and which knob
to turn; the physical floor of the measured null; stop rules against physics.

Faults named (each a :class:`Diagnosis` with a plain-words cause and the action):

* ``polarisation_impurity``: part of the beam in the wrong circular hand fills the null by about
  that fraction; from the refined fit's wrong-hand fraction, or directly from the vortex-charge
  flip test (:func:`wrong_hand_from_charge_flip`). Knob: the quarter-wave plate.
* ``slm_stroke``: the SLM delivers ``s`` x the commanded phase (grey level for 2 pi or LUT
  wrong); from the fitted phase scale. Knob: ``slm.grey_level_2pi = round(old / s)`` (or a
  compensation factor ``1 / s`` on the commanded phase when that exceeds 255).
* ``orientation``: the camera is mirrored/rotated relative to the SLM: corrections read back with
  the sign pattern of the transform (:func:`diagnose_orientation`). Knob: ``slm.flip_x`` /
  ``slm.flip_y`` (180 deg: both), for mirrors also the image orientation in the camera software.
* ``mask_offset``: the vortex sits beyond the shift the SLM should make: re-centre
  ``slm.pupil_centre_px``.
* ``unmodelled_aberration``: the fit leaves structure (modes beyond the model's, or a fault the
  model lacks). Knob: fit more modes, check the beam path.
* ``bead_too_large``: the bead alone fills the null above what is wanted. Knob: a smaller bead.
* ``at_bead_floor`` (not a fault): the measured null is at the floor the bead sets.

Conventions: Zernike Noll from 1, RMS-normalised, radians; pupil coordinates in pupil radii;
flips as :class:`hardware.slm.convert.PhaseToGrey` (``flip_x``: u -> -u).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from autoalign.simulation.zernike import zernike

if TYPE_CHECKING:  # pragma: no cover
    from autoalign.calibration.refine import RefineResult
    from autoalign.settings import Settings

__all__ = [
    "Diagnosis", "diagnose", "diagnose_orientation", "orientation_matrix", "ORIENTATIONS",
    "wrong_hand_from_charge_flip", "null_floor", "max_bead_for_null", "is_at_floor",
    "residual_within_crb", "stroke_residual_rms",
]

ORIENTATIONS = ("identity", "mirror_x", "mirror_y", "rotate_180", "transpose")


@dataclass
class Diagnosis:
    """One named finding: ``name``, the ``cause`` and the ``action`` in plain words, the
    estimated ``value`` (and 1-sigma ``uncertainty``) of the faulty quantity, the ``settings``
    changes that fix it (dotted keys), and ``null_contribution``: the null depth (fraction of
    the ring peak) this fault alone leaves, for ranking."""

    name: str
    cause: str
    action: str
    value: float = float("nan")
    uncertainty: float = float("nan")
    settings: dict[str, Any] = field(default_factory=dict)
    null_contribution: float = 0.0

    def __str__(self) -> str:
        return f"{self.cause}: {self.action}"


# ============================================================================ physics helpers
def stroke_residual_rms(scale: float) -> float:
    """RMS (radians) of the wavefront error a vortex of charge 1 suffers when the SLM delivers
    ``scale`` x its phase (0..2 pi grey ramp): ``|1 - s| sqrt(pi^2/3 - 16/9)`` after piston and
    tilt removal (the ramp's tilt component is <theta, Z3> = -4/3)."""
    return abs(1.0 - scale) * math.sqrt(math.pi**2 / 3 - 16 / 9)


def wrong_hand_from_charge_flip(centre_plus: float, centre_minus: float, background: float = 0.0,
                                floor_plus: float = 0.0) -> float:
    """Fraction of the beam's intensity in the wrong circular hand from the vortex-charge flip
    test: the centre intensity of the donut with charge +1 on the SLM (``centre_plus``) and with
    charge -1 (``centre_minus``), same units, same focus, background ``background`` included in
    both (subtracted here).

    With the right hand's charge the right-hand part is dark at the centre and only the wrong
    hand's fraction ``f`` shows, ``I(+1) = f W``; flipping the charge swaps the roles,
    ``I(-1) = (1 - f) W`` (the two configurations are mirror images with the same on-axis
    intensity ``W``). Hence ``f = I(+1) / (I(+1) + I(-1))``. A bead of finite size adds its
    floor ``F`` (the centre a perfect donut shows through it, :func:`null_floor` times the ring
    peak) weighted by the other hand: ``I(+1) = f W + (1 - f) F`` and ``I(-1) = (1 - f) W + f F``,
    so ``f = (I(+1) - F) / (I(+1) + I(-1) - 2 F)`` with ``F = floor_plus``. Raises ``ValueError``
    when the charge -1 centre is not bright."""
    plus = float(centre_plus) - float(background)
    minus = float(centre_minus) - float(background)
    fl = float(floor_plus)
    if not (math.isfinite(plus) and math.isfinite(minus) and math.isfinite(fl)) or minus <= max(plus, fl):
        raise ValueError(f"charge-flip test: centre intensities {centre_plus!r} (+1) and {centre_minus!r} (-1) "
                         f"above background {background!r}: expected a bright centre with charge -1")
    return float(min(max((plus - fl) / (plus + minus - 2 * fl), 0.0), 1.0))


def null_floor(settings: "Settings", bead_diameter_um: float | None = None, pupil_samples: int = 48,
               method: str = "pixel") -> float:
    """Expected MEASURED null depth of a perfect donut imaged through a bead of diameter
    ``bead_diameter_um`` (default ``camera.bead_diameter_um``), noise-free. No correction can go
    below it.

    * ``method="pixel"`` (default): as the simulated camera and the loop measure it: the
      unaberrated focal plane on the camera's pixel grid blurred by the bead's projected profile
      (:func:`simulation.noise.blur_by_bead`), centre pixel over the brightest 3 x 3-averaged
      pixel. At 40 nm pixels this over-states the physical floor for beads of 1-3 pixels (the
      pixel-sampled blur), e.g. 4.8 % for 80 nm.
    * ``method="continuous"``: the physical integral of the donut over the sphere's projected
      thickness, on a grid of 1/20 bead radius (centre over the blurred ring's peak), e.g. 3.2 %
      for 80 nm."""
    from scipy import ndimage

    from autoalign.simulation.noise import blur_by_bead

    d = float(settings.camera.bead_diameter_um if bead_diameter_um is None else bead_diameter_um)
    if method == "continuous":
        sim = _floor_simulator(settings, 8, pupil_samples)
        if d <= 0:
            return 0.0
        r = 0.5 * d
        g = np.linspace(-r, r, 41)
        yy, xx = np.meshgrid(g, g, indexing="ij")
        w = np.sqrt(np.clip(1 - (xx**2 + yy**2) / r**2, 0, None))
        w /= w.sum()
        centre = float((sim.intensity_at(g, g, 0.0) * w).sum())
        lam_na = settings.optics.wavelength_um / settings.optics.numerical_aperture
        radii = np.linspace(0.2, 0.7, 26) * lam_na
        ring = [float((sim.intensity_at(r0 + g, g, 0.0) * w).sum()) for r0 in radii]
        k = int(np.clip(np.argmax(ring), 1, len(radii) - 2))
        fine = np.linspace(radii[k - 1], radii[k + 1], 21)
        peak = max(float((sim.intensity_at(r0 + g, g, 0.0) * w).sum()) for r0 in fine)
        return centre / peak
    if method != "pixel":
        raise ValueError(f"null_floor(method = {method!r}): expected 'pixel' or 'continuous'")
    n = 33
    sim = _floor_simulator(settings, n, pupil_samples)
    plane = sim.stack({}, z_um=[0.0])
    blurred = blur_by_bead(plane, d, float(settings.camera.pixel_size_um))[0]
    peak = float(ndimage.uniform_filter(blurred, 3, mode="nearest").max())
    return float(max(blurred[n // 2, n // 2], 0.0) / peak)


_FLOOR_SIMS: dict[tuple, Any] = {}


def _floor_simulator(settings: "Settings", n: int, pupil_samples: int) -> Any:
    from autoalign.simulation.vectorial import PSFSimulator

    o = settings.optics
    key = (o.numerical_aperture, o.immersion_index, o.wavelength_um, o.beam, o.vortex_charge, o.polarisation,
           settings.camera.pixel_size_um, n, pupil_samples)
    if key not in _FLOOR_SIMS:
        _FLOOR_SIMS[key] = PSFSimulator.from_settings(settings, n_px=n, z_um=[0.0], pupil_samples=pupil_samples)
    return _FLOOR_SIMS[key]


def max_bead_for_null(settings: "Settings", wanted_null: float, hi_um: float = 0.3) -> float:
    """The largest bead diameter (µm) whose :func:`null_floor` stays below ``wanted_null``
    (bisection; 0 when even a point-like bead cannot reach it)."""
    lo, hi = 0.0, hi_um
    if null_floor(settings, 0.0) > wanted_null:
        return 0.0
    if null_floor(settings, hi) <= wanted_null:
        return hi
    for _ in range(14):
        mid = 0.5 * (lo + hi)
        if null_floor(settings, mid) <= wanted_null:
            lo = mid
        else:
            hi = mid
    return lo


def is_at_floor(measured_null: float, floor: float, margin: float = 0.25) -> bool:
    """True when the measured null is within ``margin`` (relative) of the physical floor:
    ``measured <= floor (1 + margin)``. NaN never is."""
    return bool(math.isfinite(measured_null) and measured_null <= floor * (1.0 + margin))


def residual_within_crb(residual_rms: float, crb_rms: float, factor: float = 2.0) -> bool:
    """True when an estimated residual RMS is within ``factor`` x its Cramér–Rao bound (the
    residual is then indistinguishable from the photon noise of the measurement: stop)."""
    return bool(math.isfinite(residual_rms) and math.isfinite(crb_rms) and residual_rms <= factor * crb_rms)


# ============================================================================ orientation
def _pupil_map(name: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return {"identity": (u, v), "mirror_x": (-u, v), "mirror_y": (u, -v), "rotate_180": (-u, -v),
            "transpose": (v, u)}[name]


def orientation_matrix(name: str, modes: Sequence[int], grid: int = 128) -> np.ndarray:
    """T[i, j] = <Z_i, Z_j o M> over the unit disk for the pupil map M of camera orientation
    ``name``: an aberration ``c`` applied on the SLM reads back as ``T c`` in a camera frame
    related to the SLM frame by M. By symmetry (theta -> pi - theta, -theta, theta + pi,
    pi/2 - theta): ``mirror_x`` negates cos(m theta) modes of odd m and sin modes of even m;
    ``mirror_y`` negates all sin modes; ``rotate_180`` negates every odd-m mode (tip, tilt, coma,
    trefoil...); ``transpose`` swaps the cos/sin pairs with signs. Exact (to the grid's
    quadrature) numerically; the tests check the signs against these rules."""
    if name not in ORIENTATIONS:
        raise ValueError(f"orientation {name!r}: expected one of {', '.join(ORIENTATIONS)}")
    c = -1 + (np.arange(grid) + 0.5) * 2 / grid
    u, v = np.meshgrid(c, c, indexing="xy")
    inside = np.hypot(u, v) <= 1
    uu, vv = _pupil_map(name, u, v)
    zi = np.stack([zernike(j, np.hypot(u, v), np.arctan2(v, u))[inside] for j in modes])
    zt = np.stack([zernike(j, np.hypot(uu, vv), np.arctan2(vv, uu))[inside] for j in modes])
    t = zi @ zt.T / inside.sum()
    return np.where(np.abs(t) < 0.05, 0.0, np.sign(t) * np.round(np.abs(t), 2))


def diagnose_orientation(commanded: Mapping[int, float] | Sequence[Mapping[int, float]],
                         readback: Mapping[int, float] | Sequence[Mapping[int, float]],
                         current_flips: tuple[bool, bool] = (False, False),
                         vortex_charge: int = 1) -> Diagnosis:
    """Which camera/SLM orientation explains read-backs of applied corrections.

    ``commanded``: changes applied on the SLM ({Noll: rad}, one or several pokes/iterations);
    ``readback``: the aberration changes measured for them (same modes; a model-based reading,
    sign as the network reports the aberration present, i.e. ``+a`` applied reads ``+a``). Each
    candidate predicts ``readback = g T commanded``; the best (smallest relative residual, g > 0)
    is named, with the flip settings that fix it given the ``current_flips`` (flip_x, flip_y).
    ``identity`` gives ``name='orientation_ok'``."""
    cs = [commanded] if isinstance(commanded, Mapping) else list(commanded)
    rs = [readback] if isinstance(readback, Mapping) else list(readback)
    if len(cs) != len(rs) or not cs:
        raise ValueError("diagnose_orientation: expected as many read-backs as commanded changes (>= 1)")
    modes = sorted({int(k) for c in cs for k in c} | {int(k) for r in rs for k in r})
    a = np.array([[float(c.get(j, 0.0)) for j in modes] for c in cs]).T  # (J, K)
    b = np.array([[float(r.get(j, 0.0)) for j in modes] for r in rs]).T
    scores = {}
    for name in ORIENTATIONS:
        pred = orientation_matrix(name, modes) @ a
        den = float(np.sum(pred * pred))
        g = float(np.sum(pred * b)) / den if den > 0 else 0.0
        res = float(np.sum((b - g * pred) ** 2)) / max(float(np.sum(b * b)), 1e-30)
        scores[name] = (res if g > 0 else 1.0 + res, g)
    best = min(scores, key=lambda k: scores[k][0])
    res, gain = scores[best]
    fx, fy = current_flips
    if best == "identity":
        return Diagnosis("orientation_ok", "read-backs match the SLM frame",
                         "nothing to change", value=gain, uncertainty=res)
    changes: dict[str, Any]
    if best == "rotate_180":
        changes = {"slm.flip_x": not fx, "slm.flip_y": not fy}
        cause = "the camera image is rotated 180 deg relative to the SLM (odd-m modes read back negated)"
        action = f"set slm.flip_x: {str(not fx).lower()} and slm.flip_y: {str(not fy).lower()}"
    elif best in ("mirror_x", "mirror_y"):
        key = "slm.flip_x" if best == "mirror_x" else "slm.flip_y"
        cur = fx if best == "mirror_x" else fy
        changes = {key: not cur, "optics.vortex_charge": -vortex_charge}
        axis = best[-1]
        cause = f"the camera image is mirrored in {axis} relative to the SLM"
        action = (f"mirror the camera image in {axis} in the camera software (preferred: the model then sees the "
                  f"donut it was trained on), or set {key}: {str(not cur).lower()} and optics.vortex_charge: "
                  f"{-vortex_charge} (the mirror reverses the vortex)")
    else:  # transpose
        changes = {"camera transpose": True}
        cause = "the camera image is transposed (x and y swapped) relative to the SLM"
        action = "swap the camera's x and y in the camera software (e.g. Micro-Manager Transpose_SwapXY)"
    return Diagnosis("orientation", cause, action, value=gain, uncertainty=res, settings=changes)


# ============================================================================ the diagnosis
def diagnose(
    result: "RefineResult",
    settings: "Settings",
    measured_null: float | None = None,
    wanted_null: float | None = None,
    wrong_hand_threshold: float = 0.002,
    scale_tolerance: float = 0.02,
    max_mask_shift: float = 0.1,
    floor: float | None = None,
) -> list[Diagnosis]:
    """Named faults found in a refined fit, the most damaging first (empty: nothing beyond what
    Zernike correction fixes).

    ``measured_null``: the null now measured (loop's definition); when it is within 25 % of the
    bead's floor an ``at_bead_floor`` finding says so (not a fault: the stop reason);
    ``wanted_null``: the null the user wants (the bead-size check); ``wrong_hand_threshold``: wrong-hand fraction worth reporting
    (also needs 3 sigma); ``scale_tolerance``: |1 - s| worth reporting (also 3 sigma);
    ``max_mask_shift``: the largest vortex shift (pupil radii) the SLM should make before the
    pupil is re-centred; ``floor``: the bead's :func:`null_floor` (computed when needed)."""
    out: list[Diagnosis] = []
    unc = result.uncertainty
    f, sf = result.wrong_hand_fraction, unc.get("wrong_hand_fraction", float("nan"))
    if "wrong_hand_fraction" in result.parameter_names and f > wrong_hand_threshold and (
            not math.isfinite(sf) or f > 3 * sf):
        out.append(Diagnosis(
            "polarisation_impurity",
            f"polarisation impurity, ~{100 * f:.1f} % of the power in the wrong circular hand",
            "rotate the quarter-wave plate (check the polariser/half-wave plate before it) until the "
            "vortex-charge flip test reads < 0.1 %",
            value=f, uncertainty=sf, null_contribution=f))
    s, ss = result.slm_phase_scale, unc.get("slm_phase_scale", float("nan"))
    if "slm_phase_scale" in result.parameter_names and abs(1 - s) > scale_tolerance and (
            not math.isfinite(ss) or abs(1 - s) > 3 * ss):
        old = int(settings.slm.grey_level_2pi)
        new = int(round(old / s))
        if 255 < new <= 255 * (1 + 1.5 * scale_tolerance):  # full range, within the fit's accuracy
            new = 255
        if new <= 255:
            action = f"set slm.grey_level_2pi: {new} (now {old}), or compensate by scaling the phase by {1 / s:.3f}"
            changes: dict[str, Any] = {"slm.grey_level_2pi": new}
        else:
            action = (f"the SLM cannot reach 2 pi at grey level {old} (needs {new} > 255): recalibrate its LUT or "
                      f"the wavelength setting of its driver; meanwhile scale the phase by {1 / s:.3f}")
            changes = {"phase compensation factor": 1 / s}
        rms = stroke_residual_rms(s)
        out.append(Diagnosis(
            "slm_stroke",
            f"SLM stroke/LUT error: it delivers {100 * s:.1f} % of the commanded phase "
            f"(vortex error {rms:.2f} rad RMS)", action,
            value=s, uncertainty=ss, settings=changes, null_contribution=rms**2))
    ox, oy = result.misregistration
    shift = math.hypot(*result.mask_offset)
    mis = math.hypot(ox, oy)
    if mis > max_mask_shift:
        g = settings.slm
        sx, sy = (-1 if g.flip_x else 1), (-1 if g.flip_y else 1)
        cx, cy = g.pupil_centre_px
        new = [round(cx - sx * ox * g.pupil_radius_px, 1), round(cy - sy * oy * g.pupil_radius_px, 1)]
        out.append(Diagnosis(
            "mask_offset",
            f"the vortex sits {mis:.3f} pupil radii off the pupil centre, beyond the SLM's safe shift "
            f"({max_mask_shift:g})", f"re-centre the pupil on the SLM: slm.pupil_centre_px: {new}",
            value=mis, uncertainty=math.hypot(unc.get("offset_x", 0.0), unc.get("offset_y", 0.0)),
            settings={"slm.pupil_centre_px": new}, null_contribution=shift**2))
    from autoalign.calibration.refine import CHI2_MAX, STRUCTURE_P

    if result.structure_p < STRUCTURE_P or result.chi2_per_dof > CHI2_MAX:
        out.append(Diagnosis(
            "unmodelled_aberration",
            f"the fit leaves structure (p = {result.structure_p:.1e} at {result.structure_block_px} px, "
            f"chi^2/dof = {result.chi2_per_dof:.2f}): aberration beyond the model's modes, a fault the model lacks, "
            "or optics settings that do not match the instrument",
            "check optics.numerical_aperture, optics.wavelength_um and camera.pixel_size_um against the instrument "
            "(1 % in NA or 2 % in pixel size already fail the fit), fit more modes (up to Noll 28), check the "
            "beam path (clipping, a dirty or tilted optic) and the bead",
            value=result.structure_p, null_contribution=0.0))
    if measured_null is not None and math.isfinite(measured_null):
        fl = null_floor(settings, result.bead_diameter_um) if floor is None else floor
        floor = fl
        if is_at_floor(measured_null, fl):
            out.append(Diagnosis(
                "at_bead_floor",
                f"the measured null ({100 * measured_null:.2f} %) is at the floor set by the "
                f"{1000 * result.bead_diameter_um:.0f} nm bead ({100 * fl:.2f} %)",
                "nothing left to correct that this bead can show; a smaller bead shows a deeper null",
                value=measured_null, null_contribution=0.0))
    if wanted_null is not None:
        fl = null_floor(settings, result.bead_diameter_um) if floor is None else floor
        if fl > wanted_null:
            d_max = max_bead_for_null(settings, wanted_null)
            out.append(Diagnosis(
                "bead_too_large",
                f"the {1000 * result.bead_diameter_um:.0f} nm bead fills the null to {100 * fl:.2f} % "
                f"(wanted {100 * wanted_null:.2f} %)",
                f"use a bead of at most {1000 * d_max:.0f} nm to see that null (the donut may already be fine)",
                value=fl, settings={"camera.bead_diameter_um": d_max}, null_contribution=fl))
    out.sort(key=lambda d: -d.null_contribution)
    structured = [d for d in out if d.name == "unmodelled_aberration"]
    others = [d for d in out if d.name not in ("unmodelled_aberration", "at_bead_floor")]
    if structured and others and result.chi2_per_dof <= CHI2_MAX:
        # a fitted fault with sharp edges (stroke wraps, the SLM's shifted pupil circle) leaves
        # some structure at the quadrature's resolution: the named fault comes first
        structured[0].cause += " (possibly the edges of the fault found, which the model resolves coarsely)"
        out = others + [d for d in out if d.name == "at_bead_floor"] + structured
    elif structured:  # the fit does not explain the data: its other findings are only hints
        for d in out:
            if d.name != "unmodelled_aberration":
                d.cause += " (uncertain: the fit does not explain the data)"
        out = structured + [d for d in out if d.name != "unmodelled_aberration"]
    return out
