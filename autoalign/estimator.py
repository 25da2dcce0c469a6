"""The estimator interface: what reads an aberration from a measurement.

An estimator turns one checked measurement (:class:`autoalign.calibration.measurement.Measurement`)
into an :class:`Estimate` of the aberration PRESENT (the loop applies ``-gain * estimate``). The
alignment loop (:class:`autoalign.app.loop.AlignmentLoop`) takes any :class:`Estimator`; it never
asks which kind it holds. Implementations:

* :class:`autoalign.models.estimator.CNNEstimator`: the trained network (one stack, ``probes``
  False);
* :class:`autoalign.calibration.modal.ModalEstimator`: classical sensorless modal AO, which shows
  biased corrections and acquires ``2N`` extra stacks through the loop (``probes`` True).

Ground floor: this module imports nothing of the project, so every floor may implement it. The
measurement is described structurally by :class:`MeasurementLike` (what an estimator may rely on).

Conventions: coefficients by Noll index (from 1), RMS-normalised over the unit pupil, radians;
mask offset (x, y) in pupil radii.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


class MeasurementLike(Protocol):
    """What an estimator may read from a measurement (see ``calibration.measurement.Measurement``)."""

    sections: np.ndarray          # (3, n, n) photons, background kept: xy[y, x], xz[z, x], yz[z, y]
    background_photons: float     # per pixel
    valid: bool
    stack: Any                    # the raw stack (``hardware.base.Stack``) or None


class ProbeHost(Protocol):
    """The public API of the loop that a probing estimator (``probes`` True) acquires through."""

    settings: Any
    correction: Any               # autoalign.correction.Correction now on the SLM

    def probe(self, correction: Any) -> Any:
        """Show ``correction`` (checked, not adopted) and return the analysed measurement."""

    def restore(self) -> None:
        """Show the loop's own correction again."""

    def ideal_sections(self) -> np.ndarray:
        """Unaberrated ortho-sections (background removed, xy peak 1) on the measurement's grid."""


@dataclass
class Estimate:
    """What an estimator read from one measurement.

    ``coefficients``: {Noll: rad} of the aberration present (the loop applies minus gain times
    these). ``mask_offset``: (x, y) offset of the vortex mask from the beam in pupil radii, or None
    when the estimator does not read it. ``uncertainty``: {Noll: rad} one-sigma per mode, or None.
    ``valid``: False when the estimator itself refuses (``reason`` says why; nothing is applied).
    ``residual_rms``: the estimator's reading of the residual wavefront RMS (rad, Noll >= 5) or
    None when it cannot tell; it is reported, never decided on (the loop's stop rules use what the
    camera measures; ``loop.converged_rms_rad`` is deprecated and ignored). ``score``: figure of
    merit of the measured state, LOWER is better, comparable only between estimates of the same
    estimator (the loop keeps the correction with the best score). ``source``: the estimator's
    name."""

    coefficients: dict[int, float]
    mask_offset: tuple[float, float] | None = None
    uncertainty: dict[int, float] | None = None
    valid: bool = True
    reason: str = ""
    source: str = ""
    residual_rms: float | None = None
    score: float = math.inf
    extras: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def residual_of(coefficients: dict[int, float]) -> float:
        """RMS (rad) of the modes beyond tip/tilt/defocus (Noll >= 5) of ``coefficients``."""
        return float(math.sqrt(sum(v * v for k, v in coefficients.items() if int(k) >= 5)))


class Estimator(ABC):
    """Reads the aberration present from a measurement. Subclass and implement :meth:`estimate`.

    ``name`` identifies the estimator in logs, records and the command line (``--corrector``).
    ``modes``: the Noll indices it estimates. ``probes``: True when :meth:`estimate` acquires
    extra stacks through the host given to :meth:`attach` (it must then use only the host's
    public API: ``probe``, ``restore``, ``ideal_sections``, ``correction``, ``settings``)."""

    name: str = "estimator"
    probes: bool = False

    @property
    @abstractmethod
    def modes(self) -> list[int]:
        """Noll indices this estimator estimates."""

    def attach(self, host: ProbeHost) -> None:  # noqa: B027 - optional hook, default does nothing
        """Called by the loop that uses this estimator (default: nothing to remember)."""

    def prepare(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Load what :meth:`estimate` needs (weights, references); raise when that is impossible."""

    def reset(self) -> None:  # noqa: B027 - optional hook, default does nothing
        """Called by the loop at the start of every run: forget what earlier runs taught it (warm
        starts, trust regions, scan phase), so that a run depends only on the devices and the
        settings. Caches of pure functions of the settings may stay."""

    @abstractmethod
    def estimate(self, measurement: MeasurementLike) -> Estimate:
        """The aberration present in a VALID measurement. May raise; the loop then refuses."""


__all__ = ["Estimate", "Estimator", "MeasurementLike", "ProbeHost"]
