"""How the window words what the loop and the devices say: one unit per quantity in a sentence.

The loop and its diagnosers write null depths as fractions (``measured null 0.0246 +- 0.0061 vs
the bead floor 0.0262 (+0.008)``), lengths in ``um`` and the RMS of a correction over Noll >= 5
only; the window writes null depths in percent everywhere else. :func:`display_text` rewrites a
line for the window: null depths, floors and their margins in percent, ``um`` as ``µm``, a
measured residual's ``+-`` as ``±`` (it stays in rad), and the correction's RMS named as the
higher-order one it is. A line it does not recognise is unchanged.

:data:`LOOP_ITERATION_LINE` matches the loop's own per-iteration decision line (``iteration 0:
applied``, numbered from 0 within a run); the window writes that decision itself, numbered like
its states (``iteration 1: applied`` ... ``after iteration 1: null ...``).
"""
from __future__ import annotations

import re

#: the loop's per-iteration decision line (the window writes its own, see the module docstring)
LOOP_ITERATION_LINE = re.compile(r"^iteration \d+: ")

_NUMBER = r"(\d+\.\d+)"
# a null depth or a floor given as a fraction (not already followed by %), with an optional +- sigma
_NULL = re.compile(r"\b(null(?: depth)?|floor) " + _NUMBER + r"(?: \+- " + _NUMBER + r")?(?![\d.]*\s*%)")
# the margin that follows a floor in percent: "(+0.008)", "(+0.008 margin)", "+ 0.008"
_MARGIN_PAREN = re.compile(r"(floor [\d.]+ %) \(\+(\d*\.?\d+)( margin)?\)")
_MARGIN_PLUS = re.compile(r"(floor [\d.]+ %) \+ (\d*\.?\d+)(?![\d.]*\s*%)")
_UM = re.compile(r"(\d|\)) um\b")
# the measured residual (calibration.quality): "residual 0.012 +- 0.006 rad" -> "± "
_RESIDUAL_PM = re.compile(r"\b(residual \d+\.\d+) \+- (\d+\.\d+ rad)")
_CORRECTION_RMS = "applied correction: RMS "


def percent(fraction: float) -> str:
    """A fraction as a percentage number without the sign: 0.0246 -> '2.46', 0.12 -> '12.0'."""
    value = 100.0 * fraction
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _null(match: re.Match[str]) -> str:
    word, value, sigma = match.group(1), float(match.group(2)), match.group(3)
    if sigma is None:
        return f"{word} {percent(value)} %"
    return f"{word} {percent(value)} ± {percent(float(sigma))} %"


def display_text(line: str) -> str:
    """``line`` worded for the window (see the module docstring)."""
    text = _NULL.sub(_null, str(line))
    text = _MARGIN_PAREN.sub(lambda m: f"{m.group(1)} (+{percent(float(m.group(2)))} %{m.group(3) or ''})", text)
    text = _MARGIN_PLUS.sub(lambda m: f"{m.group(1)} + {percent(float(m.group(2)))} %", text)
    text = _UM.sub(r"\1 µm", text)
    text = _RESIDUAL_PM.sub(r"\1 ± \2", text)
    return text.replace(_CORRECTION_RMS, "applied correction: higher-order (Noll ≥ 5) RMS ")


def tip_tilt_defocus_text(before: dict[int, float], after: dict[int, float]) -> str:
    """What a centring changed on the SLM: the tip, tilt and defocus coefficients it added and
    their RMS (the Zernikes are RMS-normalised: the root of the sum of squares), e.g.
    ``tip/tilt/defocus changed by Z2 +0.100, Z3 -0.050, Z4 +0.110 rad (0.16 rad RMS)``."""
    delta = {j: float(after.get(j, 0.0)) - float(before.get(j, 0.0)) for j in (2, 3, 4)}
    if not any(abs(v) > 1e-12 for v in delta.values()):
        return "tip/tilt/defocus on the SLM unchanged"
    rms = sum(v * v for v in delta.values()) ** 0.5
    parts = ", ".join(f"Z{j} {v:+.3f}" for j, v in delta.items())
    return f"tip/tilt/defocus changed by {parts} rad ({rms:.2f} rad RMS)"


__all__ = ["display_text", "percent", "tip_tilt_defocus_text", "LOOP_ITERATION_LINE"]
