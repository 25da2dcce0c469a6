"""Network input: section preparation (shared by training and the predictor), camera noise at
load time and the HDF5 data set.

``prepare_sections`` is THE one function turning ortho-sections in photons (background included)
into the network's input, in training and on real data alike: bin by ``binning`` (sum over
``binning x binning`` blocks), subtract a robust background per section (the median of the
section's border frame), divide by the triplet's maximum (so the input is independent of the
photon count). The per-channel mean/std normalisation that follows is the model's
(``models.networks.Normaliser``), computed on the training split and stored in the checkpoint.

Noise at load: :class:`simulation.noise.NoiseTransform` (re-exported here), drawn on the binned
pixels. The data set's format is owned by :mod:`simulation.dataset`; this module reads through
its ``read_split`` and ``iter_split_images``.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoalign.simulation.dataset import (  # noqa: F401 (DatasetError re-exported)
    DatasetError, SPLITS, dataset_info, iter_split_images, read_split,
)
from autoalign.simulation.noise import READ_NOISE_SCALE, NoiseTransform, add_noise_numpy  # noqa: F401 (re-exported)

BORDER_PX = 2  # width (binned pixels) of the border frame whose median is the background


def bin_sections(x: torch.Tensor, binning: int) -> torch.Tensor:
    """Sum over ``binning x binning`` blocks of the last two axes (which must divide)."""
    if binning == 1:
        return x
    *lead, h, w = x.shape
    if h % binning or w % binning:
        raise ValueError(f"sections of {h}x{w} px cannot be binned by {binning}")
    return x.reshape(*lead, h // binning, binning, w // binning, binning).sum(dim=(-3, -1))


def _border_median(x: torch.Tensor, width: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    width = max(1, min(width, h // 4, w // 4))
    frame = torch.cat([
        x[..., :width, :].flatten(-2), x[..., -width:, :].flatten(-2),
        x[..., width:-width, :width].flatten(-2), x[..., width:-width, -width:].flatten(-2),
    ], dim=-1)
    return frame.median(dim=-1).values


def prepare_sections(sections_photons: Any, binning: int) -> Any:
    """Ortho-sections (..., 3, n, n) in photons -> network input (..., 3, n/b, n/b) float32.

    Bin, subtract each section's background (median of its border frame), divide by the
    triplet's maximum. Scale-invariant: ``prepare(k x) == prepare(x)`` for k > 0. Accepts numpy
    (returns numpy) or torch (returns torch, on the same device)."""
    is_numpy = not isinstance(sections_photons, torch.Tensor)
    x = torch.as_tensor(np.asarray(sections_photons) if is_numpy else sections_photons)
    x = x.to(torch.float32)
    if x.ndim < 3 or x.shape[-3] != 3:
        raise ValueError(f"expected ortho-sections of shape (..., 3, n, n), got {tuple(x.shape)}")
    if not torch.all(torch.isfinite(x)):
        raise ValueError("ortho-sections contain NaN or infinity")
    x = bin_sections(x, binning)
    x = x - _border_median(x, BORDER_PX)[..., None, None]
    scale = x.flatten(-3).max(dim=-1).values.clamp_min(1e-6)
    x = x / scale[..., None, None, None]
    return x.numpy() if is_numpy else x


class PSFDataset(torch.utils.data.Dataset):
    """One split of an ``autoalign simulate`` file, held in memory already binned.

    ``PSFDataset(path, split, transform=None, binning=2)``. ``transform`` is a
    :class:`NoiseTransform` (with the same ``binning``) or None (noise-free). Items are
    ``(prepare_sections(noisy) (3, m, m), labels (J,))``; :meth:`batches` yields whole prepared
    batches with vectorised noise (what training uses). ``limit`` keeps the first samples only."""

    def __init__(self, path: str | Path, split: str, transform: NoiseTransform | None = None,
                 binning: int = 2, limit: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        self.path = Path(path)
        self.info = dataset_info(path)
        self.split = split
        self.transform = transform
        self.binning = int(binning)
        self.noise_baked = self.info["noise_baked"]
        m = self.info["n_px"] // self.binning
        imgs = [bin_sections(torch.from_numpy(block), self.binning)
                for block in iter_split_images(path, split, limit)]
        self.images = torch.cat(imgs) if imgs else torch.zeros(0, 3, m, m)
        arrays = read_split(path, split, ("labels", "peak_photons", "background_photons", "bead_diameter_um",
                                          "centring_rad", "instrument", "higher_order_rad"), limit)
        self.labels = torch.from_numpy(arrays.pop("labels"))
        self.peak = torch.from_numpy(arrays.pop("peak_photons"))
        self.background = torch.from_numpy(arrays.pop("background_photons"))
        self.meta = arrays  # bead_diameter_um, centring_rad, instrument, higher_order_rad (when stored)
        if not (torch.all(torch.isfinite(self.images)) and torch.all(torch.isfinite(self.labels))):
            raise DatasetError(f"{self.path}: split '{split}' contains NaN or infinity")

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> "PSFDataset":
        """Move the images, labels, photon counts and backgrounds to ``device`` (in place; the
        batches and their noise are then drawn there, with a generator on that device)."""
        self.images = self.images.to(device)
        self.labels = self.labels.to(device)
        self.peak = self.peak.to(device)
        self.background = self.background.to(device)
        return self

    @property
    def modes(self) -> list[int]:
        return self.info["modes"]

    @property
    def has_offset(self) -> bool:
        return self.info["has_offset"]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def _inputs(self, idx: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = self.images[idx]
        if self.noise_baked:
            photons = x
        elif self.transform is not None:
            photons = self.transform(x, self.peak[idx], self.background[idx], generator)
        else:  # noise-free, in photons
            b2 = self.binning**2
            photons = x * self.peak[idx, None, None, None] + b2 * self.background[idx, None, None, None]
        return prepare_sections(photons, 1)  # already binned

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([int(i)])
        return self._inputs(idx, None)[0], self.labels[int(i)]

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                indices: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Prepared (inputs, labels) batches; fresh noise each call (drawn from ``generator``).
        ``indices``: the samples, in this order (e.g. a rank's share from a DistributedSampler)."""
        if indices is not None:
            order = torch.as_tensor(indices, dtype=torch.long, device=self.device)
        else:
            n = len(self)
            order = (torch.randperm(n, generator=generator, device=self.device) if shuffle
                     else torch.arange(n, device=self.device))
        n = len(order)
        for a in range(0, n, batch_size):
            idx = order[a: a + batch_size]
            yield self._inputs(idx, generator), self.labels[idx]


def compute_normalisation(dataset: PSFDataset, samples: int = 4096, seed: int = 0) -> dict[str, list[float]]:
    """Per-channel (section) mean and std of prepared noisy inputs over (up to) ``samples`` of
    ``dataset`` (the training split)."""
    g = torch.Generator().manual_seed(seed)
    n = min(samples, len(dataset))
    idx = torch.randperm(len(dataset), generator=g)[:n]
    x = dataset._inputs(idx, g)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
