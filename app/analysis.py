"""Analyse a recorded measurement: the instrument-model fit, an independent phase retrieval, the
networks where they apply, and a verdict a person can read (``autoalign analyse``).

For each z-stack of a recording (:func:`autoalign.hardware.recorded.read_recording`):

1. the instrument-model fit (:func:`calibration.psf_fit.fit_stacks`) on the native pixels, at the
   instrument given (an instrument file from ``autoalign calibrate instrument``, else the
   nominal optics of the flags / settings), Noll 5..``max_noll`` free, with its validity verdict
   and two kinds of uncertainty;
2. for a beam without a phase mask (a focus, a fluorescent bead's PSF), an independent phase
   retrieval (:func:`calibration.phase_retrieval.retrieve_pupil`, Gerchberg-Saxton over defocus:
   another method, not the same fit), and the comparison of the two on Noll 5..22: RMS
   difference and the ratio of the observed difference per mode to the combined reported sigma;
3. the limits, in words: what the fit's residual says is missing (model error fraction, where
   the residual is), whether the sigma covers the disagreement.

Section scans (:class:`autoalign.recording.SectionScans`, a scanning STED microscope's xy/xz/yz)
are fitted by :func:`calibration.section_fit.fit_sections`; the networks read them resampled onto
their grid (:mod:`calibration.resample`) when the beam is the one they were trained for.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoalign.calibration.psf_fit import CameraCounts, FitOptions, JointFit, fit_stacks
from autoalign.recording import Recording, ZStack
from autoalign.simulation.instrument import Instrument

__all__ = ["AnalysisOptions", "StackAnalysis", "analyse_recording", "compare_estimates", "COMPARE_MODES"]

COMPARE_MODES = tuple(range(5, 23))
"""The modes on which the fit and the phase retrieval are compared (Noll 5..22)."""


@dataclass(frozen=True)
class AnalysisOptions:
    """max_noll : modes 5..max_noll fitted; z_range_um, plane_step : planes used by the fit;
    retrieval : run the independent phase retrieval (beams without a mask)."""

    max_noll: int = 37
    z_range_um: float = 2.5
    plane_step: int = 2
    retrieval: bool = True
    beam: str = "none"


@dataclass
class StackAnalysis:
    """The analysis of one z-stack."""

    stack: ZStack
    fit: JointFit
    retrieval: Any | None = None                 # PhaseRetrievalResult
    comparison: dict[str, Any] | None = None
    limits: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        sf = self.fit.stacks[0]
        out: dict[str, Any] = {
            "name": self.stack.name, "channel": self.stack.channel, "shape": list(self.stack.data.shape),
            "pixel_um": [self.stack.pixel_x_um, self.stack.pixel_y_um], "z_step_um": self.stack.z_step_um,
            "provenance": {k: str(v) for k, v in self.stack.provenance.items()},
            "fit": {
                "valid": sf.valid, "verdict": sf.verdict, "reasons": sf.reasons,
                "deviance_per_dof": sf.deviance_per_dof, "chi2_per_dof": sf.chi2_per_dof,
                "structure_p": {str(b): p for b, p in sf.structure_p.items()},
                "model_error_fraction": sf.model_error_fraction,
                "coefficients_rad": {str(j): c for j, c in sf.coefficients.items()},
                "sigma_rad": {str(j): c for j, c in sf.sigma.items()},
                "sigma_fisher_rad": {str(j): c for j, c in sf.sigma_fisher.items()},
                "sigma_sandwich_rad": {str(j): c for j, c in sf.sigma_sandwich.items()},
                "bead_um": list(sf.bead_um), "photons_per_plane": sf.photons_per_plane,
                "background_photons": sf.background_photons, "planes": len(sf.z_um),
                "crop_px": int(sf.data.shape[-1]), "pupil_samples": self.fit.pupil_samples,
                "quadrature_error_sigma": self.fit.quadrature_error_sigma, "elapsed_s": self.fit.elapsed_s,
            },
            "instrument": self.fit.instrument.to_dict()["instrument"],
            "limits": self.limits,
        }
        if self.retrieval is not None:
            r = self.retrieval
            out["phase_retrieval"] = {
                "method": "multi-plane Gerchberg-Saxton (Hanser et al. 2004), vectorial" if r.vectorial
                else "multi-plane Gerchberg-Saxton (Hanser et al. 2004), scalar",
                "coefficients_rad": {str(j): c for j, c in r.coefficients.items()},
                "sigma_rad": {str(j): c for j, c in r.uncertainty.items()},
                "uncertainty_method": r.uncertainty_method, "residual": r.total_residual,
                "elapsed_s": r.elapsed_s,
            }
        if self.comparison is not None:
            out["comparison"] = self.comparison
        return out


def compare_estimates(fit: dict[int, float], fit_sigma: dict[int, float], other: dict[int, float],
                      other_sigma: dict[int, float], modes: tuple[int, ...] = COMPARE_MODES) -> dict[str, Any]:
    """The fit against an independent estimate on ``modes``: RMS difference (rad), the observed
    RMS difference over the RMS of the combined one-sigma (1 when the sigmas describe the
    disagreement; > 3: the sigmas are too small; < 1/3: too large), the correlation, per mode."""
    a = np.array([fit.get(j, 0.0) for j in modes])
    b = np.array([other.get(j, 0.0) for j in modes])
    sa = np.array([fit_sigma.get(j, 0.0) for j in modes])
    sb = np.array([other_sigma.get(j, 0.0) for j in modes])
    diff = a - b
    comb = np.sqrt(sa**2 + sb**2)
    rms_diff = float(np.sqrt(np.mean(diff**2)))
    rms_sigma = float(np.sqrt(np.mean(comb**2)))
    corr = float(np.corrcoef(a, b)[0, 1]) if np.std(a) > 0 and np.std(b) > 0 else float("nan")
    return {"modes": list(modes), "rms_difference_rad": rms_diff, "rms_fit_rad": float(np.sqrt(np.mean(a**2))),
            "rms_other_rad": float(np.sqrt(np.mean(b**2))), "rms_combined_sigma_rad": rms_sigma,
            "disagreement_over_sigma": rms_diff / rms_sigma if rms_sigma > 0 else float("inf"),
            "correlation": corr, "difference_rad": {str(j): float(d) for j, d in zip(modes, diff)},
            "combined_sigma_rad": {str(j): float(s) for j, s in zip(modes, comb)}}


def _limits(analysis: StackAnalysis) -> list[str]:
    """What limits this result, in words (from the fit's residual and the comparison)."""
    sf = analysis.fit.stacks[0]
    out = []
    if not sf.valid:
        out.append("the instrument model does not explain this stack: " + "; ".join(sf.reasons)
                   + f"; its residual is {100 * sf.model_error_fraction:.1f} % of the local intensity beyond the "
                   "counting noise" + ("" if analysis.fit.instrument.source else
                                       " (no instrument file: run 'autoalign calibrate instrument' on bead stacks "
                                       "of this microscope, then --instrument)"))
    n = sf.data.shape[-1]
    yy, xx = np.mgrid[:n, :n] - n // 2
    r = np.hypot(xx * sf.pixel_um - sf.bead_um[0], yy * sf.pixel_um - sf.bead_um[1])
    pear2 = (sf.data - sf.model) ** 2 / np.clip(sf.model, 1e-6, None)
    core = r < 0.3
    far = r > 1.5
    if core.any() and far.any():
        c, f = float(pear2[:, core].mean()), float(pear2[:, far].mean())
        if c > 2 * f:
            out.append(f"the residual is in the bead's core (chi^2/px {c:.1f} within 0.3 µm vs {f:.2f} beyond 1.5 µm): "
                       "the pupil (amplitude, higher-order phase) is not fully described")
    cmp_ = analysis.comparison
    if cmp_ is not None:
        ratio = cmp_["disagreement_over_sigma"]
        if ratio > 3:
            out.append(f"the fit and the phase retrieval differ by {cmp_['rms_difference_rad']:.3f} rad RMS on Noll "
                       f"5..22, {ratio:.1f}x their combined sigma: model error, not noise, limits the estimate")
        elif ratio < 1 / 3:
            out.append(f"the sigmas ({cmp_['rms_combined_sigma_rad']:.3f} rad) are larger than the observed "
                       f"difference ({cmp_['rms_difference_rad']:.3f} rad): conservative")
    if not out:
        out.append("photon noise: the model explains the stack and the sigmas describe the disagreement with "
                   "the independent method")
    return out


def analyse_stack(stack: ZStack, instrument: Instrument, camera: CameraCounts, options: AnalysisOptions,
                  progress: Callable[[str], None] | None = None) -> StackAnalysis:
    """Fit, phase retrieval (beam ``none``) and comparison for one z-stack."""
    fopt = FitOptions(modes=tuple(range(5, options.max_noll + 1)), z_range_um=options.z_range_um,
                      plane_step=options.plane_step)
    fit = fit_stacks([stack], camera, instrument, fopt, progress=progress)
    analysis = StackAnalysis(stack=stack, fit=fit)
    if options.retrieval and options.beam == "none":
        from autoalign.calibration.phase_retrieval import retrieve_pupil

        if progress is not None:
            progress("phase retrieval (Gerchberg-Saxton over defocus, independent of the fit)")
        electrons = (np.asarray(stack.data, dtype=float) - camera.offset_adu) * camera.electrons_per_adu
        sf = fit.stacks[0]
        # the same planes (relative to the bead's focus) and the instrument's effective NA as the fit
        r = retrieve_pupil(electrons, stack.z_um, stack.pixel_um, instrument.numerical_aperture,
                           instrument.immersion_index, instrument.wavelength_um, n_modes=options.max_noll,
                           z_range_um=(-options.z_range_um, options.z_range_um), window_px=96,
                           polarisation="unpolarised" if instrument.polarisation == "unpolarised"
                           else instrument.polarisation)
        analysis.retrieval = r
        analysis.comparison = compare_estimates(sf.coefficients, sf.sigma, r.coefficients, r.uncertainty)
    analysis.limits = _limits(analysis)
    return analysis


def analyse_recording(recording: Recording, instrument: Instrument, camera: CameraCounts,
                      options: AnalysisOptions, progress: Callable[[str], None] | None = None
                      ) -> list[StackAnalysis]:
    """Analyse every z-stack of a recording (section scans: :func:`analyse_scans`)."""
    if not recording.stacks and not recording.scans:
        raise ValueError(f"{recording.path}: no z-stack and no section scans to analyse "
                         f"(found {len(recording.images)} other image(s))")
    return [analyse_stack(s, instrument, camera, options, progress) for s in recording.stacks]


def summary_lines(analysis: StackAnalysis) -> list[str]:
    """The analysis in a few lines of text (the CLI prints them)."""
    sf = analysis.fit.stacks[0]
    lines = [f"{analysis.stack.name or 'stack'}: {sf.data.shape[0]} planes of {sf.data.shape[1]} x {sf.data.shape[2]} px "
             f"used, {analysis.fit.pupil_samples} pupil nodes, fit {analysis.fit.elapsed_s:.1f} s",
             "  " + sf.verdict]
    modes = [j for j in sf.coefficients if j <= 22]
    rms = math.sqrt(sum(sf.coefficients[j] ** 2 for j in modes))
    lines.append(f"  aberration Noll 5..22: {rms:.3f} rad RMS; Noll 5..{max(sf.coefficients)}: "
                 f"{math.sqrt(sum(c * c for c in sf.coefficients.values())):.3f} rad RMS")
    if analysis.comparison is not None:
        c = analysis.comparison
        lines.append(f"  vs phase retrieval (Noll 5..22): {c['rms_difference_rad']:.3f} rad RMS difference, "
                     f"correlation {c['correlation']:.2f}, difference / combined sigma {c['disagreement_over_sigma']:.1f}")
    lines += ["  limit: " + s for s in analysis.limits]
    return lines


def _network_readings(scans: Any, settings: Any) -> dict[str, Any]:
    """The coarse and fine networks' readings of section scans resampled onto their grid (only
    meaningful for the beam and optics they were trained for: the settings')."""
    from autoalign.calibration.resample import resample_scans
    from autoalign.models.predictor import Predictor

    out: dict[str, Any] = {}
    rs = resample_scans(scans, settings.camera.pixel_size_um, settings.camera.roi_px, settings.stack.z_step_um)
    out["resampled_outside_fraction"] = float(getattr(rs, "outside_fraction", float("nan")))
    for label, path in (("coarse", settings.model.checkpoint), ("fine", settings.model.fine_checkpoint)):
        if not path:
            continue
        try:
            pred = Predictor.load(path, settings, fast=False).predict(rs.sections)
        except Exception as exc:  # noqa: BLE001 - report what went wrong, keep the analysis
            out[label] = {"error": str(exc)}
            continue
        out[label] = {"coefficients_rad": {str(j): c for j, c in pred.coefficients.items()},
                      "mask_offset": list(pred.mask_offset) if pred.mask_offset else None}
    return out


def analyse_scans(scans: Any, instrument: Instrument, beam: str,
                  progress: Callable[[str], None] | None = None, settings: Any = None,
                  confocal: bool = True) -> tuple[Any, dict[str, Any]]:
    """Fit one bead's section scans (xy/xz/yz of a scanning microscope) and read them with the
    networks (vortex beam): the :class:`calibration.psf_fit.SectionFit` and the JSON entry (with
    ``summary`` lines; :func:`app.analysis_report.write_sections_report` draws it)."""
    import torch

    from autoalign.calibration.section_fit import fit_sections
    from autoalign.settings import load_settings

    settings = settings or load_settings(None)
    fit = fit_sections(scans, instrument, beam=beam, confocal=confocal, progress=progress)
    entry: dict[str, Any] = {
        "channel": scans.channel, "name": scans.name, "beam": beam, "confocal_detection": confocal,
        "fit": {"valid": fit.valid, "verdict": fit.verdict, "reasons": fit.reasons,
                "deviance_per_dof": fit.deviance_per_dof, "chi2_per_dof": fit.chi2_per_dof,
                "structure_p": {str(b): p for b, p in fit.structure_p.items()},
                "model_error_fraction": fit.model_error_fraction,
                "coefficients_rad": {str(j): c for j, c in fit.coefficients.items()},
                "sigma_rad": {str(j): c for j, c in fit.sigma.items()},
                "mask_offset": list(fit.mask_offset), "mask_offset_sigma": list(fit.mask_offset_sigma),
                "bead_um": list(fit.bead_um), "bead_sigma_um": list(fit.bead_sigma_um),
                "bin_factor": fit.bin_factor, "elapsed_s": fit.elapsed_s},
    }
    # how much the confocal detection matters: the illumination alone, best scaled, against the fit
    if confocal:
        from autoalign.calibration.section_fit import _SectionProblem

        problem = _SectionProblem(scans, instrument, beam, sorted(fit.coefficients), False)
        theta = torch.zeros(len(problem.names), dtype=torch.float64)
        for i, n in enumerate(problem.names):
            if n.startswith("Z"):
                theta[i] = fit.coefficients[int(n[1:])]
            elif n in ("bead_x_um", "bead_y_um", "bead_z_um"):
                theta[i] = fit.bead_um[("bead_x_um", "bead_y_um", "bead_z_um").index(n)]
            elif n.startswith("mask_offset"):
                theta[i] = fit.mask_offset[0 if n.endswith("x") else 1]
        worst = 0.0
        with torch.no_grad():
            for k, key in enumerate(problem.keys):
                ill = problem.intensity(theta, k).numpy()
                conf = fit.model[key] - fit.background[key]
                scale = float((ill * conf).sum() / max(float((ill * ill).sum()), 1e-30))
                worst = max(worst, float(np.abs(conf - scale * ill).max() / max(float(conf.max()), 1e-30)))
        entry["confocal_effect_of_peak"] = worst
    if beam == "vortex":
        entry["networks"] = _network_readings(scans, settings)
    summary = [f"section scans {scans.name or scans.channel}: {', '.join(fit.data)} ({beam} beam, "
               f"{'confocal' if confocal else 'direct'} detection), fit {fit.elapsed_s:.1f} s", "  " + fit.verdict,
               f"  aberration Noll 5..22: {math.sqrt(sum(c * c for j, c in fit.coefficients.items() if j <= 22)):.3f} "
               f"rad RMS; mask offset ({fit.mask_offset[0]:+.3f}, {fit.mask_offset[1]:+.3f}) +- "
               f"({fit.mask_offset_sigma[0]:.3f}, {fit.mask_offset_sigma[1]:.3f}) pupil radii"]
    if "confocal_effect_of_peak" in entry:
        summary.append(f"  confocal detection changes the model by up to {100 * entry['confocal_effect_of_peak']:.0f} % "
                       "of the section's peak against the illumination alone (it matters)")
    nets = entry.get("networks", {})
    for label in ("coarse", "fine"):
        if label in nets and "coefficients_rad" in nets[label]:
            c = {int(k): v for k, v in nets[label]["coefficients_rad"].items()}
            cmp_ = compare_estimates(fit.coefficients, fit.sigma, c, {})
            summary.append(f"  {label} network: {math.sqrt(sum(v * v for v in c.values())):.3f} rad RMS, "
                           f"{cmp_['rms_difference_rad']:.3f} rad RMS from the fit (correlation {cmp_['correlation']:.2f})")
            entry["networks"][label]["vs_fit"] = cmp_
    entry["summary"] = summary
    return fit, entry
