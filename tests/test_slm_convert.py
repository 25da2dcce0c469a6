"""PhaseToGrey: phase (radians, pupil grid) to SLM grey levels, against hand-computed images."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autoalign.settings import load_settings
from autoalign.hardware.base import SLMInputError
from autoalign.hardware.slm.convert import PhaseToGrey, SLMConfigError, load_flatness, load_lut

PI = math.pi
# A 2 x 2 pupil grid [v, u]: a (v<0, u<0), b (v<0, u>0), c (v>0, u<0), d (v>0, u>0).
# Grey levels for G = 255, worked out by hand: round(mod(phase, 2 pi) / (2 pi) * 255) mod 255
#   a = pi/2        -> 63.75  -> 64
#   b = -pi/2       -> 191.25 -> 191
#   c = 2 pi + 0.1  -> 4.06   -> 4
#   d = 3.0         -> 121.75 -> 122
GRID = np.array([[PI / 2, -PI / 2], [2 * PI + 0.1, 3.0]])


def small(**kw) -> PhaseToGrey:
    """8 x 6 SLM, pupil centre (4, 3) px, radius 2 px. Pixel centres col + 0.5 give
    u = (col + 0.5 - 4) / 2: cols 2..5 -> -0.75, -0.25, 0.25, 0.75 (rows 1..4 likewise for v);
    the four corners (|u| = |v| = 0.75) fall outside the unit pupil."""
    args = dict(width_px=8, height_px=6, pupil_centre_px=(4.0, 3.0), pupil_radius_px=2.0)
    args.update(kw)
    return PhaseToGrey(**args)


def test_pupil_placement_and_wrap_by_hand():
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 64, 191, 0, 0, 0],
        [0, 0, 64, 64, 191, 191, 0, 0],
        [0, 0, 4, 4, 122, 122, 0, 0],
        [0, 0, 0, 4, 122, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ], dtype=np.uint8)
    out = small().encode(GRID)
    assert out.dtype == np.uint8 and out.shape == (6, 8)
    np.testing.assert_array_equal(out, expected)


def test_flip_x_and_flip_y_by_hand():
    flip_x = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 191, 64, 0, 0, 0],
        [0, 0, 191, 191, 64, 64, 0, 0],
        [0, 0, 122, 122, 4, 4, 0, 0],
        [0, 0, 0, 122, 4, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(small(flip_x=True).encode(GRID), flip_x)
    flip_y = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 4, 122, 0, 0, 0],
        [0, 0, 4, 4, 122, 122, 0, 0],
        [0, 0, 64, 64, 191, 191, 0, 0],
        [0, 0, 0, 64, 191, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
    ])
    np.testing.assert_array_equal(small(flip_y=True).encode(GRID), flip_y)


def test_wrapping_edge_cases_by_hand():
    conv = small()
    centre = (3, 4)  # a pixel that reads grid cell d
    for phase, level in [(1000 * PI + PI / 2, 64), (-3 * PI / 2, 64), (2 * PI - 1e-9, 0), (0.0, 0),
                         (-1e-12, 0), (1.0, 41)]:  # 1 rad -> 40.58 -> 41
        grid = np.full((2, 2), phase)
        assert conv.encode(grid)[centre] == level, phase


def test_grey_level_2pi_scales_by_hand():
    # G = 200: a -> 50, b -> 150, c -> 0.1/(2 pi)*200 = 3.18 -> 3, d -> 3/(2 pi)*200 = 95.49 -> 95
    out = small(grey_level_2pi=200).encode(GRID)
    assert (out[2, 3], out[2, 4], out[3, 3], out[3, 4]) == (50, 150, 3, 95)


def test_split_screen_right_half_clips_pupil_by_hand():
    # 16 x 6 SLM split in two 8-column halves; this beam: right half (cols 8..15); centre (9, 3):
    # u = (col + 0.5 - 9) / 2: col 7 -> -0.75 (left half: not ours), 8 -> -0.25, 9 -> 0.25, 10 -> 0.75.
    conv = PhaseToGrey(16, 6, (9.0, 3.0), 2.0, split_screen=True, split_half="right")
    out = conv.encode(GRID)
    assert out[:, :8].max() == 0  # the other beam's half stays at phase 0
    np.testing.assert_array_equal(out[2, 7:12], [0, 64, 191, 191, 0])
    np.testing.assert_array_equal(out[3, 7:12], [0, 4, 122, 122, 0])
    np.testing.assert_array_equal(out[1, 7:12], [0, 64, 191, 0, 0])


def test_split_screen_left_half_centre_in_other_half_is_refused():
    with pytest.raises(SLMConfigError, match="pupil_centre_px"):
        PhaseToGrey(16, 6, (12.0, 3.0), 2.0, split_screen=True, split_half="left")


def test_lut_by_hand():
    lut = (255 - np.arange(256)).astype(np.uint8)  # reversed: grey = 255 - level
    out = small(lut=lut).encode(GRID)
    assert out[0, 0] == 255  # outside the pupil: level 0 -> 255
    assert (out[2, 3], out[2, 4], out[3, 3], out[3, 4]) == (191, 64, 251, 133)


def test_flatness_added_before_wrap_by_hand():
    flat = np.full((6, 8), 10)
    flat[1, 3] = 200
    out = small(flatness=flat).encode(GRID)
    assert out[1, 3] == (64 + 200) % 255 == 9
    assert out[1, 4] == 191 + 10
    assert out[0, 0] == 10  # phase 0 outside the pupil still gets its flatness
    assert out[3, 4] == 132


def test_lut_and_flatness_files(tmp_path):
    lut = (255 - np.arange(256)).astype(np.uint8)
    np.save(tmp_path / "lut.npy", lut)
    (tmp_path / "lut.csv").write_text("\n".join(f"{k},{v}" for k, v in enumerate(lut)))
    (tmp_path / "lut.txt").write_text("# level grey\n" + "\n".join(str(v) for v in lut))
    for name in ("lut.npy", "lut.csv", "lut.txt"):
        np.testing.assert_array_equal(load_lut(tmp_path / name), lut)
    flat = np.arange(48).reshape(6, 8)
    np.save(tmp_path / "flat.npy", flat)
    from PIL import Image

    Image.fromarray(flat.astype(np.uint8)).save(tmp_path / "flat.png")
    for name in ("flat.npy", "flat.png"):
        np.testing.assert_array_equal(load_flatness(tmp_path / name, (6, 8)), flat)
    # errors name the key and the file
    with pytest.raises(SLMConfigError, match=r"slm.flatness_file.*\(6, 8\)"):
        load_flatness(tmp_path / "flat.npy", (8, 6))
    with pytest.raises(SLMConfigError, match="slm.lut_file.*not found"):
        load_lut(tmp_path / "missing.npy")
    np.save(tmp_path / "short.npy", np.arange(10))
    with pytest.raises(SLMConfigError, match="256 entries"):
        load_lut(tmp_path / "short.npy")


def test_from_settings_reads_files_relative_to_settings(tmp_path):
    s = load_settings().replace(**{"slm.width_px": 8, "slm.height_px": 6, "slm.pupil_centre_px": [4.0, 3.0],
                                   "slm.pupil_radius_px": 2.0, "slm.lut_file": "lut.npy"})
    np.save(tmp_path / "lut.npy", (255 - np.arange(256)).astype(np.uint8))
    import dataclasses

    s = dataclasses.replace(s, source=str(tmp_path / "settings.yaml"))
    conv = PhaseToGrey.from_settings(s)
    assert conv.encode(GRID)[2, 3] == 191


@pytest.mark.parametrize("bad, why", [
    (np.full((4, 4), np.nan), "NaN"),
    (np.array([[0.0, np.inf], [0.0, 0.0]]), "NaN/inf"),
    (np.zeros((4, 5)), "square"),
    (np.zeros((2, 4, 4)), "square"),
    (np.zeros(16), "square"),
    (np.full((4, 4), 2e4), "limit"),
    (np.zeros((4, 4), complex), "complex"),
    (np.array([["a", "b"], ["c", "d"]]), "real numbers"),
])
def test_bad_phases_refused(bad, why):
    with pytest.raises(SLMInputError, match=why):
        small().encode(bad)


def test_decode_inverts_encode_within_one_grey_step():
    rng = np.random.default_rng(1)
    lut = ((7 * np.arange(256) + 3) % 256).astype(np.uint8)  # scrambled but one-to-one
    flat = rng.integers(0, 256, size=(200, 256))
    for kwargs in ({}, {"lut": lut, "flatness": flat, "flip_x": True, "grey_level_2pi": 230}):
        conv = PhaseToGrey(256, 200, (120.0, 100.0), 90.0, **kwargs)
        m = 30  # cells of 6 SLM pixels
        phase = rng.uniform(-20, 20, size=(m, m))
        back = conv.decode(conv.encode(phase), m)
        from autoalign.simulation.phase import pupil_grid

        u, v, inside = pupil_grid(m)
        assert np.all(back[~inside] == 0)
        # cells whose centre lies within a pixel of the rim may read an SLM pixel outside the pupil
        inside &= np.hypot(u, v) <= 1 - 1.5 / 90.0
        diff = np.angle(np.exp(1j * (back - phase)))[inside]
        step = 2 * PI / conv.grey_level_2pi
        assert np.abs(diff).max() <= step / 2 + 1e-9


def test_decode_with_misregistration_shifts_the_pattern():
    # phase 5 u on the SLM; read at pupil point (0.5, 0) with the SLM shifted by +0.2 in x:
    # the SLM's phase at u = 0.5 - 0.2 = 0.3, i.e. 1.5 rad (within half a grid cell, 5 / m, plus
    # half a grey step).
    conv = PhaseToGrey(512, 512, (256.0, 256.0), 200.0)
    from autoalign.simulation.phase import pupil_grid

    m = 256
    u = pupil_grid(m)[0]
    grey = conv.encode(5 * u)
    got = conv.decode_at(grey, np.array([0.5]), np.array([0.0]), offset=(0.2, 0.0))[0]
    assert got == pytest.approx(1.5, abs=5 / m + PI / 255)


def test_a_pupil_shift_of_half_a_radius_moves_the_image_by_one_pixel():
    # R = 2 px: a shift of 0.5 pupil radii is exactly 1 px; on a 12 x 6 SLM the pupil stays inside
    phase = np.array([[0.3, 1.1], [2.0, 2.9]])
    for flip, step in ((False, 1), (True, -1)):
        conv = small(width_px=12, pupil_centre_px=(6.0, 3.0), flip_x=flip)
        plain = conv.encode(phase)
        moved = conv.encode(phase, shift=(0.5, 0.0))
        assert np.array_equal(moved, np.roll(plain, step, axis=1))  # flip_x: +u is towards lower columns
        assert np.array_equal(conv.encode(phase, shift=(0.0, -0.5)), np.roll(plain, -1, axis=0))


def test_a_sub_pixel_pupil_shift_is_undone_by_the_same_misregistration():
    # a smooth phase on a 64-cell grid over a 100 px radius pupil, shown shifted by 0.0137 radii (1.37 px):
    # read back at beam coordinates misregistered by the same amount it is the phase itself
    conv = PhaseToGrey(width_px=256, height_px=256, pupil_centre_px=(128.0, 128.0), pupil_radius_px=100.0)
    m = 64
    c = -1.0 + (np.arange(m) + 0.5) * 2.0 / m
    u, v = np.meshgrid(c, c, indexing="xy")
    phase = 1.5 * u + 0.8 * v * v
    shift = (0.0137, -0.0091)
    grey = conv.encode(phase, shift=shift)
    inner = u * u + v * v <= 0.8**2
    back = conv.decode_at(grey, u[inner] + shift[0], v[inner] + shift[1])
    step = 2 * PI / conv.grey_level_2pi
    assert np.max(np.abs(np.angle(np.exp(1j * (back - phase[inner]))))) <= 0.5 * step + 1e-9
    # and not read back aligned without the misregistration (the shift is real)
    assert conv.decode_at(grey, np.array([shift[0]]), np.array([shift[1]]))[0] == pytest.approx(
        np.mod(phase[32, 32], 2 * PI), abs=0.2)


def test_a_pupil_shift_beyond_half_a_radius_or_nan_is_refused():
    conv = small()
    for bad in ((0.6, 0.0), (float("nan"), 0.0), ("a", 0)):
        with pytest.raises(SLMInputError):
            conv.encode(GRID, shift=bad)
