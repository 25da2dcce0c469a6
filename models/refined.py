"""The ``refined`` estimator: the network's estimate, then the model-based Poisson fit of the
vectorial simulator to the raw stack, with uncertainties, a validity verdict and named faults.

Per measurement (:meth:`RefinedEstimator.estimate`):

1. the network (:class:`autoalign.models.estimator.CNNEstimator`, or any estimator given as
   ``network``) reads the aberration present from the ortho-sections;
2. :func:`autoalign.calibration.refine.refine` fits the forward model to a few xy planes of the
   measurement's raw stack (``measurement.stack.data`` in ADU, ``stack.z_positions_um``), warm
   started from the network, knowing what the SLM shows now: the host's (the loop's) current
   correction, ``host.correction.coefficients`` ({Noll: rad}, tip/tilt/defocus included) and
   ``host.correction.mask_offset`` (the commanded vortex shift, pupil radii);
3. :func:`autoalign.calibration.diagnosis.diagnose` names the faults the fit found (with the
   measured null of the measurement and the bead's floor).

The :class:`~autoalign.estimator.Estimate` returned:

* ``coefficients``: the aberration present as the correction sees it ({Noll: rad}, the fit's
  modes; the loop applies minus gain times them): the fitted hidden aberration ``A`` plus the
  commanded correction ``C``. With a fitted SLM stroke ``s`` (``refine.fit_slm_scale``) this is
  NOT the fit's ``s C + A``: the SLM wraps the phase before the stroke scales it, so it delivers
  the full commanded phase minus a sawtooth ``(1 - s) wrap(V + C)`` that no Zernike correction
  removes (the stroke's own knob: ``slm.grey_level_2pi``, as the ``slm_stroke`` diagnosis says);
* ``mask_offset``: the fit's offset present (pupil radii; the network's when the offset is not fitted);
* ``uncertainty``: 1 sigma per mode from the inverse Fisher information;
* ``valid``: the fit explains the data (chi^2/dof <= ``CHI2_MAX``, no structured residual at
  p < ``refine.structure_p``, see :func:`fit_problems`, unless chi^2 is fine and a fitted fault
  with sharp edges, the stroke or the mask offset, was found: ``extras["structure_attributed_to"]``);
  ``reason`` says which failed and by how much. A network that disagrees with the fit by more
  than ``refine.agreement_rad`` on a mode is outside its domain (``extras["network_outside_domain"]``
  names the modes): the fit that explains the data is then used (measured: 1.6-2.0 rad trials,
  where the network reads 0.4-0.6x the truth, reach 0.032 rad in 5 iterations instead of stopping
  on refused fits); with ``refine.require_agreement`` such an estimate is refused instead, as is
  any estimate whose fit does not explain the data;
* when the fit does not explain the data and ``refine.network_fallback`` (default), the network's
  estimate, valid, with the fit's findings in the extras and ``extras["fit_refused"]`` saying why
  and what to do (measured: with 0.25 rad in Noll 16..28 every fit fails chi^2 and the loop
  applied nothing, 6/6 stopped at 0.64 rad; the network alone reaches 0.19 rad there);
* far off, when the network reads more than ``refine.fit_below_rad`` (rad RMS, Noll >= 5; the
  fit's capture range: beyond it the likelihood has other minima), the network's estimate itself,
  unfitted (``extras["fit_skipped"]`` says so), no uncertainties or diagnosis;
* ``residual_rms`` and ``score``: the RMS of the fitted aberration present (Noll >= 5), a
  maximum-likelihood MEASUREMENT of the residual (precise to ~``crb_residual_rms``), lower is better;
* ``extras``: ``refine`` (summary of the :class:`~autoalign.calibration.refine.RefineResult`: wrong-hand
  fraction, SLM phase scale, bead position, photons, chi^2/dof, structure p, Cramér–Rao bound of the
  residual, ...), ``diagnoses`` (list of plain dicts: name, cause, action, value, uncertainty,
  settings, null_contribution; most damaging first), ``network`` (its coefficients),
  ``disagreement`` ({Noll: fit - network}), ``measured_null`` and ``null_floor``.

Options come from the ``refine:`` settings section (:class:`autoalign.settings.RefineSettings`).
Conventions: Noll from 1, RMS-normalised, radians; mask offset in pupil radii; lengths in µm.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from autoalign.calibration import diagnosis as dg
from autoalign.calibration.metrics import null_depth
from autoalign.calibration.refine import CHI2_MAX, RefineOptions, RefineResult, RefineStart, refine
from autoalign.calibration.verdict import FLOOR_RESIDUAL_RAD, LOWEST_PLAUSIBLE
from autoalign.estimator import Estimate, Estimator, MeasurementLike, ProbeHost
from autoalign.models.estimator import CNNEstimator
from autoalign.settings import Settings

log = logging.getLogger("autoalign.models.refined")

__all__ = ["RefinedEstimator", "refine_options", "fit_problems", "diagnosis_dict", "refine_summary"]


def refine_options(settings: Settings, modes: list[int] | None = None) -> RefineOptions:
    """:class:`RefineOptions` from the ``refine:`` settings section (``modes``: the Noll indices
    fitted, default ``settings.model.modes``)."""
    r = settings.refine
    kw: dict[str, Any] = dict(modes=tuple(int(m) for m in (modes or settings.model.modes)), crop_px=r.crop_px,
                              pupil_samples=r.pupil_samples, max_iterations=r.max_iterations,
                              fit_offset=r.fit_offset, fit_polarisation=r.fit_polarisation,
                              fit_slm_scale=r.fit_slm_scale, uncertainties=r.uncertainties)
    if r.plane_offsets_um is not None:
        kw["plane_offsets_um"] = tuple(float(z) for z in r.plane_offsets_um)
    return RefineOptions(**kw)


#: fitted faults whose sharp edges the fit's quadrature resolves coarsely (structure they leave,
#: with chi^2/dof fine, does not invalidate the estimate; as ``calibration.diagnosis.diagnose`` ranks)
SHARP_EDGED_FAULTS = ("slm_stroke", "mask_offset")


def fit_problems(r: RefineResult, structure_p: float) -> list[str]:
    """Why a fit does not explain the data: ``r.reason``'s findings, with the structured-residual
    test at the threshold ``structure_p`` instead of ``calibration.refine.STRUCTURE_P`` (1e-4).

    At convergence (a donut at the bead's floor, the deepest null) clean fits of the default
    64-px microscope reach p ~ 1e-6..1e-4 at 32 pupil nodes and down to 7e-8 at 48 (the
    microscope's 8-bit pixelated SLM, the bead model, at the deepest null), which would refuse
    converged measurements; a missing aberration of 0.3 rad gives p ~ 0 and chi^2/dof ~ 5."""
    out = [why for why in (r.reason.split("; ") if r.reason else []) if not why.startswith("structured residual")]
    if r.structure_p < structure_p:
        out.append(f"structured residual (p = {r.structure_p:.1e} at {r.structure_block_px}x{r.structure_block_px} "
                   f"px blocks)")
    return out


def _plain(x: float) -> float | None:
    """A float for a JSON report (NaN/inf as None)."""
    x = float(x)
    return x if math.isfinite(x) else None


def diagnosis_dict(d: dg.Diagnosis) -> dict[str, Any]:
    """A :class:`~autoalign.calibration.diagnosis.Diagnosis` as a plain (JSON-ready) dict."""
    return {"name": d.name, "cause": d.cause, "action": d.action, "value": _plain(d.value),
            "uncertainty": _plain(d.uncertainty), "settings": dict(d.settings),
            "null_contribution": float(d.null_contribution)}


def refine_summary(r: RefineResult) -> dict[str, Any]:
    """The scalar findings of a refined fit as a plain dict (units in the key names or as in
    :class:`~autoalign.calibration.refine.RefineResult`)."""
    return {
        "wrong_hand_fraction": float(r.wrong_hand_fraction),
        "wrong_hand_fraction_sigma": _plain(r.uncertainty.get("wrong_hand_fraction", math.nan)),
        "wrong_hand_phase_rad": float(r.wrong_hand_phase_rad),
        "slm_phase_scale": float(r.slm_phase_scale),
        "slm_phase_scale_sigma": _plain(r.uncertainty.get("slm_phase_scale", math.nan)),
        "bead_um": [float(v) for v in r.bead_um],
        "bead_diameter_um": float(r.bead_diameter_um),
        "peak_photons": float(r.peak_photons),
        "background_photons": float(r.background_photons),
        "mask_offset": [float(v) for v in r.mask_offset],
        "misregistration": [float(v) for v in r.misregistration],
        "chi2_per_dof": float(r.chi2_per_dof),
        "deviance_per_dof": float(r.deviance_per_dof),
        "structure_p": float(r.structure_p),
        "structure_block_px": int(r.structure_block_px),
        "crb_residual_rms": _plain(r.crb_residual_rms),
        "iterations": int(r.iterations),
        "elapsed_s": float(r.elapsed_s),
        "valid": bool(r.valid),
        "reason": r.reason,
    }


class RefinedEstimator(Estimator):
    """CNN warm start + model-based Poisson fit (see the module docstring). One stack per
    estimate (``probes`` False); ~1 s per fit at the default ``refine:`` settings on one core.

    ``settings``: the settings (its ``refine:`` section gives the fit's options);
    ``predictor``: a :class:`autoalign.models.predictor.Predictor`-like object for the network
    (None: ``settings.model.checkpoint`` on first use); ``network``: any estimator to warm-start
    from instead of the CNN; ``options``: :class:`RefineOptions` overriding the settings';
    ``agreement_rad``: overrides ``refine.agreement_rad``; ``wanted_null``: passed to
    :func:`~autoalign.calibration.diagnosis.diagnose` (the bead-size check)."""

    name = "refined"
    probes = False

    def __init__(self, settings: Settings, predictor: Any = None, network: Estimator | None = None,
                 options: RefineOptions | None = None, agreement_rad: float | None = None,
                 wanted_null: float | None = None) -> None:
        self.settings = settings
        self.network = network if network is not None else CNNEstimator(settings, predictor)
        self.options = options
        self.agreement_rad = float(settings.refine.agreement_rad if agreement_rad is None else agreement_rad)
        if not self.agreement_rad > 0:
            raise ValueError(f"RefinedEstimator: agreement_rad = {agreement_rad!r}: expected > 0 (radians)")
        self.wanted_null = wanted_null
        self.structure_p = float(settings.refine.structure_p)
        self.fit_below_rad = float(settings.refine.fit_below_rad)
        self.require_agreement = bool(settings.refine.require_agreement)
        self.network_fallback = bool(settings.refine.network_fallback)
        self.host: ProbeHost | None = None
        self.last_result: RefineResult | None = None
        self._misregistration = (0.0, 0.0)  # warm start of the offset when the network does not read it
        self._floors: dict[float, float] = {}

    # ------------------------------------------------------------------ interface
    @property
    def modes(self) -> list[int]:
        if self.options is not None and self.options.modes is not None:
            return [int(m) for m in self.options.modes]
        return [int(m) for m in self.settings.model.modes]

    def attach(self, host: ProbeHost) -> None:
        self.host = host
        self.network.attach(host)

    def prepare(self) -> None:
        self.network.prepare()

    def reset(self) -> None:
        """A new run: forget the last fit and the misregistration it found (the warm start of the
        offset when the network does not read it), so that a run with the same devices and
        settings gives the same numbers whatever ran before on this estimator."""
        self.last_result = None
        self._misregistration = (0.0, 0.0)
        reset = getattr(self.network, "reset", None)
        if callable(reset):
            reset()

    def fit_options(self) -> RefineOptions:
        """The :class:`RefineOptions` of the fit (``options`` given, else the ``refine:`` settings)."""
        return self.options if self.options is not None else refine_options(self.settings, self.modes)

    def null_floor(self, bead_diameter_um: float) -> float:
        """The bead's measured-null floor (:func:`calibration.diagnosis.null_floor`, cached)."""
        key = round(float(bead_diameter_um), 5)
        if key not in self._floors:
            self._floors[key] = dg.null_floor(self.settings, key)
        return self._floors[key]

    def _commanded(self) -> tuple[dict[int, float], tuple[float, float]]:
        """What the SLM shows now: the host's correction (coefficients, vortex shift); none
        without a host."""
        corr = getattr(self.host, "correction", None) if self.host is not None else None
        if corr is None:
            return {}, (0.0, 0.0)
        coeffs = {int(k): float(v) for k, v in dict(getattr(corr, "coefficients", {}) or {}).items()}
        off = getattr(corr, "mask_offset", None) or (0.0, 0.0)
        return coeffs, (float(off[0]), float(off[1]))

    # ------------------------------------------------------------------ estimate
    def _network_estimate(self, net: Estimate, extras: dict[str, Any]) -> Estimate:
        """The network's estimate applied as it is (valid), with ``extras`` saying why."""
        return Estimate(dict(net.coefficients), net.mask_offset, None, True, "", self.name,
                        residual_rms=net.residual_rms, score=net.score, extras={**net.extras, **extras})

    def estimate(self, measurement: MeasurementLike) -> Estimate:
        net = self.network.estimate(measurement)
        network_rms = Estimate.residual_of(net.coefficients)
        if net.valid and 0 < self.fit_below_rad < network_rms:
            # beyond the fit's capture range the likelihood has other minima and the network is the
            # better guess: its estimate is applied as it is (the loop still scores on the measurement)
            why = (f"fit skipped: the network reads {network_rms:.2f} rad RMS, above refine.fit_below_rad "
                   f"{self.fit_below_rad:g} (the fit's capture range)")
            log.info(why)
            return self._network_estimate(net, {"network": dict(net.coefficients), "fit_skipped": why})
        stack = getattr(measurement, "stack", None)
        if stack is None or getattr(stack, "data", None) is None:
            return Estimate(dict(net.coefficients), net.mask_offset, None, False,
                            "refinement needs the raw stack (measurement.stack is None)", self.name)
        options = self.fit_options()
        modes = list(options.modes) if options.modes is not None else self.modes
        commanded, shift = self._commanded()
        if net.mask_offset is not None:
            start_offset = (float(net.mask_offset[0]), float(net.mask_offset[1]))
        else:
            start_offset = (self._misregistration[0] + shift[0], self._misregistration[1] + shift[1])
        start = RefineStart(coefficients={j: float(net.coefficients.get(j, 0.0)) for j in modes},
                            mask_offset=start_offset)
        try:
            r = refine(stack.data, stack.z_positions_um, self.settings, start, commanded=commanded,
                       commanded_shift=shift, options=options)
        except ValueError as exc:
            return Estimate(dict(net.coefficients), net.mask_offset, None, False, f"refinement failed: {exc}",
                            self.name, extras={"network": dict(net.coefficients)})
        self.last_result = r
        if options.fit_offset and all(math.isfinite(v) for v in r.misregistration):
            self._misregistration = (float(r.misregistration[0]), float(r.misregistration[1]))
        # the aberration present as a correction must see it: hidden + commanded, NOT the fit's
        # s C + A. The SLM wraps its phase before the stroke s scales it, and modulo 2 pi
        # s wrap(x) = x - (1 - s) wrap(x): it delivers the full commanded phase minus a sawtooth
        # (1 - s) wrap(V + C) that no Zernike correction removes (the stroke's knob is
        # slm.grey_level_2pi). With s = 1 both are the same.
        present = {j: float(r.aberration[j]) + float(commanded.get(j, 0.0)) for j in modes}
        sigma = {j: float(r.sigma(j)) for j in modes}

        # ---- diagnosis (with the null measured now and the bead's floor)
        measured = null_depth(measurement.sections, measurement.background_photons)
        floor = self.null_floor(r.bead_diameter_um)
        residual = Estimate.residual_of(present)
        # "at the bead's floor" only for a plausible null of a corrected donut (see null_at_floor)
        plausible = math.isfinite(measured) and measured >= LOWEST_PLAUSIBLE * floor and residual <= FLOOR_RESIDUAL_RAD
        # a misregistration the SLM can still shift away (loop.max_mask_offset) is corrected, not a fault
        found = dg.diagnose(r, self.settings, measured_null=measured if plausible else None,
                            wanted_null=self.wanted_null, floor=floor,
                            max_mask_shift=float(self.settings.loop.max_mask_offset))

        # ---- validity: the fit explains the data, and the network agrees with it
        problems = fit_problems(r, self.structure_p)
        edged = [d.name for d in found if d.name in SHARP_EDGED_FAULTS]
        attributed = None
        if edged and r.chi2_per_dof <= CHI2_MAX and all(p.startswith("structured residual") for p in problems):
            # as diagnose(): a fitted fault with sharp edges (the stroke's wraps, the SLM's shifted
            # pupil circle) leaves structure at the fit's quadrature resolution; chi^2 is fine
            attributed, problems = edged[0], []
        reasons = [f"fit: {why}" for why in problems]
        disagreement = {j: present[j] - float(net.coefficients[j]) for j in modes if j in net.coefficients}
        far = {j: d for j, d in disagreement.items() if abs(d) > self.agreement_rad}
        outside = None
        if far:
            worst = ", ".join(f"Z{j} {d:+.2f} rad" for j, d in sorted(far.items(), key=lambda kv: -abs(kv[1])))
            outside = (f"network and fit disagree beyond {self.agreement_rad:g} rad (fit - network: {worst}): "
                       "the network is outside its domain")
            if self.require_agreement or reasons:  # a fit that does not explain the data is no arbiter
                reasons.append(outside)
            else:
                log.info("%s; the fit explains the data and is used", outside)
        if not net.valid:
            reasons.append(f"network: {net.reason}")

        coefficients, uncertainty = present, sigma
        offset = r.mask_offset if options.fit_offset else net.mask_offset
        extras = {
            "refine": refine_summary(r),
            "diagnoses": [diagnosis_dict(d) for d in found],
            "network": {j: float(v) for j, v in net.coefficients.items()},
            "disagreement": disagreement,
            "measured_null": _plain(measured),
            "null_floor": float(floor),
            "structure_attributed_to": attributed,
            "network_outside_domain": outside,
        }
        reason = "; ".join(reasons)
        if problems and self.network_fallback and net.valid:
            # the fit does not explain the data (modes beyond the fitted ones, a fault the model
            # lacks): it is no better a guess than the network, whose estimate is applied; the
            # fit's findings stay in the extras and say what limits the result
            unmodelled = next((d for d in found if d.name == "unmodelled_aberration"), None)
            note = (f"the model-based fit did not explain the data ({reason}): aberration beyond the fitted "
                    "modes, a fault the model lacks or settings that do not match the instrument; the "
                    "network's estimate was applied"
                    + (f"; {unmodelled.action}" if unmodelled is not None else ""))
            log.info(note)
            return self._network_estimate(net, {**extras, "fit_refused": note})
        if reasons:
            log.info("refined estimate invalid: %s", reason)
        return Estimate(coefficients, None if offset is None else (float(offset[0]), float(offset[1])),
                        uncertainty, not reasons, reason, self.name, residual_rms=residual, score=residual,
                        extras=extras)
