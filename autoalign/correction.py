"""The correction applied on top of the vortex mask: pure data, radians and pupil radii.

Conventions: Zernike coefficients by Noll index (from 1), RMS-normalised over the unit pupil, in
radians of phase at the beam's wavelength; ``mask_offset`` is the lateral shift (x, y) of the vortex
mask centre in pupil radii.

Correction files (YAML, ``format: autoalign-correction``, ``format_version`` :data:`CORRECTION_FORMAT_VERSION`)
record the optics they were made for (:data:`OPTICS_KEYS`: NA, wavelength, pupil radius on the SLM).
Loading one with settings of other optics is REFUSED unless ``force``: the same radians at another
wavelength, or the same Zernike over another pupil radius on the SLM, is a different phase on the
beam, and a wrong phase on the SLM silently spoils the donut. A file without the record loads
with a warning that it could not be checked (:func:`read_correction` returns the warnings, so a
window can show them).

A file must say what it is: ``format: autoalign-correction`` at the top. The one exception is the
first layout (autoalign before the header existed), recognised by its ``units`` line exactly as it
was written (:data:`LEGACY_UNITS`); it loads, with the warning that its optics cannot be checked.
A YAML without the header and without that line is refused, as is a Noll index outside the modes
the settings correct (:func:`supported_modes`: piston, tip, tilt, defocus and the model's modes;
without settings, Noll 1 to :data:`MAX_NOLL`): such a file was not made for this instrument, and
its phase would go to the SLM unchecked.
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

from autoalign.files import UserError, atomic_write_text

log = logging.getLogger("autoalign.correction")

CORRECTION_FORMAT = "autoalign-correction"
#: Version of the correction-file format written and understood here (absent in a file = 1).
CORRECTION_FORMAT_VERSION = 1
#: The optics a correction file records, as dotted settings keys.
OPTICS_KEYS = ("optics.numerical_aperture", "optics.wavelength_um", "slm.pupil_radius_px")
#: The ``units`` line of the first layout (no ``format`` header): such files still load.
LEGACY_UNITS = "radians (RMS-normalised Noll Zernikes); mask_offset in pupil radii (x, y)"
#: Without settings, the highest Noll index a correction may hold (the highest any part of
#: autoalign renders: the training data's unlabelled modes go up to 36).
MAX_NOLL = 36


def supported_modes(settings: Any = None) -> set[int]:
    """Noll indices a correction may hold: piston, tip, tilt, defocus (1-4: centring) and the modes
    the settings correct (``model.modes``, ``model.fine_modes``, ``dataset.modes``); without
    ``settings``, 1 to :data:`MAX_NOLL`."""
    if settings is None:
        return set(range(1, MAX_NOLL + 1))
    modes = {1, 2, 3, 4}
    for section, key in (("model", "modes"), ("model", "fine_modes"), ("dataset", "modes")):
        modes.update(int(m) for m in (getattr(getattr(settings, section, None), key, None) or []))
    return modes


def _ranges(modes: set[int]) -> str:
    """``{1, 2, 3, 4, 5, ..., 22}`` -> ``"1-22"``; gaps as ``"1-4, 7, 9-12"``."""
    out: list[str] = []
    for m in sorted(modes):
        if out and int(out[-1].split("-")[-1]) == m - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{m}"
        else:
            out.append(str(m))
    return ", ".join(out)


class CorrectionError(UserError, ValueError):
    """A correction file that cannot be used; the message names the file and the problem."""


def optics_record(settings: Any) -> dict[str, float]:
    """The optics a correction depends on: {dotted key: value} for :data:`OPTICS_KEYS`."""
    out = {}
    for key in OPTICS_KEYS:
        section, name = key.split(".")
        out[key] = float(getattr(getattr(settings, section), name))
    return out


def optics_differences(recorded: dict[str, Any], settings: Any) -> list[str]:
    """``key: recorded -> now`` for each recorded optics value that differs (relative 1e-6)."""
    now = optics_record(settings)
    out = []
    for key, value in now.items():
        then = recorded.get(key)
        try:
            same = then is not None and math.isclose(float(then), value, rel_tol=1e-6, abs_tol=1e-12)
        except (TypeError, ValueError):
            same = False
        if not same:
            out.append(f"{key}: {then!r} in the file, {value!r} now")
    return out


def _noll_key(key: Any, path: Any) -> int:
    if isinstance(key, bool):
        raise CorrectionError(f"{path}: coefficient key {key!r}: expected a Noll index (an integer >= 1)")
    if isinstance(key, int):
        value = key
    elif isinstance(key, str) and key.strip().isdigit():
        value = int(key.strip())
    else:
        raise CorrectionError(f"{path}: coefficient key {key!r}: expected a Noll index (an integer >= 1)")
    if value < 1:
        raise CorrectionError(f"{path}: coefficient key {key!r}: expected a Noll index (an integer >= 1)")
    return value


def _finite(value: Any, what: str, path: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CorrectionError(f"{path}: {what} = {value!r}: expected a number (radians)")
    if not math.isfinite(value):
        raise CorrectionError(f"{path}: {what} = {value!r}: expected a finite number (NaN or infinity found)")
    return float(value)


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

    def save_yaml(self, path: str | Path, settings: Any = None) -> None:
        """Write the correction (atomically) with its format version and, given ``settings``, the
        optics it was made for (so a later load under other optics is caught)."""
        data: dict[str, Any] = {"format": CORRECTION_FORMAT, "format_version": CORRECTION_FORMAT_VERSION}
        data.update(self.to_dict())
        if settings is not None:
            data["optics"] = optics_record(settings)
        data["saved"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path, settings: Any = None, force: bool = False) -> "Correction":
        """Read a correction file (:func:`read_correction`); its warnings go to the
        ``autoalign.correction`` logger. Raises :class:`CorrectionError` (a ValueError)."""
        corr, warnings = read_correction(path, settings, force)
        for message in warnings:
            log.warning("%s", message)
        return corr


def read_correction(path: str | Path, settings: Any = None, force: bool = False) -> tuple[Correction, list[str]]:
    """Read a correction file: ``(correction, warnings)``. Raises :class:`CorrectionError` naming
    the file, the key and the value: unreadable or invalid YAML, duplicate keys, no ``format``
    header (except the first layout, :data:`LEGACY_UNITS`), another format, a newer format version,
    a Noll key that is not an integer >= 1 (``5.7`` is refused, not truncated) or outside
    :func:`supported_modes`, a value that is not a finite number. With ``settings``: a file made
    for other optics is refused unless ``force`` (then a warning)."""
    from autoalign.settings import check_format_version, read_yaml_file

    warnings: list[str] = []
    data = read_yaml_file(path, "correction", CorrectionError)
    if data is None:
        data = {}
    if not isinstance(data, dict) or not isinstance(data.get("coefficients", None), (dict, type(None))) \
            or "coefficients" not in data:
        raise CorrectionError(f"{path}: not a correction file (expected a mapping with a 'coefficients' "
                              "mapping {Noll index: radians})")
    legacy = "format" not in data and data.get("units") == LEGACY_UNITS
    if "format" not in data and not legacy:
        raise CorrectionError(f"{path}: key 'format' is missing: not an autoalign correction file (expected "
                              f"'format: {CORRECTION_FORMAT}' at the top, as Save correction writes it); "
                              "nothing was loaded")
    fmt = data.get("format", CORRECTION_FORMAT)
    if fmt != CORRECTION_FORMAT:
        raise CorrectionError(f"{path}: key 'format' = {fmt!r}: expected {CORRECTION_FORMAT!r}")
    check_format_version(data, str(path), CORRECTION_FORMAT_VERSION, "correction", CorrectionError)
    allowed = supported_modes(settings)
    where = ("the modes these settings correct (piston, tip, tilt, defocus and model.modes / dataset.modes)"
             if settings is not None else f"the modes autoalign renders (Noll 1-{MAX_NOLL})")
    coeffs: dict[int, float] = {}
    for key, value in (data.get("coefficients") or {}).items():
        j = _noll_key(key, path)
        coeffs[j] = _finite(value, f"coefficient {j}", path)
        if j not in allowed:
            raise CorrectionError(f"{path}: key 'coefficients.{j}' = {value!r}: Noll {j} is outside {where}: "
                                  f"{_ranges(allowed)}; nothing was loaded")
    off = data.get("mask_offset")
    if off is None:
        off = [0.0, 0.0]
    if not isinstance(off, (list, tuple)) or len(off) != 2:
        raise CorrectionError(f"{path}: mask_offset = {off!r}: expected two numbers [x, y] in pupil radii")
    offset = (_finite(off[0], "mask_offset x", path), _finite(off[1], "mask_offset y", path))
    corr = Correction(coeffs, offset)
    if settings is not None:
        recorded = data.get("optics")
        if not isinstance(recorded, dict):
            warnings.append(f"{path}: records no optics ({'a file of the first layout' if legacy else 'no optics: block'}); "
                            "cannot check that it was made for these settings (NA, wavelength, pupil radius on the SLM)")
        else:
            diffs = optics_differences(recorded, settings)
            if diffs:
                msg = f"{path}: made for other optics ({'; '.join(diffs)})"
                if not force:
                    raise CorrectionError(msg + "; it would put a wrong phase on the SLM. Make a new "
                                          "correction for these optics, or load it with force")
                warnings.append(f"{msg}; loaded anyway (forced)")
    return corr, warnings
