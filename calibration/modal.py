"""Classical, model-free sensorless modal adaptive optics (the baseline the CNN is compared with).

For each Zernike mode ``j`` the SLM shows the current correction plus a bias ``+b Z_j`` and
``-b Z_j``; with the unbiased stack that is ``2N + 1`` stacks for ``N`` modes per round. An image
metric ``M`` is computed on each stack and a parabola through ``(-b, M-)``, ``(0, M0)``,
``(+b, M+)`` gives the mode's optimum ``x* = b (M+ - M-) / (2 (2 M0 - M+ - M-))`` (clipped to
``+-max_step * b``; a non-concave triple moves towards the better end). Modes are treated as
independent (Booth's modal scheme: exact when the metric is a sum of squares of the modes).

Metrics (``metric=``):

* ``"sharpness"``: the 3-D "low-order moment" sharpness ``sum(I^2) / sum(I)^2`` of the
  background-subtracted stack, in log. Translation invariant, sensitive to every mode, and
  near its maximum quadratic in the aberration.
* ``"correlation"`` (default): Pearson correlation of the re-centred ortho-sections with the
  ideal (unaberrated, simulated) donut; converges where sharpness does not, because some
  aberrations concentrate a donut's light into brighter lobes and so raise its sharpness.
* ``"null_depth"``: minus the donut's null depth. For a charge-1 vortex it senses only the modes
  with azimuthal order 1 (coma, tip/tilt) to first order, so it cannot correct astigmatism,
  trefoil or spherical aberration; kept for comparison.

:class:`ModalEstimator` is an :class:`autoalign.estimator.Estimator` (name ``"modal"``,
``probes`` True): its :meth:`~ModalEstimator.estimate` returns the aberration estimate (``-x*``
per mode) exactly like a model's prediction, so the loop applies ``-gain * estimate`` with all its
safety checks. It acquires only through the loop's public API (:class:`autoalign.estimator.ProbeHost`:
``probe``, ``restore``, ``ideal_sections``, ``correction``); a stop request surfaces as the host's
exception from ``probe``.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from autoalign.calibration.centroid import background_and_noise
from autoalign.calibration.measurement import to_photons
from autoalign.calibration.metrics import correlation, null_depth
from autoalign.estimator import Estimate, Estimator, MeasurementLike, ProbeHost

log = logging.getLogger("autoalign.modal")


def sharpness(stack_photons: np.ndarray, threshold_sigma: float = 2.0) -> float:
    """log(sum I^2 / (sum I)^2) over a background-subtracted, noise-thresholded stack."""
    data = np.asarray(stack_photons, dtype=float)
    bg, sigma = background_and_noise(data)
    w = np.clip(data - bg - threshold_sigma * sigma, 0.0, None)
    total = float(w.sum())
    if total <= 0:
        return float("nan")
    return float(math.log(float((w * w).sum()) / total**2))


def parabola_optimum(bias: float, m_minus: float, m_zero: float, m_plus: float,
                     max_step: float = 1.5) -> float:
    """Position of the maximum of the parabola through (-b, m-), (0, m0), (b, m+), clipped to
    +-max_step*b; NaN-safe (returns 0)."""
    if not all(math.isfinite(v) for v in (m_minus, m_zero, m_plus)):
        return 0.0
    curvature = 2 * m_zero - m_plus - m_minus
    if curvature <= 1e-12:  # not concave: step towards the better side
        return max_step * bias * float(np.sign(m_plus - m_minus))
    x = bias * (m_plus - m_minus) / (2 * curvature)
    return float(np.clip(x, -max_step * bias, max_step * bias))


class ModalEstimator(Estimator):
    """Model-free modal sensorless AO acquiring through the loop (see the module docstring).

    ``modes``: Noll indices scanned (default ``settings.model.modes`` of the host);
    ``bias_rad``: the bias ``b``; ``metric``: ``"correlation"``, ``"sharpness"`` or
    ``"null_depth"``; ``max_step``: clip of the parabola's optimum in units of ``b``.
    ``score`` of its estimates is minus the correlation with the ideal donut (lower is better);
    ``residual_rms`` is None (the scan does not read the residual, so it never declares
    convergence)."""

    name = "modal"
    probes = True

    def __init__(self, modes: list[int] | None = None, bias_rad: float = 0.5,
                 metric: str = "correlation", max_step: float = 1.5) -> None:
        if metric not in ("sharpness", "correlation", "null_depth"):
            raise ValueError(f"unknown metric {metric!r}")
        self._modes = list(modes) if modes else None
        self.bias = float(bias_rad)
        self.metric = metric
        self.max_step = float(max_step)
        self.host: ProbeHost | None = None
        self.last_metrics: dict[int, tuple[float, float, float]] = {}

    def attach(self, host: ProbeHost) -> None:
        self.host = host

    def _host(self) -> ProbeHost:
        if self.host is None:
            raise RuntimeError("the modal estimator acquires its stacks through a loop: attach() it first")
        return self.host

    @property
    def modes(self) -> list[int]:
        if self._modes is not None:
            return list(self._modes)
        return [int(m) for m in self._host().settings.model.modes]

    def measure(self, m: MeasurementLike) -> float:
        """The metric of an analysed measurement (higher is better); NaN when invalid."""
        if not m.valid:
            return float("nan")
        if self.metric == "sharpness":
            return sharpness(to_photons(m.stack.data, self._host().settings.camera))
        if self.metric == "correlation":
            return correlation(m.sections - m.background_photons, self._host().ideal_sections())
        return -null_depth(m.sections, m.background_photons)

    def estimate(self, measurement: MeasurementLike) -> Estimate:
        """Aberration estimate {mode: rad} around the host's current correction, from the
        unbiased ``measurement`` and 2 biased stacks per mode. The SLM shows the host's
        correction again afterwards (also after a stop request or a camera failure)."""
        host = self._host()
        if not self.modes:
            return Estimate({}, valid=False, reason="modal scan: no modes to scan", source=self.name)
        base = host.correction.copy()
        metric0 = self.measure(measurement)
        estimate: dict[int, float] = {}
        self.last_metrics = {}
        try:
            for j in self.modes:
                values = [self.measure(host.probe(base.plus({j: sign * self.bias}))) for sign in (-1.0, 1.0)]
                mm, mp = values
                x = parabola_optimum(self.bias, mm, metric0, mp, self.max_step)
                self.last_metrics[j] = (mm, metric0, mp)
                estimate[j] = -x
                log.debug("mode %d: metric %.4f / %.4f / %.4f -> step %+.3f rad", j, mm, metric0, mp, x)
        finally:
            try:
                host.restore()
            except Exception:  # noqa: BLE001 - the SLM itself may be the failed device
                log.warning("could not restore the correction on the SLM after the modal scan")
        # the loop keeps the best correction by score: the correlation with the ideal donut
        # (whatever the scan's metric), as before the estimator interface
        score = -correlation(measurement.sections - measurement.background_photons, host.ideal_sections())
        return Estimate(estimate, None, None, True, "", self.name, residual_rms=None, score=score,
                        extras={"metrics": dict(self.last_metrics)})


__all__ = ["ModalEstimator", "sharpness", "parabola_optimum"]
