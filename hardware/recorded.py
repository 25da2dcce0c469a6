"""Read what microscopes write: TIFF / OME-TIFF z-stacks, Imspector ``.obf`` / ``.msr`` files and
the project's own bead-walk HDF5 files, as one :class:`autoalign.recording.Recording`.

``read_recording(path, *, pixel_um=None, z_step_um=None, channel=None)`` chooses the reader by the
file's first bytes (TIFF, OBF, HDF5 signatures); the extension only says what was expected when
the content is not recognised. Every file is opened read-only and never modified. Problems raise
:class:`RecordingError` (a ``ValueError``) naming the file, what was expected and what was found.
Every size carries a :class:`~autoalign.recording.Provenance` saying where it came from; a flag
value (``pixel_um``: the lateral pixel, ``z_step_um``: the plane spacing) overrides the file and
is recorded as ``Provenance("flag", "--pixel-um")`` / ``("flag", "--z-step-um")``. What the
reader assumed is written to ``Recording.notes``.

TIFF (tifffile). Voxel sizes, in this order: OME-XML ``Pixels`` ``PhysicalSizeX/Y/Z`` with their
``...Unit`` (OME default µm); ImageJ metadata (``spacing``, ``unit``/``zunit`` and the
``XResolution``/``YResolution`` tags, pixels per unit); a plain ``ImageDescription``
``BoundingBox x0 x1 y0 y1 z0 z1`` (µm, first to last pixel centre: pixel = (x1 - x0) / (nx - 1));
``XResolution`` with ``ResolutionUnit`` centimetre/millimetre/micrometre (inch, i.e. dpi, is
ignored). Without a size from the file or a flag the reader refuses, naming the flag to pass.
A page chain that tifffile reports broken (a truncated file) is refused rather than read in part.
Channels (OME ``C``, ImageJ ``channels``) give one ZStack each (named by OME ``Channel Name``,
else ``C0``, ``C1``...); time points give one ZStack each. A 2-D TIFF is an ``Image2D("other")``.

Imspector OBF / MSR (obffile; OBF-based MSR only). Each stack's dimensions carry a size, a length
and an offset in metres (pixel ``i`` at ``offset + i * length / size``, the obffile convention)
and, in stack format >= 1, a label. The rule that names a stack's axes:

1. the dimension labels: a label ending in a separate ``x``, ``y``, ``z`` or ``t`` (``"X"``,
   ``"ExpControl Z"``, ``"Pos_Y"``) or reading ``time``; a dimension whose SI unit is seconds
   is time. Used when every dimension with more than one pixel has such a label;
2. else the stack's name: a separate token ``xy``, ``xz``, ``yz``, ``xyz`` (or a permutation),
   whose letters name the dimensions with more than one pixel in storage order, fastest first
   (``"STED xz"``: columns x, rows z, the convention ``xz[z, x]``);
3. else Imspector's dimension order x, y, z, t by position (noted as an assumption).

Labels win over a contradicting name (noted). A stack with three spatial dimensions of more than
one pixel is a ZStack (z, y, x); two are a SectionScan in the plane they span, arranged xy[y, x],
xz[z, x], yz[z, y], its ``centre_um`` the position of pixel ``[n // 2]`` (the plane's position
from the offset of the dimension of one pixel). A 2-D stack whose name contains ``SLM`` is the SLM
pattern (``Image2D(kind="slm")``); an xy scan is an overview (``Image2D(kind="overview")``) when
its name says so (overview, survey, panorama) or when it shows two or more separate beads
(Gaussian-smoothed by 0.1 µm, above half way from the background to the peak, components closed
by 0.1 µm; a scan whose smoothed peak is within 10 noise sigmas of its background has none).
Stacks with a time series or one spatial dimension are skipped (noted). The channel is the
stack's name without series numbers (``{3}``), plane tokens and overview words (``"STED 775 xz
{2}"`` -> ``"STED 775"``); channels whose names say STED / depletion / donut are recorded as
``metadata["channel_roles"][name] = "depletion"``, confocal / excitation / Gaussian as
``"excitation"``. Scans of one channel fill one SectionScans in file order; a plane seen again
starts the channel's next SectionScans. Counts are the detector's (``units="counts"``).

Bead-walk HDF5 (h5py; the layout ``autoalign collect`` writes, ``app/collect.py``, read here
without importing the application floor). Keys relied on: attribute ``format`` =
``"autoalign-beadwalk"`` (or the first version's ``layout`` = ``"autoalign bead-walk collection
v1"``), ``format_version`` <= 1, datasets ``stack`` (N, nz, ny, nx) ADU, ``round`` (N,) (rows past
its length are an unfinished round and ignored), ``focus_um`` (N,) (the mean focus of each stack)
and attribute ``settings_yaml`` (``camera.pixel_size_um``, ``stack.z_step_um``). Each complete
round is one ZStack named ``round <k>`` with focus positions ``focus + (k - (nz - 1) / 2) * step``
(the acquisition's ``stack_positions``). The training data sets of ``simulation/dataset.py`` are
refused by name (they hold simulated sections, not recordings).

:class:`RecordedScanner` is a :class:`~autoalign.hardware.base.SectionScanner` that replays a
recorded file's section scans.
"""
from __future__ import annotations

import copy
import logging
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from autoalign.hardware.base import DeviceError, SectionScanner
from autoalign.recording import Image2D, Provenance, Recording, SectionScan, SectionScans, ZStack

__all__ = ["RecordingError", "read_recording", "detect_format", "channel_role", "RecordedScanner",
           "BEADWALK_FORMAT", "BEADWALK_FORMAT_VERSION", "BEADWALK_LEGACY_LAYOUT"]

#: The bead-walk file's format name, version and first-version layout string (as ``app/collect.py``
#: writes them; tests/test_recorded.py checks they agree).
BEADWALK_FORMAT = "autoalign-beadwalk"
BEADWALK_FORMAT_VERSION = 1
BEADWALK_LEGACY_LAYOUT = "autoalign bead-walk collection v1"

