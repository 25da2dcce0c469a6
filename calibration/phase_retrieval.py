"""Phase retrieval of the detection pupil from a bead z-stack (Gerchberg-Saxton over defocus).

An independent check of the model fit (:mod:`calibration.refine`): instead of a gradient fit of
the vectorial forward model, the complex pupil is retrieved by the multi-plane Gerchberg-Saxton
iteration of Hanser et al. (J. Microsc. 216, 32-48, 2004, "Phase-retrieved pupil functions in
wide-field fluorescence microscopy"), FFT-based, and its phase is then decomposed into Noll
Zernikes. :func:`retrieve_pupil` is the entry point.

Method
------
* **Data.** A constant background is subtracted (default: the mean of the stack's border pixels
  within 5 sigma of their median, a plain median being quantised on integer counts; once the
  bead is found, only the border pixels beyond each plane's cone of marginal rays plus the
  margin, since a defocused PSF overflowing a small window lifts the border: +40 % on a 64 px
  crop at +-3 µm, +10 % left from the in-focus planes' tails). The planes whose light inside
  that cone stands ``signal_snr`` above the noise are used (or those in ``z_range_um``). The
  bead is located (brightest
  pixel of the 3x3-smoothed stack, refined by the centroid of the planes around it) unless
  ``centre`` is given; a window around it is cropped and shifted in Fourier space by the
  sub-pixel remainder, so that the bead sits at the grid centre ``n // 2`` (the simulator's
  frame) and the retrieved tip/tilt is small (the averaged iteration converges slowly on a
  tilt). The focus positions are re-referenced to the brightest plane (parabolic interpolation),
  so the retrieved defocus is small.
* **Grid.** The window is embedded in a larger FFT grid (``pad_to``; by default room for the
  defocus blur of the farthest plane): outside the window the field is free, so a defocused PSF
  that overflows the window neither wraps round nor is forced to zero. Inside the window, pixels
  beyond the cone of the marginal rays plus ``psf_margin_um`` (default 5 lambda / NA) hold only
  background noise: by default (``outside_psf="dark"``) their intensity is set to 0, since
  ``sqrt(max(noise, 0))`` would feed the rectified noise (in the real stack's 120 px window about
  40 % as much as the bead's light) into the pupil and the iteration would drift with it (0.02-0.04
  rad RMS between 30 and 90 iterations, against 0.002 dark); ``"data"`` keeps them, ``"free"``
  leaves them unconstrained (best on simulated data, 0.003 rad, but it drifts on the real stack).
* **Propagation.** Angular spectrum with the exact defocus kernel
  ``kz = 2 pi sqrt((n / lambda)^2 - |k_perp|^2)``: the field in plane ``z`` is
  ``E_z(x) = sum_k P(k) g(k) exp(i kz z) exp(-i k x)``, one FFT, in the sign convention of
  :class:`simulation.vectorial.PSFSimulator`.
* **Vectorial or scalar.** ``g`` is the vector pupil factor of :mod:`simulation.pupil`
  (Richards-Wolf: aplanatic ``1 / sqrt(cos theta)``, p/s projection): the intensity is the sum of
  ``|E|^2`` over the field components (x, y, z) and, for ``polarisation="unpolarised"`` (an
  isotropic emitter, the default), over two orthogonal input polarisations; ``"circular_plus"``
  etc. give one coherent input state, as the simulator does. The components are compressed to
  their singular vectors (exact: rank 5 unpolarised, 3 for one state). ``vectorial=False`` is the
  scalar retrieval (``g = 1``). The retrieved ``P`` is the scalar factor common to all
  components: its phase is the aberration, its amplitude the apodisation RELATIVE to the
  aplanatic pupil (uniform for an ideal aplanatic objective; retrieved, never assumed).
* **Iteration** (the averaged, "parallel" form of Hanser et al.): in every plane the model field
  components are computed; where the data constrain them their amplitude is replaced by
  ``sqrt(max(data, 0))`` (each component scaled by ``sqrt(data / sum |E|^2)``, its phase kept);
  they are propagated back to the pupil and combined by least squares over planes and components
  (``sum conj(g h_z) B / (n_planes sum |g|^2)``, ``h_z`` the defocus); the pupil support is the disk
  ``|k_perp| <= NA / lambda``, amplitude and phase inside it free. The update is over-relaxed
  (``relaxation`` 1.5: ``P + 1.5 (P_new - P)``; tilt-like modes converge about twice as fast, the
  fixed points are those of the plain iteration). The start is the uniform pupil, flat phase.
* **Decomposition.** The retrieved phase is unwrapped (:func:`skimage.restoration.unwrap_phase`,
  then re-wrapped against the smooth fit, so a slip at a noisy pixel returns) and fitted by
  least squares weighted by the retrieved amplitude with Noll ``Z_1..Z_n_modes`` (RMS-normalised
  on the unit pupil, :mod:`simulation.zernike`). With ``defocus="exact"`` (default) the defocus
  column is the exact defocus ``kz`` instead of ``Z_4``: the bead's axial offset is removed as a
  shift of the planes, as the model fit removes it (``refine``'s ``bead_z_um``), and does not
  leak into Noll 11 and 22; the Noll 4 reported is the ``Z_4`` part of that fitted defocus. (So a
  pure ``Z_4`` aberration reads as a bead shift plus about -0.06 of it in Noll 11.)
  ``defocus="zernike"`` fits ``Z_4`` itself.
* **Uncertainty** (``uncertainty="halves"``): the retrieval is repeated, from the same start and
  with the same iterations, on the even and on the odd planes (two disjoint interleaved halves,
  the same z range and diversity); the spread per mode is ``|c_even - c_odd| / 2``, a one-sample
  estimate of the standard error of the full-data coefficient (each half has about twice its
  variance). It covers photon noise and the iteration's non-uniqueness, not the systematic errors
  both halves share (optics parameters, bead size, background, the window).

Conventions: arrays (z, y, x); lengths in micrometres; Noll from 1, radians, RMS-normalised; the
pupil maps are on the FFT grid with the zero frequency at ``[M // 2, M // 2]``, ``kx`` (pupil
``u``) along the last axis, ``ky`` along the first; positive tip (Noll 2) moves the focus to +x,
tilt (Noll 3) to +y, defocus (Noll 4) towards +z, as in :class:`simulation.vectorial.PSFSimulator`
(checked against it, mode by mode, in ``tests/test_phase_retrieval.py``). For a real stack, x and
y are the array's axes and z the direction of increasing ``z_um``, whatever the camera's flips.
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
import numpy as np
import scipy.fft as sfft
from scipy import ndimage
from skimage.restoration import unwrap_phase

from autoalign.simulation.zernike import zernike_basis

__all__ = ["PhaseRetrievalResult", "retrieve_pupil", "vector_pupil_factors", "POLARISATIONS"]

POLARISATIONS: tuple[str, ...] = ("unpolarised", "circular_plus", "circular_minus", "linear", "radial",
                                  "azimuthal")


@dataclass
class PhaseRetrievalResult:
    """What :func:`retrieve_pupil` found.

    * ``coefficients`` {Noll: rad}, Noll 1..n_modes (piston 0). Tip, tilt and defocus are
      relative to the centring applied (``centre_zyx``): they say where the bead is
      (``bead_zyx``), not how the optics are aberrated.
    * ``uncertainty`` {Noll: rad}: the per-mode spread of ``uncertainty_method`` (empty for
      ``"none"``); ``halves`` the two half-data coefficient sets it came from.
    * ``pupil_phase``: the retrieved phase, unwrapped, less the fitted piston, tip, tilt and
      defocus (the aberration map that Noll >= 5 describe, higher orders and noise included);
      ``pupil_amplitude``: the retrieved amplitude, mean 1 inside the pupil (relative to the
      aplanatic pupil when vectorial); both (M, M) on the FFT grid, zero frequency at
      ``[M // 2, M // 2]``, NaN outside the pupil; ``pupil`` the complex pupil (0 outside);
      ``pupil_radius_px`` the radius NA / lambda on that grid.
    * ``residual`` per plane used: ``sqrt(sum (I - D)^2 / sum D^2)`` over the PSF's region of the
      window, ``I`` the retrieved pupil's intensity, ``D`` the background-subtracted data;
      ``residual_floor`` what photon and background noise alone would leave there, valid when the
      stack is in detected counts (photons or electrons: variance = signal).
    * ``phase_fit_rms``: the amplitude-weighted RMS (rad) of the retrieved phase that Noll
      1..n_modes do not explain.
    """

    coefficients: dict[int, float]
    uncertainty: dict[int, float]
    pupil_phase: np.ndarray
    pupil_amplitude: np.ndarray
    pupil_radius_px: float
    residual: np.ndarray
    residual_floor: np.ndarray
    iterations: int
    z_um: np.ndarray                        # focus positions of the planes used (as given)
    plane_indices: np.ndarray               # their indices in the input stack
    bead_zyx: tuple[float, float, float]    # bead position: z in z_um's units, y and x in pixels of the input
    centre_zyx: tuple[float, float, float]  # the centring applied, same units
    background: float                       # subtracted, in the stack's units
    uncertainty_method: str
    phase_fit_rms: float
    vectorial: bool
    polarisation: str                       # "scalar" when not vectorial
    grid_px: int                            # M, the FFT grid
    window_px: int                          # the data window's side
    elapsed_s: float
    pupil: np.ndarray = field(repr=False)
    halves: tuple[dict[int, float], dict[int, float]] | None = None

    @property
    def total_residual(self) -> float:
        """Root mean square of the per-plane residuals."""
        return float(np.sqrt(np.mean(self.residual ** 2)))

    @property
    def total_residual_floor(self) -> float:
        """Root mean square of the per-plane noise floors."""
        return float(np.sqrt(np.mean(self.residual_floor ** 2)))

    def rms(self, modes: Sequence[int] = tuple(range(5, 23))) -> float:
        """Root sum of squares of the coefficients of ``modes`` (default Noll 5..22), rad."""
        return float(math.sqrt(sum(self.coefficients[j] ** 2 for j in modes if j in self.coefficients)))


# ============================================================================ pupil geometry
def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b >= n (fast FFT sizes), even."""
    best = 1 << max(1, int(math.ceil(math.log2(max(n, 2)))))
    p3 = 1
    while p3 < best:
        p2 = p3
        while p2 < n:
            p2 *= 2
        if p2 % 2 == 0:
            best = min(best, p2)
        p3 *= 3
    return best


def vector_pupil_factors(u: np.ndarray, v: np.ndarray, numerical_aperture: float, immersion_index: float,
                         polarisation: str = "unpolarised") -> np.ndarray:
    """Vector pupil factors ``g`` (K, *u.shape), complex: the focal-space field components per unit
    scalar pupil, from :func:`simulation.pupil.debye_pupil_field` (aplanatic factor included).

    ``K = 3`` (x, y, z) for one input polarisation; ``K = 6`` for ``"unpolarised"`` (x and y linear
    inputs, each scaled by ``1 / sqrt(2)``: the intensity is their incoherent sum)."""
    import torch  # the project's vector pupil is written in torch (simulation floor)

    from autoalign.simulation.pupil import debye_pupil_field, input_jones

    tu = torch.as_tensor(np.asarray(u, dtype=float))
    tv = torch.as_tensor(np.asarray(v, dtype=float))
    if polarisation == "unpolarised":
        parts = []
        for angle in (0.0, math.pi / 2):
            jones = input_jones(tu, tv, "linear", angle)
            parts.append(debye_pupil_field(tu, tv, numerical_aperture, immersion_index, jones).numpy())
        return np.concatenate(parts) / math.sqrt(2)
    if polarisation not in POLARISATIONS:
        raise ValueError(f"polarisation must be one of {POLARISATIONS}, got {polarisation!r}")
    jones = input_jones(tu, tv, polarisation)  # type: ignore[arg-type]
    return debye_pupil_field(tu, tv, numerical_aperture, immersion_index, jones).numpy()


@dataclass
class _Grid:
    m: int                 # FFT grid size
    u: np.ndarray          # pupil coordinates (pupil radii), fft order (M, M)
    v: np.ndarray
    support: np.ndarray    # bool (M, M), |k| <= NA / lambda
    kz: np.ndarray         # rad/µm on the support (0 outside)
    g: np.ndarray          # (K, M, M) complex64, 0 outside the support
    g_norm: np.ndarray     # sum_k |g_k|^2 on the support (1 outside)
    radius_px: float


def _grid(m: int, pixel_um: float, na: float, n_imm: float, lam: float, vectorial: bool,
          polarisation: str, energy: float = 1.0) -> _Grid:
    f = sfft.fftfreq(m, d=pixel_um)  # cycles/µm
    fx, fy = np.meshgrid(f, f)       # fx along the last axis (x), fy along the first (y)
    cutoff = na / lam
    u, v = fx / cutoff, fy / cutoff
    support = u * u + v * v <= 1.0
    kz = np.where(support, 2 * np.pi * np.sqrt(np.maximum((n_imm / lam) ** 2 - fx * fx - fy * fy, 0.0)), 0.0)
    if vectorial:
        g_full = vector_pupil_factors(u[support], v[support], na, n_imm, polarisation)  # (K, N)
        # the intensity sum_k |FFT(P g_k)|^2 and the update only depend on G^H G: the components'
        # singular vectors (s_j V_j) give the same model with the fewest FFTs (rank 5 for
        # "unpolarised", 3 for one polarisation); ``energy`` < 1 keeps only the leading ones
        _, sv, vh = np.linalg.svd(g_full, full_matrices=False)
        share = np.cumsum(sv ** 2) / np.sum(sv ** 2)
        rank = int(np.searchsorted(share, min(energy, 1.0 - 1e-9))) + 1
        g = np.zeros((rank, m, m), dtype=complex)
        g[:, support] = sv[:rank, None] * vh[:rank]
    else:
        g = support[None].astype(complex)
    g_norm = np.where(support, np.sum(np.abs(g) ** 2, axis=0), 1.0)
    return _Grid(m, u, v, support, kz, g.astype(np.complex64), g_norm, cutoff * m * pixel_um)


# ============================================================================ the iteration
def _model_fields(pupil: np.ndarray, prop: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Field components (nz, K, M, M) of the pupil in every plane."""
    return sfft.fft2((pupil[None] * prop)[:, None] * g[None], axes=(-2, -1), workers=1)


def _intensity(fields: np.ndarray) -> np.ndarray:
    """sum_k |E_k|^2 over axis 1 of complex64 fields, without temporaries."""
    f = np.ascontiguousarray(fields)
    real_dtype = np.float32 if f.dtype == np.complex64 else np.float64
    pairs: np.ndarray = f.view(real_dtype).reshape(f.shape + (2,))
    out: np.ndarray = np.einsum("zkyxc,zkyxc->zyx", pairs, pairs)
    return out


def _gerchberg_saxton(amp: np.ndarray, known: np.ndarray, z: np.ndarray, grid: _Grid, iterations: int,
                      start: np.ndarray, relaxation: float = 1.0) -> np.ndarray:
    """The averaged multi-plane Gerchberg-Saxton iteration; ``amp`` (nz, M, M) target amplitudes
    (fft order), imposed where ``known`` (nz, M, M) and free elsewhere; ``z`` focus positions (µm,
    bead at 0); ``relaxation`` the over-relaxation of the pupil update (1: plain averaging)."""
    prop = np.exp(1j * grid.kz[None] * z[:, None, None]).astype(np.complex64) * grid.support
    kernel = prop[:, None] * grid.g[None]          # (nz, K, M, M): pupil -> plane components
    kernel_conj = np.conj(kernel)
    inv = (1.0 / (len(z) * grid.g_norm)).astype(np.float32) * grid.support
    amp32 = amp.astype(np.float32)
    tiny = np.float32(1e-12 * max(float(np.max(amp32)) ** 2, 1e-30))
    one = np.float32(1.0)
    buf = np.empty_like(kernel)
    pupil = start.astype(np.complex64)
    for _ in range(iterations):
        np.multiply(kernel, pupil, out=buf)
        e = sfft.fft2(buf, axes=(-2, -1), workers=1, overwrite_x=True)
        scale = np.where(known, amp32 / np.sqrt(_intensity(e) + tiny), one).astype(np.float32)
        e *= scale[:, None]
        back = sfft.ifft2(e, axes=(-2, -1), workers=1, overwrite_x=True)
        back *= kernel_conj
        new = (back.sum(axis=(0, 1)) * inv).astype(np.complex64)
        pupil = new if relaxation == 1.0 else (pupil + np.float32(relaxation) * (new - pupil)).astype(np.complex64)
    return pupil


def _start_pupil(grid: _Grid, amp: np.ndarray) -> np.ndarray:
    """Uniform aplanatic pupil, flat phase, scaled to the data's mean photons per plane."""
    flux = float(np.mean(np.sum(amp ** 2, axis=(-2, -1))))
    model = float(np.sum(grid.g_norm * grid.support)) * grid.m ** 2  # Parseval: unnormalised fft2
    return (np.sqrt(max(flux, 1e-30) / model) * grid.support).astype(np.complex64)


def _residuals(pupil: np.ndarray, data: np.ndarray, known: np.ndarray, z: np.ndarray, grid: _Grid,
               noise_var: float) -> tuple[np.ndarray, np.ndarray]:
    """Relative misfit per plane over ``known`` (the PSF's region), and its noise floor: the misfit a
    perfect model would leave if the data were Poisson counts (variance = signal) on a background
    of variance ``noise_var``."""
    prop = np.exp(1j * grid.kz[None] * z[:, None, None]).astype(np.complex64) * grid.support
    inten = _intensity(_model_fields(pupil, prop, grid.g))
    d = data * known
    norm = np.maximum(np.sum(d ** 2, axis=(-2, -1)), 1e-30)
    misfit = np.sqrt(np.sum((inten * known - d) ** 2, axis=(-2, -1)) / norm)
    floor = np.sqrt(np.sum((np.maximum(inten, 0.0) + noise_var) * known, axis=(-2, -1)) / norm)
    return misfit, floor


# ============================================================================ decomposition
def _decompose(pupil: np.ndarray, grid: _Grid, n_modes: int, defocus: str) -> tuple[
        np.ndarray, np.ndarray, float, float]:
    """Zernike decomposition of the retrieved pupil's phase (amplitude-weighted least squares).

    Returns the aberration map (fft order, NaN outside: the unwrapped phase less the fitted
    piston, tip, tilt and defocus), Noll 1..n_modes coefficients (piston 0; Noll 4 the ``Z_4`` part
    of the fitted defocus), the axial shift ``a`` (µm) of the planes that the fitted defocus
    amounts to (the bead sits at ``z_ref - a``) and the weighted RMS of the phase the fit leaves."""
    sup = grid.support
    rho = np.hypot(grid.u, grid.v)[sup]
    theta = np.arctan2(grid.v, grid.u)[sup]
    amp = np.abs(pupil)[sup]
    weights = amp / max(float(np.max(amp)), 1e-30)
    sw = np.sqrt(weights)
    basis = zernike_basis(n_modes, rho, theta)  # (J, N)
    kz_col = grid.kz[sup] - np.average(grid.kz[sup], weights=weights)
    columns = basis.copy()
    if defocus == "exact":
        columns[3] = kz_col
    elif defocus != "zernike":
        raise ValueError(f"defocus must be 'exact' or 'zernike', got {defocus!r}")

    def fit(values: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.linalg.lstsq((cols * sw).T, values * sw, rcond=None)[0]

    # unwrap (reliability-sorted, skimage), then refine: the smooth fit plus the re-wrapped
    # residual, so a 2 pi slip at a noisy pixel returns to the fit
    wrapped = np.angle(pupil)[sup]
    img = np.zeros(sup.shape)
    img[sup] = wrapped
    un = unwrap_phase(np.ma.masked_array(np.fft.fftshift(img), mask=~np.fft.fftshift(sup)))
    phase = np.fft.ifftshift(np.ma.filled(un, 0.0))[sup]
    for _ in range(3):
        sol = fit(phase, columns)
        smooth = sol @ columns
        phase = smooth + np.angle(np.exp(1j * (wrapped - smooth)))
    sol = fit(phase, columns)
    left = phase - sol @ columns
    fit_rms = float(np.sqrt(np.sum(weights * left ** 2) / np.sum(weights)))
    # Z_4 part of the exact defocus kz (a negative number: kz falls towards the pupil edge)
    z4_per_um = float(fit(kz_col, basis[[0, 3]])[1])
    coefficients = sol.copy()
    if defocus == "exact":
        shift = float(sol[3])
        coefficients[3] = shift * z4_per_um
    else:
        shift = float(sol[3]) / z4_per_um
    coefficients[0] = 0.0
    aberration = np.full(sup.shape, np.nan)
    aberration[sup] = phase - sol[:4] @ columns[:4]
    return aberration, coefficients, shift, fit_rms


# ============================================================================ data preparation
def _border_pixels(stack: np.ndarray, width: int) -> np.ndarray:
    return np.concatenate([stack[:, :width].ravel(), stack[:, -width:].ravel(),
                           stack[:, width:-width, :width].ravel(), stack[:, width:-width, -width:].ravel()])


def _background(border: np.ndarray) -> tuple[float, float]:
    """Background level and noise of the border pixels: their mean within 5 sigma of their median
    (sigma from the median absolute deviation). A plain median is quantised on integer counts (3.0
    for a Poisson background of 2.4 photons), the clipped mean is not, and the clip drops the
    bright outliers (PSF tails, hot pixels) the median was there to ignore."""
    med = float(np.median(border))
    mad = float(np.median(np.abs(border - med))) * 1.4826
    sigma = mad if mad > 0 else float(np.std(border))
    sel = border[np.abs(border - med) <= 5 * sigma]
    mean = float(np.mean(sel)) if sel.size else med
    return mean, float(np.std(sel)) if sel.size > 1 else sigma


def _subpixel_shift(planes: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """Shift every plane by (dy, dx) pixels (Fourier shift; the content moves by +d)."""
    ny, nx = planes.shape[-2:]
    ky = sfft.fftfreq(ny)[:, None]
    kx = sfft.fftfreq(nx)[None, :]
    ramp = np.exp(-2j * np.pi * (ky * dy + kx * dx))
    return np.real(sfft.ifft2(sfft.fft2(planes, axes=(-2, -1), workers=1) * ramp, axes=(-2, -1), workers=1))


def _locate(data: np.ndarray, pixel_um: float, na: float, lam: float) -> tuple[float, float]:
    """Sub-pixel lateral bead position (y, x) of background-subtracted data: the brightest pixel
    of the 3x3-smoothed stack, refined by the centroid of the five planes around it within
    1.5 lambda / NA."""
    smooth = ndimage.uniform_filter(data, size=(1, 3, 3), mode="constant")
    iz, iy, ix = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    planes = slice(max(iz - 2, 0), iz + 3)
    img = data[planes].sum(axis=0)
    r = max(3.0, 1.5 * lam / na / pixel_um)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    cy, cx = float(iy), float(ix)
    for _ in range(3):
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        wts = np.where(disk, np.maximum(img, 0.0), 0.0)
        total = wts.sum()
        if total <= 0:
            break
        cy, cx = float((wts * yy).sum() / total), float((wts * xx).sum() / total)
    return cy, cx


def _peak_z(data: np.ndarray, z: np.ndarray) -> float:
    """Focus position of the brightest plane (3x3-smoothed peak), parabolic interpolation."""
    peak = ndimage.uniform_filter(data, size=(1, 3, 3), mode="constant").max(axis=(1, 2))
    i = int(np.argmax(peak))
    if 0 < i < len(z) - 1:
        a, b, c = peak[i - 1], peak[i], peak[i + 1]
        den = a - 2 * b + c
        frac = 0.5 * (a - c) / den if den < 0 else 0.0
        step = 0.5 * (z[i + 1] - z[i - 1])
        return float(z[i] + np.clip(frac, -1, 1) * step)
    return float(z[i])


# ============================================================================ public API
def retrieve_pupil(
    stack: np.ndarray,
    z_um: Sequence[float] | np.ndarray,
    pixel_um: float,
    numerical_aperture: float,
    immersion_index: float,
    wavelength_um: float,
    *,
    background: float | None = None,
    iterations: int = 40,
    n_modes: int = 37,
    pad_to: int | None = None,
    centre: Sequence[float] | None = None,
    window_px: int | None = None,
    z_range_um: tuple[float, float] | None = None,
    signal_snr: float = 5.0,
    vectorial: bool = True,
    polarisation: str = "unpolarised",
    defocus: str = "exact",
    uncertainty: str = "halves",
    relaxation: float = 1.5,
    outside_psf: str = "dark",
    psf_margin_um: float | None = None,
) -> PhaseRetrievalResult:
    """Retrieve the complex pupil from a bead z-stack and decompose its phase into Zernikes.

    Parameters
    ----------
    stack : (nz, ny, nx) intensities, any linear unit (photons or electrons for a meaningful
        ``residual_floor``), camera offset removed or left to ``background``; plane ``k`` is
        recorded with the focus at ``z_um[k]``
    z_um : focus position of each plane (µm)
    pixel_um, numerical_aperture, immersion_index, wavelength_um : the detection optics (the
        pixel must sample the intensity: ``pixel_um <= lambda / (4 NA)``)
    background : subtracted from every pixel (default: from the border, see the module's docstring)
    iterations : Gerchberg-Saxton iterations (the same again for the halves)
    n_modes : Noll 1..n_modes decomposed (>= 4)
    pad_to : FFT grid size M (default: the window, or more for the defocus blur of the farthest
        plane, rounded up to a fast FFT size)
    centre : the centring: (y, x) pixels of ``stack``, or (z, y, x) with z in ``z_um``'s units
        (default: located in the data, z the brightest plane). Tip, tilt and defocus are relative
        to it: ``centre=(0.0, n // 2, n // 2)`` on a simulated stack reads them in the
        simulator's frame
    window_px : side of the window around the bead (default: the largest that fits)
    z_range_um : use only the planes with ``z_range_um[0] <= z - z_c <= z_range_um[1]`` (``z_c``
        the axial centre); default: every plane whose light within the marginal rays' cone plus
        the margin exceeds ``signal_snr`` times the background noise of that sum
    vectorial, polarisation : vector pupil factors (``"unpolarised"`` or one of the simulator's
        input polarisations) or the scalar retrieval
    defocus : ``"exact"`` (the bead's axial offset removed as a plane shift) or ``"zernike"``
    uncertainty : ``"halves"`` (even/odd planes, see the module's docstring) or ``"none"``
    relaxation : over-relaxation of the pupil update (1: Hanser's plain averaging)
    outside_psf, psf_margin_um : the window's pixels beyond the marginal rays' cone plus the
        margin (default 5 lambda / NA): ``"dark"`` (intensity 0), ``"data"`` or ``"free"``
    """
    t0 = time.perf_counter()
    data = np.asarray(stack, dtype=float)
    if data.ndim != 3:
        raise ValueError(f"stack must be (nz, ny, nx), got shape {data.shape}")
    z_all = np.asarray(z_um, dtype=float).ravel()
    if len(z_all) != data.shape[0]:
        raise ValueError(f"{len(z_all)} focus positions for {data.shape[0]} planes")
    if not (np.all(np.isfinite(data)) and np.all(np.isfinite(z_all))):
        raise ValueError("stack or z_um contains NaN or infinity")
    if not (0 < numerical_aperture < immersion_index) or wavelength_um <= 0 or pixel_um <= 0:
        raise ValueError("expected 0 < NA < immersion index, wavelength > 0 and pixel > 0")
    if pixel_um > wavelength_um / (4 * numerical_aperture) * 1.0001:
        raise ValueError(f"pixel {pixel_um} µm undersamples the intensity (Nyquist lambda / 4 NA = "
                         f"{wavelength_um / (4 * numerical_aperture):.4f} µm)")
    if uncertainty not in ("halves", "none"):
        raise ValueError(f"uncertainty must be 'halves' or 'none', got {uncertainty!r}")
    if defocus not in ("exact", "zernike"):
        raise ValueError(f"defocus must be 'exact' or 'zernike', got {defocus!r}")
    if outside_psf not in ("dark", "data", "free"):
        raise ValueError(f"outside_psf must be 'dark', 'data' or 'free', got {outside_psf!r}")
    if vectorial and polarisation not in POLARISATIONS:
        raise ValueError(f"polarisation must be one of {POLARISATIONS}, got {polarisation!r}")
    if n_modes < 4 or iterations < 1:
        raise ValueError("n_modes >= 4 and iterations >= 1 are required")
    nz, ny, nx = data.shape
    margin_um = 5 * wavelength_um / numerical_aperture if psf_margin_um is None else float(psf_margin_um)

    # background (first guess: the whole border), the bead, the planes
    width = max(2, min(ny, nx) // 16)
    raw = data
    bg0, noise = _background(_border_pixels(raw, width))
    data = raw - (bg0 if background is None else float(background))
    cy, cx = _locate(data, pixel_um, numerical_aperture, wavelength_um)
    z_ref = _peak_z(data, z_all)
    if centre is not None:
        if len(centre) not in (2, 3):
            raise ValueError(f"centre must be (y, x) or (z, y, x), got {centre!r}")
        cy, cx = float(centre[-2]), float(centre[-1])
        if len(centre) == 3:
            z_ref = float(centre[0])
    sin_t = numerical_aperture / immersion_index
    tan_t = sin_t / math.sqrt(1 - sin_t ** 2)
    yy, xx = np.mgrid[:ny, :nx]
    r2 = (yy - cy) ** 2 + (xx - cx) ** 2
    cone_px = (np.abs(z_all - z_ref) * tan_t + margin_um) / pixel_um  # the PSF's reach per plane
    if background is None:
        # the border pixels beyond each plane's cone: a defocused PSF that overflows a small
        # window lifts the whole border's mean (by 40 % on a 64 px crop at +-3 µm)
        edge = np.ones((ny, nx), dtype=bool)
        edge[width:-width, width:-width] = False
        beyond = edge[None] & (r2[None] > cone_px[:, None, None] ** 2)
        bg = bg0
        if beyond.sum() >= 100:
            bg, noise = _background(raw[beyond])
        data = raw - bg
    else:
        bg = float(background)
    if z_range_um is not None:
        keep = (z_all - z_ref >= z_range_um[0]) & (z_all - z_ref <= z_range_um[1])
    else:  # the light within the marginal rays' cone (plus the margin) above the background noise
        disks = r2[None] <= cone_px[:, None, None] ** 2
        flux = np.sum(data * disks, axis=(1, 2))
        keep = flux > signal_snr * noise * np.sqrt(np.maximum(disks.sum(axis=(1, 2)), 1))
    idx = np.flatnonzero(keep)
    if len(idx) < 3:
        raise ValueError(f"only {len(idx)} planes with signal (need >= 3)")

    # the window around the bead, sub-pixel centring
    iy, ix = int(round(cy)), int(round(cx))
    half = min(iy, ny - iy, ix, nx - ix)
    if window_px is not None:
        half = min(int(window_px) // 2, half)
    if half < 8:
        raise ValueError(f"the bead at (y, x) = ({cy:.1f}, {cx:.1f}) is too close to the edge")
    n = 2 * half
    win = _subpixel_shift(data[idx][:, iy - half: iy + half, ix - half: ix + half], -(cy - iy), -(cx - ix))
    z_rel = z_all[idx] - z_ref

    # the FFT grid: room for the blur of the farthest plane
    spread_px = float(np.max(np.abs(z_rel))) * tan_t / pixel_um
    m = _fft_size(max(n, int(math.ceil(2 * spread_px + 4 * wavelength_um / numerical_aperture / pixel_um))))
    if pad_to is not None:
        m = int(pad_to)
        if m < n or m % 2:
            raise ValueError(f"pad_to = {m}: expected an even size >= the window ({n} px)")
    grid = _grid(m, pixel_um, numerical_aperture, immersion_index, wavelength_um, vectorial, polarisation)

    # embed the window (its centre, index half, at grid index m // 2), constraints, fft order
    full = np.zeros((len(idx), m, m))
    o = m // 2 - half
    full[:, o: o + n, o: o + n] = win
    window = np.zeros((m, m), dtype=bool)
    window[o: o + n, o: o + n] = True
    yy, xx = np.mgrid[:m, :m] - m // 2
    radius = np.abs(z_rel) * tan_t / pixel_um + margin_um / pixel_um
    inside = (yy[None] ** 2 + xx[None] ** 2) <= radius[:, None, None] ** 2
    region = window[None] & inside                      # where the PSF can be
    if outside_psf == "free":
        known = region
    else:
        known = np.broadcast_to(window, full.shape)
        if outside_psf == "dark":
            full = np.where(inside, full, 0.0)
    full = np.fft.ifftshift(full, axes=(-2, -1))
    known = np.fft.ifftshift(known, axes=(-2, -1))
    region = np.fft.ifftshift(region, axes=(-2, -1))
    amp = np.sqrt(np.maximum(full, 0.0)) * known

    def retrieve(sel: slice) -> np.ndarray:
        return _gerchberg_saxton(amp[sel], known[sel], z_rel[sel], grid, iterations, _start_pupil(grid, amp[sel]),
                                 relaxation)

    pupil = retrieve(slice(None))
    aberration, coef, z_shift, fit_rms = _decompose(pupil, grid, n_modes, defocus)
    residual, floor = _residuals(pupil, full, region, z_rel, grid, noise ** 2)

    halves = None
    spread: dict[int, float] = {}
    if uncertainty == "halves" and len(idx) >= 6:
        even, odd = (_decompose(retrieve(sel), grid, n_modes, defocus)[1]
                     for sel in (slice(0, None, 2), slice(1, None, 2)))
        halves = ({j + 1: float(c) for j, c in enumerate(even)}, {j + 1: float(c) for j, c in enumerate(odd)})
        spread = {j + 1: float(abs(even[j] - odd[j]) / 2) for j in range(n_modes)}

    amp_map = np.abs(pupil).astype(float)
    amp_map = np.where(grid.support, amp_map / max(float(np.mean(amp_map[grid.support])), 1e-30), np.nan)
    # the bead: the centring plus the tip/tilt left (c rad of tip shift the focus by c lambda / (pi NA))
    shift_px = wavelength_um / (math.pi * numerical_aperture) / pixel_um
    return PhaseRetrievalResult(
        coefficients={j + 1: float(c) for j, c in enumerate(coef)},
        uncertainty=spread,
        pupil_phase=np.fft.fftshift(aberration),
        pupil_amplitude=np.fft.fftshift(amp_map),
        pupil_radius_px=float(grid.radius_px),
        residual=residual,
        residual_floor=floor,
        iterations=int(iterations),
        z_um=z_all[idx],
        plane_indices=idx,
        bead_zyx=(z_ref - z_shift, cy + coef[2] * shift_px, cx + coef[1] * shift_px),
        centre_zyx=(z_ref, cy, cx),
        background=bg,
        uncertainty_method="halves: even and odd planes, |c_even - c_odd| / 2" if spread else "none",
        phase_fit_rms=fit_rms,
        vectorial=bool(vectorial),
        polarisation=polarisation if vectorial else "scalar",
        grid_px=m,
        window_px=n,
        elapsed_s=time.perf_counter() - t0,
        pupil=np.fft.fftshift(pupil),
        halves=halves,
    )
