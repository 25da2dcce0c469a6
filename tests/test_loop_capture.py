"""app/loop_capture.py: the bead search, against a synthetic world (a Gaussian bead imaged through
stage moves; no microscope): it brings an off-centre bead back into the ROI within its tries and
step limit, says what it tried when it cannot, and stops on a stop request."""
from __future__ import annotations

import numpy as np
import pytest

from autoalign.app.loop_capture import capturable, search_bead
from autoalign.app.loop_records import LoopStopped
from autoalign.calibration.measurement import analyse_stack
from autoalign.hardware.base import Stack
from autoalign.settings import load_settings

N = 32


def _settings(**over):
    base = {"camera.roi_px": N, "stack.planes": N, "camera.pixel_size_um": 0.05, "stack.z_step_um": 0.06,
            "loop.edge_margin_px": 3}
    base.update(over)
    return load_settings().replace(**base)


class World:
    """A bead at ``bead_um`` (x, y, z) seen through a stage at ``stage_um``: the camera sees
    ``bead - stage``, as the simulated microscope's does; Poisson noise from a fixed seed."""

    def __init__(self, settings, bead_um, photons=3000.0, seed=1):
        self.s, self.bead, self.stage = settings, np.array(bead_um, float), np.zeros(3)
        self.photons, self.rng, self.moves = photons, np.random.default_rng(seed), []

    def stack(self) -> Stack:
        s = self.s
        px, dz = s.camera.pixel_size_um, s.stack.z_step_um
        c = (np.arange(N) - N // 2).astype(float)
        z, y, x = np.meshgrid(c * dz, c * px, c * px, indexing="ij")
        dx, dy, dzb = self.bead - self.stage
        blob = np.exp(-((x - dx) ** 2 + (y - dy) ** 2) / (2 * 0.08**2) - (z - dzb) ** 2 / (2 * 0.25**2))
        electrons = self.rng.poisson(2.0 + self.photons * blob).astype(float)
        adu = s.camera.offset_adu + s.camera.gain_adu_per_electron * electrons
        return Stack(data=adu, pixel_size_um=px, z_step_um=dz, z_positions_um=c * dz,
                     xy_position_um=(float(self.stage[0]), float(self.stage[1])))

    def acquire(self):
        return analyse_stack(self.stack(), self.s)

    def move(self, d):
        self.moves.append(tuple(d))
        self.stage = self.stage + np.asarray(d, float)


def test_a_bead_beyond_the_edge_is_brought_back_within_the_step_limit():
    s = _settings(**{"loop.capture_max_step_um": 0.5, "loop.capture_tries": 4})
    w = World(s, (0.78, -0.2, 0.0))
    first = w.acquire()
    assert not first.valid and first.reason.startswith("bead at edge") and capturable(first, s)
    found, tried = search_bead(first, s, None, acquire=w.acquire, move_stage=w.move)
    assert found.valid, found.reason
    assert 1 <= len(w.moves) <= 4 and len(tried) == len(w.moves)
    assert all(max(abs(v) for v in m) <= 0.5 + 1e-12 for m in w.moves)
    assert w.moves[0][0] > 0  # toward the bead (+x)
    assert all("stage moved by" in t for t in tried)


def test_no_light_anywhere_ends_the_search_and_says_so():
    s = _settings()
    w = World(s, (0.0, 0.0, 0.0), photons=0.0)
    first = w.acquire()
    assert first.reason.startswith("no bead")
    found, tried = search_bead(first, s, None, acquire=w.acquire, move_stage=w.move)
    assert not found.valid and w.moves == []
    assert tried == ["no light above the noise anywhere in the stack"]
    assert found.reason.endswith("bead search failed: 1 attempt(s) (no light above the noise anywhere in the stack)")


def test_a_bead_that_stays_out_of_reach_is_reported_after_the_last_try():
    s = _settings(**{"loop.capture_max_step_um": 0.1, "loop.capture_tries": 2})
    w = World(s, (0.9, 0.0, 0.0))
    found, tried = search_bead(w.acquire(), s, None, acquire=w.acquire, move_stage=w.move)
    assert not found.valid and len(w.moves) == 2 == len(tried)
    assert "bead search failed: 2 attempt(s)" in found.reason


def test_nothing_is_searched_for_a_valid_measurement_or_with_no_tries():
    s = _settings()
    w = World(s, (0.0, 0.0, 0.0))
    m = w.acquire()
    assert m.valid and not capturable(m, s)
    assert search_bead(m, s, None, acquire=w.acquire, move_stage=w.move) == (m, [])
    s0 = _settings(**{"loop.capture_tries": 0})
    edge = World(s0, (0.78, 0.0, 0.0)).acquire()
    assert not capturable(edge, s0)
    found, tried = search_bead(edge, s0, None, acquire=w.acquire, move_stage=w.move)
    assert found is edge and tried == [] and "bead search failed" not in found.reason


def test_a_stop_request_ends_the_search_before_the_stage_moves():
    s = _settings()
    w = World(s, (0.78, 0.0, 0.0))

    def stop():
        raise LoopStopped()

    with pytest.raises(LoopStopped):
        search_bead(w.acquire(), s, None, acquire=w.acquire, move_stage=w.move, check_stop=stop)
    assert w.moves == []
