"""An instrument model that can explain a real bead z-stack: the pupil as it is, not as designed.

The nominal simulator (:class:`simulation.vectorial.PSFSimulator`) assumes an aplanatic pupil
filled uniformly to the nominal NA. A real objective and beam path differ in ways that a bead's
image shows clearly at real photon counts; :class:`Instrument` holds those parameters and
:class:`InstrumentPSF` is the differentiable forward model (torch) that the fit
(:mod:`calibration.psf_fit`), the instrument calibration and the simulated microscope share.

Forward model (lengths in µm, phases in radians, pupil coordinates ``(u, v)`` in pupil radii with
unit radius at the effective NA)::

    E_pol(x, y, z) = sum_nodes  F_pol(u, v) A(u, v) exp(i Phi(u, v)) exp(i kz z' + i kappa (u x0 + v y0))
                                exp(-i kappa (u x + v y)) w(u, v)
    I = sum_pol sum_xyz |E|^2     (normalised so that an unaberrated plane integrates to 1)

* ``F_pol``: the Richards-Wolf vector pupil field of the input polarisation (aplanatic factor
  included), :func:`simulation.pupil.debye_pupil_field`; ``unpolarised`` light (a fluorescent
  bead seen in widefield, or a depolarised beam) is the incoherent sum of x and y linear;
* ``A = exp(-|w - d|^2 / f^2 + a_4 rho^4 + a_6 rho^6) cos(theta)^gamma``: pupil amplitude, a Gaussian beam of 1/e
  amplitude radius ``f`` (the fill factor, pupil radii; ``inf`` for a uniform fill) centred at the
  decentration ``d`` (pupil radii), times a smooth apodisation ``cos^gamma`` on top of the
  aplanatic one (``gamma > 0``: weaker at the edge);
* ``Phi = sum_j c_j Z_j(u, v)``: the aberration (Noll, RMS-normalised on the unit pupil);
* ``kappa = 2 pi NA / lambda``, ``kz = 2 pi / lambda sqrt(n^2 - NA^2 rho^2)``: NA is the
  effective NA (fitted), ``n`` the immersion index;
* ``z' = s_z (z - z_bead)``: the axial scale ``s_z`` maps stage focus to optical defocus (a
  refractive-index mismatch between immersion and sample, or a miscalibrated focus drive);
* ``(x0, y0) = (x_bead, y_bead) + (dx/dz, dy/dz) (z - z_bead)``: the bead position with a
  lateral drift per µm of focus (a tilted focus drive, or a pupil that is not telecentric);
* the output grid's pixel is ``pixel_scale`` times the nominal pixel size;
* the image is integrated over the pixel (sinc transfer function) and blurred by the bead's
  projected sphere (its exact 2-D transfer function ``3 (sin q - q cos q) / q^3``, ``q = 2 pi f R``:
  differentiable at any diameter, also far below one pixel), both by FFT on a padded grid (exact
  for a band-limited image: a grid finer than the intensity's Nyquist limit is used when the
  pixels are coarser);
* confocal detection (:attr:`Instrument.detection` ``"confocal"``) multiplies the illumination
  by the detection PSF convolved with the pinhole (:func:`confocal_detection`).

Expected counts: ``mu = N I + b (1 + g_x X + g_y Y)`` photons (``N`` photons per plane, ``b``
background per pixel, ``g`` its gradient per µm across the crop).

The pupil quadrature is the chord-adapted Gauss-Legendre rule of the nominal simulator; its
number of nodes is chosen from the geometry (:func:`pupil_samples_for`), not fixed.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from autoalign.simulation.pupil import beam_phase, debye_pupil_field, input_jones
from autoalign.simulation.vectorial import chord_quadrature
from autoalign.simulation.zernike import zernike_basis

__all__ = ["Instrument", "InstrumentPSF", "InstrumentFileError", "pupil_samples_for", "INSTRUMENT_FORMAT",
           "DEFAULT_INSTRUMENT_FILE",
           "sphere_transfer", "confocal_detection", "PARAMETER_UNITS"]

INSTRUMENT_FORMAT = "autoalign-instrument"
DEFAULT_INSTRUMENT_FILE = "instrument.yaml"
"""Where ``autoalign calibrate instrument`` writes and ``autoalign analyse`` looks by default."""
INSTRUMENT_VERSION = 1
Polarisation = Literal["unpolarised", "circular_plus", "circular_minus", "linear_x", "linear_y"]

#: units of the instrument parameters, for reports
PARAMETER_UNITS = {"numerical_aperture": "", "fill_factor": "pupil radii", "apodisation": "", "amplitude_r4": "",
                   "amplitude_r6": "",
                   "decentration_x": "pupil radii", "decentration_y": "pupil radii", "axial_scale": "",
                   "pixel_scale": "", "drift_x_per_um": "µm/µm", "drift_y_per_um": "µm/µm",
                   "bead_diameter_um": "µm"}


class InstrumentFileError(ValueError):
    """An instrument file that cannot be used (names the file, the key and what was expected)."""


@dataclass(frozen=True)
class Instrument:
    """The instrument's optics as measured (defaults: the nominal, ideal instrument).

    numerical_aperture : effective NA of the pupil (the nominal one until calibrated)
    immersion_index : refractive index of the immersion medium
    wavelength_um : wavelength of the light imaged (emission for fluorescence), µm
    fill_factor : 1/e amplitude radius of the Gaussian beam filling the pupil, pupil radii
        (``inf``: uniform)
    apodisation : exponent ``gamma`` of ``cos(theta)^gamma`` on top of the aplanatic factor
    amplitude_r4, amplitude_r6 : coefficients of rho^4 and rho^6 in the log of the pupil amplitude
        (a radial amplitude profile the fill and the apodisation do not describe)
    decentration : (x, y) of the beam / amplitude profile's centre on the pupil, pupil radii
    axial_scale : optical defocus per µm of stage focus
    pixel_scale : true pixel size / nominal pixel size
    drift_per_um : (dx/dz, dy/dz) lateral drift of the focus per µm of focus travel
    polarisation : ``unpolarised`` (widefield fluorescence), or the input polarisation
    bandwidth_um : FWHM of the detected spectrum (fluorescence emission through its filter), µm;
        the image is the spectrum-weighted sum of the PSFs (3-point Gauss-Hermite rule), the
        aberration's optical path fixed (its phase scales as lambda_0 / lambda); 0: monochromatic
    bead_diameter_um : the bead's diameter (a sphere), µm
    detection : ``widefield`` (camera) or ``confocal`` (a point detector behind a pinhole)
    pinhole_au : pinhole diameter in Airy units (confocal)
    source : what this instrument was measured from (file names), in words
    uncertainty : one-sigma uncertainty of each fitted parameter (same names as the fields)
    nominal : the nominal optics the calibration started from ({"numerical_aperture", "immersion_index",
        "wavelength_um"}): a measurement analysed with this instrument must have been taken with them
    """

    numerical_aperture: float = 1.4
    immersion_index: float = 1.518
    wavelength_um: float = 0.775
    fill_factor: float = math.inf
    apodisation: float = 0.0
    amplitude_r4: float = 0.0
    amplitude_r6: float = 0.0
    decentration: tuple[float, float] = (0.0, 0.0)
    axial_scale: float = 1.0
    pixel_scale: float = 1.0
    drift_per_um: tuple[float, float] = (0.0, 0.0)
    polarisation: Polarisation = "unpolarised"
    bandwidth_um: float = 0.0
    bead_diameter_um: float = 0.0
    detection: Literal["widefield", "confocal"] = "widefield"
    pinhole_au: float = 1.0
    source: str = ""
    uncertainty: Mapping[str, float] = field(default_factory=dict)
    nominal: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            ("numerical_aperture", 0 < self.numerical_aperture < self.immersion_index, "0 < NA < immersion index"),
            ("wavelength_um", self.wavelength_um > 0, "> 0"),
            ("fill_factor", self.fill_factor > 0, "> 0 (inf for a uniform fill)"),
            ("axial_scale", 0.3 < self.axial_scale < 3.0, "between 0.3 and 3"),
            ("pixel_scale", 0.5 < self.pixel_scale < 2.0, "between 0.5 and 2"),
            ("bead_diameter_um", 0 <= self.bead_diameter_um < 5.0, "between 0 and 5 µm"),
            ("pinhole_au", self.pinhole_au > 0, "> 0"),
            ("bandwidth_um", 0 <= self.bandwidth_um < 0.5 * self.wavelength_um, "between 0 and half the wavelength"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"instrument: {name} = {getattr(self, name)!r}, expected {expected}")
        if self.polarisation not in ("unpolarised", "circular_plus", "circular_minus", "linear_x", "linear_y"):
            raise ValueError(f"instrument: polarisation = {self.polarisation!r}, expected unpolarised, "
                             "circular_plus, circular_minus, linear_x or linear_y")
        if self.detection not in ("widefield", "confocal"):
            raise ValueError(f"instrument: detection = {self.detection!r}, expected widefield or confocal")

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decentration"] = [float(v) for v in self.decentration]
        d["drift_per_um"] = [float(v) for v in self.drift_per_um]
        d["fill_factor"] = None if math.isinf(self.fill_factor) else float(self.fill_factor)
        d["uncertainty"] = {k: float(v) for k, v in dict(self.uncertainty).items()}
        d["nominal"] = {k: float(v) for k, v in dict(self.nominal).items()}
        return {"format": INSTRUMENT_FORMAT, "version": INSTRUMENT_VERSION, "instrument": d}

    def save(self, path: str | Path) -> Path:
        """Write the instrument file (YAML, atomic: a crash leaves the old file or the new one)."""
        import yaml

        from autoalign.files import atomic_write_text

        text = ("# autoalign instrument file: the optics measured from bead stacks "
                "('autoalign calibrate instrument').\n" + yaml.safe_dump(self.to_dict(), sort_keys=False))
        return atomic_write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> "Instrument":
        """Read an instrument file; errors name the file and the key."""
        import yaml

        p = Path(path)
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise InstrumentFileError(f"{p}: cannot read the instrument file ({exc.strerror or exc})") from exc
        except yaml.YAMLError as exc:
            raise InstrumentFileError(f"{p}: not valid YAML ({exc})") from exc
        if not isinstance(doc, dict) or doc.get("format") != INSTRUMENT_FORMAT:
            raise InstrumentFileError(f"{p}: not an autoalign instrument file (expected 'format: "
                                      f"{INSTRUMENT_FORMAT}', found {doc.get('format') if isinstance(doc, dict) else doc!r})")
        if doc.get("version") != INSTRUMENT_VERSION:
            raise InstrumentFileError(f"{p}: instrument file version {doc.get('version')!r}, this autoalign "
                                      f"reads version {INSTRUMENT_VERSION}")
        body = doc.get("instrument")
        if not isinstance(body, dict):
            raise InstrumentFileError(f"{p}: key 'instrument' missing or not a mapping")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(body) - known)
        if unknown:
            raise InstrumentFileError(f"{p}: unknown key(s) instrument.{', instrument.'.join(unknown)}")
        kw = dict(body)
        if kw.get("fill_factor") is None:
            kw["fill_factor"] = math.inf
        for key in ("decentration", "drift_per_um"):
            if key in kw:
                v = kw[key]
                if not (isinstance(v, (list, tuple)) and len(v) == 2):
                    raise InstrumentFileError(f"{p}: instrument.{key} = {v!r}, expected [x, y]")
                kw[key] = (float(v[0]), float(v[1]))
        try:
            return cls(**kw)
        except (TypeError, ValueError) as exc:
            raise InstrumentFileError(f"{p}: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: Any) -> "Instrument":
        """The nominal instrument of a :class:`autoalign.settings.Settings` (beam path optics)."""
        o = settings.optics
        pol: Polarisation = o.polarisation if o.polarisation in ("circular_plus", "circular_minus") else "unpolarised"
        return cls(numerical_aperture=o.numerical_aperture, immersion_index=o.immersion_index,
                   wavelength_um=o.wavelength_um, polarisation=pol,
                   bead_diameter_um=float(settings.camera.bead_diameter_um))

    def with_values(self, values: Mapping[str, float]) -> "Instrument":
        """A copy with fitted values (flat names: ``decentration_x``, ``drift_y_per_um``, ...)."""
        kw: dict[str, Any] = {}
        dec, drift = list(self.decentration), list(self.drift_per_um)
        for k, v in values.items():
            if k == "decentration_x":
                dec[0] = float(v)
            elif k == "decentration_y":
                dec[1] = float(v)
            elif k == "drift_x_per_um":
                drift[0] = float(v)
            elif k == "drift_y_per_um":
                drift[1] = float(v)
            elif k in self.__dataclass_fields__:
                kw[k] = float(v)
        return replace(self, decentration=(dec[0], dec[1]), drift_per_um=(drift[0], drift[1]), **kw)

    def nominal_mismatch(self, numerical_aperture: float | None = None, immersion_index: float | None = None,
                         wavelength_um: float | None = None) -> list[str]:
        """The nominal optics given that differ from those this instrument was calibrated from
        (an empty list when they agree or the instrument records none)."""
        out = []
        for key, value in (("numerical_aperture", numerical_aperture), ("immersion_index", immersion_index),
                           ("wavelength_um", wavelength_um)):
            ref = dict(self.nominal).get(key)
            if value is not None and ref is not None and not math.isclose(float(value), float(ref), rel_tol=1e-6):
                out.append(f"{key} {value:g} (calibrated from {ref:g})")
        return out

    def flat(self) -> dict[str, float]:
        """The fittable parameters by flat name (see :data:`PARAMETER_UNITS`)."""
        return {"numerical_aperture": self.numerical_aperture, "fill_factor": self.fill_factor,
                "apodisation": self.apodisation, "amplitude_r4": self.amplitude_r4,
                "amplitude_r6": self.amplitude_r6, "decentration_x": self.decentration[0],
                "decentration_y": self.decentration[1], "axial_scale": self.axial_scale,
                "pixel_scale": self.pixel_scale, "drift_x_per_um": self.drift_per_um[0],
                "drift_y_per_um": self.drift_per_um[1], "bead_diameter_um": self.bead_diameter_um}


def pupil_samples_for(numerical_aperture: float, immersion_index: float, wavelength_um: float,
                      half_width_um: float, max_defocus_um: float, minimum: int = 24) -> int:
    """Pupil nodes per axis for a field of ``+-half_width_um`` and defocus up to ``max_defocus_um``.

    The integrand's phase along a pupil axis varies by ``omega = kappa x + (k n - kz(NA)) z``
    radians; Gauss-Legendre in the chord rule's angle resolves ``exp(i omega sin(pi a / 2))``
    when the nodes exceed ``pi omega / 4`` by a margin (measured: :func:`InstrumentPSF.quadrature_error`
    checks the choice against a finer rule, and the fit refines it against the data's noise)."""
    kappa = 2 * math.pi * numerical_aperture / wavelength_um
    k = 2 * math.pi / wavelength_um
    dz = k * (immersion_index - math.sqrt(immersion_index**2 - numerical_aperture**2)) * abs(max_defocus_um)
    omega = kappa * abs(half_width_um) + dz
    n = int(math.ceil(0.6 * omega + 10))
    n = max(minimum, n)
    return n + (n % 2)


def sphere_transfer(q: torch.Tensor) -> torch.Tensor:
    """2-D transfer function of a sphere's projection, ``3 (sin q - q cos q) / q^3`` with
    ``q = 2 pi |f| R``; 1 at q = 0 (series below q = 1e-2, so gradients are finite at any R)."""
    small = q < 1e-2
    qs = torch.where(small, torch.ones_like(q), q)
    exact = 3 * (torch.sin(qs) - qs * torch.cos(qs)) / qs**3
    return torch.where(small, 1 - q * q / 10, exact)


class InstrumentPSF:
    """Differentiable intensity planes of a point source / bead for an :class:`Instrument`.

    Parameters
    ----------
    instrument : the start (or fixed) instrument
    pixel_um : nominal lateral pixel size, µm
    n_px : output planes are ``n_px x n_px`` (pixel ``n_px // 2`` at the origin)
    n_modes : Zernike modes Noll 1..n_modes available
    pupil_samples : quadrature nodes per axis (``None``: :func:`pupil_samples_for` with
        ``max_defocus_um``)
    max_defocus_um : largest |z - z_bead| the planes will have (for the node count)
    dtype : torch.float64 (default) or float32
    pad_px : guard band for the pixel / bead transfer functions (cropped off)
    beam : the phase mask in the pupil: ``none`` (a focus or a fluorescent bead's PSF),
        ``vortex`` (the 2-D STED donut, ``vortex_charge``), ``tophat`` (z-STED: pi inside
        ``tophat_radius`` pupil radii); its offset from the pupil centre is the parameter
        ``mask_offset_x/_y`` (pupil radii)
    """

    def __init__(self, instrument: Instrument, pixel_um: float, n_px: int, n_modes: int = 37,
                 pupil_samples: int | None = None, max_defocus_um: float = 2.0,
                 dtype: torch.dtype = torch.float64, pad_px: int = 4, beam: str = "none",
                 vortex_charge: int = 1, tophat_radius: float = 1 / math.sqrt(2)) -> None:
        if beam not in ("none", "vortex", "tophat"):
            raise ValueError(f"InstrumentPSF: beam = {beam!r}, expected none, vortex or tophat")
        self.beam, self.vortex_charge, self.tophat_radius = beam, int(vortex_charge), float(tophat_radius)
        if pixel_um <= 0 or n_px < 4:
            raise ValueError(f"InstrumentPSF: pixel_um = {pixel_um!r} and n_px = {n_px!r}: expected > 0 and >= 4")
        self.instrument = instrument
        self.pixel_um = float(pixel_um)
        self.n_px = int(n_px)
        self.n_modes = int(n_modes)
        self.dtype = dtype
        self.cdtype = torch.complex128 if dtype == torch.float64 else torch.complex64
        half = 0.5 * (n_px + 2 * pad_px) * pixel_um
        self.pupil_samples = int(pupil_samples) if pupil_samples else pupil_samples_for(
            instrument.numerical_aperture * 1.05, instrument.immersion_index, instrument.wavelength_um,
            half, max_defocus_um)
        if self.pupil_samples % 2:
            self.pupil_samples += 1
        # intensity band limit 2 NA / lambda vs the grid's Nyquist 1 / (2 p): supersample when coarser
        cutoff = 2 * instrument.numerical_aperture * 1.05 / instrument.wavelength_um
        self.supersample = max(1, int(math.ceil(cutoff * 2 * pixel_um * 0.999)))
        self.pad_px = int(pad_px)
        u, v, w = chord_quadrature(self.pupil_samples, self.pupil_samples)
        uu = np.broadcast_to(u[:, None], v.shape)
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a), dtype=dtype)  # noqa: E731
        self.u, self.v, self.w = t(uu), t(v), t(w)
        rho = np.hypot(uu, v)
        self.rho = t(rho)
        self.basis = t(zernike_basis(self.n_modes, rho, np.arctan2(v, uu)))  # (J, Na, Nc)
        # output coordinates (coarse pixels) of the fine grid, padded: every s-th fine sample is a
        # coarse pixel's centre (the pixel-integrated image is sampled there after filtering)
        s, m = self.supersample, self.n_px + 2 * self.pad_px
        self._fine_px = t(np.arange(m * s) / s - (m // 2))
        self._jones = {
            "x": (torch.ones_like(self.u).to(self.cdtype), torch.zeros_like(self.u).to(self.cdtype)),
            "y": (torch.zeros_like(self.u).to(self.cdtype), torch.ones_like(self.u).to(self.cdtype)),
        }
        fx = np.fft.fftfreq(m * s, d=1.0 / s)  # cycles per coarse pixel
        self._fx = t(fx)
        self._frq = t(np.fft.rfftfreq(m * s, d=1.0 / s))

    # ------------------------------------------------------------------ pieces
    def _pupil_fields(self, na: torch.Tensor) -> list[torch.Tensor]:
        """Vector pupil fields (3, Na, Nc) of the polarisation state(s), weights included."""
        ins = self.instrument
        n = ins.immersion_index
        if ins.polarisation == "unpolarised":
            states = [self._jones["x"], self._jones["y"]]
            scale = 1 / math.sqrt(2)
        elif ins.polarisation == "linear_x":
            states, scale = [self._jones["x"]], 1.0
        elif ins.polarisation == "linear_y":
            states, scale = [self._jones["y"]], 1.0
        else:
            states, scale = [input_jones(self.u, self.v, ins.polarisation)], 1.0
        return [debye_pupil_field(self.u, self.v, na, n, j) * (self.w * scale)  # type: ignore[arg-type]  # NA: a tensor
                for j in states]

    def _spectral(self, p: Mapping[str, torch.Tensor], z_um: torch.Tensor, coefficients: torch.Tensor,
                  xs_um: torch.Tensor | None, ys_um: torch.Tensor | None) -> torch.Tensor:
        """Intensity per µm^2 (normalised per wavelength), summed over the detected spectrum."""
        ins = self.instrument
        lam0 = ins.wavelength_um
        if ins.bandwidth_um <= 0:
            inten, norm = self._fields_on(p, z_um, coefficients, xs_um, ys_um, lam0)
            return inten * norm
        sigma = ins.bandwidth_um / (2 * math.sqrt(2 * math.log(2)))
        total = None
        for offset, weight in ((-math.sqrt(3), 1 / 6), (0.0, 2 / 3), (math.sqrt(3), 1 / 6)):
            lam = lam0 + offset * sigma
            inten, norm = self._fields_on(p, z_um, coefficients * (lam0 / lam), xs_um, ys_um, lam)
            part = inten * (norm * weight)
            total = part if total is None else total + part
        assert total is not None
        return total

    def _fields_on(self, p: Mapping[str, torch.Tensor], z_um: torch.Tensor, coefficients: torch.Tensor,
                   xs_um: torch.Tensor | None, ys_um: torch.Tensor | None,
                   wavelength_um: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """|E|^2 summed over components and polarisation states, (K, len(ys), len(xs)), on the
        separable grid ``xs_um`` x ``ys_um`` (µm from the origin; None: this model's fine grid at
        the pixel scale), and the normalisation factor (per µm^2) that makes an unaberrated plane
        integrate to 1."""
        ins = self.instrument
        rd = self.dtype

        def val(name: str, default: float) -> torch.Tensor:
            return p[name].to(rd) if name in p else torch.as_tensor(default, dtype=rd)

        na = val("numerical_aperture", ins.numerical_aperture)
        inv_fill2 = val("inv_fill2", 0.0 if math.isinf(ins.fill_factor) else 1 / ins.fill_factor**2)
        gamma = val("apodisation", ins.apodisation)
        dx, dy = val("decentration_x", ins.decentration[0]), val("decentration_y", ins.decentration[1])
        sz = val("axial_scale", ins.axial_scale)
        ps = val("pixel_scale", ins.pixel_scale)
        gx, gy = val("drift_x_per_um", ins.drift_per_um[0]), val("drift_y_per_um", ins.drift_per_um[1])
        bx, by, bz = val("bead_x_um", 0.0), val("bead_y_um", 0.0), val("bead_z_um", 0.0)
        lam, n = (ins.wavelength_um if wavelength_um is None else wavelength_um), ins.immersion_index
        kappa = 2 * math.pi * na / lam
        sin_t = self.rho * na / n
        cos_t = torch.sqrt(torch.clamp(1 - sin_t * sin_t, min=1e-9))
        kz = (2 * math.pi / lam) * n * cos_t
        a4, a6 = val("amplitude_r4", ins.amplitude_r4), val("amplitude_r6", ins.amplitude_r6)
        r2 = self.rho * self.rho
        amp = torch.exp(-((self.u - dx) ** 2 + (self.v - dy) ** 2) * inv_fill2 + a4 * r2 * r2 + a6 * r2 * r2 * r2
                        ) * cos_t**gamma
        phase = torch.tensordot(coefficients.to(rd), self.basis, dims=1)
        if self.beam != "none":
            phase = phase + beam_phase(self.u, self.v, self.beam, self.vortex_charge,  # type: ignore[arg-type]
                                       self.tophat_radius, val("mask_offset_x", 0.0), val("mask_offset_y", 0.0))
        scalar = torch.polar(amp, phase)  # (Na, Nc)
        dz = z_um.to(rd) - bz
        x0 = bx + gx * dz
        y0 = by + gy * dz
        diversity = (dz * sz)[:, None, None] * kz[None] + kappa * (x0[:, None, None] * self.u[None]
                                                                   + y0[:, None, None] * self.v[None])
        per_plane = scalar[None] * torch.polar(torch.ones_like(diversity), diversity)  # (K, Na, Nc)
        if xs_um is None or ys_um is None:
            xs = ys = self._fine_px * (self.pixel_um * ps)
        else:
            xs, ys = xs_um.to(rd), ys_um.to(rd)
        fxk = torch.polar(torch.ones(1, dtype=rd), -kappa * xs[:, None] * self.u[None, :, 0])  # (Mx, Na)
        kyk = torch.polar(torch.ones(1, dtype=rd), -kappa * self.v[..., None] * ys)  # (Na, Nc, My)
        k_planes = per_plane.shape[0]
        na_nodes, nc_nodes = self.u.shape
        mx, my = xs.shape[0], ys.shape[0]
        inten = torch.zeros((mx, k_planes, my), dtype=rd)
        energy = torch.zeros((), dtype=rd)
        for f in self._pupil_fields(na):
            vec = (per_plane[:, None] * f[None].to(self.cdtype))  # (K, 3, Na, Nc)
            vec = vec.permute(2, 0, 1, 3).reshape(na_nodes, k_planes * 3, nc_nodes)
            d = torch.bmm(vec, kyk)  # (Na, K 3, My)
            e = fxk @ d.reshape(na_nodes, -1)  # (Mx, K 3 My)
            inten = inten + (e.real**2 + e.imag**2).reshape(mx, k_planes, 3, my).sum(dim=2)  # (x, K, y)
            a = f * amp[None]
            energy = energy + torch.sum((a.real**2 + a.imag**2) / self.w)
        # Parseval: the plane integral of |E|^2 is (2 pi / kappa)^2 sum |P|^2 du dv
        return inten.permute(1, 2, 0), kappa**2 / (2 * math.pi) ** 2 / energy

    def intensity_on(self, p: Mapping[str, torch.Tensor], z_um: torch.Tensor, coefficients: torch.Tensor,
                     xs_um: torch.Tensor, ys_um: torch.Tensor) -> torch.Tensor:
        """Point-sampled intensity (K, len(ys), len(xs)) per µm^2 (an unaberrated plane integrates
        to 1) on any separable grid: section scans (an xz section is K planes with one y) of a
        point detector, without pixel integration or bead blur (see :meth:`planes`)."""
        return self._spectral(p, z_um, coefficients, xs_um, ys_um)

    def planes(self, p: Mapping[str, torch.Tensor], z_um: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """Camera planes (K, n_px, n_px): the intensity integrated over each pixel and blurred by
        the bead, for the parameters ``p`` (tensors, see below) at the stage focus positions
        ``z_um`` (K,), normalised so that an unaberrated plane sums to 1 (photons per pixel for
        one photon in the plane).

        ``p`` keys (missing ones take the instrument's value): numerical_aperture, inv_fill2
        (``1 / fill_factor^2``), apodisation, decentration_x/_y, axial_scale, pixel_scale,
        drift_x_per_um/_y, bead_diameter_um, amplitude_r4/_r6, bead_x_um, bead_y_um, bead_z_um,
        mask_offset_x/_y.
        ``coefficients`` (n_modes,) radians, Noll 1..n_modes.
        """
        ins = self.instrument
        rd = self.dtype
        ps = p["pixel_scale"].to(rd) if "pixel_scale" in p else torch.as_tensor(ins.pixel_scale, dtype=rd)
        diam = p["bead_diameter_um"].to(rd) if "bead_diameter_um" in p else torch.as_tensor(
            ins.bead_diameter_um, dtype=rd)
        pix = self.pixel_um * ps
        inten = self._spectral(p, z_um, coefficients, None, None) * (pix * pix)  # photons per coarse pixel area at each sample
        # pixel integration (the box of one coarse pixel) and the bead: transfer functions on the
        # fine grid, frequencies in cycles per coarse pixel; exact for the band-limited intensity
        spec = torch.fft.rfft2(inten)
        fy, fx = self._fx[:, None], self._frq[None, :]
        q = 2 * math.pi * torch.sqrt(fx**2 + fy**2 + 1e-30) / pix * (0.5 * diam)
        spec = spec * (sphere_transfer(q) * torch.sinc(fx) * torch.sinc(fy))
        img = torch.fft.irfft2(spec, s=inten.shape[-2:])
        s = self.supersample
        if s > 1:  # the pixel-integrated image at the coarse pixels' centres
            img = img[:, ::s, ::s]
        pp = self.pad_px
        return img[:, pp: pp + self.n_px, pp: pp + self.n_px]

    def quadrature_error(self, coefficients: torch.Tensor, z_um: torch.Tensor,
                         p: Mapping[str, torch.Tensor] | None = None, factor: float = 1.5) -> float:
        """Largest difference (fraction of the largest plane's peak) between these planes and a
        rule with ``factor`` times the nodes: the quadrature's own error, for checks."""
        fine = InstrumentPSF(self.instrument, self.pixel_um, self.n_px, self.n_modes,
                             int(self.pupil_samples * factor) + 1, dtype=self.dtype, pad_px=self.pad_px,
                             beam=self.beam, vortex_charge=self.vortex_charge, tophat_radius=self.tophat_radius)
        p = p or {}
        with torch.no_grad():
            a = self.planes(p, z_um, coefficients)
            b = fine.planes(p, z_um, coefficients)
        return float((a - b).abs().max() / b.abs().max())


def confocal_detection(illumination: np.ndarray, detection: np.ndarray, pixel_um: Sequence[float],
                       pinhole_au: float, wavelength_um: float, numerical_aperture: float) -> np.ndarray:
    """Confocal (scanned) signal of a point object: the illumination PSF times the detection PSF
    convolved with the pinhole (a disc of ``pinhole_au`` Airy units, 1 AU = 1.22 lambda / NA, in
    the sample's frame), on the same section grid (rows, columns) with pixel sizes ``pixel_um``.
    The convolution is lateral only (the pinhole is in an image plane), so for an xz or yz
    section only the column axis is convolved: a point detector sees, at each scan position,
    the detection PSF integrated over the pinhole there."""
    from scipy import signal

    ill = np.asarray(illumination, dtype=float)
    det = np.asarray(detection, dtype=float)
    if ill.shape != det.shape:
        raise ValueError(f"confocal_detection: illumination {ill.shape} and detection {det.shape} differ")
    radius = 0.5 * pinhole_au * 1.22 * wavelength_um / numerical_aperture
    prow, pcol = (float(p) for p in pixel_um)
    nc = int(math.ceil(radius / pcol))
    xs = np.arange(-nc, nc + 1) * pcol
    if ill.ndim == 2 and prow == pcol:
        xx, yy = np.meshgrid(xs, xs)
        disc = (xx**2 + yy**2 <= radius**2).astype(float)
    else:  # one lateral axis (an axial section): the chord length of the disc at each x
        disc = np.sqrt(np.clip(radius**2 - xs**2, 0, None))[None, :]
    disc /= disc.sum()
    blurred = signal.fftconvolve(det, disc, mode="same")
    return ill * blurred
