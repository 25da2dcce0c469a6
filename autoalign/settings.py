"""Typed, validated settings loaded from ``settings.yaml``.

One :class:`Settings` object is built once (``load_settings``) and handed down; nothing re-reads the
file. Every problem (missing key, unknown key, wrong type, value out of range, inconsistent optics)
is collected and raised together as one :class:`SettingsError` whose lines name the file, the dotted
key, the value found and what was expected.

Units: lengths in micrometres unless the key says otherwise (``_nm``, ``_mm``, ``_px``); phases in
radians; Zernike modes by Noll index (from 1).

Loading a file (:func:`load_settings`):

* duplicate keys are refused (naming file, key and both lines), not silently "last wins";
* a partial file (only the keys a user changes) is merged over the packaged defaults; unknown keys
  are still refused, naming the nearest valid key;
* ``format_version`` (top level, optional; absent means the current version) guards against files
  written for a newer autoalign;
* relative paths inside the file (:data:`PATH_KEYS`) are resolved against the file's folder; in the
  packaged defaults ``models/...`` resolves to the installed package (the shipped weights).

:func:`resolve_settings_path` is the command-line order: an explicit ``--settings``, then
``./settings.yaml``, then the packaged default.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_SETTINGS_PATH = Path(__file__).resolve().parent / "settings.yaml"
#: Packaged wiring demo: Micro-Manager demo devices (mm-test-adapters) with the simulated SLM.
DEMO_MICROMANAGER_SETTINGS_PATH = Path(__file__).resolve().parent / "demo_micromanager.yaml"
#: Version of the settings-file format written and understood by this autoalign.
SETTINGS_FORMAT_VERSION = 1
#: Dotted keys holding file or folder paths; relative values resolve against the settings file's folder.
PATH_KEYS = ("model.checkpoint", "model.fine_checkpoint", "slm.flatness_file", "slm.lut_file",
             "hardware.micromanager.config_file", "hardware.micromanager.install_dir")
#: Keys that are still accepted (older files and the settings stored in data sets hold them) but do
#: nothing; a settings file that sets one gets a warning saying so and what replaced it.
DEPRECATED_KEYS = {
    "loop.converged_rms_rad": (
        "is deprecated and ignored: the loop no longer stops on the estimator's predicted residual; it "
        "stops on what the camera measures (loop.floor_margin, loop.aligned_min_correlation and "
        "loop.min_corrections for 'converged', loop.patience, loop.max_iterations); delete the key"),
}
#: Top-level folders of the repository installed as sub-packages (``models/...`` in the packaged
#: defaults means the installed ``autoalign.models`` package).
_SUBPACKAGES = ("models", "simulation", "hardware", "calibration", "app")


class SettingsError(ValueError):
    """A settings file that cannot be used. The message lists every problem found."""


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that repeats a key (``key``, ``line`` and ``first_line`` are 1-based)."""

    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(f"duplicate key {key!r} at line {line} (first at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises :class:`DuplicateKeyError` on a repeated mapping key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: SafeLoader reports it
                continue
            if first is not None:
                raise DuplicateKeyError(key, key_node.start_mark.line + 1, first)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate keys (:class:`DuplicateKeyError`)."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml_file(path: str | Path, what: str, error: type[Exception] = ValueError) -> Any:
    """Read and parse a YAML file (duplicate keys refused); any problem raises ``error`` with a
    one-line message naming the file and the problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{p}: not a text {what} file ({exc.reason})") from exc
    except OSError as exc:
        raise error(f"{p}: cannot read the {what} file ({exc.strerror or exc})") from exc
    try:
        return safe_load_unique(text)
    except DuplicateKeyError as exc:
        raise error(f"{p}: duplicate key {exc.key!r} at line {exc.line} (first at line {exc.first_line}); "
                    "keep one of them") from exc
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{p}: not valid YAML{where}: {problem}") from exc


def check_format_version(data: dict[str, Any], source: str, current: int, what: str,
                         error: type[Exception] = ValueError) -> int:
    """Pop and check ``format_version`` from ``data`` (absent: ``current``). A newer version than
    ``current`` or a non-integer raises ``error`` naming the file."""
    version = data.pop("format_version", current)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise error(f"{source}: key 'format_version' = {version!r}: expected an integer >= 1")
    if version > current:
        raise error(f"{source}: {what} format version {version} is newer than this autoalign understands "
                    f"({current}); upgrade autoalign or re-create the file")
    return version


def _check(**rules: Any) -> dict[str, Any]:
    """Field metadata: ``gt``, ``ge``, ``lt``, ``le`` bounds, ``length`` for sequences."""
    return {"rules": rules}


def _f(default: Any = dataclasses.MISSING, **rules: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=_check(**rules))
    return field(default=default, metadata=_check(**rules))


@dataclass(frozen=True)
class OpticsSettings:
    numerical_aperture: float = _f(gt=0.0)
    immersion_index: float = _f(ge=1.0)
    wavelength_um: float = _f(gt=0.0, lt=10.0)
    objective_focal_length_mm: float = _f(gt=0.0)
    back_aperture_radius_mm: float = _f(gt=0.0)
    beam: Literal["vortex", "tophat", "none"] = _f()
    vortex_charge: int = _f(ge=-10, le=10)
    tophat_radius: float = _f(gt=0.0, lt=1.0)
    polarisation: Literal["circular_plus", "circular_minus", "linear", "radial", "azimuthal"] = _f()
    linear_angle_deg: float = _f()
    pupil_samples: int = _f(ge=16, le=1024)


@dataclass(frozen=True)
class CameraSettings:
    pixel_size_um: float = _f(gt=0.0)
    roi_px: int = _f(ge=8, le=4096)
    bit_depth: int = _f(ge=1, le=32)
    gain_adu_per_electron: float = _f(gt=0.0)
    offset_adu: float = _f(ge=0.0)
    read_noise_electrons: float = _f(ge=0.0)
    quantum_efficiency: float = _f(gt=0.0, le=1.0)
    exposure_ms: float = _f(gt=0.0)
    peak_photons: float = _f(gt=0.0)
    background_photons: float = _f(ge=0.0)
    bead_diameter_um: float = _f(ge=0.0)


@dataclass(frozen=True)
class StackSettings:
    planes: int = _f(ge=3, le=4096)
    z_step_um: float = _f(gt=0.0)


@dataclass(frozen=True)
class StageSettings:
    xy_travel_um: float = _f(gt=0.0)
    z_travel_um: float = _f(gt=0.0)
    recentre_threshold_um: float = _f(ge=0.0)
    settle_timeout_s: float = _f(gt=0.0)
    recentre_threshold_z_um: float = _f(0.08, ge=0.0)


@dataclass(frozen=True)
class SLMSettings:
    backend: Literal["simulated", "qt", "slmpy"] = _f()
    width_px: int = _f(ge=1)
    height_px: int = _f(ge=1)
    pixel_pitch_um: float = _f(gt=0.0)
    pupil_centre_px: list[float] = _f(length=2)
    pupil_radius_px: float = _f(gt=0.0)
    grey_level_2pi: int = _f(ge=1, le=255)
    split_screen: bool = _f()
    split_half: Literal["left", "right"] = _f()
    flip_x: bool = _f()
    flip_y: bool = _f()
    flatness_file: str | None = _f()
    lut_file: str | None = _f()
    monitor: int = _f(ge=0)
    pupil_margin: float = _f(0.0, ge=0.0, le=1.0)


@dataclass(frozen=True)
class MicroManagerSettings:
    python_backend: bool = _f()
    install_dir: str | None = _f()
    config_file: str | None = _f()
    port: int = _f(ge=1, le=65535)
    timeout_ms: int = _f(gt=0)
    camera_device: str | None = _f()
    focus_device: str | None = _f()
    xy_device: str | None = _f()


@dataclass(frozen=True)
class HardwareSettings:
    backend: Literal["simulated", "micromanager"] = _f()
    micromanager: MicroManagerSettings = _f()


@dataclass(frozen=True)
class ModelSettings:
    checkpoint: str = _f()
    architecture: str = _f()
    modes: list[int] = _f()
    predict_offset: bool = _f()
    binning: int = _f(ge=1, le=8)
    # optional: a fine model for the last iterations (models.estimator.CNNEstimator, "coarse + fine")
    fine_checkpoint: str = _f("")
    fine_modes: list[int] = _f([])
    fine_below_rad: float = _f(0.15, ge=0.0)
    fine_below_offset: float = _f(0.02, ge=0.0)
    fine_damping: float = _f(0.5, ge=0.0, le=1.0)
    # the mask offset read beside a large aberration is not applied (models.estimator.CNNEstimator)
    offset_below_rad: float = _f(0.6, ge=0.0)


@dataclass(frozen=True)
class DatasetSettings:
    modes: list[int] = _f()
    max_total_rms_rad: float = _f(ge=0.0)
    max_offset: float = _f(ge=0.0, lt=1.0)
    peak_photons_range: list[float] = _f(length=2)
    background_photons_range: list[float] = _f(length=2)
    bead_diameter_range_um: list[float] = _f(length=2)
    decentre_px: float = _f(ge=0.0)
    val_fraction: float = _f(ge=0.0, lt=0.5)
    test_fraction: float = _f(ge=0.0, lt=0.5)
    # optional keys (added later; data sets written before them stay readable)
    max_coefficient_rad: float = _f(0.0, ge=0.0)
    rms_mix: list[list[float]] = _f([[0.15, 0.15], [0.35, 0.5], [0.5, 1.0]])
    unlabelled_modes: list[int] = _f([])
    higher_order_rms_range_rad: list[float] = _f([0.0, 0.0], length=2)
    higher_order_decay: float = _f(2.0, ge=0.0)
    na_scale_range: list[float] = _f([1.0, 1.0], length=2)
    wavelength_scale_range: list[float] = _f([1.0, 1.0], length=2)
    pixel_scale_range: list[float] = _f([1.0, 1.0], length=2)
    polarisation_impurity_range: list[float] = _f([0.0, 0.0], length=2)
    slm_stroke_range: list[float] = _f([1.0, 1.0], length=2)


@dataclass(frozen=True)
class LoopSettings:
    gain: float = _f(gt=0.0, le=2.0)
    max_iterations: int = _f(ge=1)
    max_correction_rms_rad: float = _f(gt=0.0)
    max_prediction_rad: float = _f(gt=0.0)
    min_photons: float = _f(ge=0.0)
    saturation_fraction: float = _f(ge=0.0, le=1.0)
    edge_margin_px: int = _f(ge=0)
    # optional keys (added later; files written before them, e.g. inside data sets, stay valid)
    patience: int = _f(2, ge=1)
    max_refusals: int = _f(3, ge=1)
    min_snr: float = _f(8.0, ge=0.0)
    max_edge_fraction: float = _f(0.5, gt=0.0, le=1.0)
    tip_tilt_defocus_gain: float = _f(1.0, gt=0.0, le=2.0)
    # loop decisions on measured quantities, capture range, mask-offset range (docs/loop.md)
    floor_margin: float = _f(0.008, ge=0.0, le=1.0)     # null depth above the bead floor still aligned
    max_mask_offset: float = _f(0.2, ge=0.0, le=0.5)    # mask offset the SLM may show, pupil radii
    capture_max_step_um: float = _f(1.0, gt=0.0)        # largest stage step of a bead search, um
    capture_tries: int = _f(4, ge=0)                    # stage moves of a bead search before giving up
    aligned_min_correlation: float = _f(0.97, ge=0.0, le=1.0)  # ... and the donut's shape matches the ideal
    min_corrections: int = _f(3, ge=0)                  # corrections applied before "aligned" may stop the run
    corrector: Literal["model", "refined", "modal"] = _f("refined")  # the loop's default estimator
    # DEPRECATED, unused (see DEPRECATED_KEYS): kept so that files and data sets written with it load
    converged_rms_rad: float = _f(0.05, ge=0.0)


@dataclass(frozen=True)
class SimulationSettings:
    seed: int = _f(ge=0)
    aberration_rms_rad: float = _f(ge=0.0)
    aberration_modes: list[int] = _f()
    mask_offset: list[float] = _f(length=2)
    bead_position_um: list[float] = _f(length=3)
    drift_um_per_step: float = _f(ge=0.0)
    # optional hidden faults (defaults: a perfect instrument; see docs/physics.md)
    higher_order_rms_rad: float = _f(0.0, ge=0.0)
    higher_order_modes: list[int] | None = _f(None)  # None: Noll 16..28
    wrong_hand_fraction: float = _f(0.0, ge=0.0, le=1.0)
    wrong_hand_phase_rad: float = _f(0.0)
    slm_phase_scale: float = _f(1.0, gt=0.0, le=4.0)
    camera_orientation: Literal["identity", "mirror_x", "mirror_y", "rotate_180", "transpose"] = _f("identity")
    # the true instrument against the settings (what the loop believes): these x the settings' values
    true_na_scale: float = _f(1.0, gt=0.5, lt=1.5)
    true_wavelength_scale: float = _f(1.0, gt=0.5, lt=1.5)
    true_pixel_scale: float = _f(1.0, gt=0.5, lt=1.5)
    true_bead_diameter_um: float | None = _f(None)  # None: camera.bead_diameter_um


@dataclass(frozen=True)
class RefineSettings:
    """The ``refined`` estimator (``models/refined.py``): CNN, then the model-based Poisson fit
    (``calibration/refine.py``). Optional section; every key has its documented default."""

    plane_offsets_um: list[float] | None = _f(None)  # focus offsets of the fitted planes; None: -0.6..0.6 step 0.3
    crop_px: int = _f(32, ge=8, le=256)            # square crop around the bead (pixels)
    pupil_samples: int = _f(32, ge=8, le=256)      # pupil nodes per axis of the fit's simulator
    max_iterations: int = _f(100, ge=1)            # L-BFGS iterations of the full fit
    fit_offset: bool = _f(True)                    # fit the vortex-mask offset
    fit_polarisation: bool = _f(True)              # fit the wrong-hand fraction and phase
    fit_slm_scale: bool = _f(False)                # fit the SLM's phase stroke (LUT / grey level for 2 pi)
    uncertainties: bool = _f(True)                 # Fisher information (1 sigma per mode, CRB)
    agreement_rad: float = _f(0.4, gt=0.0)         # largest |fit - network| per mode of a valid estimate
    structure_p: float = _f(1e-12, gt=0.0, lt=1.0)  # structured-residual p below which a fit is invalid
    fit_below_rad: float = _f(1.0, ge=0.0)         # network estimate (rad RMS) above which the fit is skipped; 0: never
    require_agreement: bool = _f(False)            # refuse a fit that explains the data when the network disagrees
    network_fallback: bool = _f(True)              # a fit that does not explain the data: apply the network's estimate


@dataclass(frozen=True)
class Settings:
    """All settings. ``source`` is the file they came from (for error messages and records)."""

    optics: OpticsSettings
    camera: CameraSettings
    stack: StackSettings
    stage: StageSettings
    slm: SLMSettings
    hardware: HardwareSettings
    model: ModelSettings
    dataset: DatasetSettings
    loop: LoopSettings
    simulation: SimulationSettings
    refine: RefineSettings = RefineSettings()  # optional section (refined estimator)
    source: str = "<memory>"

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML-serialisable), without ``source``."""
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **sections: Any) -> "Settings":
        """Copy with whole sections or dotted keys replaced, re-validated.

        ``settings.replace(**{"camera.roi_px": 32})`` or ``settings.replace(camera=new_camera)``.
        """
        data = self.to_dict()
        for key, value in sections.items():
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            parts = key.split(".")
            node = data
            for part in parts[:-1]:
                node = node[part]
            node[parts[-1]] = value
        return settings_from_dict(data, source=self.source)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, errors: list[str]) -> Any:
    """Convert ``value`` to ``tp`` or append an error naming the key; returns the value."""
    origin = typing.get_origin(tp)
    bad = f"key '{key}' = {value!r}: expected {_type_name(tp)}"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(bad)
            return None
        return _build(tp, value, key, errors)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        sub_errors: list[str] = []
        for arg in args:
            if arg is type(None):
                continue
            result = _coerce(value, arg, key, sub_errors)
            if len(sub_errors) == 0:
                return result
        errors.append(bad)
        return None
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(bad)
        return value
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            errors.append(bad)
            return None
        return [_coerce(v, inner, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            errors.append(bad)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            errors.append(bad)
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(bad)
            return None
        if value != value or value in (float("inf"), float("-inf")):
            errors.append(f"key '{key}' = {value!r}: expected a finite number")
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errors.append(bad)
        return value
    raise TypeError(f"unsupported settings type {tp!r} for {key}")  # programming error


_OPS = {
    "gt": (lambda v, b: v > b, "> {}"),
    "ge": (lambda v, b: v >= b, ">= {}"),
    "lt": (lambda v, b: v < b, "< {}"),
    "le": (lambda v, b: v <= b, "<= {}"),
}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _build(cls: Any, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = [f.name for f in dataclasses.fields(cls) if f.name != "source"]
    for extra in sorted(set(data) - set(names), key=str):
        near = difflib.get_close_matches(str(extra), names, n=1, cutoff=0.6)
        hint = f"did you mean '{_join(prefix, near[0])}'? " if near else ""
        errors.append(f"key '{_join(prefix, str(extra))}': unknown key ({hint}expected one of {', '.join(names)})")
    for f in dataclasses.fields(cls):
        if f.name == "source":
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            if f.default is not dataclasses.MISSING:  # optional key: its documented default
                kwargs[f.name] = f.default
                continue
            errors.append(f"key '{key}' is missing: expected {_type_name(hints[f.name])}")
            kwargs[f.name] = None
            continue
        n_before = len(errors)
        value = _coerce(data[f.name], hints[f.name], key, errors)
        if len(errors) == n_before and value is not None:
            rules = f.metadata.get("rules", {})
            if "length" in rules and len(value) != rules["length"]:
                errors.append(f"key '{key}' = {value!r}: expected {rules['length']} values")
            for op, bound in rules.items():
                if op in _OPS and isinstance(value, (int, float)):
                    test, text = _OPS[op]
                    if not test(value, bound):
                        errors.append(f"key '{key}' = {value!r}: expected {text.format(bound)}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError:  # pragma: no cover - only with errors already recorded
        return None


def _cross_checks(s: Settings, errors: list[str]) -> None:
    o = s.optics
    if o.numerical_aperture >= o.immersion_index:
        errors.append(
            f"key 'optics.numerical_aperture' = {o.numerical_aperture}: expected < "
            f"optics.immersion_index ({o.immersion_index})"
        )
    expected_radius = o.objective_focal_length_mm * o.numerical_aperture
    if abs(o.back_aperture_radius_mm - expected_radius) > 0.05 * expected_radius:
        errors.append(
            f"key 'optics.back_aperture_radius_mm' = {o.back_aperture_radius_mm}: expected "
            f"objective_focal_length_mm * numerical_aperture = {expected_radius:.3g} (within 5 %)"
        )
    if o.beam == "vortex" and o.vortex_charge == 0:
        errors.append("key 'optics.vortex_charge' = 0: expected a non-zero charge for a vortex beam")
    for section, modes in (("model", s.model.modes), ("dataset", s.dataset.modes),
                           ("simulation", s.simulation.aberration_modes)):
        bad = [m for m in modes if not isinstance(m, int) or m < 1]
        if bad:
            errors.append(f"key '{section}.modes' = {modes!r}: expected Noll indices >= 1")
        if len(set(modes)) != len(modes):
            errors.append(f"key '{section}.modes' = {modes!r}: expected no repeated mode")
    if not set(s.model.modes) <= set(s.dataset.modes):
        errors.append(
            f"key 'model.modes' = {s.model.modes!r}: expected modes that dataset.modes "
            f"({s.dataset.modes!r}) labels (the same list, or a subset while the shipped model "
            "predicts fewer modes than new data sets carry)"
        )
    if s.stack.planes != s.camera.roi_px:
        errors.append(
            f"key 'stack.planes' = {s.stack.planes}: expected camera.roi_px ({s.camera.roi_px}) so "
            "that the xz and yz sections are square like the xy section"
        )
    if s.camera.roi_px % s.model.binning:
        errors.append(
            f"key 'model.binning' = {s.model.binning}: expected a divisor of camera.roi_px "
            f"({s.camera.roi_px})"
        )
    for key in ("peak_photons_range", "background_photons_range", "bead_diameter_range_um",
                "higher_order_rms_range_rad", "na_scale_range", "wavelength_scale_range",
                "pixel_scale_range", "polarisation_impurity_range", "slm_stroke_range"):
        lo, hi = getattr(s.dataset, key)
        if not 0 <= lo <= hi:
            errors.append(f"key 'dataset.{key}' = {[lo, hi]!r}: expected 0 <= low <= high")
    if s.dataset.polarisation_impurity_range[1] > 0.5:
        errors.append(f"key 'dataset.polarisation_impurity_range' = {s.dataset.polarisation_impurity_range!r}: "
                      "expected a wrong-hand fraction <= 0.5")
    if s.dataset.na_scale_range[1] * s.optics.numerical_aperture >= s.optics.immersion_index:
        errors.append(f"key 'dataset.na_scale_range' = {s.dataset.na_scale_range!r}: the largest NA "
                      f"must stay below optics.immersion_index ({s.optics.immersion_index})")
    mix = s.dataset.rms_mix
    if (not mix or any(len(m) != 2 or m[0] < 0 or m[1] < 0 for m in mix)
            or abs(sum(m[0] for m in mix) - 1) > 1e-6):
        errors.append(f"key 'dataset.rms_mix' = {mix!r}: expected [[fraction, scale], ...] with "
                      "fractions >= 0 summing to 1 and scales >= 0")
    overlap = sorted(set(s.dataset.unlabelled_modes) & set(s.dataset.modes))
    if overlap or any(not isinstance(m, int) or m < 5 for m in s.dataset.unlabelled_modes):
        errors.append(f"key 'dataset.unlabelled_modes' = {s.dataset.unlabelled_modes!r}: expected Noll "
                      f"indices >= 5 not in dataset.modes")
    if s.dataset.val_fraction + s.dataset.test_fraction >= 1:
        errors.append("keys 'dataset.val_fraction' + 'dataset.test_fraction': expected a sum < 1")


def settings_from_dict(data: Any, source: str = "<memory>") -> Settings:
    """Validate a nested dict (as parsed from YAML) into :class:`Settings`."""
    errors: list[str] = []
    if not isinstance(data, dict):
        raise SettingsError(f"{source}: expected a YAML mapping of sections, found {type(data).__name__}")
    data = dict(data)
    check_format_version(data, source, SETTINGS_FORMAT_VERSION, "settings", SettingsError)
    settings = _build(Settings, data, "", errors)
    if not errors:
        settings = dataclasses.replace(settings, source=source)
        _cross_checks(settings, errors)
    if len(errors) == 1:
        raise SettingsError(f"{source}: {errors[0]}")
    if errors:
        lines = "\n  ".join(errors)
        raise SettingsError(f"{source}: {len(errors)} problems in the settings:\n  {lines}")
    return settings


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: mappings recursively, everything else replaced."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _package_location(name: str) -> Path | None:
    """Folder of the installed sub-package ``autoalign.<name>`` (found without importing it)."""
    try:
        spec = importlib.util.find_spec(f"autoalign.{name}")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_path_value(value: str, folder: Path, packaged: bool = False) -> str:
    """A path value from a settings file made absolute: ``~`` expanded, a relative path joined to
    ``folder`` (the settings file's folder). In the packaged defaults, ``models/...`` (etc.) resolves
    to the installed sub-package when the file is not found next to the settings."""
    p = Path(os.path.expanduser(value))
    if p.is_absolute():
        return str(p)
    candidate = folder / p
    if not candidate.exists() and p.parts and p.parts[0] in _SUBPACKAGES:
        # e.g. models/weights/default.pt: the installed package's file (the shipped weights), also
        # from a copy of the defaults ('autoalign settings --write') in another folder
        location = _package_location(p.parts[0])
        if location is not None and (packaged or location.joinpath(*p.parts[1:]).exists()):
            candidate = location.joinpath(*p.parts[1:])
    return str(candidate.resolve() if candidate.exists() else Path(os.path.abspath(candidate)))


def _resolve_paths(data: dict[str, Any], folder: Path, packaged: bool) -> dict[str, Any]:
    """Copy of ``data`` with the :data:`PATH_KEYS` it holds resolved (see :func:`resolve_path_value`)."""
    out = _merge({}, data)
    for dotted in PATH_KEYS:
        *parents, leaf = dotted.split(".")
        node: Any = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf].strip():
            node[leaf] = resolve_path_value(node[leaf], folder, packaged)
    return out


def _read_settings_mapping(path: Path) -> dict[str, Any]:
    data = read_yaml_file(path, "settings", SettingsError)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a YAML mapping of sections, found {type(data).__name__}")
    check_format_version(data, str(path), SETTINGS_FORMAT_VERSION, "settings", SettingsError)
    return data


def deprecated_keys_in(data: dict[str, Any]) -> list[str]:
    """The :data:`DEPRECATED_KEYS` that the (partial) settings mapping ``data`` sets."""
    found = []
    for dotted in DEPRECATED_KEYS:
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part, _ABSENT) if isinstance(node, dict) else _ABSENT
        if node is not _ABSENT:
            found.append(dotted)
    return found


_ABSENT = object()


def warn_deprecated(data: dict[str, Any], source: str) -> list[str]:
    """Log one warning per deprecated key that a settings file sets (``autoalign.settings``
    logger; the command line shows warnings); returns the messages."""
    messages = [f"{source}: key '{key}' {DEPRECATED_KEYS[key]}" for key in deprecated_keys_in(data)]
    for message in messages:
        logging.getLogger("autoalign.settings").warning("%s", message)
    return messages


def default_settings_dict() -> dict[str, Any]:
    """The packaged defaults as a plain dict, paths resolved (``model.checkpoint`` = the shipped weights)."""
    data = _read_settings_mapping(DEFAULT_SETTINGS_PATH)
    return _resolve_paths(data, DEFAULT_SETTINGS_PATH.parent, packaged=True)


def load_settings(path: str | Path | Settings | None = None) -> Settings:
    """Load and validate a settings file (default: the packaged ``autoalign/settings.yaml``).

    The file may be partial: its keys are merged over the packaged defaults (unknown keys are still
    refused). Relative paths inside it resolve against its folder. Duplicate keys and a newer
    ``format_version`` are refused. A :class:`Settings` instance is returned unchanged, so functions
    can take either.
    """
    if isinstance(path, Settings):
        return path
    defaults = default_settings_dict()
    if path is None or Path(path).resolve() == DEFAULT_SETTINGS_PATH:
        return settings_from_dict(defaults, source=str(DEFAULT_SETTINGS_PATH))
    path = Path(path)
    if path.is_dir():
        raise SettingsError(f"{path}: is a folder; expected a settings YAML file")
    user = _read_settings_mapping(path)
    warn_deprecated(user, str(path))
    user = _resolve_paths(user, Path(os.path.abspath(path)).parent, packaged=False)
    return settings_from_dict(_merge(defaults, user), source=str(path))


def resolve_settings_path(explicit: str | Path | None = None,
                          cwd: str | Path | None = None) -> tuple[Path, str]:
    """The settings file a command uses and why: an explicit ``--settings`` (relative to the current
    directory; it must exist), then ``./settings.yaml``, then the packaged default. Returns
    ``(path, how)`` with ``how`` one of ``"--settings"``, ``"./settings.yaml"``, ``"packaged default"``."""
    here = Path(cwd) if cwd is not None else Path.cwd()
    if explicit is not None:
        p = Path(os.path.expanduser(str(explicit)))
        p = p if p.is_absolute() else here / p
        if not p.exists():
            raise SettingsError(f"{explicit}: no such settings file (looked in {p.parent}); "
                                "'autoalign settings --write FILE' writes a copy of the defaults to edit")
        return p, "--settings"
    local = here / "settings.yaml"
    if local.is_file():
        return local, "./settings.yaml"
    return DEFAULT_SETTINGS_PATH, "packaged default"


def is_packaged_default(settings: Settings) -> bool:
    """Whether ``settings`` came from the packaged default file."""
    try:
        return Path(settings.source).resolve() == DEFAULT_SETTINGS_PATH
    except (OSError, ValueError):
        return False
