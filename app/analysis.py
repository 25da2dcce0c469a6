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


#: the beam of a section scan's channel by the role its name says (hardware.recorded.channel_role):
#: an excitation / confocal channel is a focus; a depletion channel (and a channel whose name says
#: neither) is the beam the command was given
ROLE_BEAMS = {"excitation": "none"}


def scan_beam(channel: str, beam: str) -> tuple[str, str]:
    """The beam to model a channel's section scans with, and why (in words): ``none`` for a channel
    whose name says excitation / confocal / Gaussian, else ``beam`` (the depletion beam given)."""
    from autoalign.hardware.recorded import channel_role

    role = channel_role(channel or "")
    if role in ROLE_BEAMS:
        return ROLE_BEAMS[role], f"channel {channel!r}: role {role} (by its name): beam {ROLE_BEAMS[role]} (a focus)"
    if role:
        return beam, f"channel {channel!r}: role {role} (by its name): beam {beam} (--beam)"
    return beam, f"channel {channel!r}: no role in its name: beam {beam} (--beam)"


def _network_readings(scans: Any, settings: Any, instrument: Instrument | None = None) -> dict[str, Any]:
    """The coarse and fine networks' readings of section scans resampled onto their grid (anti-
    aliased, :func:`calibration.resample.resample_scans`). Only meaningful for the beam and optics
    they were trained for (the settings'): ``optics_differ`` names what differs from ``instrument``."""
    from autoalign.calibration.resample import resample_scans
    from autoalign.models.predictor import Predictor

    out: dict[str, Any] = {}
    try:
        rs = resample_scans(scans, settings.camera.pixel_size_um, settings.camera.roi_px, settings.stack.z_step_um)
    except ValueError as exc:
        return {"error": f"cannot resample the sections onto the networks' grid: {exc}"}
    out["grid"] = {"pixel_um": float(settings.camera.pixel_size_um), "n_px": int(settings.camera.roi_px),
                   "z_step_um": float(settings.stack.z_step_um)}
    out["resampled_outside_fraction"] = [float(v) for v in rs.outside_fraction]
    if instrument is not None:
        o = settings.optics
        differ = [f"{name} {mine:g} (networks: {theirs:g})" for name, mine, theirs in (
            ("NA", instrument.numerical_aperture, o.numerical_aperture),
            ("immersion index", instrument.immersion_index, o.immersion_index),
            ("wavelength µm", instrument.wavelength_um, o.wavelength_um)) if not math.isclose(mine, theirs, rel_tol=1e-3)]
        out["optics_differ"] = differ
    for label, path in (("coarse", settings.model.checkpoint), ("fine", settings.model.fine_checkpoint)):
        if not path:
            continue
        try:
            pred = Predictor.load(path, settings, fast=False).predict(rs.sections)
        except Exception as exc:  # noqa: BLE001 - report what went wrong, keep the analysis
            out[label] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        out[label] = {"coefficients_rad": {str(j): float(c) for j, c in pred.coefficients.items()},
                      "mask_offset": [float(v) for v in pred.mask_offset] if pred.mask_offset else None}
    return out


def _wavelength_note(channel: str, instrument: Instrument) -> str | None:
    """A channel name with a wavelength in nm (``"Confocal 640"``) that differs from the one modelled."""
    import re

    found = [int(m) for m in re.findall(r"(?<!\d)(\d{3,4})(?!\d)", channel or "") if 350 <= int(m) <= 1700]
    if not found:
        return None
    nm = found[0]
    if math.isclose(nm / 1000, instrument.wavelength_um, rel_tol=0.03):
        return None
    return (f"channel {channel!r}: its name says {nm} nm, modelled at {instrument.wavelength_um:g} µm "
            f"(--wavelength-um); if this channel's light is {nm} nm, analyse it alone: --channel '{channel}' "
            f"--wavelength-um {nm / 1000:g}")


