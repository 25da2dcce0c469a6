"""Convention self-check: does the model read back what the SLM applies?

Each mode ``j`` is applied with ``+a`` and ``-a`` on top of the current correction; the model
predicts the aberration present in both stacks and the read-back response matrix

    R[i, j] = (pred_i(+a Z_j) - pred_i(-a Z_j)) / (2 a)

should be the identity (the model reports the aberration present, and adding ``+a Z_j`` on the SLM
adds ``+a Z_j`` of aberration). A mirrored camera, swapped x/y axes, a rotated camera, a reversed
z-stack or the wrong vortex handedness each flip or swap modes silently; they show as negative or
off-diagonal read-backs. The report names the convention error whose expected response matrix
best matches (``diagnosis``, a hint: pass/fail comes from the read-backs themselves).

Expected response matrices (:func:`expected_response`), from symmetry
-----------------------------------------------------------------------
``W`` is the pupil phase, ``I[+, W]`` the stack of the donut the model was trained on (vortex
charge and circular handedness of the settings), ``I[-, W]`` that of the opposite-handed donut.
Pupil coordinates follow the image: ``u`` along x, ``v`` along y (``Z_2 = 2 rho cos`` moves the
focus along +x).

* Pupil transforms act on Zernike modes through :func:`flip_signature`, computed from the Zernike
  functions themselves: ``S[i, j] = <Z_i, Z_j o G>`` over the unit disk (+-1 on the diagonal for
  mirrors and the rotation; the swap also exchanges odd-``m`` partners such as the trefoils).
* The image rotated by 180 degrees (mirrored in x AND in y) is EXACTLY the image of the pupil
  rotated by 180 degrees: ``I[+, W](-x, -y, z) = I[+, W o R180](x, y, z)``. Its pattern is
  ``S(R180)``: odd ``m`` flips. It is reported as "mirrored x and mirrored y".
* A mirror (x, y, or the x/y swap, determinant -1) turns the vortex and the circular polarisation
  the other way: ``I[+, W](G r) = I[-, W o G](r)`` exactly. What the model reads from the
  opposite-handed donut is the one ingredient symmetry does not give: the handedness factor
  ``epsilon(m)`` (:data:`HANDEDNESS_FACTOR`): the same sign for rotationally symmetric modes
  (``m = 0``), the opposite sign for ``|m| >= 2``, and no clean reading of coma (``|m| = 1``,
  read largely as trefoil; expected 0). ``tests/test_calibration.py`` checks it on the
  simulator with the opposite vortex charge. Pattern: ``diag(epsilon) S(G)``.
* A reversed z-stack: time reversal (complex conjugation) gives exactly
  ``I[+, W](x, y, -z) = I[-, -W](-x, -y, z)``, so its pattern is ``-diag(epsilon) S(R180)``:
  spherical and trefoil flip, astigmatism keeps its sign.
* Wrong vortex handedness on the SLM: the donut's null fills and read-backs collapse (no clean
  pattern); reported from a low mean gain and the null depth.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoalign.calibration.metrics import null_depth
from autoalign.estimator import Estimator
from autoalign.simulation.zernike import mode_name, noll_to_nm, zernike

log = logging.getLogger("autoalign.calibration")

#: pupil transforms (u, v) -> G(u, v), with u along the image's x and v along its y
PUPIL_TRANSFORMS = {
    "identity": lambda u, v: (u, v),
    "mirrored x": lambda u, v: (-u, v),
    "mirrored y": lambda u, v: (u, -v),
    "mirrored x and mirrored y": lambda u, v: (-u, -v),  # the 180-degree rotation
    "swapped x/y": lambda u, v: (v, u),
}

#: epsilon(|m|): sign with which a model of the configured donut reads mode Z_n^m from the
#: opposite-handed donut (see the module docstring); 0 where it does not read it cleanly (coma).
HANDEDNESS_FACTOR = {0: 1.0, 1: 0.0}   # every other |m|: -1


def handedness_factor(noll: int) -> float:
    """``epsilon(m)`` of Noll mode ``noll``: +1 for m = 0, 0 for |m| = 1, -1 otherwise."""
    return HANDEDNESS_FACTOR.get(abs(noll_to_nm(noll)[1]), -1.0)


def flip_signature(modes: Sequence[int], transform: str, radial_nodes: int = 32,
                   angles: int = 96) -> np.ndarray:
    """``S[i, j] = <Z_i, Z_j o G>`` (mean over the unit disk) for the pupil transform ``G`` named
    ``transform`` (a key of :data:`PUPIL_TRANSFORMS`), computed from the Zernike functions.

    Polar quadrature: Gauss-Legendre in ``rho^2`` and equally spaced angles, exact for Zernike
    products up to radial order ``2 radial_nodes - 1`` and azimuthal order ``angles - 1``. For
    the mirrors and the rotation ``S`` is diagonal, +1 where the mode is symmetric and -1 where
    it changes sign; the swap also exchanges the cosine and sine partners of odd ``m``."""
    if transform not in PUPIL_TRANSFORMS:
        raise ValueError(f"unknown pupil transform {transform!r}; expected one of {sorted(PUPIL_TRANSFORMS)}")
    x, w = np.polynomial.legendre.leggauss(radial_nodes)
    rho = np.sqrt((x + 1) / 2)                           # nodes in rho^2 on [0, 1]: area element
    theta = (np.arange(angles) + 0.5) * 2 * np.pi / angles
    rr, tt = np.meshgrid(rho, theta, indexing="ij")
    weight = np.repeat(w / 2, angles) / angles           # sums to 1: the mean over the disk
    u, v = (rr * np.cos(tt)).ravel(), (rr * np.sin(tt)).ravel()
    gu, gv = PUPIL_TRANSFORMS[transform](u, v)
    z0 = np.stack([zernike(j, np.hypot(u, v), np.arctan2(v, u)) for j in modes])
    z1 = np.stack([zernike(j, np.hypot(gu, gv), np.arctan2(gv, gu)) for j in modes])
    return (z0 * weight) @ z1.T


def expected_response(modes: Sequence[int], convention_error: str) -> np.ndarray:
    """Response matrix ``R`` expected when the camera image has ``convention_error`` (one of
    :data:`CANDIDATES`), from the symmetries in the module docstring."""
    eps = np.diag([handedness_factor(j) for j in modes])
    if convention_error in ("identity", "mirrored x and mirrored y"):
        return flip_signature(modes, convention_error)
    if convention_error in ("mirrored x", "mirrored y", "swapped x/y"):
        return eps @ flip_signature(modes, convention_error)
    if convention_error == "reversed z":
        return -eps @ flip_signature(modes, "mirrored x and mirrored y")
    raise ValueError(f"unknown convention error {convention_error!r}; expected one of {CANDIDATES}")


CANDIDATES = ("identity", "mirrored x", "mirrored y", "mirrored x and mirrored y", "swapped x/y", "reversed z")


@dataclass
class SelfCheckRow:
    mode: int
    name: str
    readback: float          # R[j, j]: 1 = read back with the right sign and scale
    dominant_mode: int       # argmax_i |R[i, j]|
    dominant_value: float
    sign_ok: bool
    mode_ok: bool


@dataclass
class SelfCheckReport:
    amplitude_rad: float
    modes: list[int]
    response: np.ndarray     # R (len(modes), len(modes)), rows predicted, columns applied
    rows: list[SelfCheckRow]
    ok: bool
    diagnosis: str
    scores: dict[str, float] = field(default_factory=dict)
    null_depth: float = float("nan")
    stacks: int = 0

    def summary(self) -> str:
        lines = [f"convention self-check ({'OK' if self.ok else 'FAILED'}): +-{self.amplitude_rad:g} rad per mode, "
                 f"{self.stacks} stacks; diagnosis: {self.diagnosis}",
                 f"{'mode':>4}  {'name':<30} {'read-back':>9}  {'dominant':>8}  sign  mode"]
        for r in self.rows:
            sign, mode = ("ok" if r.sign_ok else "BAD"), ("ok" if r.mode_ok else "BAD")
            lines.append(f"{r.mode:>4}  {r.name:<30} {r.readback:>+9.2f}  {r.dominant_mode:>4} "
                         f"({r.dominant_value:+.2f})  {sign:<4}  {mode}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "diagnosis": self.diagnosis, "amplitude_rad": self.amplitude_rad,
                "modes": self.modes, "response": np.asarray(self.response).round(4).tolist(),
                "scores": self.scores, "null_depth": self.null_depth, "stacks": self.stacks,
                "rows": [r.__dict__ for r in self.rows]}


def diagnose(response: np.ndarray, modes: list[int], min_gain: float = 0.4,
             null_depth: float = 0.0, max_null_depth: float = 0.25) -> tuple[str, dict[str, float]]:
    """Name the convention whose predicted response best matches ``response`` (scale-free),
    using only the modes the model reads at all; a filled null means the wrong vortex."""
    r = np.asarray(response, dtype=float)
    if np.isfinite(null_depth) and null_depth > max_null_depth:
        return (f"donut null filled (null depth {null_depth:.2f}): wrong vortex handedness or "
                "polarisation, or no vortex on the SLM"), {}
    seen = [i for i in range(len(modes)) if np.max(np.abs(r[:, i])) >= 0.5 * min_gain]
    if not seen:
        return "the model reads none of the applied modes", {}
    modes = [modes[i] for i in seen]
    r = r[np.ix_(seen, seen)]
    scores = {}
    for name in CANDIDATES:
        t = expected_response(modes, name)
        scale = max(float(np.sum(r * t) / max(float(np.sum(t * t)), 1e-12)), 0.0)
        scores[name] = float(np.linalg.norm(r - scale * t) / max(float(np.linalg.norm(t)), 1e-9))
    # on a tie (modes that a flip leaves unchanged) the identity wins: nothing contradicts it
    best = min(scores, key=lambda k: (round(scores[k], 9), k != "identity"))
    t_best = expected_response(modes, best)
    gain = float(np.sum(r * t_best) / max(np.sum(t_best * t_best), 1e-12))
    if gain < min_gain or scores[best] > 0.8:
        return "no consistent convention (wrong vortex handedness, wrong mask, or a model not " \
               "matching this microscope)", scores
    if best == "identity":
        return "conventions consistent", scores
    tied = [k for k in CANDIDATES if round(scores[k], 9) == round(scores[best], 9)]
    if len(tied) > 1:  # e.g. only even-m modes checked: a mirror in x reads like one in y
        return f"{' or '.join(tied)} (the modes checked cannot tell these apart)", scores
    return best, scores


def run_self_check(loop: Any, modes: list[int] | None = None, amplitude_rad: float = 0.5,
                   min_gain: float = 0.4, estimator: Estimator | None = None,
                   max_null_depth: float = 0.25) -> SelfCheckReport:
    """Apply each mode +-``amplitude_rad`` (2 stacks per mode), estimate, and compare the read-back
    with the identity. The loop's correction is shown again at the end.

    ``loop``: the alignment loop's public API (``probe``, ``restore``, ``correction``,
    ``estimator``, ``stacks_acquired``, ``log``). ``estimator``: a one-stack estimator (default
    the loop's; ``probes`` must be False: a scanning estimator would move the SLM itself)."""
    est = estimator or loop.estimator
    if est.probes:
        raise ValueError(f"the self-check reads each biased stack with a one-stack estimator such as "
                         f"the CNN; {est.name!r} acquires stacks of its own")
    pmodes = list(est.modes)
    modes = [m for m in (modes or pmodes) if m in pmodes]
    base = loop.correction.copy()
    response = np.zeros((len(modes), len(modes)))
    stacks0 = loop.stacks_acquired
    nd = []
    try:
        for col, j in enumerate(modes):
            reads = []
            for sign in (1.0, -1.0):
                m = loop.probe(base.plus({j: sign * amplitude_rad}))
                if not m.valid:
                    raise RuntimeError(f"self-check: mode {j} {sign:+.0f}: invalid stack ({m.reason})")
                nd.append(null_depth(m.sections, m.background_photons))
                p = est.estimate(m).coefficients
                reads.append(np.array([float(p.get(i, 0.0)) for i in modes]))
            response[:, col] = (reads[0] - reads[1]) / (2 * amplitude_rad)
    finally:
        try:
            loop.restore()
        except Exception:  # noqa: BLE001
            log.warning("self-check: could not restore the correction on the SLM")
    rows = []
    for col, j in enumerate(modes):
        dom = int(np.argmax(np.abs(response[:, col])))
        rb = float(response[col, col])
        rows.append(SelfCheckRow(j, mode_name(j), rb, modes[dom], float(response[dom, col]),
                                 sign_ok=rb >= min_gain, mode_ok=dom == col))
    null = float(np.nanmedian(nd)) if nd else float("nan")
    diagnosis, scores = diagnose(response, modes, min_gain, null, max_null_depth)
    ok = all(r.sign_ok and r.mode_ok for r in rows) and diagnosis == "conventions consistent"
    report = SelfCheckReport(amplitude_rad, modes, response, rows, ok, diagnosis, scores,
                             null, loop.stacks_acquired - stacks0)
    loop.log("%s", report.summary(), level=logging.INFO if ok else logging.WARNING)
    return report


__all__ = ["run_self_check", "SelfCheckReport", "SelfCheckRow", "diagnose", "expected_response", "flip_signature",
           "handedness_factor", "CANDIDATES", "PUPIL_TRANSFORMS"]
