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

Saved as YAML with the date and the settings it was made with; :meth:`PokeCalibration.load`
warns (or refuses, ``strict=True``) when the optics/camera/stack settings differ.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from autoalign.calibration import optics as opt
from autoalign.correction import Correction

log = logging.getLogger("autoalign.calibration")

_LOCKED = ("optics", "camera.pixel_size_um", "stack")


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "autoalign poke calibration",
            "created": self.created,
            "units": "matrix_um_per_rad: rows dx, dy, dz (um); columns Noll 2, 3, 4 (rad)",
            "matrix_um_per_rad": [[float(v) for v in row] for row in np.asarray(self.matrix_um_per_rad)],
            "amplitude_rad": float(self.amplitude_rad),
            "residual_um": float(self.residual_um),
            "stage_sign": None if self.stage_sign is None else [float(v) for v in self.stage_sign],
            "settings": self.settings,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path, settings: Any = None, strict: bool = False) -> "PokeCalibration":
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("kind") != "autoalign poke calibration":
            raise ValueError(f"{path}: not an autoalign poke calibration file")
        m = np.asarray(data["matrix_um_per_rad"], dtype=float)
        if m.shape != (3, 3) or not np.all(np.isfinite(m)) or abs(np.linalg.det(m)) < 1e-12:
            raise ValueError(f"{path}: matrix_um_per_rad must be a finite, invertible 3 x 3 matrix")
        cal = cls(m, float(data.get("amplitude_rad", 0.0)),
                  None if data.get("stage_sign") is None else tuple(data["stage_sign"]),
                  str(data.get("created", "")), data.get("settings") or {}, float(data.get("residual_um", 0.0)))
        if settings is not None:
            diffs = cal.differences(settings)
            if diffs:
                msg = f"{path}: made for other settings: " + "; ".join(diffs)
                if strict:
                    raise ValueError(msg)
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


def run_poke_calibration(loop: Any, amplitude_rad: float = 1.0, stage_step_um: float | None = None,
                         use: bool = True) -> PokeCalibration:
    """Poke tip, tilt and defocus by +-``amplitude_rad`` (6 stacks; 2 more per stage axis when
    ``stage_step_um``), fit the map and (``use``) hand it to the loop. The loop's correction is
    shown again at the end. Raises ``RuntimeError`` when a poke gives an invalid measurement.
    ``loop``: the alignment loop's public API (``probe``, ``restore``, ``acquire``, ``correction``,
    ``devices``, ``settings``, ``log``)."""
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
    stage_sign = None
    if stage_step_um:
        stage_sign = _poke_stage(loop, stage_step_um)
    cal = PokeCalibration(matrix, amplitude_rad, stage_sign, settings=_locked_settings(loop.settings),
                          residual_um=residual)
    scale = cal.scale_vs_optics(loop.settings)
    loop.log("poke calibration: scale vs optics (x, y, z) = %.3f, %.3f, %.3f; off-diagonal max %.3g um/rad",
              *scale, float(np.max(np.abs(matrix - np.diag(np.diag(matrix))))))
    if use:
        loop.calibration = cal
    return cal


def _poke_stage(loop: Any, step: float) -> tuple[float, float, float]:
    """Sign (per axis) of the stage move that cancels an apparent bead offset."""
    xy, focus = loop.devices.xy, loop.devices.focus
    x0, y0 = xy.position_um
    z0 = focus.position_um
    m0 = loop.acquire()
    signs = []
    try:
        for axis in range(3):
            if axis < 2:
                xy.move_to(x0 + (step if axis == 0 else 0.0), y0 + (step if axis == 1 else 0.0))
            else:
                focus.move_to(z0 + step)
            m = loop.acquire()
            xy.move_to(x0, y0)
            focus.move_to(z0)
            moved = m.offset_um[axis] - m0.offset_um[axis]
            # a stage move of +step shifts the image by `moved`; cancelling an offset d needs -d/moved*step
            signs.append(-1.0 if moved > 0 else 1.0)
    finally:
        xy.move_to(x0, y0)
        focus.move_to(z0)
    return tuple(signs)  # type: ignore[return-value]


__all__ = ["PokeCalibration", "run_poke_calibration"]