def analyse_scans(scans: Any, instrument: Instrument, beam: str,
                  progress: Callable[[str], None] | None = None, settings: Any = None,
                  confocal: bool = True, modes: tuple[int, ...] = COMPARE_MODES,
                  orientation: str = "focus") -> tuple[Any, dict[str, Any]]:
    """Fit one bead's section scans (xy/xz/yz of a scanning microscope) and read them with the
    networks (vortex beam): the :class:`calibration.section_fit.SectionFit` and the JSON entry (with
    ``summary`` and ``limits`` lines; :func:`app.analysis_report.write_sections_report` draws it).

    ``beam`` is the depletion beam; the channel's beam is :func:`scan_beam`'s (an excitation /
    confocal channel, by its name, is a focus: ``none``). ``confocal``: the signal was detected
    through the pinhole (``instrument.pinhole_au`` Airy units; a gold bead scanned by a STED
    microscope), else the data are the illumination itself (``--scan-detection direct``). The
    entry says how much confocal detection changes the model (``confocal_effect_of_peak``: the
    largest difference between the model with and without it, both at the fitted parameters,
    fraction of the section's peak). ``orientation``: how the pixels map onto the focus
    (:data:`calibration.section_fit.ORIENTATIONS`; ``focus``, the default: the focus at scan - bead,
    as the project's simulator and tests/obf_writer.py's files draw it; ``mirrored``: a focus
    scanned over a fixed bead, the focus at bead - scan)."""
    from autoalign.calibration.section_fit import QUADRATURE_CHI2, fit_sections, pinhole_radius_um
    from autoalign.settings import load_settings

    settings = settings or load_settings(None)
    beam_used, beam_rule = scan_beam(scans.channel, beam)
    fit = fit_sections(scans, instrument, beam=beam_used, modes=modes, confocal=confocal, progress=progress,
                       orientation=orientation)
    effect = max(fit.detection_effect.values()) if fit.detection_effect else float("nan")
    sections = {}
    for key in fit.data:
        rows, cols = fit.axes_um[key]
        sections[key] = {"shape_binned": list(fit.data[key].shape), "bin_factor": fit.bin_factor[key],
                         "pixel_um_binned": list(fit.pixel_um[key]), "photons": fit.photons[key],
                         "background_per_px": fit.background[key], "peak_counts": float(fit.data[key].max()),
                         "plane_offset_from_bead_um": fit.plane_offset_um[key],
                         "confocal_effect_of_peak": fit.detection_effect.get(key, float("nan"))}
    entry: dict[str, Any] = {
        "channel": scans.channel, "name": scans.name, "beam": beam_used, "beam_rule": beam_rule,
        "detection": "confocal" if confocal else "direct", "confocal_detection": confocal,
        "orientation": orientation,
        "pinhole_au": fit.pinhole_au, "pinhole_radius_um": pinhole_radius_um(instrument),
        "confocal_effect_of_peak": effect,
        "fit": {"valid": fit.valid, "verdict": fit.verdict, "reasons": fit.reasons,
                "deviance_per_dof": fit.deviance_per_dof, "chi2_per_dof": fit.chi2_per_dof,
                "structure_p": {str(b): p for b, p in fit.structure_p.items()},
                "model_error_fraction": fit.model_error_fraction,
                "modes": list(modes),
                "coefficients_rad": {str(j): c for j, c in fit.coefficients.items()},
                "sigma_rad": {str(j): c for j, c in fit.sigma.items()},
                "sigma_fisher_rad": {str(j): c for j, c in fit.sigma_fisher.items()},
                "sigma_sandwich_rad": {str(j): c for j, c in fit.sigma_sandwich.items()},
                "mask_offset": list(fit.mask_offset), "mask_offset_sigma": list(fit.mask_offset_sigma),
                "bead_um": list(fit.bead_um), "bead_sigma_um": list(fit.bead_sigma_um),
                "bin_factor": fit.bin_factor, "pupil_samples": fit.pupil_samples,
                "quadrature_chi2": fit.quadrature_chi2,
                "evaluations": fit.evaluations, "elapsed_s": fit.elapsed_s},
        "sections": sections,
        "instrument": instrument.to_dict()["instrument"],
    }
    limits: list[str] = []
    if not fit.valid:
        limits.append("the instrument model does not explain these sections: " + "; ".join(fit.reasons)
                      + f"; its residual is {100 * fit.model_error_fraction:.1f} % of the local intensity beyond the "
                      "counting noise" + ("" if instrument.source else
                                          " (nominal instrument: calibrate it, 'autoalign calibrate instrument')"))
    if fit.quadrature_chi2 > QUADRATURE_CHI2:
        limits.append(f"pupil quadrature: {fit.pupil_samples} nodes (the cap) change the model by a chi^2 distance of "
                      f"{fit.quadrature_chi2:.2f} against 1.5x the nodes (> {QUADRATURE_CHI2}): the estimate may be "
                      "biased by the quadrature")
    note = _wavelength_note(scans.channel, instrument)
    if note:
        limits.append(note)
    limits.append(f"detection: {'confocal' if confocal else 'direct'} (--scan-detection); confocal detection through "
                  f"a {fit.pinhole_au:g} AU pinhole changes the model by up to {100 * effect:.0f} % of the peak"
                  + (" (the detection PSF is modelled unaberrated, without a mask)" if confocal else
                     ": if these data were detected through a pinhole, analyse with --scan-detection confocal"))
    limits.append(f"orientation: {orientation} (the pixels show the focus at "
                  + ("scan - bead, as the simulator draws it" if orientation == "focus" else "bead - scan")
                  + "); a focus scanned over a fixed bead records its point reflection, which negates every "
                  "coefficient and flips the vortex's handedness: its orientation is 'mirrored'")
    if instrument.bead_diameter_um > 0:
        limits.append(f"bead: a {1000 * instrument.bead_diameter_um:.0f} nm sphere, as its projection onto each "
                      "plane times its marginal across it (exact second moments; mixed fourth moments approximate)")
    far = [k for k, v in fit.plane_offset_um.items() if abs(v) > 0.1]
    if far:
        limits.append("sections not through the bead (modelled as recorded): " + ", ".join(
            f"{k} {1000 * fit.plane_offset_um[k]:+.0f} nm" for k in far))
    if beam_used == "vortex":
        entry["networks"] = _network_readings(scans, settings, instrument)
        if entry["networks"].get("optics_differ"):
            limits.append("the networks were trained for other optics (" + "; ".join(entry["networks"]["optics_differ"])
                          + "): their readings do not apply")
        if confocal:
            limits.append("the networks read the illumination (camera sections); they do not know the confocal "
                          "detection, which changes these sections by up to "
                          f"{100 * effect:.0f} % of the peak")
    entry["limits"] = limits
    rms = math.sqrt(sum(c * c for j, c in fit.coefficients.items() if j <= 22))
    summary = [f"section scans {scans.name or scans.channel}: {', '.join(fit.data)} ({beam_used} beam, "
               f"{'confocal' if confocal else 'direct'} detection), fit {fit.elapsed_s:.1f} s, "
               f"{fit.pupil_samples} pupil nodes", "  " + beam_rule, "  " + fit.verdict,
               f"  aberration Noll {min(modes, default=0)}..{max(modes, default=0)}: {rms:.3f} rad RMS"
               + (f"; mask offset ({fit.mask_offset[0]:+.3f}, {fit.mask_offset[1]:+.3f}) +- "
                  f"({fit.mask_offset_sigma[0]:.3f}, {fit.mask_offset_sigma[1]:.3f}) pupil radii"
                  if beam_used != "none" else ""),
               f"  bead at ({fit.bead_um[0]:.4f}, {fit.bead_um[1]:.4f}, {fit.bead_um[2]:.4f}) µm"]
    nets = entry.get("networks", {})
    for label in ("coarse", "fine"):
        if label in nets and "coefficients_rad" in nets[label]:
            c = {int(k): v for k, v in nets[label]["coefficients_rad"].items()}
            cmp_ = compare_estimates(fit.coefficients, fit.sigma, c, {}, tuple(j for j in modes if j in c) or modes)
            summary.append(f"  {label} network: {math.sqrt(sum(v * v for v in c.values())):.3f} rad RMS, "
                           f"{cmp_['rms_difference_rad']:.3f} rad RMS from the fit (correlation {cmp_['correlation']:.2f})")
            entry["networks"][label]["vs_fit"] = cmp_
        elif label in nets and "error" in nets[label]:
            summary.append(f"  {label} network: not read ({nets[label]['error']})")
    summary += ["  limit: " + s for s in limits]
    entry["summary"] = summary
    return fit, entry
