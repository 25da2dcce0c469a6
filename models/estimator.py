"""The CNN as an :class:`autoalign.estimator.Estimator`: one stack in, the aberration out.

Wraps anything with the :class:`autoalign.models.predictor.Predictor` API (``modes`` and
``predict(sections (3, n, n) photons) -> .coefficients {Noll: rad}, .mask_offset (x, y) or None``),
so tests can plug an oracle in. Without a predictor, the checkpoint ``settings.model.checkpoint``
is loaded on first use (:meth:`CNNEstimator.prepare`).

Coarse + fine: with ``model.fine_checkpoint`` set, a second network (``model.fine_modes``, trained
on small aberrations only, hence more precise there) takes over the modes it reads once the coarse
model's estimate is within the fine model's domain: when the coarse RMS over Noll >= 5 is at most
``model.fine_below_rad`` (below the fine model's training range, see below) and its mask offset at most
``model.fine_below_offset`` pupil radii, the fine model's coefficients replace the coarse ones for
``fine_modes`` (and its offset, when it reads one), and the coarse-only modes and the coarse
offset are multiplied by ``model.fine_damping``
(their per-shot noise would otherwise set the residual floor; a gain g < 1 on pure noise leaves
sigma sqrt(g / (2 - g)), 0.58 sigma at 0.5). Measured on the clean 0.7-1.0 rad trials: damping
0.5 -> 0.042 rad after 3 iterations, 0.3 -> 0.035 but the Noll 16..22 trials slow to 0.11; a
dead band (0.03 rad per mode, 0.02 pupil radii) made both rows worse (0.055, 0.068). The coarse model reads the whole
range, the offset and the modes the fine one does not know. This choice of network is a routing
decision, never a success criterion (the loop decides on measured quantities). ``fine_below_rad``
is 0.45, below the fine model's 0.6 rad training range, because the coarse estimate reads low far
off (on the 1.6-2.0 rad trials its RMS was 0.4-0.6x the truth): 0.45 instead of 0.6 took the
1.6-2.0 rad row from 0.118 to 0.094 rad after 5 iterations and the Noll 16..22 row from 0.031 to
0.019 after 3, the clean and offset rows unchanged (6 trials each).

Offset hold: when the coarse estimate is above ``model.offset_below_rad`` (0 = never), the mask
offset it reads is not applied (``mask_offset`` None, ``extras["offset_held"]``): beside a large
aberration the network reads offsets of ~0.06 pupil radii on a centred mask, and applying them
cost the 1.6-2.0 rad trials an iteration (0.179 -> 0.118 rad after 5 iterations with 0.6; the
offset rows, which start at 0.5 rad, unchanged).

Both networks run in one concurrent call (:class:`autoalign.models.predictor.ParallelPair`) when
they can; the fine network's output is then used only when the routing asks for it.
"""
from __future__ import annotations

import logging
import math
from typing import Any

from autoalign.estimator import Estimate, Estimator, MeasurementLike
from autoalign.models.predictor import ParallelPair, Predictor
from autoalign.settings import Settings

log = logging.getLogger("autoalign.models.estimator")


class CNNEstimator(Estimator):
    """The trained network read on the measurement's ortho-sections (no extra stack).

    ``residual_rms`` and ``score`` of its estimates are the predicted residual RMS (Noll >= 5)."""

    name = "model"
    probes = False

    def __init__(self, settings: Settings, predictor: Any = None, fine_predictor: Any = None,
                 parallel: bool = True) -> None:
        self.settings = settings
        self.parallel = parallel  # False: the two networks one after the other (reference timing)
        self._predictor = predictor
        self._fine = fine_predictor  # None: loaded from model.fine_checkpoint on first use (when set)
        self._fine_loaded = fine_predictor is not None
        self._pair: ParallelPair | None = None
        self._pair_made = False

    @property
    def predictor(self) -> Any:
        """The predictor, loaded from ``settings.model.checkpoint`` on first use."""
        self.prepare()
        return self._predictor

    @predictor.setter
    def predictor(self, value: Any) -> None:
        self._predictor = value
        self._pair_made, self._pair = False, None

    @property
    def modes(self) -> list[int]:
        return [int(m) for m in self.predictor.modes]

    @property
    def fine_predictor(self) -> Any:
        """The fine model (``model.fine_checkpoint``, loaded on first use) or None."""
        if not self._fine_loaded:
            self._fine_loaded = True
            path = str(getattr(self.settings.model, "fine_checkpoint", "") or "")
            if path:
                modes = list(self.settings.model.fine_modes)
                log.info("loading the fine model from %s (Noll %s)", path, modes)
                # the optics lock compares the modes; whether it reads the offset is the checkpoint's own
                self._fine = Predictor.load(path, settings=self.settings.replace(**{"model.modes": modes}))
        return self._fine

    def prepare(self) -> None:
        if self._predictor is None:
            log.info("loading the model from %s", self.settings.model.checkpoint)
            self._predictor = Predictor.load(settings=self.settings)
        _ = self.fine_predictor

    @property
    def pair(self) -> ParallelPair | None:
        """Both networks in one concurrent call (:class:`ParallelPair`), or None (one network, or
        predictors that cannot share a call: then they run one after the other)."""
        if not self._pair_made:
            self._pair_made = True
            if not self.parallel:
                return None
            fine = self.fine_predictor
            self._pair = None if fine is None else ParallelPair.make(self.predictor, fine)
        return self._pair

    def estimate(self, measurement: MeasurementLike) -> Estimate:
        pair = self.pair
        if pair is not None:  # both read at once (about one network's time on 2 cores)
            pred, fine_pred = pair.predict(measurement.sections)
        else:
            pred, fine_pred = self.predictor.predict(measurement.sections), None
        coeffs = {int(k): float(v) for k, v in dict(pred.coefficients).items()}
        off = getattr(pred, "mask_offset", None)
        off = None if off is None else (float(off[0]), float(off[1]))
        stage = "coarse" if self.fine_predictor is not None else "single"
        coarse_rms = Estimate.residual_of(coeffs)
        m = self.settings.model
        if (stage == "coarse" and coarse_rms <= float(m.fine_below_rad)
                and (off is None or math.hypot(*off) <= float(m.fine_below_offset))):
            fine = fine_pred if fine_pred is not None else self.fine_predictor.predict(measurement.sections)
            fine_coeffs = {int(k): float(v) for k, v in dict(fine.coefficients).items()}
            damping = float(m.fine_damping)
            coeffs = {k: (fine_coeffs[k] if k in fine_coeffs else damping * v) for k, v in coeffs.items()}
            coeffs.update({k: v for k, v in fine_coeffs.items() if k not in coeffs})
            fine_off = getattr(fine, "mask_offset", None)
            if fine_off is not None:  # a fine network that reads the offset itself
                off = (float(fine_off[0]), float(fine_off[1]))
            elif off is not None:
                off = (damping * off[0], damping * off[1])
            stage = "fine"
        offset_held = bool(off is not None and float(m.offset_below_rad) > 0
                           and coarse_rms > float(m.offset_below_rad))
        if offset_held:  # read beside a large aberration: not trusted, the mask stays where it is
            off = None
        residual = Estimate.residual_of(coeffs)
        return Estimate(coeffs, off, None, True, "", self.name, residual_rms=residual, score=residual,
                        extras={"stage": stage, "coarse_rms_rad": coarse_rms, "offset_held": offset_held})


__all__ = ["CNNEstimator"]