_FLAG_PIXEL = "--pixel-um"
_FLAG_Z = "--z-step-um"

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_OBF_MAGIC = b"OMAS_BF\n\xff\xff"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_EXTENSIONS = {".tif": "tiff", ".tiff": "tiff", ".btf": "tiff", ".tf8": "tiff", ".obf": "obf", ".msr": "msr",
               ".h5": "hdf5", ".hdf5": "hdf5", ".hdf": "hdf5", ".he5": "hdf5"}
_KIND_NAMES = {"tiff": "TIFF", "obf": "Imspector OBF", "msr": "Imspector MSR", "hdf5": "HDF5"}

#: length units (OME, ImageJ) -> micrometres
_UNITS_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
             "micrometer": 1.0, "micrometre": 1.0, "micrometers": 1.0, "micrometres": 1.0, "nm": 1e-3,
             "nanometer": 1e-3, "nanometre": 1e-3, "pm": 1e-6, "å": 1e-4, "angstrom": 1e-4}


class RecordingError(ValueError):
    """A file that cannot be read as a recording: the message names the file, what was expected
    and what was found (and the flag to pass when a size is missing)."""


# ----------------------------------------------------------------------------- small helpers
@dataclass(frozen=True)
class _Flags:
    pixel_um: float | None
    z_step_um: float | None


