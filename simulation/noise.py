"""Camera model: photons to ADU (Poisson shot noise, Gaussian read noise, gain, offset, bit
depth and saturation) and the finite size of the gold bead.

Intensities from :class:`simulation.PSFSimulator` are normalised to the unaberrated beam's peak;
``peak_photons`` scales them to photons per pixel per frame at that peak. Pure functions of
numpy arrays, and the camera noise that data sets add when they are loaded (torch tensors).

Noise at load (:class:`NoiseTransform`). Poisson statistics commute with binning (a sum of
Poisson counts is Poisson with the summed mean) and Gaussian read noise adds in quadrature, so
the loader bins the noise-free intensities once and draws the noise on the binned pixels: mean
photons ``I_b peak + b^2 bg``, electrons ``Poisson(QE photons) + N(0, b sigma_read)``, back to
photons ``/ QE`` -- the same distribution as noise on the full-resolution pixels followed by
binning (ADU rounding aside), at a quarter of the cost. The read noise is drawn per sample in
``READ_NOISE_SCALE`` times the camera's. Photons per sample and background come from the data
file (drawn at generation).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from autoalign.settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    import torch

# per-sample factor on the camera's read noise when data sets add noise at load
READ_NOISE_SCALE = (0.5, 2.0)


@dataclass(frozen=True)
class CameraModel:
    """Noise and digitisation of the camera (electrons, ADU)."""

    peak_photons: float = 2000.0
    background_photons: float = 5.0
    quantum_efficiency: float = 0.8
    read_noise_electrons: float = 1.5
    gain_adu_per_electron: float = 1.0
    offset_adu: float = 100.0
    bit_depth: int = 16

    @classmethod
    def from_settings(cls, settings: "Settings") -> "CameraModel":
        c = settings.camera
        return cls(
            peak_photons=c.peak_photons,
            background_photons=c.background_photons,
            quantum_efficiency=c.quantum_efficiency,
            read_noise_electrons=c.read_noise_electrons,
            gain_adu_per_electron=c.gain_adu_per_electron,
            offset_adu=c.offset_adu,
            bit_depth=c.bit_depth,
        )

    @property
    def saturation_adu(self) -> float:
        return float(2**self.bit_depth - 1)

    def expected_electrons(self, intensity: np.ndarray) -> np.ndarray:
        """Mean photo-electrons per pixel for a normalised intensity (no noise)."""
        photons = np.asarray(intensity, dtype=float) * self.peak_photons + self.background_photons
        return photons * self.quantum_efficiency

    def expose(self, intensity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One noisy exposure in ADU (float, integer-valued, clipped to [0, saturation])."""
        mean = np.clip(self.expected_electrons(intensity), 0, None)
        electrons = rng.poisson(mean).astype(float)
        electrons += rng.normal(0.0, self.read_noise_electrons, size=electrons.shape)
        adu = np.round(electrons * self.gain_adu_per_electron + self.offset_adu)
        return np.clip(adu, 0, self.saturation_adu)

    def to_photons(self, adu: np.ndarray) -> np.ndarray:
        """Invert gain, offset and quantum efficiency: ADU to detected photons (noisy)."""
        return (np.asarray(adu, dtype=float) - self.offset_adu) / (
            self.gain_adu_per_electron * self.quantum_efficiency
        )


def bead_kernel(diameter_um: float, pixel_size_um: float) -> np.ndarray | None:
    """2-D kernel of a sphere's projected thickness (chord length), normalised to sum 1, or
    ``None`` for a bead smaller than a tenth of a pixel. Pixels are sampled 5x5 to catch beads
    smaller than a pixel."""
    radius_px = 0.5 * diameter_um / pixel_size_um
    if radius_px < 0.05:
        return None
    half = int(np.ceil(radius_px + 0.5))
    sub = (np.arange(5) + 0.5) / 5 - 0.5
    grid = np.arange(-half, half + 1)
    yy = (grid[:, None, None, None] + sub[None, None, :, None]) / radius_px
    xx = (grid[None, :, None, None] + sub[None, None, None, :]) / radius_px
    chord = np.sqrt(np.clip(1 - xx**2 - yy**2, 0, None)).mean(axis=(2, 3))
    return chord / chord.sum()


def blur_by_bead(image: np.ndarray, diameter_um: float, pixel_size_um: float) -> np.ndarray:
    """Convolve the last two axes of ``image`` with the bead's projected profile.

    The signal of a gold bead scanned through the beam is the beam intensity integrated over the
    bead; for a section this is approximated by the 2-D projection of the sphere (the PSF is
    taken as constant over the bead's extent along the third axis)."""
    kernel = bead_kernel(diameter_um, pixel_size_um)
    if kernel is None:
        return np.asarray(image, dtype=float)
    image = np.asarray(image, dtype=float)
    k = kernel.reshape((1,) * (image.ndim - 2) + kernel.shape)
    return ndimage.convolve(image, k, mode="nearest")


# ------------------------------------------------------------------ noise added to data sets
class NoiseTransform:
    """Camera noise on (binned) noise-free intensities, in photons (see the module docstring).

    ``__call__(intensity (B, 3, m, m), peak (B,), background (B,), generator)`` -> photons."""

    def __init__(self, quantum_efficiency: float, read_noise_electrons: float, binning: int = 1,
                 read_noise_scale: tuple[float, float] = READ_NOISE_SCALE) -> None:
        self.qe = float(quantum_efficiency)
        self.read = float(read_noise_electrons)
        self.binning = int(binning)
        self.read_noise_scale = read_noise_scale

    @classmethod
    def from_settings(cls, settings: Any, binning: int) -> "NoiseTransform":
        return cls(settings.camera.quantum_efficiency, settings.camera.read_noise_electrons, binning)

    def __call__(self, intensity: "torch.Tensor", peak: "torch.Tensor", background: "torch.Tensor",
                 generator: "torch.Generator | None" = None) -> "torch.Tensor":
        import torch

        b2 = self.binning**2
        shape = (-1,) + (1,) * (intensity.ndim - 1)
        mean = intensity.clamp_min(0) * peak.reshape(shape) + b2 * background.reshape(shape)
        electrons = torch.poisson(mean * self.qe, generator=generator)
        lo, hi = self.read_noise_scale
        scale = lo + (hi - lo) * torch.rand(peak.shape, generator=generator, device=intensity.device)
        sigma = (self.read * self.binning * scale).reshape(shape)
        electrons = electrons + sigma * torch.randn(intensity.shape, generator=generator,
                                                    device=intensity.device)
        return electrons / self.qe


def add_noise_numpy(intensity: np.ndarray, peak: np.ndarray, background: np.ndarray,
                    quantum_efficiency: float, read_noise_electrons: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Noise on full-resolution intensities (N, 3, n, n) -> photons (numpy; baked data sets)."""
    shape = (-1, 1, 1, 1)
    mean = np.clip(intensity, 0, None) * np.reshape(peak, shape) + np.reshape(background, shape)
    electrons = rng.poisson(mean * quantum_efficiency).astype(float)
    electrons += rng.normal(0.0, read_noise_electrons, size=electrons.shape)
    return electrons / quantum_efficiency
