"""Recorded measurements: what a file (or a scanning microscope) holds, as the estimators see it.

Two kinds of measurement reach the estimators, the fit and the loop:

* :class:`ZStack`: a camera (or any) z-stack ``(nz, ny, nx)`` with its lateral pixel size and the
  focus position of every plane;
* :class:`SectionScans`: three section scans of one bead, ``xy[y, x]``, ``xz[z, x]`` and
  ``yz[z, y]``, as a scanning (STED / confocal) microscope records them: each with its own pixel
  sizes, its own centre position and its own background.

Both carry a :class:`Provenance` for every physical quantity (where the voxel size came from:
the file's metadata, a command-line flag, or the settings), the channel name (a STED recording
has a depletion and an excitation channel) and the counts' units. A :class:`Recording` is what a
reader returns for one file: every measurement in it, plus other images it holds (an overview, an
SLM pattern) that are not measurements of one bead.

Ground floor: this module imports nothing of the project. Conventions: arrays (z, y, x); lengths
in micrometres; ``z_um`` increasing with the stage's focus coordinate; counts as recorded (ADU
for a camera, photon counts for a point detector) unless ``units`` says otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from autoalign.files import UserError

__all__ = ["MeasurementError", "Provenance", "ZStack", "SectionScan", "SectionScans", "Image2D", "Recording", "Units"]

Units = Literal["adu", "counts", "photons"]
"""``adu``: camera grey levels (offset and gain apply); ``counts``: detected photon counts of a
point detector (no offset, gain 1); ``photons``: already converted."""


class MeasurementError(UserError, ValueError):
    """A measurement that cannot be analysed (no bead, NaN, too few planes, ...): the message names
    the measurement and what was found."""


@dataclass(frozen=True)
class Provenance:
    """Where one value came from: ``source`` is ``"file"``, ``"flag"``, ``"settings"`` or
    ``"default"``; ``detail`` says which key, tag or flag (e.g. ``"TIFF ImageDescription
    BoundingBox"``, ``"--pixel-um"``)."""

    source: Literal["file", "flag", "settings", "default"]
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.source}: {self.detail}" if self.detail else self.source


@dataclass
class ZStack:
    """A z-stack of one bead.

    data : (nz, ny, nx) float array, counts in ``units``
    pixel_x_um, pixel_y_um : lateral pixel size in the sample, µm
    z_um : (nz,) focus position of each plane, µm (increasing)
    channel : channel / detector name ("" when the file has one)
    units : see :data:`Units`
    provenance : {quantity: Provenance} for "pixel_x_um", "pixel_y_um", "z_um" (and any other
        physical value a reader set)
    name : the data set's name in its file
    """

    data: np.ndarray
    pixel_x_um: float
    pixel_y_um: float
    z_um: np.ndarray
    channel: str = ""
    units: Units = "adu"
    provenance: dict[str, Provenance] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data)
        self.z_um = np.asarray(self.z_um, dtype=float).ravel()
        if self.data.ndim != 3:
            raise ValueError(f"ZStack {self.name!r}: expected data (nz, ny, nx), got shape {self.data.shape}")
        if len(self.z_um) != self.data.shape[0]:
            raise ValueError(f"ZStack {self.name!r}: {len(self.z_um)} focus positions for "
                             f"{self.data.shape[0]} planes")
        for key in ("pixel_x_um", "pixel_y_um"):
            v = float(getattr(self, key))
            if not (v > 0 and np.isfinite(v)):
                raise ValueError(f"ZStack {self.name!r}: {key} = {v!r}, expected a finite size > 0 µm")
        if len(self.z_um) > 1 and not np.all(np.diff(self.z_um) > 0):
            raise ValueError(f"ZStack {self.name!r}: focus positions must increase, got {self.z_um[:4]}...")

    @property
    def z_step_um(self) -> float:
        """Median plane spacing (µm); ``nan`` for a single plane."""
        return float(np.median(np.diff(self.z_um))) if len(self.z_um) > 1 else float("nan")

    @property
    def pixel_um(self) -> float:
        """The lateral pixel size when square (µm); raises for non-square pixels."""
        if not np.isclose(self.pixel_x_um, self.pixel_y_um, rtol=1e-3):
            raise ValueError(f"ZStack {self.name!r}: pixels are not square "
                             f"({self.pixel_x_um:g} x {self.pixel_y_um:g} µm)")
        return float(self.pixel_x_um)