def _check_flag(value: float | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise RecordingError(f"{flag} = {value!r}: expected a size in µm > 0") from None
    if not (v > 0 and math.isfinite(v)):
        raise RecordingError(f"{flag} = {value!r}: expected a finite size in µm > 0")
    return v


def _unit_um(unit: object) -> float | None:
    """Micrometres per ``unit`` (a length unit's name), None when not a known length unit."""
    if unit is None:
        return None
    text = str(unit).strip()
    if "\\u" in text:  # ImageJ writes µ as the escape \u00B5
        try:
            text = text.encode("ascii", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError:
            pass
    key = text.lower().replace("\u00b5", "µ")
    return _UNITS_UM.get(key)


def channel_role(name: str) -> Literal["depletion", "excitation", ""]:
    """The role a channel's name says: ``"depletion"`` (STED, depletion, donut, vortex),
    ``"excitation"`` (confocal, excitation, Gaussian) or ``""``."""
    low = name.lower()
    if re.search(r"sted|depl|donut|vortex", low):
        return "depletion"
    if re.search(r"conf|excit|gauss", low):
        return "excitation"
    return ""


def detect_format(path: str | Path) -> str:
    """``"tiff"``, ``"obf"``, ``"msr"`` or ``"hdf5"`` from the file's first bytes (the extension
    decides only between OBF and MSR, which share one signature). :class:`RecordingError` when
    the file is missing, empty or of no supported kind."""
    p = Path(path)
    if not p.exists():
        raise RecordingError(f"{p}: no such file (expected a TIFF, Imspector .obf/.msr or HDF5 recording)")
    if not p.is_file():
        raise RecordingError(f"{p}: is not a file (expected a TIFF, Imspector .obf/.msr or HDF5 recording)")
    with open(p, "rb") as fh:
        head = fh.read(16)
    ext = _extension(p)
    expected = _EXTENSIONS.get(ext)
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head[:10] == _OBF_MAGIC:
        return "msr" if ext == ".msr" else "obf"
    if head[:8] == _HDF5_MAGIC or (expected == "hdf5" and _is_hdf5(p)):
        return "hdf5"
    found = "an empty file" if not head else f"first bytes {head[:10]!r}"
    if expected is not None:
        raise RecordingError(f"{p}: expected a {_KIND_NAMES[expected]} file (extension {ext}), found {found}: "
                             f"no {_KIND_NAMES[expected]} signature (corrupt, truncated or another format)")
    raise RecordingError(f"{p}: expected a TIFF / OME-TIFF, Imspector .obf/.msr or HDF5 recording, found {found} "
                         f"(extension {ext or 'none'})")


def _extension(p: Path) -> str:
    return p.suffix.lower()


def _is_hdf5(p: Path) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(str(p)))
    except OSError:
        return False


# ----------------------------------------------------------------------------- entry point
def read_recording(
    path: str | Path,
    *,
    pixel_um: float | None = None,
    z_step_um: float | None = None,
    channel: str | None = None,
) -> Recording:
    """Read a microscope recording (see the module docstring for the formats and rules).

    pixel_um : lateral pixel size (µm) overriding the file's (both x and y)
    z_step_um : plane spacing (µm) overriding the file's (z-stacks; the z pixel of xz/yz scans)
    channel : keep only this channel's stacks and scans (exact name, else case-insensitive, else
        a unique case-insensitive part of a name); images of other channels are dropped too
    """
    p = Path(path)
    flags = _Flags(_check_flag(pixel_um, _FLAG_PIXEL), _check_flag(z_step_um, _FLAG_Z))
    kind = detect_format(p)
    if kind == "tiff":
        rec = _read_tiff(p, flags)
    elif kind in ("obf", "msr"):
        rec = _read_obf(p, flags, kind)
    else:
        rec = _read_hdf5(p, flags)
    if flags.pixel_um is not None:
        rec.notes.append(f"lateral pixel size {flags.pixel_um:g} µm from {_FLAG_PIXEL} (overrides the file)")
    if flags.z_step_um is not None:
        rec.notes.append(f"z step {flags.z_step_um:g} µm from {_FLAG_Z} (overrides the file)")
    if channel is not None:
        rec = _select_channel(rec, channel)
    return rec


def _select_channel(rec: Recording, channel: str) -> Recording:
    names = rec.channels() + [im.channel for im in rec.images if im.channel and im.channel not in rec.channels()]
    chosen = None
    if channel in names:
        chosen = channel
    else:
        folded = [n for n in names if n.casefold() == channel.casefold()]
        part = [n for n in names if channel.casefold() in n.casefold()]
        if len(folded) == 1:
            chosen = folded[0]
        elif len(part) == 1:
            chosen = part[0]
    if chosen is None:
        raise RecordingError(f"{rec.path}: expected a channel {channel!r}, found channels {names}")
    rec.stacks = [s for s in rec.stacks if s.channel == chosen]
    rec.scans = [s for s in rec.scans if s.channel == chosen]
    rec.images = [im for im in rec.images if im.channel in ("", chosen)]
    rec.notes.append(f"channel {chosen!r} selected (of {names})")
    return rec


# ----------------------------------------------------------------------------- TIFF
_BOUNDING_BOX = re.compile(r"^\s*BoundingBox((?:\s+[-+0-9.eE]+){6})\s*$")


@dataclass
class _Sizes:
    """Voxel sizes (µm) found in a TIFF and where they came from."""

    px: float | None = None
    py: float | None = None
    dz: float | None = None
    z0: float = 0.0
    prov_x: str = ""
    prov_y: str = ""
    prov_z: str = ""
    channel_names: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    """Collects a library's log warnings (tifffile reports truncated page chains only so)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _read_tiff(p: Path, flags: _Flags) -> Recording:
    logger = logging.getLogger("tifffile")
    collect = _Collect()
    logger.addHandler(collect)
    try:
        rec = _read_tiff_file(p, flags)
    finally:
        logger.removeHandler(collect)
    damaged = [m for m in collect.messages if re.search(r"invalid page offset|truncat|corrupt", m, re.IGNORECASE)]
    if damaged:  # tifffile stops at a broken page chain and returns the pages before it
        raise RecordingError(f"{p}: expected a complete TIFF, found a damaged or truncated one (tifffile: "
                             f"{damaged[0]}); only part of its planes would be read")
    for message in collect.messages:
        rec.notes.append(f"tifffile warned: {message} (the file may be truncated or damaged)")
    return rec


def _read_tiff_file(p: Path, flags: _Flags) -> Recording:
    import tifffile

    try:
        tif = tifffile.TiffFile(p)  # opened 'rb'
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupt file
        raise RecordingError(f"{p}: expected a readable TIFF, found a file tifffile cannot parse "
                             f"({type(exc).__name__}: {exc})") from exc
    with tif:
        fmt = "ome-tiff" if tif.is_ome else "tiff"
        rec = Recording(path=str(p), format=fmt)
        flavour = "ome" if tif.is_ome else "imagej" if tif.is_imagej else "plain"
        rec.metadata["tiff_flavour"] = flavour
        if not tif.series:
            raise RecordingError(f"{p}: expected an image series in the TIFF, found none")
        for index, series in enumerate(tif.series):
            try:
                data = np.asarray(series.asarray())
            except Exception as exc:  # noqa: BLE001
                raise RecordingError(f"{p}: expected readable image data in TIFF series {index}, found an error "
                                     f"({type(exc).__name__}: {exc}); the file may be truncated") from exc
            axes = str(series.axes).upper()
            if flavour == "ome":
                sizes = _ome_sizes(p, tif.ome_metadata or "", index)
            elif flavour == "imagej":
                sizes = _imagej_sizes(tif)
            else:
                sizes = _plain_sizes(tif, data, axes)
            stem = p.name.split(".")[0] or p.stem
            _tiff_series(rec, p, data, axes, sizes, flags, (series.name or stem) if len(tif.series) > 1 else stem)
    return rec


def _ome_sizes(p: Path, xml: str, index: int) -> _Sizes:
    out = _Sizes()
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise RecordingError(f"{p}: expected OME-XML in the first ImageDescription, found XML that does not parse "
                             f"({exc})") from exc
    local = lambda el: el.tag.rsplit("}", 1)[-1]
    images = [el for el in root.iter() if local(el) == "Image"]
    if index >= len(images):
        return out
    pixels = next((el for el in images[index] if local(el) == "Pixels"), None)
    if pixels is None:
        return out
    a = pixels.attrib

    def size(axis: str) -> tuple[float | None, str]:
        value = a.get(f"PhysicalSize{axis}")
        if value is None:
            return None, ""
        unit = a.get(f"PhysicalSize{axis}Unit", "µm")
        scale = _unit_um(unit)
        if scale is None:
            return None, f"OME-XML PhysicalSize{axis}Unit {unit!r} is not a length unit"
        return float(value) * scale, f"OME-XML Pixels PhysicalSize{axis} = {value} {unit}"

    out.px, out.prov_x = size("X")
    out.py, out.prov_y = size("Y")
    out.dz, out.prov_z = size("Z")
    out.channel_names = [ch.attrib.get("Name", "") for ch in pixels if local(ch) == "Channel"]
    return out


def _imagej_sizes(tif: Any) -> _Sizes:
    out = _Sizes()
    md = tif.imagej_metadata or {}
    unit = md.get("unit")
    scale = _unit_um(unit)
    page = tif.pages[0]
    tags = page.tags
    if scale is not None:
        for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
            if tag in tags:
                num, den = tags[tag].value
                if num > 0 and den > 0 and not (num == den == 1):
                    size = den / num * scale
                    text = f"ImageJ {tag} {num}/{den} pixels per {unit}"
                    if axis == "x":
                        out.px, out.prov_x = size, text
                    else:
                        out.py, out.prov_y = size, text
    if out.px is not None and out.py is None:
        out.py, out.prov_y = out.px, out.prov_x + " (YResolution absent: square pixels)"
    spacing = md.get("spacing")
    zunit = md.get("zunit", unit)
    zscale = _unit_um(zunit)
    if spacing is not None and zscale is not None:
        out.dz, out.prov_z = float(spacing) * zscale, f"ImageJ metadata spacing = {spacing} {zunit}"
    return out


def _plain_sizes(tif: Any, data: np.ndarray, axes: str) -> _Sizes:
    out = _Sizes()
    page = tif.pages[0]
    description = str(getattr(page, "description", "") or "")
    m = _BOUNDING_BOX.match(description)
    nx = data.shape[axes.index("X")] if "X" in axes else 0
    ny = data.shape[axes.index("Y")] if "Y" in axes else 0
    zaxes = [a for a in axes if a not in "YXS"]
    nz = data.shape[axes.index(zaxes[0])] if len(zaxes) == 1 else 1
    if m:
        x0, x1, y0, y1, z0, z1 = (float(v) for v in m.group(1).split())
        what = f"TIFF ImageDescription BoundingBox {description.strip()[12:]!s} (µm assumed)"
        if nx > 1 and x1 > x0:
            out.px, out.prov_x = (x1 - x0) / (nx - 1), f"{what}: x {x0:g}..{x1:g} over {nx} px"
        if ny > 1 and y1 > y0:
            out.py, out.prov_y = (y1 - y0) / (ny - 1), f"{what}: y {y0:g}..{y1:g} over {ny} px"
        if nz > 1 and z1 != z0:
            out.dz, out.prov_z = (z1 - z0) / (nz - 1), f"{what}: z {z0:g}..{z1:g} over {nz} planes"
            out.z0 = z0
        return out
    tags = page.tags
    if "XResolution" in tags and "ResolutionUnit" in tags:
        unit = int(tags["ResolutionUnit"].value)
        per_um = {3: 1e-4, 4: 1e-3, 5: 1.0}.get(unit)  # pixels per cm / mm / µm -> per µm factor
        if per_um is not None:
            for axis, tag in (("x", "XResolution"), ("y", "YResolution")):
                if tag not in tags:
                    continue
                num, den = tags[tag].value
                if num > 0 and den > 0:
                    size = den / num / per_um
                    if size <= 10.0:  # a sample-space pixel; beyond: a print resolution, not a microscope's
                        text = f"TIFF {tag} {num}/{den} per {('cm', 'mm', 'µm')[unit - 3]}"
                        if axis == "x":
                            out.px, out.prov_x = size, text
                        else:
                            out.py, out.prov_y = size, text
    return out


def _tiff_series(rec: Recording, p: Path, data: np.ndarray, axes: str, sizes: _Sizes, flags: _Flags,
                 base: str) -> None:
    """Split one TIFF series into ZStacks (per channel and time point) and add them to ``rec``."""
    if "S" in axes:
        s_len = data.shape[axes.index("S")]
        if s_len != 1:
            raise RecordingError(f"{p}: expected a grey-level z-stack, found {s_len} samples per pixel (RGB) "
                                 f"with axes {axes}")
        data = np.take(data, 0, axis=axes.index("S"))
        axes = axes.replace("S", "")
    if "Y" not in axes or "X" not in axes:
        raise RecordingError(f"{p}: expected image axes Y and X, found axes {axes!r} of shape {data.shape}")
    generic = [a for a in axes if a in "IQ"]
    if generic:
        if "Z" in axes or len(generic) > 1:
            raise RecordingError(f"{p}: expected axes such as ZYX, CZYX or TZCYX, found {axes!r} of shape {data.shape}")
        axes = axes.replace(generic[0], "Z")
        rec.notes.append(f"{base}: the TIFF's unnamed leading axis ({generic[0]}, {data.shape[axes.index('Z')]} "
                         f"frames) read as the z planes")
    unknown = [a for a in axes if a not in "TZCYX"]
    if unknown:
        raise RecordingError(f"{p}: expected axes from T, Z, C, Y, X, found {axes!r} of shape {data.shape}")
    for a in "TCZ":
        if a not in axes:
            data = data[np.newaxis]
            axes = a + axes
    data = np.transpose(data, [axes.index(a) for a in "TCZYX"])
    nt, nc, nz, ny, nx = data.shape
    names = sizes.channel_names if len(sizes.channel_names) == nc else [f"C{c}" for c in range(nc)] if nc > 1 else [""]
    if nz == 1:
        for t in range(nt):
            for c in range(nc):
                if flags.pixel_um is not None:
                    pix: tuple[float, float] | None = (flags.pixel_um, flags.pixel_um)
                else:
                    pix = (sizes.py, sizes.px) if sizes.px and sizes.py else None
                suffix = (f" {names[c]}" if names[c] else "") + (f" t{t}" if nt > 1 else "")
                rec.images.append(Image2D(np.asarray(data[t, c, 0], dtype=float), pix, kind="other",
                                          channel=names[c], name=base + suffix))
        rec.notes.append(f"{base}: a single plane ({ny} x {nx}), read as an image, not a z-stack")
        return
    px, prov_x = _pick(sizes.px, sizes.prov_x, flags.pixel_um, _FLAG_PIXEL)
    py, prov_y = _pick(sizes.py, sizes.prov_y, flags.pixel_um, _FLAG_PIXEL)
    dz, prov_z = _pick(sizes.dz, sizes.prov_z, flags.z_step_um, _FLAG_Z, allow_negative=True)
    missing = []
    if px is None or py is None:
        why = "; ".join(t for t in (sizes.prov_x, sizes.prov_y) if t)
        missing.append(f"the lateral pixel size (looked for OME-XML PhysicalSizeX/Y, ImageJ resolution and unit, an "
                       f"ImageDescription BoundingBox, XResolution in cm/mm/µm{'; ' + why if why else ''}): pass {_FLAG_PIXEL}")
    if dz is None:
        missing.append(f"the z step (looked for OME-XML PhysicalSizeZ, ImageJ spacing, an ImageDescription "
                       f"BoundingBox): pass {_FLAG_Z}")
    if missing:
        raise RecordingError(f"{p}: expected voxel sizes for the {nz}-plane stack, found none for " + "; and ".join(missing))
    assert px is not None and py is not None and dz is not None
    sign = 1.0
    if dz < 0:
        sign, dz = -1.0, -dz
        rec.notes.append(f"{base}: planes are stored from high to low z; reversed so that z increases")
    z0 = sizes.z0 if prov_z.source == "file" else 0.0
    z_um = z0 + sign * np.arange(nz) * dz
    if not (prov_z.source == "file" and "BoundingBox" in prov_z.detail):
        rec.notes.append(f"{base}: focus positions relative to the first plane (z = 0)")
    for t in range(nt):
        for c in range(nc):
            stack = np.asarray(data[t, c], dtype=float)
            z = z_um
            if sign < 0:
                stack, z = stack[::-1], z_um[::-1]
            suffix = (f" {names[c]}" if names[c] else "") + (f" t{t}" if nt > 1 else "")
            rec.stacks.append(ZStack(
                data=stack, pixel_x_um=px, pixel_y_um=py, z_um=z, channel=names[c], units="adu",
                provenance={"pixel_x_um": prov_x, "pixel_y_um": prov_y, "z_um": prov_z}, name=base + suffix))
    if nc > 1:
        rec.notes.append(f"{base}: {nc} channels {names}, one z-stack each")
    rec.notes.append(f"{base}: counts read as camera ADU (units 'adu')")


def _pick(file_value: float | None, file_detail: str, flag_value: float | None, flag: str,
          allow_negative: bool = False) -> tuple[float | None, Provenance]:
    """The flag's value, else the file's (finite, > 0; < 0 too for a z step stored descending)."""
    if flag_value is not None:
        return flag_value, Provenance("flag", flag)
    if file_value is not None and math.isfinite(file_value) and (file_value > 0 or (allow_negative and file_value < 0)):
        return file_value, Provenance("file", file_detail)
    return None, Provenance("default", "")


# ----------------------------------------------------------------------------- Imspector OBF / MSR
_AXIS_LABEL = re.compile(r"(?:^|[^a-z0-9])([xyzt])$", re.IGNORECASE)
_PLANE_TOKEN = re.compile(r"(?<![a-z0-9])(xyz|xzy|yxz|yzx|zxy|zyx|xy|yx|xz|zx|yz|zy)(?![a-z0-9])", re.IGNORECASE)
_OVERVIEW = re.compile(r"overview|survey|panorama|übersicht", re.IGNORECASE)
_SERIES = re.compile(r"\{[^}]*\}")


@dataclass
class _Dim:
    index: int            # dimension index in the file (0 = fastest)
    size: int
    label: str
    length_m: float       # physical length in metres (scale applied)
    offset_m: float
    unit: str             # "m", "s", "" (none given) or the unit's text
    axis: str | None = None


def _si_kind(si: Any) -> tuple[str, float]:
    """``("m", scale)``, ``("s", scale)``, ``("", 1)`` (no unit) or ``(text, 1)`` of an OBF SI unit."""
    if si is None:
        return "", 1.0
    exps = [si.meters, si.kilograms, si.seconds, si.amperes, si.kelvin, si.moles, si.candela, si.radian, si.steradian]
    nonzero = [(i, e) for i, e in enumerate(exps) if e[0] != 0]
    scale = float(si.scale_factor) if si.scale_factor not in (0, 0.0) else 1.0
    if not nonzero:
        return "", 1.0
    if len(nonzero) == 1 and nonzero[0][0] == 0 and nonzero[0][1][0] == nonzero[0][1][1]:
        return "m", scale
    if len(nonzero) == 1 and nonzero[0][0] == 2 and nonzero[0][1][0] == nonzero[0][1][1]:
        return "s", scale
    return str(si), 1.0


def _label_axis(label: str, unit: str) -> str | None:
    if unit == "s":
        return "t"
    text = label.strip()
    if text.lower() in ("time", "t"):
        return "t"
    m = _AXIS_LABEL.search(text)
    return m.group(1).lower() if m else None


def _channel_from_name(name: str) -> str:
    text = name.rsplit("/", 1)[-1]
    text = _SERIES.sub(" ", text)
    text = _PLANE_TOKEN.sub(" ", text)
    text = _OVERVIEW.sub(" ", text)
    text = re.sub(r"\s+", " ", text)
    return text.strip(" _-:.,;|")


def _iter_obf_stacks(obf: Any) -> list[Any]:
    """All stacks in file order, duplicates of a name kept (obffile 2026.2.20's sequence keys them by
    name), following the chain of ``next_stack_pos`` with a guard against cycles."""
    from obffile import ObfStack

    fh = obf.filehandle
    out = []
    seen: set[int] = set()
    pos = int(obf.header.first_stack_pos)
    while pos != 0:
        if pos in seen:
            raise RecordingError(f"{obf.filepath}: expected a chain of stacks, found a cycle at offset {pos}")
        seen.add(pos)
        fh.seek(pos)
        stack = ObfStack(fh, squeeze=False)
        out.append(stack)
        pos = int(stack.header.next_stack_pos)
    return out


def _read_obf(p: Path, flags: _Flags, kind: str) -> Recording:
    from obffile import ObfFile

    rec = Recording(path=str(p), format=kind)
    try:
        obf = ObfFile(p, mode="r", squeeze=False)
    except Exception as exc:  # noqa: BLE001
        raise RecordingError(f"{p}: expected an Imspector OBF/MSR file, found one obffile cannot parse "
                             f"({type(exc).__name__}: {exc})") from exc
    groups: dict[str, list[SectionScans]] = {}
    with obf:
        rec.metadata["obf_format_version"] = int(obf.header.format_version)
        if obf.header.metadata:
            rec.metadata["obf_tags"] = dict(obf.header.metadata)
        try:
            stacks = _iter_obf_stacks(obf)
        except RecordingError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise RecordingError(f"{p}: expected readable OBF stack headers, found a damaged stack "
                                 f"({type(exc).__name__}: {exc})") from exc
        rec.metadata["stacks"] = [s.name for s in stacks]
        for st in stacks:
            try:
                data = np.asarray(st.asarray())
            except Exception as exc:  # noqa: BLE001
                raise RecordingError(f"{p}: expected the data of stack {st.name!r}, found an error "
                                     f"({type(exc).__name__}: {exc}); the file may be truncated") from exc
            _obf_stack(rec, p, st, data, flags, groups)
    for scans_list in groups.values():
        rec.scans.extend(scans_list)
        if len(scans_list) > 1:
            rec.notes.append(f"channel {scans_list[0].channel!r}: {len(scans_list)} sets of section scans (a plane "
                             f"seen again starts the next set)")
    roles = {c: channel_role(c) for c in rec.channels() + [im.channel for im in rec.images] if c}
    rec.metadata["channel_roles"] = {c: r for c, r in roles.items() if r}
    for c, r in roles.items():
        rec.notes.append(f"channel {c!r}: from the stack names" + (f", role {r} (by its name)" if r else ""))
    return rec


def _obf_dims(st: Any) -> list[_Dim]:
    hdr, ftr = st.header, st.footer
    labels = list(ftr.labels) + [""] * (hdr.rank - len(ftr.labels))
    si = list(ftr.si_dimensions[: hdr.rank]) + [None] * (hdr.rank - len(ftr.si_dimensions[: hdr.rank]))
    dims = []
    for i in range(hdr.rank):
        unit, scale = _si_kind(si[i])
        length = hdr.lengths[i] if i < len(hdr.lengths) else 0.0
        offset = hdr.offsets[i] if i < len(hdr.offsets) else 0.0
        dims.append(_Dim(i, int(hdr.res[i]), str(labels[i]), float(length) * scale, float(offset) * scale, unit))
    return dims


def _assign_axes(rec: Recording, st: Any, dims: list[_Dim]) -> str:
    """Name every dimension's axis (see the module docstring); returns how ("labels", "name",
    "position")."""
    big = [d for d in dims if d.size > 1]
    from_labels = [_label_axis(d.label, d.unit) for d in dims]
    big_labels = [from_labels[d.index] for d in big]
    token = _PLANE_TOKEN.search(st.name)
    if big and all(a is not None for a in big_labels) and len(set(big_labels)) == len(big_labels):
        for d in dims:
            d.axis = from_labels[d.index]
        how = "labels"
        if token and len(token.group(1)) == len(big):
            named = token.group(1).lower()
            spatial = "".join(a for a in big_labels if a is not None and a in "xyz")
            if sorted(named) != sorted(spatial):
                rec.notes.append(f"stack {st.name!r}: its name says {named!r} but its dimension labels "
                                 f"{[d.label for d in big]} say {spatial!r}; the labels were used")
    elif token and len(token.group(1)) == len(big):
        for d, a in zip(big, token.group(1).lower()):
            d.axis = a
        rest = [a for a in "xyzt" if a not in token.group(1).lower()]
        for d in dims:
            if d.size == 1:
                d.axis = from_labels[d.index] or (rest.pop(0) if rest else None)
        how = "name"
    else:
        for d in dims:
            d.axis = from_labels[d.index] or ("xyzt"[d.index] if d.index < 4 else None)
        how = "position"
    return how


def _coords(d: _Dim) -> tuple[float, float]:
    """(position of pixel 0, pixel step) in µm of a dimension."""
    return d.offset_m * 1e6, (d.length_m / d.size * 1e6 if d.size else 0.0)


def _obf_stack(rec: Recording, p: Path, st: Any, data: np.ndarray, flags: _Flags,
               groups: dict[str, list[SectionScans]]) -> None:
    name = st.name
    dims = _obf_dims(st)
    rank = len(dims)
    if data.ndim != rank:  # samples per pixel (RGB) or a mismatch: not a measurement
        rec.notes.append(f"stack {name!r}: data of shape {data.shape} for {rank} dimensions (colour?); skipped")
        return
    big = [d for d in dims if d.size > 1]
    channel = _channel_from_name(name)
    if re.search(r"slm", name, re.IGNORECASE) and len(big) == 2:
        img = np.squeeze(data)
        xs, ys = big[0], big[1]
        pix = None
        if xs.unit in ("m", "") and ys.unit in ("m", "") and xs.length_m and ys.length_m:
            pix = (abs(_coords(ys)[1]), abs(_coords(xs)[1]))
        rec.images.append(Image2D(np.asarray(img, dtype=float), pix, kind="slm", channel="", name=name))
        rec.notes.append(f"stack {name!r}: the SLM pattern (its name contains 'SLM'), image[row, column] as stored")
        return
    how = _assign_axes(rec, st, dims)
    spatial = [d for d in big if d.axis in ("x", "y", "z")]
    other = [d for d in big if d.axis not in ("x", "y", "z")]
    if other:
        rec.notes.append(f"stack {name!r}: dimensions {[(d.label or d.index, d.size) for d in other]} are not "
                         f"spatial (time series / unknown); skipped")
        return
    if len(spatial) < 2:
        rec.notes.append(f"stack {name!r}: {len(spatial)} spatial dimension(s) of more than one pixel; skipped")
        return
    if len({d.axis for d in spatial}) != len(spatial):
        rec.notes.append(f"stack {name!r}: two dimensions name the same axis {[d.axis for d in spatial]}; skipped")
        return
    for d in spatial:
        if d.unit not in ("m", ""):
            rec.notes.append(f"stack {name!r}: dimension {d.label or d.index} has unit {d.unit!r}, not a length; skipped")
            return
    if any(d.unit == "" for d in spatial):
        rec.notes.append(f"stack {name!r}: no SI unit on its spatial dimensions; lengths read as metres")
    if how != "labels":
        rec.notes.append(f"stack {name!r}: axes {''.join(d.axis or '?' for d in big)} (fastest first) from its "
                         f"{'name' if how == 'name' else 'dimension order (Imspector x, y, z, t: assumed)'}")
    # array axis of file dimension i is rank - 1 - i
    by_axis = {str(d.axis): d for d in spatial}
    singles = {str(d.axis): d for d in dims if d.size == 1 and d.axis in ("x", "y", "z")}
    order = "zyx" if len(spatial) == 3 else {"xy": "yx", "xz": "zx", "yz": "zy"}["".join(sorted(by_axis))]
    squeeze = tuple(rank - 1 - d.index for d in dims if d.size == 1)
    arr = np.squeeze(data, axis=squeeze) if squeeze else data
    kept = [d for d in sorted(dims, key=lambda d: -d.index) if d.size > 1]  # array order after squeezing
    arr = np.transpose(arr, [kept.index(by_axis[a]) for a in order])
    start: dict[str, float] = {}
    step: dict[str, float] = {}
    prov: dict[str, Provenance] = {}
    for a in order:
        d = by_axis[a]
        s0, ds = _coords(d)
        flag_value, flag = (flags.z_step_um, _FLAG_Z) if a == "z" else (flags.pixel_um, _FLAG_PIXEL)
        if ds < 0:  # stored from high to low coordinate: flip so that coordinates increase
            arr = np.flip(arr, axis=order.index(a))
            s0, ds = s0 + ds * (d.size - 1), -ds
            rec.notes.append(f"stack {name!r}: dimension {d.label or d.index} has a negative length; flipped")
        if flag_value is not None:
            ds = flag_value
            prov[a] = Provenance("flag", flag)
        elif ds > 0:
            prov[a] = Provenance("file", f"OBF stack {name!r} dimension {d.label or d.index}: length "
                                         f"{d.length_m:g} m over {d.size} px")
        else:
            raise RecordingError(f"{p}: expected a physical length for dimension {d.label or d.index} of stack "
                                 f"{name!r}, found {d.length_m!r} m; pass {flag}")
        start[a], step[a] = s0, ds
    centre: dict[str, float] = {}
    for a in "xyz":
        if a in by_axis:
            n = by_axis[a].size
            centre[a] = start[a] + (n // 2) * step[a]
        elif a in singles:
            centre[a] = _coords(singles[a])[0]
        else:
            centre[a] = 0.0
    centre_prov = Provenance("file", f"OBF stack {name!r} offsets (pixel [n // 2]; the plane's position from its "
                                     f"one-pixel dimension)")
    if len(spatial) == 3:
        z_um = start["z"] + np.arange(by_axis["z"].size) * step["z"]
        rec.stacks.append(ZStack(data=np.asarray(arr, dtype=float), pixel_x_um=step["x"], pixel_y_um=step["y"],
                                 z_um=z_um, channel=channel, units="counts",
                                 provenance={"pixel_x_um": prov["x"], "pixel_y_um": prov["y"], "z_um": prov["z"]},
                                 name=name))
        return
    plane = "".join(sorted(by_axis))  # "xy", "xz" or "yz"
    image = np.asarray(arr, dtype=float)
    rows, cols = order[0], order[1]
    if plane == "xy":
        overview, why = _is_overview(name, image, (step["y"], step["x"]))
        if overview:
            rec.images.append(Image2D(image, (step["y"], step["x"]), kind="overview", channel=channel, name=name))
            rec.notes.append(f"stack {name!r}: an overview ({why})")
            return
    scan = SectionScan(plane=cast(Literal["xy", "xz", "yz"], plane), image=image, pixel_um=(step[rows], step[cols]),
                       centre_um=(centre["x"], centre["y"], centre["z"]), channel=channel, units="counts",
                       provenance={"pixel_um": _join_prov(prov[rows], prov[cols]), "centre_um": centre_prov},
                       name=name)
    sets = groups.setdefault(channel, [])
    target = next((s for s in sets if getattr(s, plane) is None), None)
    if target is None:
        target = SectionScans(channel=channel, name=f"{channel or 'scans'} {len(sets) + 1}")
        sets.append(target)
    setattr(target, plane, scan)


def _join_prov(a: Provenance, b: Provenance) -> Provenance:
    if a == b:
        return a
    if a.source == b.source:
        return Provenance(a.source, f"rows: {a.detail}; columns: {b.detail}")
    return Provenance("flag" if "flag" in (a.source, b.source) else a.source, f"rows: {a}; columns: {b}")


def _is_overview(name: str, image: np.ndarray, pixel_um: tuple[float, float]) -> tuple[bool, str]:
    if _OVERVIEW.search(name):
        return True, "its name says so"
    n = _count_beads(image, pixel_um)
    if n >= 2:
        return True, f"{n} separate beads in the scan"
    return False, ""


def _count_beads(image: np.ndarray, pixel_um: tuple[float, float]) -> int:
    """Separate bright objects in an xy scan: smoothed by 0.1 µm, above half way from the
    background (the smoothed image's 10th percentile) to the peak, closed by 0.1 µm (lobes of one
    aberrated PSF merge), at least 50 x 50 nm; none when the smoothed peak (away from the border)
    is within 10 sigmas of the smoothed noise (from neighbouring pixels' differences) of the
    background."""
    from scipy import ndimage

    py, px = (max(float(v), 1e-6) for v in pixel_um)
    img = np.asarray(image, dtype=float)
    if min(img.shape) < 8:
        return 0
    sy, sx = 0.1 / py, 0.1 / px
    smooth = ndimage.gaussian_filter(img, (sy, sx))
    bg = float(np.percentile(smooth, 10))
    diff = np.diff(img, axis=1)
    raw_noise = math.sqrt(0.5 * float(np.mean(diff**2)))  # white noise per pixel (signal only adds to it)
    noise = raw_noise / (2.0 * math.sqrt(math.pi * max(sy, 0.5) * max(sx, 0.5)))  # after the filter
    ry, rx = max(1, round(sy)), max(1, round(sx))
    interior = smooth[ry:-ry, rx:-rx] if min(img.shape[0] - 2 * ry, img.shape[1] - 2 * rx) > 0 else smooth
    peak = float(interior.max())  # the border band is left out: reflected noise is stronger there
    if not peak > bg + 10.0 * noise:  # nothing stands out of the noise: no beads
        return 0
    mask = smooth > bg + 0.5 * (peak - bg)
    yy, xx = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disc = (yy / ry) ** 2 + (xx / rx) ** 2 <= 1.0
    mask = ndimage.binary_closing(np.pad(mask, ((ry, ry), (rx, rx))), structure=disc)[ry:-ry, rx:-rx]
    labels, count = ndimage.label(mask)
    if count == 0:
        return 0
    areas = np.asarray(ndimage.sum(mask, labels, np.arange(1, count + 1)))
    return int(np.sum(areas >= (0.05 / py) * (0.05 / px)))


# ----------------------------------------------------------------------------- bead-walk HDF5
def _read_hdf5(p: Path, flags: _Flags) -> Recording:
    import h5py

    try:
        f = h5py.File(p, "r")
    except OSError as exc:
        raise RecordingError(f"{p}: expected a readable HDF5 file, found one HDF5 cannot open ({exc}); corrupt, "
                             f"truncated or being written") from exc
    with f:
        fmt = _text(f.attrs.get("format"))
        layout = _text(f.attrs.get("layout"))
        keys = sorted(f.keys())
        if fmt.startswith("autoalign-psf-"):
            raise RecordingError(f"{p}: expected a recording, found an autoalign training data set (format {fmt!r}: "
                                 f"simulated ortho-sections); open it with autoalign.simulation.dataset.open_dataset")
        if fmt != BEADWALK_FORMAT and not (not fmt and layout == BEADWALK_LEGACY_LAYOUT):
            found = f"format {fmt!r}" if fmt else "no 'format' attribute"
            raise RecordingError(f"{p}: expected an autoalign bead-walk file (attribute 'format' = {BEADWALK_FORMAT!r} "
                                 f"with datasets 'stack', 'round', 'focus_um'), found {found} and datasets {keys[:8]}")
        version = int(f.attrs.get("format_version", 1)) if fmt else 1
        if version > BEADWALK_FORMAT_VERSION:
            raise RecordingError(f"{p}: expected bead-walk format version <= {BEADWALK_FORMAT_VERSION}, found "
                                 f"version {version}; a newer autoalign wrote it")
        for key in ("stack", "round", "focus_um"):
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise RecordingError(f"{p}: expected dataset {key!r} of the bead-walk layout, found datasets {keys[:8]}")
        stack_ds = f["stack"]
        if stack_ds.ndim != 4:
            raise RecordingError(f"{p}: expected dataset 'stack' of shape (N, nz, ny, nx), found {stack_ds.shape}")
        settings = _beadwalk_settings(p, f)
        px, prov_px = _settings_size(p, settings, ("camera", "pixel_size_um"), flags.pixel_um, _FLAG_PIXEL)
        dz, prov_z = _settings_size(p, settings, ("stack", "z_step_um"), flags.z_step_um, _FLAG_Z)
        if prov_z.source == "file":
            prov_z = Provenance("file", "HDF5 dataset 'focus_um' (mean focus of each stack) and attribute "
                                        "'settings_yaml' stack.z_step_um")
        rounds = np.asarray(f["round"][()]).astype(int)
        n = int(rounds.shape[0])
        focus = np.asarray(f["focus_um"][()], dtype=float)
        if stack_ds.shape[0] < n or focus.shape[0] < n:
            raise RecordingError(f"{p}: expected {n} rows (dataset 'round') in 'stack' and 'focus_um', found "
                                 f"{stack_ds.shape[0]} and {focus.shape[0]}")
        rec = Recording(path=str(p), format="hdf5")
        rec.metadata.update({"hdf5_format": fmt or BEADWALK_LEGACY_LAYOUT, "format_version": version, "rounds": n,
                             "created": _text(f.attrs.get("created"))})
        nz = int(stack_ds.shape[1])
        k = np.arange(nz) - (nz - 1) / 2.0
        for i in range(n):
            try:
                data = np.asarray(stack_ds[i], dtype=float)
            except OSError as exc:
                raise RecordingError(f"{p}: expected readable data in dataset 'stack' row {i}, found an error ({exc})") from exc
            rec.stacks.append(ZStack(
                data=data, pixel_x_um=px, pixel_y_um=px, z_um=float(focus[i]) + k * dz, channel="", units="adu",
                provenance={"pixel_x_um": prov_px, "pixel_y_um": prov_px, "z_um": prov_z}, name=f"round {rounds[i]}"))
        extra = int(stack_ds.shape[0]) - n
        if extra:
            rec.notes.append(f"{extra} row(s) past dataset 'round' belong to an unfinished round; ignored")
        rec.notes.append("bead-walk file: one centred stack per round, ADU; focus positions rebuilt as "
                         "focus_um + (k - (nz - 1) / 2) * z step")
    return rec


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _beadwalk_settings(p: Path, f: Any) -> dict[str, Any]:
    import yaml

    text = _text(f.attrs.get("settings_yaml"))
    if not text:
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecordingError(f"{p}: expected readable YAML in attribute 'settings_yaml', found a YAML error ({exc})") from exc
    return loaded if isinstance(loaded, dict) else {}


def _settings_size(p: Path, settings: dict[str, Any], key: tuple[str, str], flag_value: float | None,
                   flag: str) -> tuple[float, Provenance]:
    if flag_value is not None:
        return flag_value, Provenance("flag", flag)
    section = settings.get(key[0])
    value = section.get(key[1]) if isinstance(section, dict) else None
    try:
        v = float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        v = math.nan
    if not (v > 0 and math.isfinite(v)):
        raise RecordingError(f"{p}: expected key {'.'.join(key)} in attribute 'settings_yaml', found "
                             f"{'no such key' if value is None else repr(value)}; pass {flag}")
    return v, Provenance("file", f"HDF5 attribute 'settings_yaml' {'.'.join(key)}")


# ----------------------------------------------------------------------------- replay backend
class RecordedScanner(SectionScanner):
    """A :class:`~autoalign.hardware.base.SectionScanner` that replays the section scans of a
    recorded file (any format :func:`read_recording` reads): each :meth:`scan_sections` call
    returns the channel's next recorded set (a copy), in file order, starting over after the last
    when ``repeat`` (else :class:`DeviceError`). ``pixel_um`` / ``z_step_um`` as for
    :func:`read_recording`."""

    def __init__(self, path: str | Path, name: str = "recorded scanner", *, repeat: bool = True,
                 pixel_um: float | None = None, z_step_um: float | None = None) -> None:
        super().__init__(name)
        self.path = Path(path)
        self.repeat = bool(repeat)
        self._pixel_um = pixel_um
        self._z_step_um = z_step_um
        self._recording: Recording | None = None
        self._next: dict[str, int] = {}

    @property
    def recording(self) -> Recording:
        """The file's :class:`~autoalign.recording.Recording` (while open)."""
        self._require_open()
        assert self._recording is not None
        return self._recording

    def _open(self) -> None:
        try:
            rec = read_recording(self.path, pixel_um=self._pixel_um, z_step_um=self._z_step_um)
        except RecordingError as exc:
            raise DeviceError(f"{self.name}: {exc}") from exc
        if not rec.scans:
            raise DeviceError(f"{self.name}: {self.path} holds no section scans (found {len(rec.stacks)} z-stack(s), "
                              f"{len(rec.images)} image(s))")
        self._recording = rec
        self._next = {}

    def _close(self) -> None:
        self._recording = None

    def channels(self) -> list[str]:
        return _unique([s.channel for s in self.recording.scans])

    def scan_sections(self, channel: str | None = None) -> SectionScans:
        names = self.channels()
        if channel is None:
            channel = names[0]
        if channel not in names:
            raise ValueError(f"{self.name}: channel {channel!r} not recorded in {self.path}; channels {names}")
        sets = [s for s in self.recording.scans if s.channel == channel]
        i = self._next.get(channel, 0)
        if i >= len(sets):
            if not self.repeat:
                raise DeviceError(f"{self.name}: all {len(sets)} recorded set(s) of channel {channel!r} replayed")
            i = 0
        self._next[channel] = i + 1
        return copy.deepcopy(sets[i])


def _unique(items: Sequence[str]) -> list[str]:
    out: list[str] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out
