"""Bead capture: bring a bead refused as "bead at edge" / "no bead" back into the ROI with
step-limited stage moves (``AlignmentLoop.capture`` calls :func:`search_bead`).

Each move goes toward the stack's brightest region (:func:`calibration.measurement.plan_capture`),
each axis limited to ``loop.capture_max_step_um``; after each move a new stack is acquired; at most
``loop.capture_tries`` moves. The devices are reached only through the callables handed in
(``acquire``, ``move_stage``), so the rule is tested without a microscope.
"""
from __future__ import annotations

import logging
from typing import Any
from collections.abc import Callable

from autoalign.calibration.measurement import CAPTURABLE, Measurement, plan_capture
from autoalign.settings import Settings


def capturable(m: Measurement, settings: Settings) -> bool:
    """True when ``m`` was refused for a reason a bead search can fix and searching is enabled
    (``loop.capture_tries`` > 0)."""
    return not m.valid and m.reason.startswith(CAPTURABLE) and int(settings.loop.capture_tries) > 0


def search_bead(m: Measurement, settings: Settings, calibration: Any, *,
                acquire: Callable[[], Measurement], move_stage: Callable[[tuple[float, float, float]], None],
                check_stop: Callable[[], None] = lambda: None,
                log: Callable[..., None] = lambda *a, **k: None) -> tuple[Measurement, list[str]]:
    """Search for the bead of ``m``: up to ``loop.capture_tries`` stage moves toward its
    brightest region, re-acquiring after each (``check_stop`` is called before each move; a
    :class:`LoopStopped` it raises propagates).

    Returns the last measurement (valid when found) and what was tried, one line per attempt.
    When the bead was not found, the measurement's ``reason`` ends with "; bead search failed:
    N attempt(s) (<what was tried>)"."""
    tries = int(settings.loop.capture_tries)
    tried: list[str] = []
    for _ in range(tries):
        if m.valid or not m.reason.startswith(CAPTURABLE):
            break
        check_stop()
        move, what = plan_capture(m, settings, calibration)
        if move is None:
            tried.append(what)
            break
        move_stage(move)
        tried.append(f"{what}: stage moved by ({move[0]:+.2f}, {move[1]:+.2f}, {move[2]:+.2f}) um")
        log("bead search: %s", tried[-1], level=logging.WARNING)
        m = acquire()
    if not m.valid and m.reason.startswith(CAPTURABLE) and tries > 0:
        summary = "; ".join(tried) if tried else "nothing tried"
        m.reason = f"{m.reason}; bead search failed: {len(tried)} attempt(s) ({summary})"
    return m, tried


__all__ = ["capturable", "search_bead"]