@dataclass
class SectionScan:
    """One section scan through a bead.

    plane : "xy" (image[y, x]), "xz" (image[z, x]) or "yz" (image[z, y])
    image : 2-D float array, counts in ``units``
    pixel_um : (rows, columns) pixel sizes, µm: for "xz" (dz, dx), for "yz" (dz, dy), for "xy" (dy, dx)
    centre_um : (x, y, z) of the image's centre pixel ([n // 2]) in the scanner's frame, µm
    """

    plane: Literal["xy", "xz", "yz"]
    image: np.ndarray
    pixel_um: tuple[float, float]
    centre_um: tuple[float, float, float] = (0.0, 0.0, 0.0)
    channel: str = ""
    units: Units = "counts"
    provenance: dict[str, Provenance] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.image = np.asarray(self.image)
        if self.plane not in ("xy", "xz", "yz"):
            raise ValueError(f"SectionScan {self.name!r}: plane = {self.plane!r}, expected 'xy', 'xz' or 'yz'")
        if self.image.ndim != 2:
            raise ValueError(f"SectionScan {self.name!r}: expected a 2-D image, got shape {self.image.shape}")
        if not all(float(p) > 0 and np.isfinite(p) for p in self.pixel_um):
            raise ValueError(f"SectionScan {self.name!r}: pixel_um = {self.pixel_um!r}, expected sizes > 0 µm")

    def axis_um(self, axis: int) -> np.ndarray:
        """Coordinates (µm) of the pixels along image axis ``axis`` (0 rows, 1 columns), in the
        scanner's frame (the centre pixel at ``centre_um``)."""
        n = self.image.shape[axis]
        x, y, z = self.centre_um
        centre = {"xy": (y, x), "xz": (z, x), "yz": (z, y)}[self.plane][axis]
        return centre + (np.arange(n) - n // 2) * float(self.pixel_um[axis])


@dataclass
class SectionScans:
    """The xy, xz and yz scans of one bead in one channel (any of them may be missing: None)."""

    xy: SectionScan | None = None
    xz: SectionScan | None = None
    yz: SectionScan | None = None
    channel: str = ""
    name: str = ""

    def sections(self) -> list[SectionScan]:
        """The scans present, in the order xy, xz, yz."""
        return [s for s in (self.xy, self.xz, self.yz) if s is not None]


@dataclass
class Image2D:
    """An image in a recording that is not a measurement of one bead (an overview scan, the SLM
    pattern, a camera frame): ``kind`` says which ("overview", "slm", "other")."""

    image: np.ndarray
    pixel_um: tuple[float, float] | None
    kind: str = "other"
    channel: str = ""
    name: str = ""


@dataclass
class Recording:
    """Everything a reader found in one file (see ``autoalign.hardware.recorded.read_recording``)."""

    path: str
    format: str                                   # "tiff", "ome-tiff", "obf", "msr", "hdf5"
    stacks: list[ZStack] = field(default_factory=list)
    scans: list[SectionScans] = field(default_factory=list)
    images: list[Image2D] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the reader assumed or skipped, in words
    metadata: dict[str, object] = field(default_factory=dict)

    def channels(self) -> list[str]:
        """Channel names of the stacks and scans, in file order, without repeats."""
        seen: list[str] = []
        for c in [s.channel for s in self.stacks] + [s.channel for s in self.scans]:
            if c not in seen:
                seen.append(c)
        return seen
