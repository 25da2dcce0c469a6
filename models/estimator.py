"""The CNN as an :class:`autoalign.estimator.Estimator`: one stack in, the aberration out.

Wraps anything with the :class:`autoalign.models.predictor.Predictor` API (``modes`` and
``predict(sections (3, n, n) photons) -> .coefficients {Noll: rad}, .mask_offset (x, y) or None``),
so tests can plug an oracle in. Without a predictor, the checkpoint ``settings.model.checkpoint``
is loaded on first use (:meth:`CNNEstimator.prepare`).
"""
from __future__ import annotations

import logging
from typing import Any

from autoalign.estimator import Estimate, Estimator, MeasurementLike
from autoalign.models.predictor import Predictor
from autoalign.settings import Settings

log = logging.getLogger("autoalign.models.estimator")


class CNNEstimator(Estimator):
    """The trained network read on the measurement's ortho-sections (no extra stack).

    ``residual_rms`` and ``score`` of its estimates are the predicted residual RMS (Noll >= 5)."""

    name = "model"
    probes = False

    def __init__(self, settings: Settings, predictor: Any = None) -> None:
        self.settings = settings
        self._predictor = predictor

    @property
    def predictor(self) -> Any:
        """The predictor, loaded from ``settings.model.checkpoint`` on first use."""
        self.prepare()
        return self._predictor

    @predictor.setter
    def predictor(self, value: Any) -> None:
        self._predictor = value

    @property
    def modes(self) -> list[int]:
        return [int(m) for m in self.predictor.modes]

    def prepare(self) -> None:
        if self._predictor is None:
            log.info("loading the model from %s", self.settings.model.checkpoint)
            self._predictor = Predictor.load(settings=self.settings)

    def estimate(self, measurement: MeasurementLike) -> Estimate:
        pred = self.predictor.predict(measurement.sections)
        coeffs = {int(k): float(v) for k, v in dict(pred.coefficients).items()}
        off = getattr(pred, "mask_offset", None)
        off = None if off is None else (float(off[0]), float(off[1]))
        residual = Estimate.residual_of(coeffs)
        return Estimate(coeffs, off, None, True, "", self.name, residual_rms=residual, score=residual)


__all__ = ["CNNEstimator"]
