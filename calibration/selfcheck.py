"""Convention self-check: does the model read back what the SLM applies?

Each mode ``j`` is applied with ``+a`` and ``-a`` on top of the current correction; the model
predicts the aberration present in both stacks and the read-back response matrix

    R[i, j] = (pred_i(+a Z_j) - pred_i(-a Z_j)) / (2 a)

should be the identity (the model reports the aberration present, and adding ``+a Z_j`` on the SLM
adds ``+a Z_j`` of aberration). A mirrored camera, swapped x/y axes, a reversed z-stack or the wrong
vortex handedness each flip or swap modes silently; they show as negative or off-diagonal
read-backs. The report names the convention error whose expected response matrix best matches
(``diagnosis``, a hint: pass/fail comes from the read-backs themselves):

* image mirrored in x / y or x-y swapped: the patterns of the equivalent pupil transforms for the
  donut (see ``_transform_matrix``; measured on the simulator, not those of a plain Gaussian focus)
* z-stack reversed     <-> the conjugate beam (see ``_transform_matrix``): spherical flips sign.
* wrong vortex handedness: the donut's null fills and read-backs collapse (no clean pattern);
  reported from a low mean gain and the null depth.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoalign.calibration.metrics import null_depth
from autoalign.estimator import Estimator
from autoalign.simulation.zernike import mode_name, noll_to_nm, zernike

log = logging.getLogger("autoalign.calibration")


def _transform_matrix(modes: list[int], mapping: str) -> np.ndarray:
    """T[i, j] = <Z_i, Z_j o transform> over the unit disk, for the named pupil transform."""
    if mapping == "reversed z":
        # Exact for intensity: I(x, y, -z; W) = I(-x, -y, z; -W) of the CONJUGATE beam (opposite
        # vortex charge and circular handedness), so for the donut there is no clean linear map.
        # Measured on the simulator: the rotationally symmetric modes (m = 0: spherical) flip,
        # the others, read mostly from the in-focus ring, keep their sign. Used as the nearest
        # pattern only.
        return np.diag([-1.0 if noll_to_nm(j)[1] == 0 else 1.0 for j in modes])
    n = 128
    c = -1 + (np.arange(n) + 0.5) * 2 / n
    u, v = np.meshgrid(c, c, indexing="xy")
    inside = np.hypot(u, v) <= 1
    # Image flip -> equivalent pupil transform FOR THE DONUT. A mirrored image of a charge-1,
    # circular-plus donut is the image of the opposite-handed donut, which the model reads through
    # the in-focus interference of the m = +-1 components: measured on the simulator, an image
    # mirrored in x reads like the pupil swapped (u, v) -> (v, u), and swapped image axes read like
    # the pupil mirrored u -> -u (astigmatism Z5/Z6 exchange their sign flips).
    uu, vv = {"identity": (u, v), "mirrored x": (v, u), "mirrored y": (-v, -u),
              "swapped x/y": (-u, v)}[mapping]
    rho0, th0 = np.hypot(u, v), np.arctan2(v, u)
    rho1, th1 = np.hypot(uu, vv), np.arctan2(vv, uu)
    zi = np.stack([zernike(j, rho0, th0)[inside] for j in modes])
    zt = np.stack([zernike(j, rho1, th1)[inside] for j in modes])
    return zi @ zt.T / inside.sum()


CANDIDATES = ("identity", "mirrored x", "mirrored y", "swapped x/y", "reversed z")


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
            lines.append(f"{r.mode:>4}  {r.name:<30} {r.readback:>+9.2f}  {r.dominant_mode:>4} "
                         f"({r.dominant_value:+.2f})  {'ok' if r.sign_ok else 'BAD':<4}  {'ok' if r.mode_ok else 'BAD'}")
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
        t = _transform_matrix(modes, name)
        scale = max(float(np.sum(r * t) / np.sum(t * t)), 0.0)
        scores[name] = float(np.linalg.norm(r - scale * t) / max(np.linalg.norm(t), 1e-9))
    # on a tie (modes that a flip leaves unchanged) the identity wins: nothing contradicts it
    best = min(scores, key=lambda k: (round(scores[k], 9), k != "identity"))
    gain = float(np.mean(np.diag(r) * np.diag(_transform_matrix(modes, best))))
    if gain < min_gain or scores[best] > 0.8:
        return "no consistent convention (wrong vortex handedness, wrong mask, or a model not " \
               "matching this microscope)", scores
    return ("conventions consistent" if best == "identity" else best), scores


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


__all__ = ["run_self_check", "SelfCheckReport", "SelfCheckRow", "diagnose"]
