"""The references the loop measures against and the simulated truth it records.

:class:`LoopReference`: the ideal (unaberrated) donut's sections and MEASURED null depth through the
configured bead (:func:`calibration.donut.ideal_reference`, computed once: the bead floor of
``AlignmentLoop.ideal_null_depth``), and the simulated microscope's truth of the state now on the
SLM (true residual RMS, true null depth, true mask offset; :mod:`calibration.donut`), computed once
per SLM state (``donut.truth_key``; about 1 s each on 2 cores). Without a simulated microscope the
truth is empty.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from autoalign.calibration import donut
from autoalign.settings import Settings


class LoopReference:
    """Cached ideal reference and per-state truth for one loop's ``settings``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ideal: dict[str, Any] | None = None
        #: (truth_key, metrics) of the state last asked for
        self._truth: tuple[bytes | None, dict[str, float]] = (None, {})

    def ideal(self) -> dict[str, Any]:
        """:func:`calibration.donut.ideal_reference` of the settings (``sections``, ``null_depth``)."""
        if self._ideal is None:
            self._ideal = donut.ideal_reference(self.settings)
        return self._ideal

    def ideal_sections(self) -> np.ndarray:
        return self.ideal()["sections"]  # type: ignore[no-any-return]

    def ideal_null_depth(self) -> float:
        return float(self.ideal()["null_depth"])

    def truth(self, microscope: Any) -> dict[str, float]:
        """``true_residual_rms``, ``true_null_depth`` and ``true_mask_offset`` (its length) of the
        state on ``microscope`` now; the keys it cannot tell are left out (all of them without a
        simulated microscope). Reused while the SLM state is unchanged."""
        key = donut.truth_key(microscope)
        if key is not None and key == self._truth[0]:
            return dict(self._truth[1])
        out = {"true_residual_rms": donut.true_residual_rms(microscope),
               "true_null_depth": donut.true_null_depth(microscope, self.settings)}
        off = donut.true_mask_offset(microscope)
        if off is not None and all(math.isfinite(v) for v in off):
            out["true_mask_offset"] = math.hypot(*off)
        found = {k: v for k, v in out.items() if v is not None}
        self._truth = (key, found)
        return dict(found)


__all__ = ["LoopReference"]
