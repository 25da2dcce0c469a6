"""Phase (radians) to SLM grey levels, in one place: pure numpy, no device, no Qt.

The phase convention (slmsuite style): phases are float radians until the device edge.
``SLM.show(phase_rad)`` takes a square ``m x m`` float array on the *pupil grid* of
:mod:`simulation.phase` (any ``m``): it spans the pupil diameter, pupil coordinates ``u`` (x) and
``v`` (y) in pupil radii, cell centres at ``-1 + (i + 0.5) * 2 / m``, indexed ``[v, u]``.

:class:`PhaseToGrey` maps that grid onto the SLM's pixels, the only place where this happens:

1. Geometry. SLM pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``; its centre is
   ``(col + 0.5, row + 0.5)`` in SLM pixel coordinates (so ``pupil_centre_px = (960, 576)`` is the
   exact centre of a 1920 x 1152 SLM). Its pupil coordinates are
   ``u = sx (col + 0.5 - cx) / R``, ``v = sy (row + 0.5 - cy) / R`` with ``(cx, cy) =
   slm.pupil_centre_px`` (full-SLM coordinates, also with a split screen), ``R =
   slm.pupil_radius_px`` and ``sx = -1`` when ``slm.flip_x`` (``sy`` likewise), else ``+1``.
   Pixels whose centre has ``u^2 + v^2 <= 1`` take the value of the grid cell containing
   ``(u, v)`` (nearest neighbour: a vortex's 2 pi step is never interpolated). With
   ``slm.pupil_margin`` = g > 0 the pattern reaches out to ``(1 + g) R``: pixels in that ring take
   the value at the pupil's edge in their direction (radius clamped to ``1 - sqrt(2)/m``), so the
   vortex stays exact there and the correction is continued flat, and a beam misregistered (or a
   pattern shifted) by up to g pupil radii is never cut by the pattern's edge. All other pixels
   get phase 0. ``shift`` (:meth:`PhaseToGrey.levels`) moves the whole pattern, sub-pixel.
2. Split screen (``slm.split_screen``): this beam owns the ``split_half`` ("left": columns
   ``[0, W // 2)``, "right": ``[W // 2, W)``); the pupil is clipped to it and the other half is
   left at phase 0 (only the flatness correction), for the other beam's own settings.
3. Grey levels, with ``G = slm.grey_level_2pi`` (the grey level giving 2 pi at the wavelength):
   ``level = round(mod(phase, 2 pi) * G / (2 pi)) mod G``, then
   ``level = (level + flatness) mod G`` with the optional flatness correction (grey levels,
   SLM-sized, from ``slm.flatness_file``), then the optional lookup table
   ``grey = lut[level]`` (``slm.lut_file``, 256 entries), else ``grey = level``; ``uint8`` out.

:meth:`PhaseToGrey.decode` inverts 3 (inverse LUT, minus flatness, to ``[0, 2 pi)``) and samples
the SLM image at pupil coordinates, optionally misregistered; the simulated SLM/microscope use it.

Backends sharing the converter: :class:`QtSLMWindow` (a frameless full-screen PyQt5 window on a
chosen screen), :class:`SlmPyAdapter` (``slmpy`` from the wavefrontshaping project) and
``hardware.simulated.SimulatedSLM``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from autoalign.hardware.base import SLMInputError
from autoalign.settings import Settings, SLMSettings
from autoalign.simulation.phase import pupil_grid

log = logging.getLogger(__name__)

TWO_PI = 2.0 * math.pi
MAX_ABS_PHASE_RAD = 1.0e4
#: the largest displacement of the whole pupil pattern (pupil radii) :meth:`PhaseToGrey.levels` draws
MAX_PUPIL_SHIFT = 0.5
"""Phases beyond this magnitude (radians) are refused as absurd (a unit or scaling mistake)."""

__all__ = ["MAX_ABS_PHASE_RAD", "TWO_PI", "SLMConfigError", "PhaseToGrey", "load_flatness", "load_lut"]


class SLMConfigError(ValueError):
    """SLM settings or calibration files that cannot be used (the message names key/file/value)."""


# ============================================================================ calibration files
def _resolve(path: str | Path, base_dir: str | Path | None) -> Path:
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        candidate = Path(base_dir) / p
        if candidate.exists() or not p.exists():
            return candidate
    return p


def load_flatness(
    path: str | Path, shape: tuple[int, int], base_dir: str | Path | None = None
) -> np.ndarray:
    """Flatness correction (grey levels, 0..255) of shape ``shape`` = (height, width) from a
    ``.npy`` array or an image (png, bmp, tif...; converted to 8-bit grey). Rounded to integers.
    Relative paths are looked up in ``base_dir`` (the settings file's folder) first."""
    p = _resolve(path, base_dir)
    key = "slm.flatness_file"
    if not p.is_file():
        raise SLMConfigError(f"{key} = '{path}': file not found ({p})")
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(p) as img:
                arr = np.asarray(img.convert("L") if img.mode not in ("L", "I", "I;16", "F") else img)
    except Exception as exc:  # noqa: BLE001 - any reader error becomes a config error
        raise SLMConfigError(f"{key} = '{path}': cannot read {p} ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3].mean(axis=-1)
    if arr.shape != tuple(shape):
        raise SLMConfigError(
            f"{key} = '{path}': shape {arr.shape} does not match the SLM (height, width) = {tuple(shape)}"
        )
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise SLMConfigError(f"{key} = '{path}': expected real numbers, found dtype {arr.dtype}")
    arr = arr.astype(float)
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 255:
        raise SLMConfigError(f"{key} = '{path}': expected finite grey levels in 0..255 "
                             f"(found {np.nanmin(arr):g}..{np.nanmax(arr):g})")
    return np.rint(arr).astype(np.int64)


def load_lut(path: str | Path, base_dir: str | Path | None = None) -> np.ndarray:
    """256-entry lookup table (linear level -> grey level sent to the SLM) from ``.npy``, ``.txt``
    or ``.csv`` (one value per line, or two columns ``level, grey`` of which the last is used).
    Entries must be integers 0..255."""
    p = _resolve(path, base_dir)
    key = "slm.lut_file"
    if not p.is_file():
        raise SLMConfigError(f"{key} = '{path}': file not found ({p})")
    try:
        if p.suffix.lower() == ".npy":
            arr = np.load(p, allow_pickle=False)
        elif p.suffix.lower() in (".txt", ".csv", ".lut", ".dat"):
            text = p.read_text(encoding="utf-8")
            delimiter = "," if "," in text else None
            arr = np.loadtxt(p, delimiter=delimiter, comments="#", ndmin=1)
        else:
            raise SLMConfigError(f"{key} = '{path}': unsupported extension '{p.suffix}' (use .npy, .txt or .csv)")
    except SLMConfigError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SLMConfigError(f"{key} = '{path}': cannot read {p} ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(arr, dtype=float)
    if arr.ndim == 2:
        arr = arr[:, -1]
    if arr.ndim != 1 or arr.size != 256:
        raise SLMConfigError(f"{key} = '{path}': expected 256 entries, found shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr != np.rint(arr)) or arr.min() < 0 or arr.max() > 255:
        raise SLMConfigError(f"{key} = '{path}': expected integer grey levels in 0..255")
    return arr.astype(np.uint8)


# ============================================================================ the converter
class PhaseToGrey:
    """Pupil phase (radians, ``m x m`` pupil grid) to the SLM's 8-bit grey image, and back.

    Parameters (pixels are SLM pixels; see the module docstring for the conventions)
    ----------
    width_px, height_px : SLM resolution
    pupil_centre_px : (x, y) of the pupil centre in full-SLM pixel coordinates
    pupil_radius_px : pupil radius imaged onto the SLM
    grey_level_2pi : grey level giving a 2 pi phase (1..255)
    flip_x, flip_y : the SLM image is mirrored relative to the pupil along x / y
    split_screen, split_half : this beam owns the left or right half of the SLM
    flatness : optional (height, width) grey-level flatness correction
    lut : optional 256-entry lookup table (linear level -> grey)
    max_abs_phase_rad : refuse phases of larger magnitude
    name : device name used in error messages
    """

    def __init__(
        self,
        width_px: int,
        height_px: int,
        pupil_centre_px: Sequence[float],
        pupil_radius_px: float,
        grey_level_2pi: int = 255,
        flip_x: bool = False,
        flip_y: bool = False,
        split_screen: bool = False,
        split_half: Literal["left", "right"] = "left",
        flatness: np.ndarray | None = None,
        lut: np.ndarray | None = None,
        max_abs_phase_rad: float = MAX_ABS_PHASE_RAD,
        name: str = "SLM",
        pupil_margin: float = 0.0,
    ) -> None:
        self.name = name
        if not (math.isfinite(pupil_margin) and 0.0 <= pupil_margin <= 1.0):
            raise SLMConfigError(f"{name}: slm.pupil_margin = {pupil_margin!r}: expected 0..1 (pupil radii)")
        self.pupil_margin = float(pupil_margin)
        if int(width_px) != width_px or int(height_px) != height_px or width_px < 1 or height_px < 1:
            raise SLMConfigError(f"{name}: SLM size {width_px} x {height_px} px: expected positive integers")
        self.width_px = int(width_px)
        self.height_px = int(height_px)
        cx, cy = (float(c) for c in pupil_centre_px)
        if not (math.isfinite(cx) and math.isfinite(cy)):
            raise SLMConfigError(f"{name}: slm.pupil_centre_px = {list(pupil_centre_px)}: expected finite numbers")
        self.pupil_centre_px = (cx, cy)
        if not (math.isfinite(pupil_radius_px) and pupil_radius_px > 0):
            raise SLMConfigError(f"{name}: slm.pupil_radius_px = {pupil_radius_px!r}: expected > 0")
        self.pupil_radius_px = float(pupil_radius_px)
        if int(grey_level_2pi) != grey_level_2pi or not 1 <= grey_level_2pi <= 255:
            raise SLMConfigError(f"{name}: slm.grey_level_2pi = {grey_level_2pi!r}: expected an integer 1..255")
        self.grey_level_2pi = int(grey_level_2pi)
        self.flip_x = bool(flip_x)
        self.flip_y = bool(flip_y)
        self.split_screen = bool(split_screen)
        if split_half not in ("left", "right"):
            raise SLMConfigError(f"{name}: slm.split_half = {split_half!r}: expected 'left' or 'right'")
        self.split_half = split_half
        self.max_abs_phase_rad = float(max_abs_phase_rad)
        if self.split_screen:
            half = self.width_px // 2
            self.columns = (0, half) if split_half == "left" else (half, self.width_px)
        else:
            self.columns = (0, self.width_px)
        x0, x1 = self.columns
        if not (x0 <= cx <= x1 and 0 <= cy <= self.height_px):
            raise SLMConfigError(
                f"{name}: slm.pupil_centre_px = [{cx:g}, {cy:g}] lies outside this beam's region "
                f"(columns {x0}..{x1}, rows 0..{self.height_px}"
                f"{', ' + split_half + ' half of a split screen' if self.split_screen else ''})"
            )
        r = self.pupil_radius_px
        if cx - r < x0 or cx + r > x1 or cy - r < 0 or cy + r > self.height_px:
            log.warning("%s: the pupil (centre [%g, %g] px, radius %g px) is clipped by its region "
                        "(columns %d..%d, rows 0..%d)", name, cx, cy, r, x0, x1, self.height_px)
        if flatness is not None:
            flatness = np.asarray(flatness)
            if flatness.shape != self.shape:
                raise SLMConfigError(f"{name}: flatness correction of shape {flatness.shape}: expected {self.shape}")
            flatness = np.rint(flatness).astype(np.int64) % self.grey_level_2pi
        self.flatness = flatness
        if lut is not None:
            lut = np.asarray(lut)
            if lut.shape != (256,) or lut.min() < 0 or lut.max() > 255:
                raise SLMConfigError(f"{name}: LUT of shape {lut.shape}: expected 256 grey levels 0..255")
            lut = lut.astype(np.uint8)
        self.lut = lut
        self._inverse_lut = self._make_inverse_lut()
        self._maps: dict[tuple[int, float, float], tuple[np.ndarray, np.ndarray]] = {}
        self._pixels = self._pupil_pixels()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_settings(
        cls, settings: "Settings | SLMSettings", base_dir: str | Path | None = None, name: str = "SLM"
    ) -> "PhaseToGrey":
        """Build from ``settings.slm`` (or the ``SLMSettings`` section itself), loading the
        flatness and LUT files (relative paths: from ``base_dir``, default the settings file's
        folder, then the working directory)."""
        slm = getattr(settings, "slm", settings)
        if base_dir is None:
            source = getattr(settings, "source", None)
            if source and not str(source).startswith("<"):
                base_dir = Path(source).resolve().parent
        shape = (int(slm.height_px), int(slm.width_px))
        flatness = load_flatness(slm.flatness_file, shape, base_dir) if slm.flatness_file else None
        lut = load_lut(slm.lut_file, base_dir) if slm.lut_file else None
        return cls(
            width_px=slm.width_px,
            height_px=slm.height_px,
            pupil_centre_px=slm.pupil_centre_px,
            pupil_radius_px=slm.pupil_radius_px,
            grey_level_2pi=slm.grey_level_2pi,
            flip_x=slm.flip_x,
            flip_y=slm.flip_y,
            split_screen=slm.split_screen,
            split_half=slm.split_half,
            flatness=flatness,
            lut=lut,
            name=name,
            pupil_margin=float(getattr(slm, "pupil_margin", 0.0)),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the SLM in pixels."""
        return (self.height_px, self.width_px)

    @property
    def pupil_samples(self) -> int:
        """A good pupil-grid size ``m`` for :meth:`encode`: about one cell per SLM pixel across the
        pupil diameter, at most 256 (finer grids add nothing visible and cost time)."""
        return int(max(2, min(256, 2 * math.ceil(self.pupil_radius_px))))

    def _make_inverse_lut(self) -> np.ndarray:
        """grey (0..255) -> linear level (0..G-1): the level whose LUT entry is nearest."""
        g = self.grey_level_2pi
        if self.lut is None:
            return (np.arange(256) % g).astype(np.int64)
        levels = self.lut[:g].astype(float)
        grey = np.arange(256, dtype=float)
        return np.argmin(np.abs(grey[:, None] - levels[None, :]), axis=1).astype(np.int64)

    def _pupil_pixels(self, shift: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat indices of the SLM pixels inside the pupil (and in this beam's region) with their
        pupil coordinates (u, v); ``shift`` (pupil radii, in u and v) moves the whole pupil disc
        on the SLM (see :meth:`levels`)."""
        sx = -1.0 if self.flip_x else 1.0
        sy = -1.0 if self.flip_y else 1.0
        r = self.pupil_radius_px
        cx = self.pupil_centre_px[0] + sx * r * float(shift[0])
        cy = self.pupil_centre_px[1] + sy * r * float(shift[1])
        x0, x1 = self.columns
        reach = r * (1.0 + self.pupil_margin)
        c0, c1 = max(x0, int(math.floor(cx - reach)) - 1), min(x1, int(math.ceil(cx + reach)) + 1)
        r0, r1 = max(0, int(math.floor(cy - reach)) - 1), min(self.height_px, int(math.ceil(cy + reach)) + 1)
        if c1 <= c0 or r1 <= r0:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        cols = np.arange(c0, c1)
        rows = np.arange(r0, r1)
        u = (cols + 0.5 - cx) / r * sx
        v = (rows + 0.5 - cy) / r * sy
        uu, vv = np.meshgrid(u, v, indexing="xy")
        inside = uu * uu + vv * vv <= (1.0 + self.pupil_margin) ** 2
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        flat = (rr * self.width_px + cc)[inside]
        return flat.astype(np.int64), uu[inside], vv[inside]

    def _geometry(self, m: int, shift: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
        """(flat SLM indices of the pupil pixels, the flat grid cell of each) for a grid of size
        m and a pupil shift (cached: the unshifted pupil, and the last few shifts)."""
        key = (int(m), round(float(shift[0]), 12), round(float(shift[1]), 12))
        hit = self._maps.get(key)
        if hit is None:
            flat, u, v = self._pixels if key[1:] == (0.0, 0.0) else self._pupil_pixels(key[1:])
            if self.pupil_margin > 0:
                # the margin ring takes the pupil's edge value in its direction: radii clamped to
                # 1 - sqrt(2)/m, where the containing cell's centre is still inside the pupil
                rho = np.hypot(u, v)
                scale = np.minimum(1.0, (1.0 - math.sqrt(2.0) / m) / np.maximum(rho, 1e-12))
                u, v = u * scale, v * scale
            iu = np.clip(np.floor((u + 1.0) * (m / 2.0)).astype(np.int64), 0, m - 1)
            iv = np.clip(np.floor((v + 1.0) * (m / 2.0)).astype(np.int64), 0, m - 1)
            hit = (flat, iv * m + iu)
            if len(self._maps) > 8:
                self._maps.clear()
            self._maps[key] = hit
        return hit

    def check_shift(self, shift: Sequence[float]) -> tuple[float, float]:
        """``shift`` as two finite floats within +-:data:`MAX_PUPIL_SHIFT` pupil radii, else
        :class:`SLMInputError`."""
        try:
            ox, oy = (float(a) for a in shift)
        except (TypeError, ValueError) as exc:
            raise SLMInputError(f"{self.name}: pupil shift {shift!r}: expected two numbers (pupil radii)") from exc
        if not (math.isfinite(ox) and math.isfinite(oy)) or math.hypot(ox, oy) > MAX_PUPIL_SHIFT:
            raise SLMInputError(f"{self.name}: pupil shift ({ox:g}, {oy:g}) pupil radii: expected finite and "
                                f"within {MAX_PUPIL_SHIFT} of the centre; nothing shown")
        return ox, oy

    # ------------------------------------------------------------------ phase -> grey
    def validate(self, phase_rad: Any) -> np.ndarray:
        """Return the phase as a float64 ``(m, m)`` array or raise :class:`SLMInputError` saying
        why (not an array of real numbers, not 2-D square, NaN/inf, beyond the magnitude limit)."""
        try:
            arr = np.asarray(phase_rad)
        except Exception as exc:  # noqa: BLE001
            raise SLMInputError(f"{self.name}: phase is not an array ({type(exc).__name__}: {exc})") from exc
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise SLMInputError(f"{self.name}: phase must be real numbers (radians), got dtype {arr.dtype}")
        if np.iscomplexobj(arr):
            raise SLMInputError(f"{self.name}: phase must be real (radians), got complex dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[0] != arr.shape[1] or arr.shape[0] < 1:
            raise SLMInputError(
                f"{self.name}: phase of shape {arr.shape}: expected a square 2-D pupil grid (m, m)"
            )
        arr = arr.astype(np.float64, copy=False)
        finite = np.isfinite(arr)
        if not finite.all():
            raise SLMInputError(
                f"{self.name}: phase contains {int((~finite).sum())} NaN/inf value(s); nothing shown"
            )
        peak = float(np.abs(arr).max())
        if peak > self.max_abs_phase_rad:
            raise SLMInputError(
                f"{self.name}: |phase| reaches {peak:.3g} rad, beyond the limit of "
                f"{self.max_abs_phase_rad:.3g} rad (wrong units?); nothing shown"
            )
        return arr

    def levels(self, phase_rad: Any, shift: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
        """Linear grey levels (0..G-1, int64, SLM-sized) before the LUT, flatness included.

        ``shift`` ``(du, dv)`` (pupil radii, in the pupil frame u, v) draws the whole pupil (the
        disc and everything on the grid) displaced on the SLM by that much: the grid's centre
        lands on SLM pixel ``(cx + sx R du, cy + sy R dv)``, sub-pixel (each pixel takes the cell
        under its own centre). This is how a vortex-mask misregistration is corrected: moving
        the whole pattern, as ``slm.pupil_centre_px`` would, so the correction and the pupil edge
        move with the vortex."""
        arr = self.validate(phase_rad)
        shift = self.check_shift(shift)
        m = arr.shape[0]
        g = self.grey_level_2pi
        grid = np.rint(np.mod(arr, TWO_PI) * (g / TWO_PI)).astype(np.int64) % g
        out = np.zeros(self.height_px * self.width_px, dtype=np.int64)
        flat_idx, cells = self._geometry(m, shift)
        if flat_idx.size:
            out[flat_idx] = grid.ravel()[cells]
        out = out.reshape(self.shape)
        if self.flatness is not None:
            out = (out + self.flatness) % g
        return out

    def encode(self, phase_rad: Any, shift: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
        """The 8-bit grey image (height, width) for a pupil phase in radians, the pupil drawn
        displaced by ``shift`` pupil radii (:meth:`levels`).

        Raises :class:`SLMInputError` for invalid input (see :meth:`validate`, :meth:`check_shift`)."""
        lv = self.levels(phase_rad, shift)
        if self.lut is not None:
            return self.lut[lv]
        return lv.astype(np.uint8)

    def flat_image(self) -> np.ndarray:
        """The grey image of phase 0 everywhere (flatness and LUT only)."""
        return self.encode(np.zeros((1, 1)))

    # ------------------------------------------------------------------ grey -> phase
    def grey_to_phase(self, grey: np.ndarray) -> np.ndarray:
        """Per-pixel phase in ``[0, 2 pi)`` of grey values (inverse LUT, minus flatness when the
        array is SLM-sized)."""
        grey = np.asarray(grey)
        lv = self._inverse_lut[grey.astype(np.int64)]
        if self.flatness is not None and grey.shape == self.shape:
            lv = (lv - self.flatness) % self.grey_level_2pi
        return lv * (TWO_PI / self.grey_level_2pi)

    def decode_at(
        self, grey: np.ndarray, u: np.ndarray, v: np.ndarray, offset: Sequence[float] = (0.0, 0.0)
    ) -> np.ndarray:
        """Phase in ``[0, 2 pi)`` the SLM image ``grey`` puts at pupil coordinates ``(u, v)``
        (any shape; pupil radii), nearest SLM pixel.

        ``offset`` ``(ox, oy)`` (pupil radii) misregisters the SLM: the phase at pupil point
        ``(u, v)`` is the SLM's phase at ``(u - ox, v - oy)``, so a pattern shown centred appears
        centred at ``(ox, oy)`` (as ``mask_offset`` in :class:`simulation.vectorial.PSFSimulator`).
        Points that fall outside the SLM or this beam's region read phase 0."""
        grey = np.asarray(grey)
        if grey.shape != self.shape:
            raise SLMInputError(f"{self.name}: grey image of shape {grey.shape}: expected {self.shape}")
        u = np.asarray(u, dtype=float) - float(offset[0])
        v = np.asarray(v, dtype=float) - float(offset[1])
        cx, cy = self.pupil_centre_px
        r = self.pupil_radius_px
        x = cx + (-1.0 if self.flip_x else 1.0) * r * u
        y = cy + (-1.0 if self.flip_y else 1.0) * r * v
        col = np.floor(x).astype(np.int64)
        row = np.floor(y).astype(np.int64)
        x0, x1 = self.columns
        ok = (col >= x0) & (col < x1) & (row >= 0) & (row < self.height_px)
        lv = np.zeros(u.shape, dtype=np.int64)
        g = self.grey_level_2pi
        lv[ok] = self._inverse_lut[grey[row[ok], col[ok]].astype(np.int64)]
        if self.flatness is not None:
            lv[ok] = (lv[ok] - self.flatness[row[ok], col[ok]]) % g
        return lv * (TWO_PI / g)

    def decode(self, grey: np.ndarray, m: int, offset: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
        """Phase in ``[0, 2 pi)`` on the ``m x m`` pupil grid read back from a grey image (0 outside
        the pupil); ``offset`` as in :meth:`decode_at`. ``decode(encode(p), m)`` equals
        ``mod(p, 2 pi)`` within one grey step when cells span at least 2 SLM pixels."""
        u, v, inside = pupil_grid(m)
        return np.where(inside, self.decode_at(grey, u, v, offset), 0.0)
