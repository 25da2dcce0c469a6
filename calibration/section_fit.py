"""Fit the instrument model to one bead's section scans (xy, xz, yz of a scanning microscope).

A scanning STED / confocal microscope records a bead as three section scans, each with its own
pixel sizes, centre and background (:class:`autoalign.recording.SectionScans`). The expected
counts of each section are the point-sampled intensity of
:class:`simulation.instrument.InstrumentPSF` on that section's grid (no camera pixel; a binned
scan pixel is integrated), blurred by the bead (a Gaussian of the sphere's RMS radius per axis),
times the confocal detection PSF through the pinhole when the signal is detected confocally
(:func:`simulation.instrument.confocal_detection`), scaled by the section's photons plus its
background. Fitted: the aberration, the mask offset (beams with a mask), the bead's 3-D position,
photons and background per section. Goodness of fit and uncertainties as in
:mod:`calibration.psf_fit`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from autoalign.calibration.psf_fit import (
    _MODE_SCALE, DEVIANCE_MAX, STRUCTURE_P_MIN, block_sums, jacobian, minimise, model_error_fraction)
from autoalign.calibration.refine import structure_test
from autoalign.simulation.instrument import Instrument, InstrumentPSF, confocal_detection

__all__ = ["SectionFit", "fit_sections", "pupil_samples_needed"]


@dataclass
class SectionFit:
    """The fit of one bead's section scans (xy, xz, yz of a scanning microscope)."""

    coefficients: dict[int, float]
    sigma: dict[int, float]
    mask_offset: tuple[float, float]              # pupil radii (vortex / top-hat), (0, 0) for no mask
    mask_offset_sigma: tuple[float, float]
    bead_um: tuple[float, float, float]           # x, y, z in the scanner's frame
    bead_sigma_um: tuple[float, float, float]
    photons: dict[str, float]                     # per section: photons at the model's unit intensity
    background: dict[str, float]                  # per section: counts per pixel
    deviance_per_dof: float
    chi2_per_dof: float
    structure_p: dict[int, float]
    model_error_fraction: float
    valid: bool
    reasons: list[str]
    data: dict[str, np.ndarray]                   # binned counts per section
    model: dict[str, np.ndarray]
    pixel_um: dict[str, tuple[float, float]]      # binned pixel sizes (rows, columns)
    bin_factor: dict[str, int]
    confocal: bool
    elapsed_s: float

    @property
    def verdict(self) -> str:
        fit = (f"deviance/dof {self.deviance_per_dof:.3f} (limit {DEVIANCE_MAX}), chi^2/dof {self.chi2_per_dof:.3f}, "
               f"model error {100 * self.model_error_fraction:.1f} % of the local intensity")
        if self.valid:
            return "the model explains the sections: " + fit
        return "the model does NOT explain the sections (" + "; ".join(self.reasons) + "): " + fit


def _bin2d(img: np.ndarray, fr: int, fc: int) -> np.ndarray:
    r, c = img.shape[0] // fr, img.shape[1] // fc
    return img[: r * fr, : c * fc].reshape(r, fr, c, fc).sum(axis=(1, 3))


