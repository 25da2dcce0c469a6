"""Empirical poke calibration of the centroid -> tip/tilt/defocus map.

Known tip (Noll 2), tilt (Noll 3) and defocus (Noll 4) are applied on the SLM with + and - sign on
top of the current correction; the bead's centre of mass moves and the linear map

    shift_um (dx, dy, dz) = M @ (c2, c3, c4)            M: micrometres per radian, 3 x 3

is fitted from the differences (central differences cancel the current offset and first-order
crosstalk from the donut's asymmetry). The loop then cancels a measured offset ``d`` with
``-M^-1 d``. Unlike the optics formulas (:mod:`calibration.optics`) it includes the SLM's real
phase scale, the camera's real pixel size and orientation, and the high-NA fact that a Z4
defocus is not a pure axial shift. Optionally the stage is poked too (``stage_step_um``) to learn
the sign of the stage move that re-centres the bead.

Saved as YAML (``format_version`` :data:`POKE_FORMAT_VERSION`, written atomically) with the date
and the settings it was made with; :meth:`PokeCalibration.load` warns (or refuses, ``strict=True``)
when the optics/camera/stack settings differ. :func:`default_calibration_path` is where
``autoalign calibrate`` saves it and where ``align`` and the GUI look for it: next to the settings
file, or in the user data folder when the settings are the packaged defaults.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from autoalign.calibration import optics as opt
from autoalign.correction import Correction
from autoalign.files import UserError

log = logging.getLogger("autoalign.calibration")

_LOCKED = ("optics", "camera.pixel_size_um", "stack")
POKE_KIND = "autoalign poke calibration"
#: Version of the poke-calibration file format written and understood here (absent in a file = 1).
POKE_FORMAT_VERSION = 1


class PokeCalibrationError(UserError, ValueError):
    """A poke-calibration file that cannot be used (names the file and the problem)."""


def default_calibration_path(settings: Any) -> Path:
    """Where the poke calibration for ``settings`` lives: ``<settings folder>/poke_calibration.yaml``,
    or ``<user data folder>/poke_calibration.yaml`` when ``settings`` are the packaged defaults (or
    were not read from a file)."""
    from autoalign.files import user_data_dir
    from autoalign.settings import is_packaged_default

    source = Path(str(getattr(settings, "source", "<memory>")))
    if is_packaged_default(settings) or not source.is_file():
        return user_data_dir() / "poke_calibration.yaml"
    return source.absolute().parent / "poke_calibration.yaml"


def _locked_settings(settings: Any) -> dict[str, Any]:
    d = settings.to_dict()
    return {"optics": d["optics"], "camera.pixel_size_um": d["camera"]["pixel_size_um"], "stack": d["stack"]}


@dataclass
class PokeCalibration:
    """Linear map from tip/tilt/defocus (rad) to the focus shift (um), and stage signs."""

    matrix_um_per_rad: np.ndarray                      # (3, 3): columns c2, c3, c4; rows dx, dy, dz
    amplitude_rad: float = 0.0
    stage_sign: tuple[float, float, float] | None = None
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    settings: dict[str, Any] = field(default_factory=dict)
    residual_um: float = 0.0                           # fit residual (repeatability)
    # lateral bead shift on the camera (through camera.pixel_size_um) per um of stage move (x, y):
    # 1 when the pixel size is right (the stage poke measures it; None without a stage poke)
    stage_scale: tuple[float, float] | None = None

    @classmethod
    def from_optics(cls, settings: Any) -> "PokeCalibration":
        """The map the optics formulas predict (diagonal), for comparison and as a fallback."""
        o = settings.optics
        lat = 1.0 / opt.tip_tilt_per_um(o.numerical_aperture, o.wavelength_um)
        ax = 1.0 / opt.defocus_per_um(o.numerical_aperture, o.immersion_index, o.wavelength_um)
        return cls(np.diag([lat, lat, ax]), settings=_locked_settings(settings), created="optics formula")

    def rad_per_um(self) -> np.ndarray:
        return np.linalg.inv(self.matrix_um_per_rad)

    def correction_for_shift(self, offset_um: tuple[float, float, float]) -> dict[int, float]:
        """Tip/tilt/defocus {2, 3, 4: rad} that cancel a measured focus offset (um)."""
        c = -self.rad_per_um() @ np.asarray(offset_um, dtype=float)
        return {2: float(c[0]), 3: float(c[1]), 4: float(c[2])}

    def scale_vs_optics(self, settings: Any) -> np.ndarray:
        """Diagonal of this map over the optics formula's (1 = the optics are right)."""
        return np.diag(self.matrix_um_per_rad) / np.diag(PokeCalibration.from_optics(settings).matrix_um_per_rad)

    def pixel_size_check(self, settings: Any, tolerance: float = 0.01) -> str | None:
        """What the stage poke says about ``camera.pixel_size_um``: None when it agrees within
        ``tolerance`` (or no stage poke was made), else a sentence with the pixel size it implies.
        A stage move of ``d`` um shows as ``d * nominal / true`` um through the settings' pixel size,
        so the true pixel size is the settings' over :attr:`stage_scale`. It is only as good as the
        stage's own scale (a closed-loop stage: ~0.1 %)."""
        if self.stage_scale is None:
            return None
        ratio = float(np.mean(self.stage_scale))
        if not np.isfinite(ratio) or abs(ratio - 1.0) <= tolerance:
            return None
        now = float(settings.camera.pixel_size_um)
        return (f"camera pixel size: a stage move shows as {ratio:.3f} x itself on the camera (x {self.stage_scale[0]:.3f}, "
                f"y {self.stage_scale[1]:.3f}): camera.pixel_size_um is probably {now / ratio:.4f} um (now {now:g}); "
                "the model-based fit and the networks assume the settings' value")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": POKE_KIND,
            "format_version": POKE_FORMAT_VERSION,
            "created": self.created,
            "units": "matrix_um_per_rad: rows dx, dy, dz (um); columns Noll 2, 3, 4 (rad)",
            "matrix_um_per_rad": [[float(v) for v in row] for row in np.asarray(self.matrix_um_per_rad)],
            "amplitude_rad": float(self.amplitude_rad),
            "residual_um": float(self.residual_um),
            "stage_sign": None if self.stage_sign is None else [float(v) for v in self.stage_sign],
            "stage_scale": None if self.stage_scale is None else [float(v) for v in self.stage_scale],
            "settings": self.settings,
        }

    def save(self, path: str | Path) -> None:
        """Write atomically (a crash leaves the old file or the new one)."""
        from autoalign.files import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @staticmethod
    def is_calibration_file(path: str | Path) -> bool:
        """Whether ``path`` is a poke-calibration file (so replacing it loses nothing foreign)."""
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return False
        return isinstance(data, dict) and data.get("kind") == POKE_KIND

    @classmethod
    def load(cls, path: str | Path, settings: Any = None, strict: bool = False) -> "PokeCalibration":
        """Read a calibration file; :class:`PokeCalibrationError` (a ValueError) names the file and
        the problem. With ``settings``: a calibration made for other optics is refused (``strict``)
        or logged as a warning."""
        from autoalign.settings import check_format_version, read_yaml_file

        data = read_yaml_file(path, "poke calibration", PokeCalibrationError)
        if not isinstance(data, dict) or data.get("kind") != POKE_KIND:
            raise PokeCalibrationError(f"{path}: not an autoalign poke calibration file (no 'kind: {POKE_KIND}')")
        check_format_version(data, str(path), POKE_FORMAT_VERSION, "poke calibration", PokeCalibrationError)
        try:
            m = np.asarray(data["matrix_um_per_rad"], dtype=float)
            sign = data.get("stage_sign")
            stage_sign = None if sign is None else tuple(float(v) for v in sign)
            amplitude, residual = float(data.get("amplitude_rad", 0.0)), float(data.get("residual_um", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise PokeCalibrationError(f"{path}: malformed poke calibration ({type(exc).__name__}: {exc})") from exc
        if m.shape != (3, 3) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) < 1e-12:
            raise PokeCalibrationError(f"{path}: matrix_um_per_rad must be a finite, invertible 3 x 3 matrix")
        if stage_sign is not None and (len(stage_sign) != 3 or any(v not in (-1.0, 1.0) for v in stage_sign)):
            raise PokeCalibrationError(f"{path}: stage_sign = {sign!r}: expected three values, each +1 or -1")
        scale = data.get("stage_scale")
        try:
            stage_scale = None if scale is None else (float(scale[0]), float(scale[1]))
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise PokeCalibrationError(f"{path}: stage_scale = {scale!r}: expected two numbers (x, y)") from exc
        cal = cls(m, amplitude, stage_sign, str(data.get("created", "")), data.get("settings") or {}, residual,
                  stage_scale)
        if settings is not None:
            diffs = cal.differences(settings)
            if diffs:
                msg = f"{path}: made for other settings: " + "; ".join(diffs)
                if strict:
                    raise PokeCalibrationError(msg)
                log.warning(msg)
        return cal

    def differences(self, settings: Any) -> list[str]:
        now = _locked_settings(settings)
        out = []
        for key, value in now.items():
            then = self.settings.get(key)
            if isinstance(value, dict) and isinstance(then, dict):
                out += [f"{key}.{k}: {then.get(k)!r} -> {v!r}" for k, v in value.items() if then.get(k) != v]
            elif then != value:
                out.append(f"{key}: {then!r} -> {value!r}")
        return out


def load_matching_calibration(settings: Any, explicit: str | Path | None = None,
                              disabled: bool = False) -> tuple["PokeCalibration | None", str]:
    """The poke calibration to use with ``settings`` and a one-line message saying which (for the
    log / GUI). ``explicit``: that file, refused (:class:`PokeCalibrationError`) when made for other
    optics. Else the saved one at :func:`default_calibration_path` when its optics match; one made
    for other optics is ignored with a message; none: the optics formulas (message empty)."""
    if disabled:
        return None, "poke calibration disabled; using the optics formulas"
    if explicit:
        cal = PokeCalibration.load(explicit, settings=settings, strict=True)
        return cal, f"using the poke calibration {explicit} (made {cal.created})"
    path = default_calibration_path(settings)
    if not path.exists():
        return None, ""
    try:
        cal = PokeCalibration.load(path, settings=settings, strict=True)
    except PokeCalibrationError as exc:
        return None, f"ignoring the saved poke calibration (using the optics formulas): {exc}"
    return cal, f"using the saved poke calibration {path} (made {cal.created}; its optics match these settings)"


def run_poke_calibration(loop: Any, amplitude_rad: float = 1.0, stage_step_um: float | None = None,
                         use: bool = True) -> PokeCalibration:
    """Poke tip, tilt and defocus by +-``amplitude_rad`` (6 stacks; 2 more per stage axis when
    ``stage_step_um``), fit the map and (``use``) hand it to the loop. The loop's correction is
    shown again at the end. Raises ``RuntimeError`` when a poke gives an invalid measurement.
    ``loop``: the alignment loop's public API (``probe``, ``restore``, ``acquire``, ``correction``,
    ``devices``, ``settings``, ``log``)."""

    if not (np.isfinite(amplitude_rad) and amplitude_rad > 0):
        raise ValueError(f"amplitude_rad = {amplitude_rad!r}: expected a number > 0")
    if stage_step_um is not None and not (np.isfinite(stage_step_um) and stage_step_um > 0):
        raise ValueError(f"stage_step_um = {stage_step_um!r}: expected a number > 0 (a negative or zero step "
                         "would learn the stage sign backwards)")
    base: Correction = loop.correction.copy()
    matrix = np.zeros((3, 3))
    spread = []
    try:
        for col, mode in enumerate((2, 3, 4)):
            shifts = []
            for sign in (1.0, -1.0):
                m = loop.probe(base.plus({mode: sign * amplitude_rad}))
                if not m.valid:
                    raise RuntimeError(f"poke calibration: Noll {mode} {sign:+.0f}: invalid stack ({m.reason})")
                shifts.append(np.asarray(m.offset_um))
            matrix[:, col] = (shifts[0] - shifts[1]) / (2 * amplitude_rad)
            spread.append(0.5 * (shifts[0] + shifts[1]))
    finally:
        try:
            loop.restore()
        except Exception:  # noqa: BLE001
            log.warning("poke calibration: could not restore the correction on the SLM")
    centre = np.mean(spread, axis=0)
    residual = float(np.sqrt(np.mean((np.asarray(spread) - centre) ** 2)))
    stage_sign = stage_scale = None
    if stage_step_um:
        stage_sign, stage_scale = _poke_stage(loop, stage_step_um)
    cal = PokeCalibration(matrix, amplitude_rad, stage_sign, settings=_locked_settings(loop.settings),
                          residual_um=residual, stage_scale=stage_scale)
    check = cal.pixel_size_check(loop.settings)
    if check:
        loop.log("poke calibration: %s", check, level=logging.WARNING)
    scale = cal.scale_vs_optics(loop.settings)
    loop.log("poke calibration: scale vs optics (x, y, z) = %.3f, %.3f, %.3f; off-diagonal max %.3g um/rad",
              *scale, float(np.max(np.abs(matrix - np.diag(np.diag(matrix))))))
    if use:
        loop.calibration = cal
    return cal


def _poke_stage(loop: Any, step: float) -> tuple[tuple[float, float, float], tuple[float, float]]:
    """Sign (per axis) of the stage move that cancels an apparent bead offset, and the lateral
    scale (x, y): the bead's measured shift between stage moves of -step and +step over 2 step
    (1 = the pixel size is right; NaN when the -step stack was invalid).
    ``step`` (um) must be > 0; an axis whose poke moves the bead by less than a quarter of
    ``step`` raises RuntimeError (the stage did not move, or the bead was lost), so no sign is
    guessed."""
    if not (np.isfinite(step) and step > 0):
        raise ValueError(f"stage_step_um = {step!r}: expected a number > 0")
    xy, focus = loop.devices.xy, loop.devices.focus
    x0, y0 = xy.position_um
    z0 = focus.position_um
    m0 = loop.acquire()
    signs, scales = [], []
    try:
        for axis in range(3):
            if axis < 2:
                xy.move_to(x0 + (step if axis == 0 else 0.0), y0 + (step if axis == 1 else 0.0))
            else:
                focus.move_to(z0 + step)
            m = loop.acquire()
            xy.move_to(x0, y0)
            focus.move_to(z0)
            if not (m.valid and m0.valid):
                raise RuntimeError(f"stage poke: invalid stack along axis {'xyz'[axis]} "
                                   f"({m.reason or m0.reason}); stage signs not learned")
            moved = m.offset_um[axis] - m0.offset_um[axis]
            if not abs(moved) >= 0.25 * step:
                raise RuntimeError(f"stage poke: a {step} um move along {'xyz'[axis]} moved the bead by only "
                                   f"{moved:.3g} um; stage signs not learned (check the stage and the step)")
            # a stage move of +step shifts the image by `moved`; cancelling an offset d needs -d/moved*step
            signs.append(-1.0 if moved > 0 else 1.0)
            if axis < 2:  # the lateral scale from a central difference (+-step: the centroid's bias cancels)
                xy.move_to(x0 - (step if axis == 0 else 0.0), y0 - (step if axis == 1 else 0.0))
                back = loop.acquire()
                xy.move_to(x0, y0)
                scales.append(abs(m.offset_um[axis] - back.offset_um[axis]) / (2 * step) if back.valid else math.nan)
    finally:
        xy.move_to(x0, y0)
        focus.move_to(z0)
    return tuple(signs), (scales[0], scales[1])  # type: ignore[return-value]


__all__ = ["PokeCalibration", "PokeCalibrationError", "run_poke_calibration", "default_calibration_path",
           "load_matching_calibration", "POKE_FORMAT_VERSION"]
