"""What the alignment loop can say about why it stopped: :class:`Diagnosis` and the
:class:`Diagnoser` seam.

A diagnoser looks at the loop's state (its history of :class:`autoalign.app.loop.IterationRecord`
and a few figures, :class:`LoopState`) and the last estimate, and names a fault the loop cannot
correct by itself, with the knob a user turns. The loop asks its diagnosers (in order, first
answer wins) after every iteration; a diagnosis with ``stop`` True ends the run, and the run's
``stop_reason`` then reads ``"stopped: <cause>: <action>"``.

Ground floor: imports nothing of the project, so every floor may implement a diagnoser
(``app.loop.LoopDiagnoser`` ships what the loop can tell itself; a model-based fault diagnosis,
e.g. polarisation impurity or SLM stroke from a fitted stack, plugs in the same way).

Units: null depth is centre over peak intensity (dimensionless); phases in radians; mask offset
in pupil radii; lengths in micrometres.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable
from collections.abc import Sequence

#: severities, mildest first
SEVERITIES = ("info", "warning", "error")


@dataclass
class Diagnosis:
    """A named finding with the knob to turn.

    ``name``: short identifier (``"aligned"``, ``"flipped_frame"``, ``"mask_offset_out_of_range"``,
    ``"estimate_invalid"``, ``"bead_lost"``, ``"polarisation_impurity"``, ...). ``cause``: what is
    wrong, in plain words. ``action``: what the user should do (the setting or the optical element
    to adjust; "" when nothing). ``limiting_terms``: figures that limit the result, by name (e.g.
    ``{"null_depth": 0.031, "bead_floor": 0.023}``). ``severity``: one of :data:`SEVERITIES`.
    ``stop``: True when the loop must stop iterating (corrections cannot help, or would harm).
    ``success``: True only for the aligned state (the loop then reports "converged")."""

    name: str
    cause: str
    action: str = ""
    limiting_terms: dict[str, float] = field(default_factory=dict)
    severity: str = "warning"
    stop: bool = True
    success: bool = False

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Diagnosis.severity = {self.severity!r}: expected one of {SEVERITIES}")

    def message(self) -> str:
        """One line for the stop reason: ``"<cause>: <action>"`` (or the cause alone)."""
        return f"{self.cause}: {self.action}" if self.action else self.cause

    def __str__(self) -> str:  # what a person reads (the GUI's diagnosis slot, logs)
        return self.message()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "cause": self.cause, "action": self.action,
                "limiting_terms": {k: float(v) for k, v in self.limiting_terms.items()},
                "severity": self.severity, "stop": self.stop, "success": self.success}


@dataclass
class LoopState:
    """What a diagnoser is shown after each iteration.

    ``history``: this run's iteration records (oldest first; each has ``decision``, ``metrics``
    with the MEASURED ``null_depth`` and ``correlation_ideal``, ``estimate``, ``correction``).
    ``null_floor``: the measured null depth of a perfect donut through the configured bead
    (noise-free). ``floor_margin``: the allowance above it that still counts as aligned.
    ``settings``: the loop's settings. ``extras``: anything else the loop knows (e.g. the capture
    attempts of a bead search)."""

    history: Sequence[Any]
    null_floor: float
    floor_margin: float
    settings: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Diagnoser(Protocol):
    """Names what limits the alignment. ``diagnose(state, last_estimate)`` returns a
    :class:`Diagnosis` or None (nothing to say). It must not touch devices; it may be called after
    every iteration, so keep it cheap (or let it look only at the last records)."""

    def diagnose(self, state: LoopState, last_estimate: Any) -> Diagnosis | None:
        ...


__all__ = ["Diagnosis", "Diagnoser", "LoopState", "SEVERITIES"]
