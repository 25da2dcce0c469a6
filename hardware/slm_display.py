"""Phase (radians) to SLM grey levels, in one place, and the SLM display backends.

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
   ``(u, v)`` (nearest neighbour: a vortex's 2 pi step is never interpolated); all others get
   phase 0.
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

import abc
import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from autoalign.hardware.base import SLM, DeviceError, DeviceNotConnected, DeviceTimeout, SLMInputError

if TYPE_CHECKING:  # pragma: no cover
    from autoalign.settings import Settings, SLMSettings

log = logging.getLogger(__name__)

TWO_PI = 2.0 * math.pi
MAX_ABS_PHASE_RAD = 1.0e4
"""Phases beyond this magnitude (radians) are refused as absurd (a unit or scaling mistake)."""

__all__ = [
    "MAX_ABS_PHASE_RAD",
    "SLMConfigError",
    "PhaseToGrey",
    "load_flatness",
    "load_lut",
    "ConvertingSLM",
    "QtSLMWindow",
    "SlmPyAdapter",
]


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
    ) -> None:
        self.name = name
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
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
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

    def _pupil_pixels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat indices of the SLM pixels inside the pupil (and in this beam's region) with their
        pupil coordinates (u, v)."""
        cx, cy = self.pupil_centre_px
        r = self.pupil_radius_px
        x0, x1 = self.columns
        c0, c1 = max(x0, int(math.floor(cx - r)) - 1), min(x1, int(math.ceil(cx + r)) + 1)
        r0, r1 = max(0, int(math.floor(cy - r)) - 1), min(self.height_px, int(math.ceil(cy + r)) + 1)
        if c1 <= c0 or r1 <= r0:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
        cols = np.arange(c0, c1)
        rows = np.arange(r0, r1)
        u = (cols + 0.5 - cx) / r * (-1.0 if self.flip_x else 1.0)
        v = (rows + 0.5 - cy) / r * (-1.0 if self.flip_y else 1.0)
        uu, vv = np.meshgrid(u, v, indexing="xy")
        inside = uu * uu + vv * vv <= 1.0
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        flat = (rr * self.width_px + cc)[inside]
        return flat.astype(np.int64), uu[inside], vv[inside]

    def _cell_map(self, m: int) -> np.ndarray:
        """For a grid of size m: the flat grid cell of each pupil pixel (cached)."""
        cells = self._maps.get(m)
        if cells is None:
            _, u, v = self._pixels
            iu = np.clip(np.floor((u + 1.0) * (m / 2.0)).astype(np.int64), 0, m - 1)
            iv = np.clip(np.floor((v + 1.0) * (m / 2.0)).astype(np.int64), 0, m - 1)
            cells = iv * m + iu
            if len(self._maps) > 4:
                self._maps.clear()
            self._maps[m] = cells
        return cells

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

    def levels(self, phase_rad: Any) -> np.ndarray:
        """Linear grey levels (0..G-1, int64, SLM-sized) before the LUT, flatness included."""
        arr = self.validate(phase_rad)
        m = arr.shape[0]
        g = self.grey_level_2pi
        grid = np.rint(np.mod(arr, TWO_PI) * (g / TWO_PI)).astype(np.int64) % g
        out = np.zeros(self.height_px * self.width_px, dtype=np.int64)
        flat_idx = self._pixels[0]
        if flat_idx.size:
            out[flat_idx] = grid.ravel()[self._cell_map(m)]
        out = out.reshape(self.shape)
        if self.flatness is not None:
            out = (out + self.flatness) % g
        return out

    def encode(self, phase_rad: Any) -> np.ndarray:
        """The 8-bit grey image (height, width) for a pupil phase in radians.

        Raises :class:`SLMInputError` for invalid input (see :meth:`validate`)."""
        lv = self.levels(phase_rad)
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
        from autoalign.simulation.phase import pupil_grid

        u, v, inside = pupil_grid(m)
        return np.where(inside, self.decode_at(grey, u, v, offset), 0.0)


