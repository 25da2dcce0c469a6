"""The CNN family, by name (:data:`NETWORKS`, :func:`build_network`).

The report's architectures (Net12, MultiNet12, Net11, MultiNet11, MultiNetCat11, OffsetNet2,
OffsetNet13, MultiOffsetNet13) are not available as code, so they are re-designed here as small
CNNs faithful to what the names say:

* ``Net*``: one section (xy) through one convolutional tower;
* ``Multi*``: the three sections (xy, xz, yz) through three towers of their own (the sections look
  different, so the weights are not shared), features concatenated before the dense head;
* ``*Cat*``: the three sections stacked as the channels of one tower;
* ``Offset*``: the output includes the vortex-mask offset (x, y); they require a model trained
  with the offset (``predict_offset``).

The digits are the report's nominal output counts (12 = Noll 4..15, 11 = Noll 5..15, 13 = 11
modes + the 2 offset coordinates, 2 = the offset alone). Here every network's output size
follows the checkpoint instead: ``len(modes)`` (+ 2 with the offset), so the digits are names
only. ``ResNet`` is a residual network in the style of Moeckl et al. (batch norm, residual
blocks, global pooling).

Input: (B, 3, m, m) prepared sections (:func:`models.data.prepare_sections`, then the
per-channel normalisation of :class:`Normaliser`). Dropout is an ``nn.Dropout`` module (off in
``eval()``), so inference is deterministic.
"""
from __future__ import annotations

import torch
from torch import nn


class Normaliser(nn.Module):
    """Per-channel (section) standardisation with constants from the training split."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Tower(nn.Module):
    """Stem: 5x5 convolution (stride 1, ``widths[0]`` channels), batch norm, ReLU, 2x2 max-pool;
    then per further width a 3x3 convolution, batch norm, ReLU and 2x2 max-pool. The feature map
    is flattened (positions matter for aberrations, so no global pooling).

    The stem keeps stride 1: the donut's ring has a radius of only ~2.5 binned pixels, and a
    stride-2 stem (tried first) could not learn the even modes (astigmatism, spherical,
    quadrafoil: validation R^2 < 0.2 after 4 epochs) while this stem reached R^2 ~0.6 for them in
    200 steps at about the same cost."""

    def __init__(self, c_in: int, widths: tuple[int, ...], input_size: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(c_in, widths[0], 5, 1, 2, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c = widths[0]
        for w in widths[1:]:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.body = nn.Sequential(*layers)
        side = input_size // 2 ** len(widths)
        if side < 1:
            raise ValueError(f"input of {input_size} px is too small for {len(widths)} stages")
        self.features = c * side * side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1)


def _head(features: int, hidden: int, n_outputs: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
                         nn.Linear(hidden, n_outputs))


class SingleSectionNet(nn.Module):
    """xy section only -> tower (16, 32, 64 channels) -> dense 256 -> dropout -> outputs.
    Base of Net12, Net11 (and, with the offset, OffsetNet2, OffsetNet13)."""

    requires_offset = False
    widths: tuple[int, ...] = (16, 32, 64)
    hidden = 256

    def __init__(self, n_outputs: int, input_size: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.tower = Tower(1, self.widths, input_size)
        self.head = _head(self.tower.features, self.hidden, n_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(x[:, :1]))


class MultiSectionNet(nn.Module):
    """xy, xz, yz each through its own tower (16, 32, 48 channels; weights not shared), the three
    flattened feature maps (3 x 48 x 4 x 4 at 32 px) concatenated -> dense 256 -> dropout ->
    outputs. Base of MultiNet12, MultiNet11, MultiOffsetNet13."""

    requires_offset = False
    widths: tuple[int, ...] = (16, 32, 48)
    hidden = 256

    def __init__(self, n_outputs: int, input_size: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.towers = nn.ModuleList([Tower(1, self.widths, input_size) for _ in range(3)])
        self.head = _head(3 * self.towers[0].features, self.hidden, n_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([t(x[:, k: k + 1]) for k, t in enumerate(self.towers)], dim=1))


class ConcatSectionNet(nn.Module):
    """The three sections as the 3 input channels of one wider tower (32, 64, 96 channels) ->
    dense 256 -> dropout -> outputs. Base of MultiNetCat11."""

    requires_offset = False
    widths: tuple[int, ...] = (32, 64, 96)
    hidden = 256

    def __init__(self, n_outputs: int, input_size: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.tower = Tower(3, self.widths, input_size)
        self.head = _head(self.tower.features, self.hidden, n_outputs, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(x))


class Net12(SingleSectionNet):
    """Single-section (xy) CNN; the report's 12-output (Noll 4..15) network."""


