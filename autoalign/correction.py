"""The correction applied on top of the vortex mask: pure data, radians and pupil radii.

Conventions: Zernike coefficients by Noll index (from 1), RMS-normalised over the unit pupil, in
radians of phase at the beam's wavelength; ``mask_offset`` is the lateral shift (x, y) of the vortex
mask centre in pupil radii.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml


@dataclass
class Correction:
    """Correction applied on top of the vortex mask (pure data, radians / pupil radii)."""

    coefficients: dict[int, float] = field(default_factory=dict)
    mask_offset: tuple[float, float] = (0.0, 0.0)

    def copy(self) -> "Correction":
        return Correction(dict(self.coefficients), tuple(self.mask_offset))

    def rms(self) -> float:
        """RMS (rad) of the higher-order part, Noll >= 5."""
        return float(math.sqrt(sum(v * v for k, v in self.coefficients.items() if k >= 5)))

    def is_finite(self) -> bool:
        return all(math.isfinite(v) for v in self.coefficients.values()) and all(
            math.isfinite(v) for v in self.mask_offset
        )

    def plus(self, delta: dict[int, float], offset_delta: tuple[float, float] = (0.0, 0.0)) -> "Correction":
        out = dict(self.coefficients)
        for k, v in delta.items():
            out[int(k)] = out.get(int(k), 0.0) + float(v)
        return Correction(out, (self.mask_offset[0] + offset_delta[0], self.mask_offset[1] + offset_delta[1]))

    def as_array(self, n_modes: int = 22) -> np.ndarray:
        """Coefficient array, column k = Noll k + 1."""
        arr = np.zeros(n_modes)
        for k, v in self.coefficients.items():
            if 1 <= k <= n_modes:
                arr[k - 1] = v
        return arr

    def to_dict(self) -> dict[str, Any]:
        return {
            "units": "radians (RMS-normalised Noll Zernikes); mask_offset in pupil radii (x, y)",
            "coefficients": {int(k): float(v) for k, v in sorted(self.coefficients.items())},
            "mask_offset": [float(self.mask_offset[0]), float(self.mask_offset[1])],
        }

    def save_yaml(self, path: str | Path) -> None:
        data = self.to_dict()
        data["saved"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        Path(path).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    @classmethod
    def load_yaml(cls, path: str | Path) -> "Correction":
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict) or "coefficients" not in data:
            raise ValueError(f"{path}: not a correction file (no 'coefficients' mapping)")
        coeffs = {int(k): float(v) for k, v in (data.get("coefficients") or {}).items()}
        off = data.get("mask_offset") or [0.0, 0.0]
        corr = cls(coeffs, (float(off[0]), float(off[1])))
        if not corr.is_finite():
            raise ValueError(f"{path}: correction contains NaN or infinity")
        return corr
