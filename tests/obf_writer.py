"""A minimal writer of Imspector OBF / MSR files, for TESTS ONLY (obffile 2026.2.20 cannot write).

Specification followed: the OBF format of the Imspector documentation, "File Formats"
(https://imspectordocs.readthedocs.io/en/latest/fileformat.html): file header ``OMAS_BF\\n\\xff\\xff``
of file format version 2 (with the file-level tag dictionary), stacks ``OMAS_BF_STACK\\n\\xff\\xff``
of stack format version 6 with the version-1 to version-6 footer. The byte layout was taken from
what obffile 2026.2.20 parses (``ObfFileHeader``, ``ObfStackHeader``, ``ObfStackFooter``: the
reader the project uses) and agrees with the msr-reader package's reader of the same page;
little-endian throughout, all 15 dimension slots written, unused ones zero.

Written: the stack chain (``next_stack_pos``), per stack its rank, pixels, lengths and offsets in
metres per dimension (dimension 0 = fastest = the array's last axis), the data type, optional
zlib compression, name and description, and in the footer the SI units (metres for lengths, or
seconds), the dimension labels, an optional legacy metadata string and the stack tag dictionary.
Not written: column positions / labels, flush points, chunked storage.
"""
from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_DIMS = 15
FILE_MAGIC = b"OMAS_BF\n\xff\xff"
STACK_MAGIC = b"OMAS_BF_STACK\n\xff\xff"
FILE_FORMAT_VERSION = 2
STACK_FORMAT_VERSION = 6
_STACK_HEADER = struct.Struct("<16s17I30d5I3Q")   # magic, version, rank, res[15], len[15], off[15], dt, ...
_SI = struct.Struct("<18id")                       # 9 (numerator, denominator) pairs + scale factor
_DTYPES = {np.dtype(np.uint8): 0x1, np.dtype(np.int8): 0x2, np.dtype(np.uint16): 0x4, np.dtype(np.int16): 0x8,
           np.dtype(np.uint32): 0x10, np.dtype(np.int32): 0x20, np.dtype(np.float32): 0x40,
           np.dtype(np.float64): 0x80, np.dtype(np.uint64): 0x1000, np.dtype(np.int64): 0x2000}
#: fixed footer size of stack version 6: v1 32 uint32, v2 16 SI units, v3 2 uint64, v4 1 uint64,
#: v5 uint64 + uint32, v6 3 uint64
FOOTER_SIZE = 32 * 4 + 16 * _SI.size + 16 + 8 + 12 + 24


@dataclass
class Stack:
    """One OBF stack. ``data``'s axes are the file's dimensions from slowest to fastest (numpy C
    order): ``data.shape == res[::-1]``; ``labels``, ``lengths_m``, ``offsets_m`` and ``units``
    are given per dimension from dimension 0 (the fastest, the array's last axis)."""

    name: str
    data: np.ndarray
    labels: Sequence[str] = ()
    lengths_m: Sequence[float] = ()
    offsets_m: Sequence[float] = ()
    units: Sequence[str] = ()            # "m", "s" or "" (no unit) per dimension; default "m"
    description: str = ""
    metadata: str = ""                   # the legacy metadata string
    tags: dict[str, str] = field(default_factory=dict)
    compress: bool = False


def _si(unit: str) -> bytes:
    pairs = [(0, 1)] * 9
    if unit == "m":
        pairs[0] = (1, 1)
    elif unit == "s":
        pairs[2] = (1, 1)
    elif unit:
        raise ValueError(f"unit {unit!r}: expected 'm', 's' or ''")
    flat = [v for pair in pairs for v in pair]
    return _SI.pack(*flat, 1.0)


