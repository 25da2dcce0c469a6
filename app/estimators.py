"""Estimators by name, for the command line (``--corrector``), the GUI and scripts.

``make_estimator("model", settings, predictor=None)`` -> the CNN
(:class:`autoalign.models.estimator.CNNEstimator`; ``predictor`` None loads
``settings.model.checkpoint`` on first use); ``make_estimator("modal", settings, modes=...,
bias_rad=..., metric=..., max_step=...)`` -> classical sensorless modal AO
(:class:`autoalign.calibration.modal.ModalEstimator`); ``make_estimator("refined", settings,
predictor=None, ...)`` -> the CNN then the model-based fit (:class:`autoalign.models.refined.RefinedEstimator`,
options from the ``refine:`` settings).

Adding an estimator: implement :class:`autoalign.estimator.Estimator` in the package it belongs to
and add one entry to :data:`ESTIMATORS` (see ``docs/architecture.md``). The loop is not touched.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Callable

from autoalign.calibration.modal import ModalEstimator
from autoalign.estimator import Estimator
from autoalign.settings import Settings


def _cnn(settings: Settings, predictor: Any = None, **options: Any) -> Estimator:
    from autoalign.models.estimator import CNNEstimator  # torch: imported only when the CNN is used

    return CNNEstimator(settings, predictor, **options)


def _modal(settings: Settings, predictor: Any = None, **options: Any) -> Estimator:
    return ModalEstimator(**options)


def _refined(settings: Settings, predictor: Any = None, **options: Any) -> Estimator:
    from autoalign.models.refined import RefinedEstimator  # torch: imported only when used

    return RefinedEstimator(settings, predictor, **options)


#: name -> factory(settings, predictor=None, **options)
ESTIMATORS: dict[str, Callable[..., Estimator]] = {"model": _cnn, "modal": _modal, "refined": _refined}


def make_estimator(kind: str, settings: Settings, predictor: Any = None, **options: Any) -> Estimator:
    """The estimator registered as ``kind`` (:data:`ESTIMATORS`); ``options`` go to its class."""
    try:
        factory = ESTIMATORS[kind]
    except KeyError:
        raise ValueError(f"unknown corrector {kind!r}: expected one of {sorted(ESTIMATORS)}") from None
    return factory(settings, predictor, **options)


__all__ = ["ESTIMATORS", "make_estimator"]