class Net11(SingleSectionNet):
    """Single-section (xy) CNN; the report's 11-output (Noll 5..15) network."""


class MultiNet12(MultiSectionNet):
    """Three-tower CNN over xy, xz, yz; the report's 12-output network."""


class MultiNet11(MultiSectionNet):
    """Three-tower CNN over xy, xz, yz; the report's 11-output network (the default)."""


class MultiNetCat11(ConcatSectionNet):
    """Sections concatenated as channels of one tower; the report's 11-output variant."""


class OffsetNet2(SingleSectionNet):
    """Single-section (xy) CNN for the vortex-mask offset (the report's offset-only network; here
    the modes are predicted too). The offset breaks the donut's rotational symmetry in xy."""

    requires_offset = True


class OffsetNet13(SingleSectionNet):
    """Single-section (xy) CNN for 11 modes + the mask offset (the report's 13 outputs)."""

    requires_offset = True


class MultiOffsetNet13(MultiSectionNet):
    """Three-tower CNN for 11 modes + the mask offset."""

    requires_offset = True


class ResidualBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus identity (or a strided 1x1 projection), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Residual network in the style of Moeckl et al.: stem conv (3 -> 32) with batch norm, residual
    blocks 32, 64 (stride 2), 128 (stride 2), 2x2 adaptive average pooling (keeps coarse
    position), dropout, linear outputs. Takes all three sections as channels."""

    requires_offset = False

    def __init__(self, n_outputs: int, input_size: int = 32, dropout: float = 0.1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True))
        self.blocks = nn.Sequential(ResidualBlock(32, 32), ResidualBlock(32, 64, 2), ResidualBlock(64, 128, 2))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(128 * 4, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))))


NETWORKS: dict[str, type[nn.Module]] = {
    "Net12": Net12,
    "MultiNet12": MultiNet12,
    "Net11": Net11,
    "MultiNet11": MultiNet11,
    "MultiNetCat11": MultiNetCat11,
    "OffsetNet2": OffsetNet2,
    "OffsetNet13": OffsetNet13,
    "MultiOffsetNet13": MultiOffsetNet13,
    "ResNet": ResNet,
}


def available_networks() -> list[str]:
    return list(NETWORKS)


def build_network(name: str, n_modes: int, predict_offset: bool = False, input_size: int = 32,
                  dropout: float = 0.1) -> nn.Module:
    """The network ``name`` with ``n_modes (+ 2 if predict_offset)`` outputs for inputs of
    ``input_size`` px. Raises ValueError for an unknown name or an Offset* network without offset."""
    if name not in NETWORKS:
        raise ValueError(f"unknown architecture {name!r}: expected one of {', '.join(NETWORKS)}")
    cls = NETWORKS[name]
    if getattr(cls, "requires_offset", False) and not predict_offset:
        raise ValueError(f"{name} predicts the mask offset: it needs a data set with the offset "
                         "(dataset.max_offset > 0) and model.predict_offset: true")
    n_out = n_modes + (2 if predict_offset else 0)
    if n_out < 1:
        raise ValueError("the network needs at least one output")
    return cls(n_out, input_size=input_size, dropout=dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