def _strn(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<I", len(raw)) + raw


def _tag_dict(tags: dict[str, str]) -> bytes:
    out = b"".join(_strn(k) + _strn(v) for k, v in tags.items())
    return out + struct.pack("<I", 0)


def _stack_bytes(stack: Stack, position: int, is_last: bool) -> bytes:
    data = np.ascontiguousarray(stack.data)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    dt = _DTYPES.get(np.dtype(data.dtype.str.replace(">", "<")))
    if dt is None:
        raise ValueError(f"stack {stack.name!r}: dtype {data.dtype} has no OBF type")
    rank = data.ndim
    if not 1 <= rank <= MAX_DIMS:
        raise ValueError(f"stack {stack.name!r}: rank {rank}")
    res = list(data.shape[::-1])
    lengths = list(stack.lengths_m) or [float(n) for n in res]
    offsets = list(stack.offsets_m) or [0.0] * rank
    labels = list(stack.labels) or [""] * rank
    units = list(stack.units) or ["m"] * rank
    if not len(lengths) == len(offsets) == len(labels) == len(units) == rank:
        raise ValueError(f"stack {stack.name!r}: per-dimension lists must have {rank} entries")
    raw = data.tobytes()
    payload = zlib.compress(raw, 6) if stack.compress else raw
    name = stack.name.encode("utf-8")
    descr = stack.description.encode("utf-8")

    pad = lambda seq, fill: list(seq) + [fill] * (MAX_DIMS - len(seq))
    header = _STACK_HEADER.pack(
        STACK_MAGIC, STACK_FORMAT_VERSION, rank, *pad(res, 0), *pad(lengths, 0.0), *pad(offsets, 0.0),
        dt, 1 if stack.compress else 0, 6 if stack.compress else 0, len(name), len(descr),
        0, len(payload), 0,  # reserved, data_length, next_stack_pos (patched below)
    )
    meta = stack.metadata.encode("utf-8")
    tags = _tag_dict(stack.tags) if stack.tags else b""
    variable = b"".join(_strn(lbl) for lbl in labels) + meta + tags
    data_pos = position + len(header) + len(name) + len(descr)
    footer_pos = data_pos + len(payload)
    end = footer_pos + FOOTER_SIZE + len(variable)
    footer = struct.pack("<32I", FOOTER_SIZE, *([0] * 15), *([0] * 15), len(meta))     # v1: no col positions/labels
    footer += _si("") + b"".join(_si(u) for u in pad(units, ""))                      # v2: value unit, dimension units
    footer += struct.pack("<2Q", 0, 0)                                                 # v3: no flush points
    footer += struct.pack("<Q", len(tags))                                             # v4: tag dictionary length
    footer += struct.pack("<QI", end, 1)                                               # v5: stack end, min version
    footer += struct.pack("<3Q", end, 0, 0)                                            # v6: end used, all samples, no chunks
    assert len(footer) == FOOTER_SIZE
    next_pos = 0 if is_last else end
    header = header[:-8] + struct.pack("<Q", next_pos)
    return header + name + descr + payload + footer + variable


def write_obf(path: str | Path, stacks: Sequence[Stack], description: str = "",
              file_tags: dict[str, str] | None = None) -> Path:
    """Write ``stacks`` to ``path`` (``.obf`` or ``.msr``: the same bytes)."""
    path = Path(path)
    descr = description.encode("utf-8")
    tags = _tag_dict(file_tags or {})
    head_len = 10 + 4 + 8 + 4 + len(descr) + 8
    meta_pos = head_len
    first = head_len + len(tags) if stacks else 0
    out = bytearray(FILE_MAGIC + struct.pack("<IQI", FILE_FORMAT_VERSION, first, len(descr)) + descr
                    + struct.pack("<Q", meta_pos) + tags)
    for i, stack in enumerate(stacks):
        out += _stack_bytes(stack, len(out), i == len(stacks) - 1)
    path.write_bytes(bytes(out))
    return path


def imspector_stack(name: str, image: np.ndarray, plane: str, pixel_m: float, centre_m: tuple[float, float, float],
                    dtype: type = np.uint16, labels: tuple[str, str, str, str] = ("ExpControl X", "ExpControl Y",
                                                                                   "ExpControl Z", "Time"),
                    compress: bool = False) -> Stack:
    """A 2-D or 3-D scan stored as Imspector does: four dimensions x, y, z, t (fastest first), the
    ones not scanned of one pixel at the plane's position; ``image`` as xy[y, x], xz[z, x], yz[z, y]
    or a stack [z, y, x]; pixel ``[n // 2]`` of every scanned axis at ``centre_m`` (x, y, z)."""
    image = np.asarray(image)
    axes = {"xy": "yx", "xz": "zx", "yz": "zy", "xyz": "zyx"}[plane]
    sizes = {a: 1 for a in "xyzt"}
    for a, n in zip(axes, image.shape):
        sizes[a] = int(n)
    # array order (t, z, y, x): slowest first
    arr = image.transpose([axes.index(a) for a in "zyx" if a in axes])
    arr = arr.reshape(1, sizes["z"], sizes["y"], sizes["x"]).astype(dtype)
    lengths, offsets = [], []
    for i, a in enumerate("xyz"):
        n = sizes[a]
        step = pixel_m if n > 1 else 0.0
        lengths.append(n * step if n > 1 else 0.0)
        offsets.append(centre_m[i] - (n // 2) * step)
    lengths.append(0.0)
    offsets.append(0.0)
    return Stack(name=name, data=arr, labels=labels, lengths_m=lengths, offsets_m=offsets, units=("m", "m", "m", "s"),
                 compress=compress, tags={"imspector": "<root><doc/></root>"})