# ============================================================================ SLM devices
class ConvertingSLM(SLM):
    """Base of the SLM backends: validation and conversion by a :class:`PhaseToGrey`, last good
    image kept on refusal. Subclasses implement ``_open``, ``_close`` and ``_display(grey)``.

    ``show(phase)`` takes a square pupil-grid phase of any size (radians); :attr:`pupil_samples`
    is a good size. On open the SLM shows phase 0 (the flat image)."""

    def __init__(self, converter: PhaseToGrey, pixel_pitch_um: float, name: str) -> None:
        super().__init__(name)
        self.converter = converter
        converter.name = name
        self._pixel_pitch_um = float(pixel_pitch_um)
        self._grey: np.ndarray | None = None
        self._phase: np.ndarray | None = None
        self._lock = threading.RLock()
        self.frames_shown = 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.converter.shape

    @property
    def pixel_pitch_um(self) -> float:
        return self._pixel_pitch_um

    @property
    def pupil_samples(self) -> int:
        """Recommended pupil-grid size for :meth:`show` (see :attr:`PhaseToGrey.pupil_samples`)."""
        return self.converter.pupil_samples

    @property
    def phase_rad(self) -> np.ndarray:
        """The phase (radians, pupil grid) last shown successfully; zeros (1, 1) before any."""
        with self._lock:
            return np.zeros((1, 1)) if self._phase is None else self._phase.copy()

    @property
    def grey_image(self) -> np.ndarray | None:
        """The 8-bit image (height, width) on the SLM now, or ``None`` before the first frame."""
        with self._lock:
            return None if self._grey is None else self._grey.copy()

    def open(self) -> None:
        super().open()
        try:
            self.show(np.zeros((1, 1)))
        except Exception:
            self.close()
            raise

    def show(self, phase_rad: np.ndarray) -> None:
        """Convert and display a pupil phase (radians, ``(m, m)``). Invalid input raises
        :class:`SLMInputError`, a device failure :class:`DeviceError`; in both cases the previous
        image stays on the SLM and :attr:`phase_rad` is unchanged."""
        self._require_open()
        phase = self.converter.validate(phase_rad)
        grey = self.converter.encode(phase)
        with self._lock:
            self._display(grey, phase)
            self._grey = grey
            self._phase = phase.copy()
            self.frames_shown += 1

    @abc.abstractmethod
    def _display(self, grey: np.ndarray, phase_rad: np.ndarray) -> None:
        """Put the uint8 image (height, width) on the device; raise DeviceError on failure."""


