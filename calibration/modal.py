"""Classical, model-free sensorless modal adaptive optics (the baseline the CNN is compared with).

Booth-style modal scheme: the image metric ``M`` (higher is better) is, near its maximum,
quadratic in each Zernike mode, ``M(x) = M_max - c_j (x - x*_j)^2`` for a bias ``x`` of mode
``j`` added to the current correction. Each round estimates ``x*_j`` for every mode around the
same correction (the loop's own, unbiased stack ``M0`` is shared) and the loop applies the step.

Schemes (``scheme=``):

* ``"2n+1"``: biases ``-b`` and ``+b`` per mode; the parabola through ``(-b, M-)``, ``(0, M0)``,
  ``(+b, M+)`` gives ``x* = b (M+ - M-) / (2 (2 M0 - M+ - M-))`` (:func:`parabola_optimum`);
  the curvature is measured in situ each round. ``2N`` extra stacks per round.
* ``"n+1"``: one biased stack per mode, ``s b`` with the sign ``s`` alternating between rounds,
  and the KNOWN curvature ``c_j``: ``x* = (M_b - M0) / (2 s b c_j) + s b / 2``
  (:func:`known_curvature_optimum`). ``c_j`` is calibrated ONCE on the simulated, noise-free
  ideal donut through the same measurement pipeline, at the N+1 bias ``n1_bias_rad``
  (:func:`calibrate_curvature`, ``2N + 1`` simulated stacks). ``N`` extra stacks per round. The
  curvature measured in situ matches the calibrated one only near the optimum (within ~20 % for
  a correlation above ~0.9; half of it, even of the wrong sign for some modes, at 0.75), and a
  curvature error ``e`` biases the estimate by ``e s b / 2`` per mode, so rounds whose unbiased
  correlation is below ``n1_min_metric`` (0.9) are 2N+1 rounds and the N+1 bias is small (0.3 rad).

Metric (``metric=``, measured in ``docs/baseline.md``):

* ``"correlation"`` (default): Pearson correlation of the re-centred ortho-sections with the
  ideal (unaberrated, simulated) donut, corrected for the attenuation that camera noise causes
  (:func:`noise_corrected_correlation`), so its scale and curvature do not depend on the photon
  count. Concave in every mode Noll 5..15 at biases 0.3..1.5 rad; noise 3e-5 (ideal) to 5e-4
  (0.5 rad aberration) per stack against a curvature signal ``c b^2`` of 0.02..0.2.
* ``"null_depth"``: minus the donut's measured null depth. For a charge-1 vortex the null is
  first-order sensitive only to modes of azimuthal order |m| = 1 (coma 7, 8); others enter at
  fourth order. Measured through an 80 nm bead (which fills the null) it is not even concave in
  coma, and its noise (3e-3) exceeds its curvature signal: kept for comparison only.
* ``"sharpness"``: the 3-D low-order-moment sharpness ``log(sum I^2 / (sum I)^2)``; several
  aberrations (coma, spherical, quadrafoil) concentrate a donut's light into brighter lobes and
  RAISE it, so its maximum is not the ideal donut: kept for comparison only.

Iteration strategy. The untuned baseline (bias 0.5, step clip 1.5 b, gain 1, plain correlation)
got worse in its first round on some trials and oscillated on others: the metric couples modes of
the same symmetry (oblique astigmatism 5 with secondary astigmatism 13, 6 with 12; normalised
coupling ~0.5), so estimating every mode around the same base and applying all of them at full
gain overshoots along the coupled direction (mode 13 hit the +-clip with alternating sign every
round while its true value was 0), and far from the optimum a non-concave triple stepped the full
clip towards a noisy "better" side. This estimator applies ``step_gain`` (0.7) of each clipped
step (damped Jacobi iteration: stable while the largest eigenvalue of the curvature-normalised
metric matrix is below 2 / 0.7 = 2.9, against 2 at gain 1), clips at ``max_step`` (1.0) times the bias,
and keeps a trust region: a round whose unbiased metric is worse than the best base so far (by
more than the metric's noise) does not scan but returns to the best base and halves the clip.

:class:`ModalEstimator` is an :class:`autoalign.estimator.Estimator` (name ``"modal"``,
``probes`` True): :meth:`~ModalEstimator.estimate` returns the aberration estimate (``-x*`` per
mode) like a model's prediction, so the loop applies ``-gain * estimate`` with all its safety
checks. It acquires only through the loop's public API (:class:`autoalign.estimator.ProbeHost`:
``probe``, ``restore``, ``ideal_sections``, ``correction``, ``settings``); a stop request surfaces
as the host's exception from ``probe``. ``Estimate.score`` is minus the metric (lower is better);
``residual_rms`` is None (a metric scan does not read the residual).

Units: Zernike Noll index from 1, RMS-normalised, radians.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from autoalign.calibration.centroid import background_and_noise
from autoalign.calibration.measurement import Measurement, analyse_stack, to_photons
from autoalign.calibration.metrics import correlation, null_depth
from autoalign.correction import Correction
from autoalign.estimator import Estimate, Estimator, MeasurementLike, ProbeHost

log = logging.getLogger("autoalign.modal")

#: metrics a :class:`ModalEstimator` can optimise (higher is better)
METRICS = ("correlation", "null_depth", "sharpness")
#: scan schemes: 2N+1 (parabola through -b, 0, +b) and N+1 (one bias, known curvature)
SCHEMES = ("2n+1", "n+1")


# ---------------------------------------------------------------------------------------------- metrics
def sharpness(stack_photons: np.ndarray, threshold_sigma: float = 2.0) -> float:
    """log(sum I^2 / (sum I)^2) over a background-subtracted, noise-thresholded stack."""
    data = np.asarray(stack_photons, dtype=float)
    bg, sigma = background_and_noise(data)
    w = np.clip(data - bg - threshold_sigma * sigma, 0.0, None)
    total = float(w.sum())
    if total <= 0:
        return float("nan")
    return float(math.log(float((w * w).sum()) / total**2))


def noise_corrected_correlation(sections: np.ndarray, background: float, ideal: np.ndarray,
                                noise_variance: np.ndarray | float) -> float:
    """Pearson correlation of ``sections - background`` (photons) with ``ideal``, divided by the
    attenuation ``sqrt(1 - mean(noise_variance) / var(sections))`` that uncorrelated pixel noise
    causes (Spearman's correction): the correlation the noise-free image would have, so the
    metric's scale, and its curvature, do not depend on the photon count. NaN when undefined."""
    data = np.asarray(sections, dtype=float) - background
    r = correlation(data, ideal)
    total_var = float(np.var(data))
    noise = float(np.mean(noise_variance))
    if not math.isfinite(r) or total_var <= 0 or noise >= total_var:
        return r
    return float(r / math.sqrt(1.0 - noise / total_var))


def section_noise_variance(m: MeasurementLike, camera: Any) -> np.ndarray:
    """Per-pixel noise variance (photons^2, the unit of ``Measurement.sections``) of a
    measurement's sections: shot noise ``photons / QE`` (Poisson in electrons = QE x photons)
    plus read noise ``(read_noise_electrons / QE)^2``."""
    qe = float(camera.quantum_efficiency)
    shot = np.clip(np.asarray(m.sections, dtype=float), 0.0, None) / qe
    return shot + (float(camera.read_noise_electrons) / qe) ** 2


def metric_value(kind: str, m: MeasurementLike, ideal: np.ndarray, camera: Any) -> float:
    """The metric ``kind`` (:data:`METRICS`, higher is better) of an analysed measurement; NaN
    when the measurement is invalid. ``ideal``: unaberrated sections (``ProbeHost.ideal_sections``);
    ``camera``: the camera settings (photon conversion, noise)."""
    if not m.valid:
        return float("nan")
    if kind == "correlation":
        return noise_corrected_correlation(m.sections, m.background_photons, ideal,
                                           section_noise_variance(m, camera))
    if kind == "null_depth":
        return -null_depth(m.sections, m.background_photons)
    if kind == "sharpness":
        return sharpness(to_photons(m.stack.data, camera))
    raise ValueError(f"unknown metric {kind!r}: expected one of {METRICS}")


# ---------------------------------------------------------------------------------------------- optima
def parabola_optimum(bias: float, m_minus: float, m_zero: float, m_plus: float,
                     max_step: float = 1.5) -> float:
    """Position (rad) of the maximum of the parabola through (-b, m-), (0, m0), (b, m+), clipped
    to +-max_step*b; a non-concave triple steps ``max_step * b`` towards the better side;
    non-finite values give 0."""
    if not all(math.isfinite(v) for v in (m_minus, m_zero, m_plus)):
        return 0.0
    curvature = 2 * m_zero - m_plus - m_minus
    if curvature <= 1e-12:  # not concave: step towards the better side
        return max_step * bias * float(np.sign(m_plus - m_minus))
    x = bias * (m_plus - m_minus) / (2 * curvature)
    return float(np.clip(x, -max_step * bias, max_step * bias))


def known_curvature_optimum(bias: float, m_zero: float, m_biased: float, curvature: float,
                            max_step: float = 1.5) -> float:
    """Optimum x* (rad) of ``M(x) = M_max - curvature (x - x*)^2`` from ``M(0) = m_zero`` and
    ``M(bias) = m_biased`` (``bias`` may be negative): ``x* = (m_b - m_0) / (2 b c) + b / 2``,
    clipped to +-max_step*|b|; 0 when a value is not finite or the curvature not positive."""
    if not (math.isfinite(m_zero) and math.isfinite(m_biased)) or not curvature > 0 or bias == 0:
        return 0.0
    x = (m_biased - m_zero) / (2.0 * bias * curvature) + bias / 2.0
    limit = max_step * abs(bias)
    return float(np.clip(x, -limit, limit))


# ---------------------------------------------------------------------------------------------- simulation
class SimulatedProbeHost:
    """A :class:`autoalign.estimator.ProbeHost` over a simulated microscope (no loop): shows a
    correction on a simulated SLM and returns the analysed measurement. For the curvature
    calibration (noise-free, no aberration), metric characterisation and tests.

    ``aberration``: hidden aberration {Noll: rad}; ``noise``: camera noise on/off; ``seed``."""

    def __init__(self, settings: Any, aberration: dict[int, float] | None = None, noise: bool = False,
                 seed: int = 0) -> None:
        from autoalign.calibration import donut  # the SLM phase and the ideal reference
        from autoalign.hardware.acquisition import acquire_stack
        from autoalign.hardware.simulated import SimulatedCamera, SimulatedFocusStage, SimulatedSLM
        from autoalign.simulation.microscope import SimulatedMicroscope, nominal_instrument

        self.settings = nominal_instrument(settings.replace(**{"hardware.backend": "simulated",
                                                              "slm.backend": "simulated"}))
        self._donut, self._acquire = donut, acquire_stack
        self.microscope = SimulatedMicroscope(self.settings, seed=seed, aberration=dict(aberration or {}),
                                              mask_offset=(0.0, 0.0), bead_um=(0.0, 0.0, 0.0),
                                              drift_um_per_step=0.0, noise=noise)
        self.camera = SimulatedCamera(self.microscope)
        self.focus = SimulatedFocusStage(self.microscope)
        self.slm = SimulatedSLM(self.microscope)
        for dev in (self.camera, self.focus, self.slm):
            dev.open()
        self.correction = Correction()
        self.stacks_acquired = 0
        self._ideal: np.ndarray | None = None
        self.restore()

    def _show(self, correction: Correction) -> None:
        self._donut.show_correction(self.slm, self.settings, correction)

    def acquire(self) -> Measurement:
        """Acquire and analyse one stack of what the SLM shows now."""
        self.stacks_acquired += 1
        stack = self._acquire(self.camera, self.focus, self.settings)
        return analyse_stack(stack, self.settings, float(self.camera.saturation_adu))

    def probe(self, correction: Correction) -> Measurement:
        self._show(correction)
        return self.acquire()

    def restore(self) -> None:
        self._show(self.correction)

    def apply(self, correction: Correction) -> None:
        """Make ``correction`` this host's own and show it."""
        self.correction = correction.copy()
        self._show(self.correction)

    def ideal_sections(self) -> np.ndarray:
        if self._ideal is None:
            self._ideal = self._donut.ideal_reference(self.settings)["sections"]
        return self._ideal

    def true_residual_rms(self) -> float:
        return float(self.microscope.residual_rms())


_CURVATURES: dict[tuple, dict[int, float]] = {}


def calibrate_curvature(settings: Any, modes: list[int], bias: float | dict[int, float],
                        metric: str = "correlation") -> dict[int, float]:
    """Curvature ``c_j`` (metric units per rad^2) of ``M(x) = M_max - c_j x^2`` per mode on the
    simulated, noise-free ideal donut, measured through the measurement pipeline with biases
    ``+-b_j``: ``c_j = (2 M(0) - M(b) - M(-b)) / (2 b^2)`` (exact for a quadratic metric; for a
    real one the secant curvature over the bias, which is what the N+1 estimate with that bias
    needs). Cached per optics/camera/stack settings, modes, biases and metric; ``2 N + 1``
    noise-free simulated stacks."""
    modes = [int(j) for j in modes]
    biases = {j: float(bias[j] if isinstance(bias, dict) else bias) for j in modes}
    key = (repr(settings.optics), repr(settings.camera), repr(settings.stack), tuple(biases.items()), metric)
    if key in _CURVATURES:
        return dict(_CURVATURES[key])
    host = SimulatedProbeHost(settings, noise=False)
    ideal = host.ideal_sections()
    cam = host.settings.camera

    def value(corr: dict[int, float]) -> float:
        return metric_value(metric, host.probe(Correction(corr)), ideal, cam)

    m0 = value({})
    out = {j: float((2 * m0 - value({j: b}) - value({j: -b})) / (2 * b * b)) for j, b in biases.items()}
    _CURVATURES[key] = dict(out)
    return out


# ---------------------------------------------------------------------------------------------- estimator
class ModalEstimator(Estimator):
    """Model-free modal sensorless AO acquiring through the loop (see the module docstring).

    ``modes``: Noll indices scanned (default ``settings.model.modes`` of the host);
    ``bias_rad``: the 2N+1 bias ``b`` (one value, or {Noll: rad}); ``metric``: one of
    :data:`METRICS`; ``scheme``: ``"2n+1"`` or ``"n+1"``; ``max_step``: clip of a mode's step in
    units of its bias; ``step_gain``: fraction of the estimated optimum returned (damping);
    ``trust_region``: step back to the best base when a round's unbiased metric got worse;
    ``curvature``: {Noll: c} for N+1 (default: :func:`calibrate_curvature` on first use);
    ``n1_min_metric``: N+1 rounds only when the unbiased metric is at least this (else 2N+1);
    ``n1_bias_rad``: the N+1 bias (None: ``bias_rad``).
    ``score`` of its estimates is minus the metric of the unbiased stack (lower is better);
    ``residual_rms`` is None."""

    name = "modal"
    probes = True

    def __init__(self, modes: list[int] | None = None, bias_rad: float | dict[int, float] = 0.6,
                 metric: str = "correlation", max_step: float = 1.0, scheme: str = "2n+1",
                 step_gain: float = 0.7, trust_region: bool = True,
                 curvature: dict[int, float] | None = None, n1_min_metric: float = 0.9,
                 n1_bias_rad: float | None = 0.3) -> None:
        if metric not in METRICS:
            raise ValueError(f"modal estimator: unknown metric {metric!r}: expected one of {METRICS}")
        scheme = str(scheme).lower().replace("N", "n")
        if scheme not in SCHEMES:
            raise ValueError(f"modal estimator: unknown scheme {scheme!r}: expected one of {SCHEMES}")
        biases = bias_rad.values() if isinstance(bias_rad, dict) else [bias_rad]
        if not all(math.isfinite(float(b)) and float(b) > 0 for b in biases):
            raise ValueError(f"modal estimator: bias_rad = {bias_rad!r}: expected positive radians")
        if not (max_step > 0 and 0 < step_gain <= 1.5):
            raise ValueError(f"modal estimator: max_step = {max_step!r} must be > 0 and step_gain = {step_gain!r} "
                             "in (0, 1.5]")
        self._modes = list(modes) if modes else None
        self.bias_rad = bias_rad
        self.metric = metric
        self.scheme = scheme
        self.max_step = float(max_step)
        self.step_gain = float(step_gain)
        self.trust_region = bool(trust_region)
        self.curvature = {int(k): float(v) for k, v in curvature.items()} if curvature else None
        self.n1_min_metric = float(n1_min_metric)
        self.n1_bias_rad = None if n1_bias_rad is None else float(n1_bias_rad)
        self.host: ProbeHost | None = None
        self.last_metrics: dict[int, tuple[float, ...]] = {}
        self.rounds = 0
        self._best: tuple[float, Correction] | None = None   # (metric, correction) of the best base
        self._trust = 1.0                                     # current fraction of max_step

    # ------------------------------------------------------------------ plumbing
    def attach(self, host: ProbeHost) -> None:
        self.host = host
        self.reset()

    def reset(self) -> None:
        """Forget the rounds so far (trust region, best base, N+1 sign alternation)."""
        self.rounds = 0
        self._best = None
        self._trust = 1.0

    def _host(self) -> ProbeHost:
        if self.host is None:
            raise RuntimeError("the modal estimator acquires its stacks through a loop: attach() it first")
        return self.host

    @property
    def modes(self) -> list[int]:
        if self._modes is not None:
            return list(self._modes)
        return [int(m) for m in self._host().settings.model.modes]

    @property
    def stacks_per_round(self) -> int:
        """Stacks per round including the loop's unbiased one: 2N+1 or N+1."""
        n = len(self.modes)
        return (2 * n if self.scheme == "2n+1" else n) + 1

    def bias(self, mode: int, scheme: str = "2n+1") -> float:
        """The bias (rad) of ``mode`` in a round of ``scheme`` (N+1: ``n1_bias_rad`` when set)."""
        if scheme == "n+1" and self.n1_bias_rad is not None:
            return self.n1_bias_rad
        if isinstance(self.bias_rad, dict):
            return float(self.bias_rad.get(mode, self.bias_rad.get(int(mode), min(self.bias_rad.values()))))
        return float(self.bias_rad)

    def measure(self, m: MeasurementLike) -> float:
        """The metric of an analysed measurement (higher is better); NaN when invalid."""
        host = self._host()
        return metric_value(self.metric, m, host.ideal_sections(), host.settings.camera)

    def curvatures(self) -> dict[int, float]:
        """Per-mode curvature for N+1 (given, else :func:`calibrate_curvature` on first use)."""
        if self.curvature is None:
            self.curvature = calibrate_curvature(self._host().settings, self.modes,
                                                 {j: self.bias(j, "n+1") for j in self.modes}, self.metric)
        return self.curvature

    def _step(self, mode: int, bias: float, sign: float, scheme: str) -> float:
        """The optimum x* (rad) of ``mode`` from :attr:`last_metrics`, clipped to the trust region."""
        step = self.max_step * self._trust
        row = self.last_metrics[mode]
        if scheme == "2n+1":
            return parabola_optimum(bias, row[0], row[1], row[2], step)
        return known_curvature_optimum(sign * bias, row[0], row[1], self.curvatures()[mode], step)

    # ------------------------------------------------------------------ one round
    def estimate(self, measurement: MeasurementLike) -> Estimate:
        """Aberration estimate {mode: rad} around the host's current correction, from the
        unbiased ``measurement`` and ``2N`` (2N+1) or ``N`` (N+1) biased stacks. The SLM shows
        the host's correction again afterwards (also after a stop request or a camera failure)."""
        host = self._host()
        if not self.modes:
            return Estimate({}, valid=False, reason="modal scan: no modes to scan", source=self.name)
        base = host.correction.copy()
        metric0 = self.measure(measurement)
        if not math.isfinite(metric0):
            return Estimate({}, valid=False, reason=f"modal scan: metric {self.metric} undefined", source=self.name)
        score = -metric0
        # trust region: a worse base than the best one so far -> go back there, smaller steps
        if self.trust_region and self._best is not None and metric0 < self._best[0] - self._tolerance():
            best_metric, best = self._best
            self._trust *= 0.5
            gain = float(host.settings.loop.gain) or 1.0
            back = {j: (base.coefficients.get(j, 0.0) - best.coefficients.get(j, 0.0)) / gain for j in self.modes}
            log.info("modal: metric %.4f worse than the best %.4f: back to it, steps x%.2f", metric0,
                     best_metric, self._trust)
            self.rounds += 1
            self._best = None  # the next round starts afresh from the restored base
            return Estimate(back, None, None, True, "", self.name, residual_rms=None, score=score,
                            extras={"backtrack": True, "metric": metric0})
        if self._best is None or metric0 > self._best[0]:
            self._best = (metric0, base)
        sign = 1.0 if self.rounds % 2 == 0 else -1.0
        modes = self.modes
        # N+1 needs the in-situ curvature to match the calibrated one: measured within ~20 % once the
        # correlation exceeds ~0.9, not below (docs/baseline.md); below, this round is 2N+1
        scheme = self.scheme if (self.scheme == "2n+1" or metric0 >= self.n1_min_metric) else "2n+1"
        if scheme == "n+1":
            self.curvatures()  # calibrated once, before the scan
        biases = [self.bias(j, scheme) for j in modes]
        self.last_metrics = {}
        try:
            for j, b in zip(modes, biases):
                if scheme == "2n+1":
                    mm = self.measure(host.probe(base.plus({j: -b})))
                    mp = self.measure(host.probe(base.plus({j: b})))
                    self.last_metrics[j] = (mm, metric0, mp)
                else:
                    self.last_metrics[j] = (metric0, self.measure(host.probe(base.plus({j: sign * b}))))
        finally:
            try:
                host.restore()
            except Exception:  # noqa: BLE001 - the SLM itself may be the failed device
                log.warning("could not restore the correction on the SLM after the modal scan")
        estimate = {j: -self.step_gain * self._step(j, b, sign, scheme) for j, b in zip(modes, biases)}
        self.rounds += 1
        return Estimate(estimate, None, None, True, "", self.name, residual_rms=None, score=score,
                        extras={"metrics": dict(self.last_metrics), "metric": metric0, "scheme": scheme})

    def _tolerance(self) -> float:
        """Drop of the unbiased metric that counts as worse: about ten times the metric's shot
        noise per stack at a 0.5 rad aberration for the correlation (2.6e-4), a few times it for
        the others (null depth 3e-3, sharpness 1.4e-2; measured, docs/baseline.md)."""
        return {"correlation": 0.003, "null_depth": 0.01, "sharpness": 0.03}[self.metric]


__all__ = ["ModalEstimator", "SimulatedProbeHost", "METRICS", "SCHEMES", "calibrate_curvature",
           "known_curvature_optimum", "metric_value", "noise_corrected_correlation", "parabola_optimum",
           "sharpness"]
