"""From the refined estimator's findings to the loop's stop reason, in plain words; the stop rule
against physics (issue 13 items 3-4).

* :func:`summarise_diagnoses`: the dominant named fault of an estimate's diagnoses (the one that
  fills the null most), e.g. ``("polarisation_impurity", "polarisation impurity, ~2.0 % of the
  power in the wrong circular hand", "rotate the quarter-wave plate ...", {...})`` with the terms
  that limit the null;
* :func:`is_converged_physics`: stop when the estimated residual is within ``factor`` x its
  Cramér–Rao bound or the measured null is at the bead's floor; claim success only at the floor.

Both read plain data (the ``extras`` of an :class:`autoalign.estimator.Estimate` made by
:class:`autoalign.models.refined.RefinedEstimator`: ``extras["diagnoses"]``, a list of dicts with
``name``, ``cause``, ``action``, ``value``, ``settings``, ``null_contribution``; and
``extras["refine"]``, the fit's summary): a loop needs nothing but the estimate.

Null depths are fractions of the ring's peak (measured: the loop's
:func:`autoalign.calibration.metrics.null_depth`; floor: :func:`calibration.diagnosis.null_floor`).
Residuals in radians RMS (Noll >= 5).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from autoalign.calibration.diagnosis import is_at_floor, residual_within_crb
from autoalign.calibration.quality import ALIGNED_RAD, Quality, is_aligned_quality

__all__ = ["DiagnosisSummary", "PhysicsConvergence", "summarise_diagnoses", "is_converged_physics",
           "null_at_floor", "FAULT_NAMES", "LOWEST_PLAUSIBLE", "FLOOR_RESIDUAL_RAD"]

#: diagnoses that name a fault Zernike correction cannot fix (not ``unmodelled_aberration``, which
#: says the model lacks something, nor ``at_bead_floor``, which is not a fault)
FAULT_NAMES = ("polarisation_impurity", "slm_stroke", "orientation", "mask_offset", "bead_too_large")


#: a measured null below this fraction of the bead's floor is not a deep null but a failed reading
#: (an aberrated donut's dark spot off the centre, the quadratic refinement of a noisy minimum
#: extrapolating below zero): e.g. 0.00 % measured through an 80 nm bead at 0.5 rad of aberration
LOWEST_PLAUSIBLE = 0.5


#: the largest estimated residual (rad RMS) at which a null at the floor counts: through an 80 nm
#: bead a donut with 1 rad of aberration can read a null at the floor (the dark spot moves, the
#: bead fills it anyway), measured on the simulated microscope (benchmarks/refined_loop.py, 1.0
#: rad: 4 of 6 first stacks; benchmarks/quality_figure.py: 69 of 91 random states above 0.1 rad);
#: the measured quality figure's aligned threshold (``calibration.quality.ALIGNED_RAD``)
FLOOR_RESIDUAL_RAD = ALIGNED_RAD


def null_at_floor(measured_null: float | None, floor: float | None, margin: float = 0.25,
                  lowest: float = LOWEST_PLAUSIBLE, residual_rms: float | None = None,
                  max_residual_rad: float = FLOOR_RESIDUAL_RAD, quality: Quality | None = None) -> bool:
    """True when the measured null is at the bead's floor: within ``margin`` above it
    (:func:`calibration.diagnosis.is_at_floor`), not below ``lowest`` x the floor (no correction
    goes below the floor: a reading that low failed), when the estimated ``residual_rms`` is
    given, that residual at most ``max_residual_rad`` and, when the measured ``quality`` figure
    is given (:class:`calibration.quality.Quality`), that figure aligned
    (:func:`calibration.quality.is_aligned_quality`): an aberrated donut seen through a bead can
    read a null at the floor (measured: 69 of 91 random states above 0.1 rad,
    ``benchmarks/quality_figure.py``). None/NaN null or floor: False."""
    if measured_null is None or floor is None or not (math.isfinite(measured_null) and math.isfinite(floor)):
        return False
    if residual_rms is not None and not (math.isfinite(residual_rms) and residual_rms <= max_residual_rad):
        return False
    if quality is not None and not is_aligned_quality(quality):
        return False
    return bool(is_at_floor(float(measured_null), float(floor), margin) and measured_null >= lowest * floor)


@dataclass(frozen=True)
class DiagnosisSummary:
    """The dominant finding: ``name`` (a :mod:`calibration.diagnosis` name, ``at_bead_floor`` or
    ``none``), ``cause`` and ``action`` in plain words, and ``limiting_terms``: {term: null depth
    it accounts for (fraction of the ring peak)}: ``bead_floor``, one entry per named fault (its
    ``null_contribution``), ``residual_aberration`` (``1 - exp(-residual_rms**2)``, the power a
    residual wavefront scatters, when known; an order of magnitude like the faults' own) and
    ``unexplained`` (measured minus the others, when the measured null is known). Unpacks as the
    tuple ``(name, cause, action, limiting_terms)``; ``str()`` is the stop-reason text."""

    name: str
    cause: str
    action: str
    limiting_terms: dict[str, float]

    def __iter__(self):  # (name, cause, action, limiting_terms)
        return iter((self.name, self.cause, self.action, self.limiting_terms))

    def __str__(self) -> str:
        return f"{self.cause}: {self.action}" if self.action else self.cause


def _field(d: Any, key: str, default: Any = None) -> Any:
    return d.get(key, default) if isinstance(d, Mapping) else getattr(d, key, default)


def _extras(source: Any) -> tuple[list[Any], Mapping[str, Any]]:
    """(diagnoses, refine summary) from an Estimate, its extras dict, or a list of diagnoses."""
    if source is None:
        return [], {}
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return list(source), {}
    extras = getattr(source, "extras", source)
    if not isinstance(extras, Mapping):
        raise TypeError(f"summarise_diagnoses: expected an Estimate, its extras (a mapping) or a list of "
                        f"diagnoses, got {type(source).__name__}")
    return list(extras.get("diagnoses") or []), extras.get("refine") or {}


def summarise_diagnoses(estimate_or_extras: Any, measured_null: float | None = None,
                        floor: float | None = None, residual_rms: float | None = None,
                        margin: float = 0.25,
                        max_residual_rad: float = FLOOR_RESIDUAL_RAD,
                        quality: Quality | None = None) -> DiagnosisSummary:
    """The dominant finding of an estimate's diagnoses, for the loop's stop reason.

    ``estimate_or_extras``: an :class:`~autoalign.estimator.Estimate` of the refined estimator, its
    ``extras`` mapping, or a list of diagnoses (dicts or :class:`~calibration.diagnosis.Diagnosis`);
    ``measured_null``: the null now measured (the loop's definition); ``floor``: the bead's
    null floor (same definition); ``residual_rms``: the estimated residual (rad; default the
    estimate's ``residual_rms``); ``margin``, ``max_residual_rad`` and the measured ``quality``
    figure (:mod:`calibration.quality`): what "at the floor" means (:func:`null_at_floor`).

    Choice: the named fault (:data:`FAULT_NAMES`) with the largest ``null_contribution``; when the
    fit does not explain the data (``unmodelled_aberration`` ranked first by ``diagnose``, i.e.
    chi^2/dof too large) and the null is not at the floor, that finding instead; with no fault:
    ``at_bead_floor`` when the measured null is within ``margin`` of the floor, else
    ``unmodelled_aberration`` if found, else ``none``.
    ``at_bead_floor`` findings in the input are ignored (recomputed from the arguments)."""
    found, _ = _extras(estimate_or_extras)
    if residual_rms is None:
        residual_rms = getattr(estimate_or_extras, "residual_rms", None)
    items = [d for d in found if _field(d, "name") != "at_bead_floor"]
    faults = [d for d in items if _field(d, "name") in FAULT_NAMES]
    unmodelled = [d for d in items if _field(d, "name") == "unmodelled_aberration"]

    terms: dict[str, float] = {}
    if floor is not None and math.isfinite(floor):
        terms["bead_floor"] = float(floor)
    for d in faults:
        if _field(d, "name") == "bead_too_large" and "bead_floor" in terms:
            continue  # its contribution IS the bead's floor
        terms[str(_field(d, "name"))] = float(_field(d, "null_contribution", 0.0) or 0.0)
    if residual_rms is not None and math.isfinite(residual_rms):
        terms["residual_aberration"] = 1.0 - math.exp(-float(residual_rms) ** 2)
    if measured_null is not None and math.isfinite(measured_null):
        terms["unexplained"] = max(float(measured_null) - sum(terms.values()), 0.0)

    def pick(d: Any) -> DiagnosisSummary:
        return DiagnosisSummary(str(_field(d, "name")), str(_field(d, "cause", "")), str(_field(d, "action", "")),
                                terms)

    at_floor = null_at_floor(measured_null, floor, margin, residual_rms=residual_rms, max_residual_rad=max_residual_rad,
                             quality=quality)
    # diagnose() ranks unmodelled_aberration first only when the fit does not explain the data
    # (chi^2/dof > CHI2_MAX: its other findings are then uncertain) or nothing else was found; a
    # null at the bead's floor leaves nothing that matters to the model's lack
    if unmodelled and _field(items[0], "name") == "unmodelled_aberration" and not at_floor:
        return pick(unmodelled[0])
    if faults:
        return pick(max(faults, key=lambda d: float(_field(d, "null_contribution", 0.0) or 0.0)))
    if at_floor and measured_null is not None and floor is not None:
        residual = f" and the measured {quality.text()} is aligned" if quality is not None else ""
        return DiagnosisSummary(
            "at_bead_floor",
            f"the measured null ({100 * measured_null:.2f} %) is at the floor set by the bead ({100 * floor:.2f} %)"
            + residual,
            "nothing left to correct that this bead can show; a smaller bead shows a deeper null", terms)
    if unmodelled:
        return pick(unmodelled[0])
    return DiagnosisSummary("none", "no fault found beyond what Zernike correction fixes", "", terms)


@dataclass(frozen=True)
class PhysicsConvergence:
    """Verdict of :func:`is_converged_physics`: ``stop`` (nothing more a correction can show),
    ``converged`` (success may be claimed: the measured null is at the bead's floor), the two
    tests, and ``reason`` in plain words. ``bool(verdict)`` is ``converged``."""

    converged: bool
    stop: bool
    at_floor: bool
    within_crb: bool
    reason: str

    def __bool__(self) -> bool:
        return self.converged


def is_converged_physics(residual_rms: float | None, crb_rms: float | None, measured_null: float | None,
                         floor: float | None, factor: float = 2.0, margin: float = 0.25,
                         max_residual_rad: float = FLOOR_RESIDUAL_RAD, diagnoses: Any = None,
                         quality: Quality | None = None) -> PhysicsConvergence:
    """Stop against physics (issue 13 item 4).

    ``residual_rms``: the estimated residual (rad RMS, Noll >= 5, e.g. the refined estimate's
    ``residual_rms``); ``crb_rms``: its Cramér–Rao bound at the photons collected
    (``extras["refine"]["crb_residual_rms"]``); ``measured_null`` and ``floor``: the measured null
    and the bead's floor (:func:`calibration.diagnosis.null_floor`), same definition.

    * at the floor (:func:`null_at_floor`: :func:`calibration.diagnosis.is_at_floor` with the
      relative ``margin``, not implausibly below the floor, the residual, when known, at most
      ``max_residual_rad`` and the measured ``quality`` figure, when given, aligned): stop, converged;
    * residual within ``factor`` x its bound (:func:`calibration.diagnosis.residual_within_crb`)
      but the null above the floor: stop, NOT converged (something Zernike correction does not fix
      fills the null: see :func:`summarise_diagnoses`);
    * a named fault (:data:`FAULT_NAMES`) among ``diagnoses`` (an estimate, its extras or a list,
      as :func:`summarise_diagnoses` takes) forbids ``converged`` (the stop still holds): through
      an 80 nm bead (floor 4.8 %) a 2 % wrong-hand fault reads a null within the 25 % margin,
      measured on the simulated microscope (``benchmarks/refined_loop.py --fault
      wrong_hand_fraction=0.02``);
    * otherwise: go on. Unknown (None/NaN) inputs make their test False."""
    nan = float("nan")
    res, crb = (nan if v is None else float(v) for v in (residual_rms, crb_rms))
    null, fl = (nan if v is None else float(v) for v in (measured_null, floor))
    at_floor = null_at_floor(null, fl, margin, residual_rms=residual_rms, max_residual_rad=max_residual_rad,
                             quality=quality)
    within = residual_within_crb(res, crb, factor)
    if at_floor:
        reason = f"measured null {100 * null:.2f} % at the bead's floor {100 * fl:.2f} % (+{100 * margin:.0f} %)"
    elif within:
        reason = f"estimated residual {res:.3f} rad within {factor:g} x its Cramér–Rao bound ({crb:.3f} rad)"
        if math.isfinite(null) and math.isfinite(fl):
            reason += f", but the measured null {100 * null:.2f} % is not at the bead's floor {100 * fl:.2f} %"
    else:
        reason = ""
    found, _ = _extras(diagnoses)
    fault = next((d for d in found if _field(d, "name") in FAULT_NAMES), None)
    converged = at_floor and fault is None
    if fault is not None and (at_floor or within):
        summary = summarise_diagnoses(found, measured_null, floor, residual_rms, margin, max_residual_rad, quality)
        reason += f"; not converged: {summary}"
    elif within and not at_floor:
        reason += ": not converged"
    return PhysicsConvergence(converged=converged, stop=at_floor or within, at_floor=at_floor,
                              within_crb=within, reason=reason)