class _SectionProblem:
    """Expected counts of the three sections of one bead (point-scanned: no camera pixels)."""

    def __init__(self, scans: Any, instrument: Instrument, beam: str, modes: list[int], confocal: bool,
                 max_px: int = 64) -> None:
        self.modes, self.n_modes = modes, max([22] + modes)
        self.instrument = instrument
        self.confocal = confocal
        self.keys: list[str] = []
        self.data: list[torch.Tensor] = []
        self.grids: list[tuple[str, np.ndarray, np.ndarray, tuple[float, float], int]] = []
        raw: dict[str, np.ndarray] = {}
        span = 0.0
        for sec in scans.sections():
            img = np.asarray(sec.image, dtype=float)
            if not np.all(np.isfinite(img)):
                raise ValueError(f"section {sec.name or sec.plane!r}: contains NaN or infinite values")
            f = max(1, int(math.ceil(max(img.shape) / max_px)))
            b = _bin2d(img, f, f)
            rows = sec.axis_um(0)[: b.shape[0] * f].reshape(-1, f).mean(axis=1)
            cols = sec.axis_um(1)[: b.shape[1] * f].reshape(-1, f).mean(axis=1)
            pix = (float(sec.pixel_um[0]) * f, float(sec.pixel_um[1]) * f)
            self.keys.append(sec.plane)
            self.data.append(torch.as_tensor(np.clip(b, 0, None)))
            self.grids.append((sec.plane, rows, cols, pix, f))
            raw[sec.plane] = b
            span = max(span, float(np.ptp(rows)), float(np.ptp(cols)))
        if not self.keys:
            raise ValueError("fit_sections: the scans hold no section")
        self.raw = raw
        # pupil nodes for the sections' lateral field and defocus (the model's own camera grid is unused)
        self.model = InstrumentPSF(instrument, 0.05, 8, self.n_modes, beam=beam, pupil_samples=pupil_samples_needed(
            instrument, 0.5 * span + 0.1, 0.5 * span + 0.3))
        self.detection: dict[str, torch.Tensor] = {}
        names = [f"Z{j}" for j in modes] + ["bead_x_um", "bead_y_um", "bead_z_um"]
        scales = [_MODE_SCALE] * len(modes) + [0.005, 0.005, 0.01]
        if beam != "none":
            names += ["mask_offset_x", "mask_offset_y"]
            scales += [0.005, 0.005]
        for key in self.keys:
            names += [f"{key}.log_photons", f"{key}.background"]
            img = raw[key]
            scales += [0.01, 0.02 * max(float(np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]))), 0.5)]
        self.names, self.scales = names, np.asarray(scales)
        self.index = {n: i for i, n in enumerate(names)}
        self.bead_sigma_um = math.sqrt(0.2) * 0.5 * instrument.bead_diameter_um  # the sphere's RMS per axis

    def _grid_points(self, k: int, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z planes, xs, ys) of section ``k`` in the scanner's frame."""
        plane, rows, cols, _, _ = self.grids[k]
        bx = theta[self.index["bead_x_um"]]
        by = theta[self.index["bead_y_um"]]
        bz = theta[self.index["bead_z_um"]]
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=float))  # noqa: E731
        if plane == "xy":
            return bz[None] * 0 + bz, t(cols) - bx, t(rows) - by
        if plane == "xz":
            return t(rows), t(cols) - bx, torch.zeros(1, dtype=torch.float64) + 0 * by
        return t(rows), torch.zeros(1, dtype=torch.float64) + 0 * bx, t(cols) - by

    def intensity(self, theta: torch.Tensor, k: int) -> torch.Tensor:
        """Illumination (times detection when confocal) on section ``k``'s grid (rows, columns)."""
        plane = self.grids[k][0]
        coef = torch.zeros(self.n_modes, dtype=torch.float64)
        coef = coef.index_put((torch.as_tensor([j - 1 for j in self.modes]),),
                              theta[torch.as_tensor([self.index[f"Z{j}"] for j in self.modes])])
        z, xs, ys = self._grid_points(k, theta)
        p: dict[str, torch.Tensor] = {"bead_z_um": theta[self.index["bead_z_um"]]}
        if "mask_offset_x" in self.index:
            p["mask_offset_x"] = theta[self.index["mask_offset_x"]]
            p["mask_offset_y"] = theta[self.index["mask_offset_y"]]
        if plane == "xy":
            p["bead_z_um"] = torch.zeros((), dtype=torch.float64)
            img = self.model.intensity_on(p, torch.zeros(1, dtype=torch.float64), coef, xs, ys)[0]  # (y, x)
        elif plane == "xz":
            img = self.model.intensity_on(p, z, coef, xs, ys)[:, 0, :]  # (z, x)
        else:
            img = self.model.intensity_on(p, z, coef, xs, ys)[:, :, 0]  # (z, y)
        return self._blur(img, k)

    def _blur(self, img: torch.Tensor, k: int) -> torch.Tensor:
        """The bead (a Gaussian of the sphere's RMS radius per axis) and the binned scan pixel."""
        _, _, _, pix, f = self.grids[k]
        pad = 6
        padded = torch.nn.functional.pad(img[None, None], (pad, pad, pad, pad), mode="replicate")[0, 0]
        fr = torch.as_tensor(np.fft.fftfreq(padded.shape[0], d=pix[0]))[:, None]
        fc = torch.as_tensor(np.fft.rfftfreq(padded.shape[1], d=pix[1]))[None, :]
        s2 = self.bead_sigma_um**2
        tf = torch.exp(-2 * math.pi**2 * s2 * (fr**2 + fc**2))
        if f > 1:
            tf = tf * torch.sinc(fr * pix[0]) * torch.sinc(fc * pix[1])
        out = torch.fft.irfft2(torch.fft.rfft2(padded) * tf, s=padded.shape)
        return out[pad:-pad, pad:-pad]

    def expected(self, theta: torch.Tensor, k: int) -> torch.Tensor:
        key = self.keys[k]
        inten = self.intensity(theta, k)
        if self.confocal:
            inten = inten * self.detection_psf(k)
        return torch.exp(theta[self.index[f"{key}.log_photons"]]) * inten + theta[self.index[f"{key}.background"]]

    def detection_psf(self, k: int) -> torch.Tensor:
        """The confocal detection: the focus (no mask) at the bead convolved with a 1 AU pinhole,
        normalised to 1 at its peak (lateral convolution; for axial sections along the lateral
        axis, see :func:`simulation.instrument.confocal_detection`)."""
        key = self.keys[k]
        if key not in self.detection:
            det_model = InstrumentPSF(self.instrument, 0.05, 8, 22, beam="none",
                                      pupil_samples=self.model.pupil_samples)
            plane, rows, cols, pix, _ = self.grids[k]
            zero = torch.zeros(22, dtype=torch.float64)
            rc = torch.as_tensor(rows - rows[len(rows) // 2])
            cc = torch.as_tensor(cols - cols[len(cols) // 2])
            with torch.no_grad():
                if plane == "xy":
                    det = det_model.intensity_on({}, torch.zeros(1, dtype=torch.float64), zero, cc, rc)[0]
                else:
                    det = det_model.intensity_on({}, rc, zero, cc, torch.zeros(1, dtype=torch.float64))[:, 0, :]
            ins = self.instrument
            blurred = confocal_detection(np.ones(det.shape), det.numpy(), pix, ins.pinhole_au, ins.wavelength_um,
                                         ins.numerical_aperture)
            self.detection[key] = torch.as_tensor(blurred / blurred.max())
        return self.detection[key]

    def nll(self, theta: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for k, d in enumerate(self.data):
            mu = torch.clamp(self.expected(theta, k), min=1e-6)
            total = total + torch.sum(mu - d * torch.log(mu))
        return total


def pupil_samples_needed(instrument: Instrument, half_width_um: float, max_defocus_um: float) -> int:
    """:func:`simulation.instrument.pupil_samples_for` for an instrument (NA with a 5 % margin)."""
    from autoalign.simulation.instrument import pupil_samples_for

    return pupil_samples_for(instrument.numerical_aperture * 1.05, instrument.immersion_index,
                             instrument.wavelength_um, half_width_um, max_defocus_um)


def fit_sections(scans: Any, instrument: Instrument, beam: str = "vortex", modes: Sequence[int] = tuple(range(5, 23)),
                 confocal: bool = False, max_iterations: int = 150, max_px: int = 64,
                 progress: Callable[[str], None] | None = None) -> SectionFit:
    """Fit the instrument model to one bead's section scans (:class:`autoalign.recording.SectionScans`):
    the aberration (``modes``), the mask offset (beams with a mask), the bead's 3-D position, and
    photons and background per section. Sections are binned to at most ``max_px`` pixels a side
    (counts summed: Poisson is kept). ``confocal``: the recorded signal is the illumination times
    the detection PSF through a pinhole of ``instrument.pinhole_au``."""
    t0 = time.perf_counter()
    problem = _SectionProblem(scans, instrument, beam, [int(m) for m in modes], confocal, max_px)
    start = np.zeros(len(problem.names))
    # bead start: the xy section's centroid (or the scanner centre), z from the axial sections
    for k, (plane, rows, cols, _, _) in enumerate(problem.grids):
        img = problem.data[k].numpy()
        bg = float(np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])))
        sig = np.clip(img - bg, 0, None)
        w = sig.sum() + 1e-12
        rc, cc = float((sig.sum(axis=1) * rows).sum() / w), float((sig.sum(axis=0) * cols).sum() / w)
        if plane == "xy":
            start[problem.index["bead_x_um"]], start[problem.index["bead_y_um"]] = cc, rc
        else:
            start[problem.index["bead_z_um"]] = rc
            start[problem.index["bead_x_um" if plane == "xz" else "bead_y_um"]] = cc
        start[problem.index[f"{plane}.background"]] = max(bg, 0.05)
    with torch.no_grad():
        th = torch.as_tensor(start)
        for k, key in enumerate(problem.keys):
            bg = float(start[problem.index[f"{key}.background"]])
            unit = problem.expected(th, k) - bg
            img = problem.data[k].numpy()
            start[problem.index[f"{key}.log_photons"]] = math.log(max(float(np.clip(img - bg, 0, None).sum()), 1.0)
                                                                   / max(float(unit.sum()), 1e-12))
    names = problem.names
    is_mode = np.array([n.startswith("Z") for n in names])
    theta = start
    total = 0
    for label, free, iters in (("bead and photons", ~is_mode, 30), ("aberration", np.ones(len(names), bool), max_iterations)):
        if progress is not None:
            progress(f"section fit: {label} ({len(problem.keys)} sections, {problem.model.pupil_samples} pupil nodes)")
        theta, count = minimise(problem, theta, free, iters, progress, label)
        total += count
    # ---- goodness of fit, uncertainties
    n_par = len(names)
    fisher = np.zeros((n_par, n_par))
    meat = np.zeros((n_par, n_par))
    d_all, mu_all = [], []
    data_out, model_out = {}, {}
    for k, key in enumerate(problem.keys):
        with torch.no_grad():
            mu = problem.expected(torch.as_tensor(theta), k).numpy()
        d = problem.data[k].numpy()
        jac = jacobian(problem, theta, k, list(range(n_par)))
        var = np.clip(mu, 1e-6, None).ravel()
        fisher += jac.T @ (jac / var[:, None])
        score = jac * ((d.ravel() - var) / var)[:, None]
        sb = block_sums(score, (1, d.shape[0], d.shape[1]), 4)
        meat += sb.T @ sb
        d_all.append(d.ravel())
        mu_all.append(mu.ravel())
        data_out[key], model_out[key] = d, mu
    cov_f = np.linalg.pinv(fisher, rcond=1e-12, hermitian=True)
    sig = np.fmax(np.sqrt(np.clip(np.diag(cov_f), 0, None)), np.sqrt(np.clip(np.diag(cov_f @ meat @ cov_f), 0, None)))
    d_cat, mu_cat = np.concatenate(d_all), np.clip(np.concatenate(mu_all), 1e-6, None)
    dof = max(d_cat.size - n_par, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        dev = 2 * float(np.sum(np.where(d_cat > 0, d_cat * np.log(d_cat / mu_cat), 0.0) - (d_cat - mu_cat))) / dof
    chi2 = float(np.sum((d_cat - mu_cat) ** 2 / mu_cat)) / dof
    pear = [(data_out[k] - model_out[k]) / np.sqrt(np.clip(model_out[k], 1e-6, None)) for k in problem.keys]
    struct = {b: min(1.0, min(structure_test(pp[None], blocks=(b,))[0] for pp in pear) * len(pear)) for b in (2, 4, 8)}
    eps = model_error_fraction(d_cat, mu_cat, mu_cat, dof)
    reasons = []
    if dev > DEVIANCE_MAX:
        reasons.append(f"deviance/dof {dev:.2f} > {DEVIANCE_MAX}")
    if struct[4] < STRUCTURE_P_MIN:
        reasons.append(f"structured residual at 4x4 px (p = {struct[4]:.1e} < {STRUCTURE_P_MIN})")
    ix = problem.index
    off = (float(theta[ix["mask_offset_x"]]), float(theta[ix["mask_offset_y"]])) if "mask_offset_x" in ix else (0.0, 0.0)
    off_s = (float(sig[ix["mask_offset_x"]]), float(sig[ix["mask_offset_y"]])) if "mask_offset_x" in ix else (0.0, 0.0)
    return SectionFit(
        coefficients={j: float(theta[ix[f"Z{j}"]]) for j in problem.modes},
        sigma={j: float(sig[ix[f"Z{j}"]]) for j in problem.modes},
        mask_offset=off, mask_offset_sigma=off_s,
        bead_um=(float(theta[ix["bead_x_um"]]), float(theta[ix["bead_y_um"]]), float(theta[ix["bead_z_um"]])),
        bead_sigma_um=(float(sig[ix["bead_x_um"]]), float(sig[ix["bead_y_um"]]), float(sig[ix["bead_z_um"]])),
        photons={k: math.exp(theta[ix[f"{k}.log_photons"]]) for k in problem.keys},
        background={k: float(theta[ix[f"{k}.background"]]) for k in problem.keys},
        deviance_per_dof=dev, chi2_per_dof=chi2, structure_p=struct, model_error_fraction=eps,
        valid=not reasons, reasons=reasons, data=data_out, model=model_out,
        pixel_um={g[0]: g[3] for g in problem.grids}, bin_factor={g[0]: g[4] for g in problem.grids},
        confocal=confocal, elapsed_s=time.perf_counter() - t0)