# ---------------------------------------------------------------------------- Qt window
def _qt_invoke(fn: Any, timeout_s: float = 10.0) -> Any:
    """Run ``fn()`` in the Qt application's (GUI) thread and return its result: directly when
    already there, else through a queued call that this thread waits for (``timeout_s``)."""
    from PyQt5 import QtCore

    app = QtCore.QCoreApplication.instance()
    if app is None:
        raise DeviceNotConnected("Qt SLM window: no QApplication (create one in the main thread first)")
    if QtCore.QThread.currentThread() is app.thread():
        return fn()
    invoker = _invoker()
    done = threading.Event()
    box: dict[str, Any] = {}

    def job() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            box["error"] = exc
        finally:
            done.set()

    invoker.call.emit(job)
    if not done.wait(timeout_s):
        raise DeviceTimeout(f"Qt SLM window: the GUI thread did not answer within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("result")


_INVOKER: Any = None


def _invoker() -> Any:
    global _INVOKER
    from PyQt5 import QtCore

    if _INVOKER is None:

        class _Invoker(QtCore.QObject):
            call = QtCore.pyqtSignal(object)

            def __init__(self) -> None:
                super().__init__()
                self.call.connect(self._run, QtCore.Qt.QueuedConnection)

            @QtCore.pyqtSlot(object)  # a real slot: delivered in this object's (GUI) thread
            def _run(self, job: Any) -> None:
                job()

        inv = _Invoker()
        inv.moveToThread(QtCore.QCoreApplication.instance().thread())
        _INVOKER = inv
    return _INVOKER


class QtSLMWindow(ConvertingSLM):
    """The SLM as a frameless full-screen PyQt5 window on screen ``screen`` (index into
    ``QGuiApplication.screens()``), 1:1 pixels, 8-bit grey (``QImage.Format_Grayscale8``).

    It refuses to open on the screen of the application's visible main window, or on the primary
    screen when there is none, and on a screen whose size differs from the SLM's, unless
    ``force=True``. Safe to call from a worker thread: widget work runs in the GUI thread. Needs a
    ``QApplication`` (one is created when called from the main thread without one)."""

    def __init__(
        self,
        converter: PhaseToGrey,
        pixel_pitch_um: float,
        screen: int = 1,
        force: bool = False,
        name: str = "Qt SLM window",
    ) -> None:
        super().__init__(converter, pixel_pitch_um, name)
        self.screen_index = int(screen)
        self.force = bool(force)
        self._widget: Any = None
        self._qimage: Any = None

    @classmethod
    def from_settings(cls, settings: "Settings", force: bool = False) -> "QtSLMWindow":
        return cls(PhaseToGrey.from_settings(settings, name="Qt SLM window"), settings.slm.pixel_pitch_um,
                   screen=settings.slm.monitor, force=force)

    @property
    def widget(self) -> Any:
        """The QWidget (for tests: ``widget.grab()``), or ``None`` when closed."""
        return self._widget

    def _open(self) -> None:
        try:
            from PyQt5 import QtCore, QtWidgets
        except ImportError as exc:
            raise DeviceNotConnected(f"{self.name}: PyQt5 is not installed ({exc})") from exc
        if QtWidgets.QApplication.instance() is None:
            if threading.current_thread() is not threading.main_thread():
                raise DeviceNotConnected(f"{self.name}: no QApplication, and none can be created outside the main thread")
            self._own_app = QtWidgets.QApplication([])
        if not isinstance(QtCore.QCoreApplication.instance(), QtWidgets.QApplication):
            raise DeviceNotConnected(f"{self.name}: the running Qt application is not a QApplication (widgets needed)")
        self._widget = _qt_invoke(self._create_widget)

    def _create_widget(self) -> Any:
        from PyQt5 import QtCore, QtGui, QtWidgets

        screens = QtGui.QGuiApplication.screens()
        if not 0 <= self.screen_index < len(screens):
            raise DeviceNotConnected(
                f"{self.name}: slm.monitor = {self.screen_index}: no such screen "
                f"({len(screens)} screen(s): {', '.join(s.name() for s in screens)})"
            )
        screen = screens[self.screen_index]
        gui_screens = {w.screen() for w in QtWidgets.QApplication.topLevelWidgets()
                       if w.isVisible() and not getattr(w, "_is_slm_window", False)}
        gui_screens.discard(None)
        if not gui_screens:
            gui_screens = {QtGui.QGuiApplication.primaryScreen()}
        if screen in gui_screens and not self.force:
            raise DeviceError(
                f"{self.name}: slm.monitor = {self.screen_index} ('{screen.name()}') is the screen of the "
                "application window (or the primary screen); refusing to cover it. Choose the SLM's "
                "screen index, or open with force=True."
            )
        geo = screen.geometry()
        ratio = screen.devicePixelRatio()
        phys = (round(geo.width() * ratio), round(geo.height() * ratio))
        if phys != (self.shape[1], self.shape[0]) and not self.force:
            raise DeviceError(
                f"{self.name}: screen {self.screen_index} ('{screen.name()}') is {phys[0]} x {phys[1]} px, "
                f"the SLM settings say {self.shape[1]} x {self.shape[0]} (slm.width_px, slm.height_px); "
                "1:1 pixels are impossible. Fix the settings or open with force=True."
            )

        owner = self

        class _SLMWidget(QtWidgets.QWidget):
            _is_slm_window = True

            def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt API
                painter = QtGui.QPainter(self)
                img = owner._qimage
                if img is not None:
                    pix = QtGui.QPixmap.fromImage(img)
                    pix.setDevicePixelRatio(self.devicePixelRatioF())
                    painter.drawPixmap(0, 0, pix)
                painter.end()

        w = _SLMWidget()
        w.setWindowTitle(self.name)
        w.setWindowFlags(QtCore.Qt.FramelessWindowHint | QtCore.Qt.WindowStaysOnTopHint | QtCore.Qt.Window)
        w.setAttribute(QtCore.Qt.WA_OpaquePaintEvent)
        w.setCursor(QtCore.Qt.BlankCursor)
        if w.windowHandle() is None:
            w.create()
        if w.windowHandle() is not None:
            w.windowHandle().setScreen(screen)
        size = QtCore.QSize(round(self.shape[1] / ratio), round(self.shape[0] / ratio))
        w.setGeometry(QtCore.QRect(geo.topLeft(), size))
        w.setFixedSize(size)
        w.show()
        if phys == (self.shape[1], self.shape[0]):
            w.showFullScreen()
        return w

    def _close(self) -> None:
        widget, self._widget = self._widget, None
        if widget is not None:
            try:
                _qt_invoke(lambda: (widget.close(), widget.deleteLater()))
            except DeviceError:
                log.warning("%s: could not close the window", self.name, exc_info=True)
        self._qimage = None

    def _display(self, grey: np.ndarray, phase_rad: np.ndarray) -> None:
        from PyQt5 import QtGui

        if self._widget is None:
            raise DeviceNotConnected(f"{self.name}: the window is closed")
        data = np.ascontiguousarray(grey, dtype=np.uint8)
        h, w = data.shape
        img = QtGui.QImage(data.data, w, h, w, QtGui.QImage.Format_Grayscale8).copy()
        widget = self._widget

        def paint() -> None:
            self._qimage = img
            widget.repaint()

        _qt_invoke(paint)

    def grab_image(self) -> np.ndarray:
        """The window's pixels (uint8, height x width) as rendered by Qt (for tests/self-checks)."""
        from PyQt5 import QtGui

        self._require_open()

        def grab() -> np.ndarray:
            img = self._widget.grab().toImage().convertToFormat(QtGui.QImage.Format_Grayscale8)
            h, w, bpl = img.height(), img.width(), img.bytesPerLine()
            buf = img.constBits()
            buf.setsize(h * bpl)
            return np.frombuffer(buf, np.uint8).reshape(h, bpl)[:, :w].copy()

        return _qt_invoke(grab)


# ---------------------------------------------------------------------------- slmPy
class SlmPyAdapter(ConvertingSLM):
    """The SLM through ``slmpy`` (https://github.com/wavefrontshaping/slmPy), a wxPython full-screen
    display: ``slmpy.SLMdisplay(monitor=..., isImageLock=True)``, ``updateArray(uint8 2-D)``,
    ``getSize() -> (width, height)``, ``close()``. Imported only in :meth:`open`.

    Note: the PyPI package called ``slmpy`` is an unrelated library; install slmPy from its
    repository (``pip install git+https://github.com/wavefrontshaping/slmPy``)."""

    INSTALL_HINT = ("install slmPy from the wavefrontshaping project: "
                    "pip install git+https://github.com/wavefrontshaping/slmPy "
                    "(the PyPI package named 'slmpy' is an unrelated library)")

    def __init__(self, converter: PhaseToGrey, pixel_pitch_um: float, monitor: int = 1,
                 is_image_lock: bool = True, name: str = "slmPy SLM") -> None:
        super().__init__(converter, pixel_pitch_um, name)
        self.monitor = int(monitor)
        self.is_image_lock = bool(is_image_lock)
        self._display_obj: Any = None

    @classmethod
    def from_settings(cls, settings: "Settings") -> "SlmPyAdapter":
        return cls(PhaseToGrey.from_settings(settings, name="slmPy SLM"), settings.slm.pixel_pitch_um,
                   monitor=settings.slm.monitor)

    def _open(self) -> None:
        import importlib

        try:
            slmpy = importlib.import_module("slmpy")
        except ImportError as exc:
            raise DeviceNotConnected(f"{self.name}: module 'slmpy' not found ({exc}); {self.INSTALL_HINT}") from exc
        cls = getattr(slmpy, "SLMdisplay", None)
        if cls is None:
            where = getattr(slmpy, "__file__", "?")
            raise DeviceNotConnected(
                f"{self.name}: the imported 'slmpy' ({where}) has no SLMdisplay class: it is not slmPy "
                f"from the wavefrontshaping project; {self.INSTALL_HINT}"
            )
        try:
            self._display_obj = cls(monitor=self.monitor, isImageLock=self.is_image_lock)
        except Exception as exc:  # noqa: BLE001
            raise DeviceNotConnected(
                f"{self.name}: slmpy.SLMdisplay(monitor={self.monitor}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            size = tuple(int(s) for s in self._display_obj.getSize())
        except Exception as exc:  # noqa: BLE001
            self._safe_close()
            raise DeviceError(f"{self.name}: getSize() failed: {type(exc).__name__}: {exc}") from exc
        if size != (self.shape[1], self.shape[0]):
            self._safe_close()
            raise DeviceError(
                f"{self.name}: monitor {self.monitor} is {size[0]} x {size[1]} px, the settings say "
                f"{self.shape[1]} x {self.shape[0]} (slm.width_px, slm.height_px)"
            )

    def _safe_close(self) -> None:
        obj, self._display_obj = self._display_obj, None
        if obj is not None:
            try:
                obj.close()
            except Exception:  # noqa: BLE001
                log.warning("%s: close() failed", self.name, exc_info=True)

    def _close(self) -> None:
        self._safe_close()

    def _display(self, grey: np.ndarray, phase_rad: np.ndarray) -> None:
        if self._display_obj is None:
            raise DeviceNotConnected(f"{self.name}: not open")
        try:
            self._display_obj.updateArray(np.ascontiguousarray(grey, dtype=np.uint8))
        except Exception as exc:  # noqa: BLE001
            raise DeviceError(f"{self.name}: updateArray failed: {type(exc).__name__}: {exc}") from exc
