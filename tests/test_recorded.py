"""Reading what microscopes write (hardware/recorded.py), replaying it (RecordedScanner) and
resampling it onto a network's grid (calibration/resample.py).

The Imspector files are written here by tests/obf_writer.py (obffile cannot write) with real
vortex / Gaussian sections from the project's vectorial simulator; the TIFF tests use the real
widefield bead stack in tests/data/aovift-widefield-bead (see its README for the expected sizes).
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile

from autoalign.calibration.resample import resample_scans, resample_stack, sections_from_scans, sections_from_stack
from autoalign.hardware.base import DeviceError, DeviceNotConnected, SectionScanner
from autoalign.hardware.recorded import RecordedScanner, RecordingError, read_recording
from autoalign.recording import SectionScan, SectionScans, ZStack
from tests.obf_writer import Stack, imspector_stack, write_obf

DATA = Path(__file__).parent / "data" / "aovift-widefield-bead"
REAL = DATA / "WF_150ms.tif"
PIXEL_M = 1e-8                               # 10 nm
BEAD_M = (1.25e-6, -0.5e-6, 2.0e-6)          # (x, y, z) of the bead in the scanner's frame
N = 200


# ----------------------------------------------------------------------------- the Imspector file
def _slm_pattern(h: int = 288, w: int = 480) -> np.ndarray:
    """A split-screen SLM image: a vortex in the left half, a top-hat (pi disc) in the right."""
    yy, xx = np.mgrid[0:h, 0:w // 2].astype(float)
    u, v = (xx - w / 4) / (h / 3), (yy - h / 2) / (h / 3)
    left = np.mod(np.arctan2(v, u), 2 * np.pi) / (2 * np.pi) * 255
    right = np.where(np.hypot(u, v) < 0.7071, 128.0, 0.0)
    return np.round(np.concatenate([left, right], axis=1)).astype(np.uint8)


@pytest.fixture(scope="module")
def imspector(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from autoalign.simulation import PSFSimulator

    rng = np.random.default_rng(7)
    z_um = (np.arange(N) - N // 2) * 0.01
    sted = PSFSimulator.from_settings(None, pixel_size_um=0.01, n_px=N, z_um=z_um).orthosections({})
    conf = PSFSimulator.from_settings(None, pixel_size_um=0.01, n_px=N, z_um=z_um, beam="none").orthosections({})
    donut = PSFSimulator.from_settings(None, pixel_size_um=0.01, n_px=121, z_um=[0.0]).stack({})[0]
    canvas = np.zeros((340, 340))                 # 2.2 µm field (220 px) with a 60 px margin
    for cy, cx in [(110, 110), (40, 40), (40, 180), (180, 40), (180, 180)]:
        canvas[cy:cy + 121, cx:cx + 121] += donut
    overview = canvas[60:280, 60:280]
    written = {
        "sted": [rng.poisson(150 * s + 2).astype(np.uint16) for s in sted],
        "conf": [rng.poisson(300 * s + 2).astype(np.uint16) for s in conf],
        "overview": rng.poisson(150 * overview + 2).astype(np.uint16),
        "slm": _slm_pattern(),
    }
    stacks = []
    for i, plane in enumerate(("xy", "xz", "yz")):
        stacks.append(imspector_stack(f"STED 775 {{{i + 1}}}", written["sted"][i], plane, PIXEL_M, BEAD_M,
                                      compress=(plane == "xz")))
        stacks.append(imspector_stack(f"Confocal 640 {{{i + 1}}}", written["conf"][i], plane, PIXEL_M, BEAD_M))
    stacks.append(imspector_stack("STED 775 {4}", written["overview"], "xy", PIXEL_M, (0.0, 0.0, BEAD_M[2])))
    h, w = written["slm"].shape
    stacks.append(Stack(name="SLM pattern", data=written["slm"], labels=("SLM X", "SLM Y"),
                        lengths_m=(w * 9.2e-6, h * 9.2e-6), offsets_m=(0.0, 0.0), units=("m", "m")))
    folder = tmp_path_factory.mktemp("imspector")
    path = write_obf(folder / "bead.obf", stacks, description="test file", file_tags={"ome_xml": "<OME/>"})
    msr = write_obf(folder / "bead.msr", stacks)
    return {"path": path, "msr": msr, "written": written, "sted": sted}


def test_obf_channels_planes_sizes(imspector: dict) -> None:
    rec = read_recording(imspector["path"])
    assert rec.format == "obf"
    assert rec.channels() == ["STED 775", "Confocal 640"]
    assert rec.metadata["channel_roles"] == {"STED 775": "depletion", "Confocal 640": "excitation"}
    assert rec.stacks == []
    assert [s.channel for s in rec.scans] == ["STED 775", "Confocal 640"]
    for scans in rec.scans:
        assert [s.plane for s in scans.sections()] == ["xy", "xz", "yz"]
        for scan in scans.sections():
            assert scan.image.shape == (N, N)
            assert scan.pixel_um == pytest.approx((0.01, 0.01), rel=1e-12)
            assert scan.provenance["pixel_um"].source == "file"
            assert "OBF stack" in scan.provenance["pixel_um"].detail
            assert scan.provenance["centre_um"].source == "file"
            assert scan.centre_um == pytest.approx(tuple(v * 1e6 for v in BEAD_M), abs=1e-9)
            assert scan.units == "counts"
            assert scan.channel == scans.channel
    assert any("role depletion" in n for n in rec.notes)


def test_obf_round_trip_equals_written(imspector: dict) -> None:
    rec = read_recording(imspector["path"])
    w = imspector["written"]
    sted, conf = rec.scans
    for i, plane in enumerate(("xy", "xz", "yz")):
        np.testing.assert_array_equal(getattr(sted, plane).image, w["sted"][i])
        np.testing.assert_array_equal(getattr(conf, plane).image, w["conf"][i])
    # the depletion scans show a donut: a null at the centre, the ring around it
    xy = sted.xy.image
    assert xy[N // 2 - 3:N // 2 + 4, N // 2 - 3:N // 2 + 4].mean() < 0.2 * xy.max()
    assert conf.xy.image[N // 2, N // 2] > 0.8 * conf.xy.image.max()


def test_obf_overview_and_slm(imspector: dict) -> None:
    rec = read_recording(imspector["path"])
    kinds = {im.kind: im for im in rec.images}
    assert set(kinds) == {"overview", "slm"}
    ov = kinds["overview"]
    assert ov.channel == "STED 775" and ov.pixel_um == pytest.approx((0.01, 0.01))
    np.testing.assert_array_equal(ov.image, imspector["written"]["overview"])
    assert any("5 separate beads" in n for n in rec.notes)
    slm = kinds["slm"]
    np.testing.assert_array_equal(slm.image, imspector["written"]["slm"])
    assert slm.pixel_um == pytest.approx((9.2, 9.2))
    half = slm.image.shape[1] // 2
    assert slm.image[:, :half].std() > 50 and set(np.unique(slm.image[:, half:])) == {0, 128}


def test_msr_is_read_like_obf(imspector: dict) -> None:
    rec = read_recording(imspector["msr"])
    assert rec.format == "msr" and rec.channels() == ["STED 775", "Confocal 640"]


def test_obf_channel_selection_and_flags(imspector: dict) -> None:
    rec = read_recording(imspector["path"], channel="confocal")
    assert rec.channels() == ["Confocal 640"]
    assert [im.kind for im in rec.images] == ["slm"]   # the STED overview went with its channel
    with pytest.raises(RecordingError, match=r"channel 'GFP'.*'STED 775', 'Confocal 640'"):
        read_recording(imspector["path"], channel="GFP")
    rec = read_recording(imspector["path"], pixel_um=0.02, z_step_um=0.03)
    xz = rec.scans[0].xz
    assert xz.pixel_um == (0.03, 0.02)
    assert str(xz.provenance["pixel_um"]) == "flag: rows: --z-step-um; columns: --pixel-um"
    assert str(rec.scans[0].xy.provenance["pixel_um"]) == "flag: --pixel-um"


def test_obf_axis_rules(tmp_path: Path) -> None:
    """Labels, else the name, else Imspector's dimension order; 3-D stacks; skipped stacks."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 100, (16, 24)).astype(np.uint16)          # rows 16, columns 24
    vol = rng.integers(0, 100, (5, 6, 7)).astype(np.uint16)          # z, y, x
    one_bead = np.zeros((40, 40), np.uint16)
    one_bead[18:22, 18:22] = 100
    stacks = [
        # no labels, rank 2: the name's token (columns first) -> an xz scan [z, x]
        Stack("Conf xz {1}", img, labels=("", ""), lengths_m=(24e-8, 16e-8), offsets_m=(0, 0)),
        # no labels, rank 2, "zx": columns z, rows x -> transposed to [z, x]
        Stack("Conf zx {2}", img, labels=("", ""), lengths_m=(24e-8, 16e-8), offsets_m=(0, 0)),
        # labels say x and z, the name says yz: the labels win (noted)
        Stack("Conf yz {3}", img, labels=("X", "Z"), lengths_m=(24e-8, 16e-8), offsets_m=(0, 0)),
        # no labels, no token, rank 4 with y of one pixel: Imspector's order x, y, z, t -> xz
        Stack("Ch2 {4}", img.reshape(1, 16, 1, 24), labels=("", "", "", ""), lengths_m=(24e-8, 0, 32e-8, 0),
              offsets_m=(0, 5e-6, 0, 0)),
        # a 3-D stack with labels -> ZStack (z, y, x)
        Stack("Conf stack {5}", vol, labels=("ExpControl X", "ExpControl Y", "ExpControl Z"),
              lengths_m=(7e-8, 12e-8, 5e-7), offsets_m=(0, 0, 1e-6)),
        # one bead, but named an overview
        Stack("Overview Conf", one_bead, labels=("X", "Y"), lengths_m=(40e-8, 40e-8), offsets_m=(0, 0)),
        # noise only: no beads, so a section scan (of its own set: a second xy of channel "Conf")
        Stack("Conf {8}", rng.poisson(3, (64, 64)).astype(np.uint16), labels=("X", "Y"), lengths_m=(64e-8, 64e-8),
              offsets_m=(0, 0)),
        # a time series: skipped
        Stack("Conf xy time", rng.integers(0, 9, (3, 8, 8)).astype(np.uint16), labels=("X", "Y", "T"),
              lengths_m=(8e-8, 8e-8, 3.0), offsets_m=(0, 0, 0), units=("m", "m", "s")),
    ]
    rec = read_recording(write_obf(tmp_path / "rules.obf", stacks))
    scans = rec.scans
    assert [s.channel for s in scans] == ["Conf", "Conf", "Conf", "Ch2"]
    assert scans[0].xy is not None and scans[0].xy.name == "Conf {8}"
    a, b, c, d = scans[0].xz, scans[1].xz, scans[2].xz, scans[3].xz
    np.testing.assert_array_equal(a.image, img)                      # [z, x]
    assert a.pixel_um == pytest.approx((0.01, 0.01))
    np.testing.assert_array_equal(b.image, img.T)                    # stored [x, z] -> [z, x]
    np.testing.assert_array_equal(c.image, img)
    assert any("'Conf yz {3}': its name says 'yz'" in n for n in rec.notes)
    assert any("'Conf xz {1}': axes xz (fastest first) from its name" in n for n in rec.notes)
    np.testing.assert_array_equal(d.image, img)
    assert d.pixel_um == pytest.approx((0.02, 0.01)) and d.centre_um[1] == pytest.approx(5.0)
    assert any("'Ch2 {4}'" in n and "Imspector x, y, z, t: assumed" in n for n in rec.notes)
    (zs,) = rec.stacks
    np.testing.assert_array_equal(zs.data, vol)
    assert (zs.pixel_x_um, zs.pixel_y_um, zs.z_step_um) == pytest.approx((0.01, 0.02, 0.1))
    assert zs.z_um[0] == pytest.approx(1.0) and zs.provenance["z_um"].source == "file"
    assert [im.kind for im in rec.images] == ["overview"]
    assert any("'Conf xy time'" in n and "skipped" in n for n in rec.notes)


def test_one_aberrated_donut_is_one_bead() -> None:
    from autoalign.hardware.recorded import _count_beads
    from autoalign.simulation import PSFSimulator

    sim = PSFSimulator.from_settings(None, pixel_size_um=0.01, n_px=151, z_um=[0.0], pupil_samples=32)
    for coeffs in ({}, {5: 0.8, 7: 0.8}, {6: 1.2}, {8: 1.0, 11: 0.5}):
        image = np.random.default_rng(0).poisson(100 * sim.stack(coeffs)[0] + 1)
        assert _count_beads(image, (0.01, 0.01)) == 1, coeffs


def test_obf_corrupt(tmp_path: Path, imspector: dict) -> None:
    raw = Path(imspector["path"]).read_bytes()
    cut = tmp_path / "cut.obf"
    cut.write_bytes(raw[:5000])
    with pytest.raises(RecordingError, match=r"cut\.obf"):
        read_recording(cut)
    bad = tmp_path / "bad.obf"
    bad.write_bytes(b"not an imspector file at all")
    with pytest.raises(RecordingError, match=r"bad\.obf: expected a Imspector OBF file \(extension \.obf\)"):
        read_recording(bad)


# ----------------------------------------------------------------------------- TIFF
def test_real_tiff_stack_sizes() -> None:
    rec = read_recording(REAL)
    assert rec.format == "tiff"
    (s,) = rec.stacks
    assert s.data.shape == (101, 128, 128)
    # README: lateral 12.319 µm / 127 = 0.0970 µm, z step 0.100 µm (101 planes over 10 µm)
    assert s.pixel_x_um == pytest.approx(0.0970, abs=5e-4) and s.pixel_y_um == pytest.approx(0.0970, abs=5e-4)
    assert s.pixel_um == pytest.approx(12.319002 / 127)
    assert s.z_step_um == pytest.approx(0.100, abs=1e-9) and s.z_um[0] == 0.0 and s.z_um[-1] == pytest.approx(10.0)
    for key in ("pixel_x_um", "pixel_y_um", "z_um"):
        assert s.provenance[key].source == "file"
        assert s.provenance[key].detail.startswith("TIFF ImageDescription BoundingBox 0 12.319002")
    assert "over 128 px" in s.provenance["pixel_x_um"].detail
    assert "z 0..10 over 101 planes" in s.provenance["z_um"].detail
    assert s.units == "adu"
    with tifffile.TiffFile(REAL) as t:
        np.testing.assert_array_equal(s.data, t.asarray())
    # the bead near (z, y, x) = (50, 68, 65), background ~111 ADU (README)
    assert abs(np.median(s.data) - 111) < 5


def test_ome_tiff_sizes_and_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    data = rng.integers(0, 1000, (2, 7, 16, 20)).astype(np.uint16)    # C, Z, Y, X
    path = tmp_path / "two.ome.tif"
    tifffile.imwrite(path, data, ome=True, metadata={
        "axes": "CZYX", "PhysicalSizeX": 0.065, "PhysicalSizeY": 0.07, "PhysicalSizeZ": 150.0,
        "PhysicalSizeZUnit": "nm", "Channel": {"Name": ["STED", "Confocal"]}})
    rec = read_recording(path)
    assert rec.format == "ome-tiff" and rec.channels() == ["STED", "Confocal"]
    for c, s in enumerate(rec.stacks):
        np.testing.assert_array_equal(s.data, data[c])
        assert (s.pixel_x_um, s.pixel_y_um, s.z_step_um) == pytest.approx((0.065, 0.07, 0.15))
        assert s.provenance["pixel_x_um"].detail == "OME-XML Pixels PhysicalSizeX = 0.065 µm"
        assert s.provenance["z_um"].detail == "OME-XML Pixels PhysicalSizeZ = 150.0 nm"
    # single channel, sizes only in the OME metadata
    path1 = tmp_path / "one.ome.tif"
    tifffile.imwrite(path1, data[0], metadata={"axes": "ZYX", "PhysicalSizeX": 0.1, "PhysicalSizeY": 0.1,
                                               "PhysicalSizeZ": 0.2})
    (s,) = read_recording(path1).stacks
    assert s.channel == "" and (s.pixel_um, s.z_step_um) == pytest.approx((0.1, 0.2))


def test_imagej_tiff(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    data = rng.integers(0, 1000, (6, 2, 12, 12)).astype(np.uint16)    # Z, C, Y, X
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, data, imagej=True, resolution=(1 / 0.08, 1 / 0.08),
                     metadata={"spacing": 0.25, "unit": "um", "axes": "ZCYX"})
    rec = read_recording(path)
    assert rec.format == "tiff" and rec.metadata["tiff_flavour"] == "imagej"
    assert rec.channels() == ["C0", "C1"]
    for c, s in enumerate(rec.stacks):
        np.testing.assert_array_equal(s.data, data[:, c])
        assert (s.pixel_x_um, s.pixel_y_um, s.z_step_um) == pytest.approx((0.08, 0.08, 0.25))
        assert s.provenance["pixel_x_um"].detail.startswith("ImageJ XResolution")
        assert s.provenance["z_um"].detail == "ImageJ metadata spacing = 0.25 um"


def test_tiff_without_sizes_needs_flags(tmp_path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 100, (5, 10, 10)).astype(np.uint16)
    path = tmp_path / "bare.tif"
    tifffile.imwrite(path, data)
    with pytest.raises(RecordingError) as err:
        read_recording(path)
    text = str(err.value)
    assert str(path) in text and "pass --pixel-um" in text and "pass --z-step-um" in text
    with pytest.raises(RecordingError, match="pass --z-step-um"):
        read_recording(path, pixel_um=0.1)
    (s,) = read_recording(path, pixel_um=0.1, z_step_um=0.2).stacks
    assert (s.pixel_um, s.z_step_um) == pytest.approx((0.1, 0.2))
    assert s.provenance["pixel_x_um"] == s.provenance["pixel_y_um"]
    assert str(s.provenance["pixel_x_um"]) == "flag: --pixel-um" and str(s.provenance["z_um"]) == "flag: --z-step-um"
    with pytest.raises(RecordingError, match="--pixel-um"):
        read_recording(path, pixel_um=-1.0, z_step_um=0.2)


def test_flags_override_the_file() -> None:
    rec = read_recording(REAL, pixel_um=0.1, z_step_um=0.2)
    (s,) = rec.stacks
    assert (s.pixel_x_um, s.z_step_um) == pytest.approx((0.1, 0.2))
    assert str(s.provenance["pixel_x_um"]) == "flag: --pixel-um" and str(s.provenance["z_um"]) == "flag: --z-step-um"
    assert any("--pixel-um (overrides the file)" in n for n in rec.notes)


def test_corrupt_and_foreign_files(tmp_path: Path) -> None:
    cut = tmp_path / "cut.tif"
    cut.write_bytes(REAL.read_bytes()[:3000])
    with pytest.raises(RecordingError, match=r"cut\.tif: expected"):
        read_recording(cut)
    bare = tmp_path / "bare.tif"             # uncompressed: a cut leaves a shorter page chain
    tifffile.imwrite(bare, np.ones((10, 32, 32), np.uint16), description="BoundingBox 0 3.1 0 3.1 0 0.9")
    half = tmp_path / "half.tif"
    half.write_bytes(bare.read_bytes()[: bare.stat().st_size // 2])
    with pytest.raises(RecordingError, match=r"half\.tif: expected .*(truncated|damaged)"):
        read_recording(half)
    text = tmp_path / "notes.tif"
    text.write_text("hello")
    with pytest.raises(RecordingError, match=r"notes\.tif: expected a TIFF file \(extension \.tif\), found first bytes"):
        read_recording(text)
    with pytest.raises(RecordingError, match="no such file"):
        read_recording(tmp_path / "missing.tif")
    other = tmp_path / "data.xyz"
    other.write_bytes(b"\x00\x01")
    with pytest.raises(RecordingError, match="expected a TIFF / OME-TIFF, Imspector .obf/.msr or HDF5"):
        read_recording(other)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(RecordingError, match="found an empty file"):
        read_recording(empty)


# ----------------------------------------------------------------------------- HDF5
def test_foreign_and_corrupt_hdf5(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["images"] = np.zeros((2, 4, 4))
    with pytest.raises(RecordingError, match=r"foreign\.h5: expected an autoalign bead-walk file .*found no 'format' "
                                             r"attribute and datasets \['images'\]"):
        read_recording(foreign)
    partial = tmp_path / "partial.h5"
    with h5py.File(partial, "w") as f:
        f.attrs["format"] = "autoalign-beadwalk"
        f.attrs["format_version"] = 1
        f["stack"] = np.zeros((1, 3, 4, 4))
        f["round"] = np.zeros(1, int)
    with pytest.raises(RecordingError, match=r"partial\.h5: expected dataset 'focus_um'"):
        read_recording(partial)
    training = tmp_path / "train.h5"
    with h5py.File(training, "w") as f:
        f.attrs["format"] = "autoalign-psf-dataset/1"
    with pytest.raises(RecordingError, match="training data set"):
        read_recording(training)
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(foreign.read_bytes()[:600])
    with pytest.raises(RecordingError, match=r"corrupt\.h5: expected a readable HDF5 file"):
        read_recording(corrupt)


def test_beadwalk_file_from_the_project_writer(tmp_path: Path) -> None:
    from autoalign.app import collect
    from autoalign.hardware import recorded
    from autoalign.settings import load_settings

    assert (recorded.BEADWALK_FORMAT, recorded.BEADWALK_FORMAT_VERSION, recorded.BEADWALK_LEGACY_LAYOUT) == (
        collect.BEADWALK_FORMAT, collect.BEADWALK_FORMAT_VERSION, collect._LEGACY_LAYOUT)
    s = load_settings(None).replace(**{"camera.roi_px": 16, "stack.planes": 16, "model.binning": 1})
    path = tmp_path / "walk.h5"
    writer = collect.CollectionFile(path, s, (16, 16, 16))
    rng = np.random.default_rng(4)
    stacks = [rng.integers(100, 400, (16, 16, 16)).astype(float) for _ in range(2)]
    for i, st in enumerate(stacks):
        writer.append({"stack": st, "sections": np.zeros((3, 16, 16)), "prediction": None, "applied": {},
                       "random_aberration": {}, "correction_after": {}, "stage_xy_um": (0.0, 0.0),
                       "focus_um": 1.5 + i, "centroid_um": (0.0, 0.0, 0.0), "timestamp": 0.0, "round": i,
                       "decision": "recorded", "metrics": {}})
    with h5py.File(path, "a") as f:   # an unfinished third round: a stack row without its 'round'
        f["stack"].resize(3, axis=0)
    rec = read_recording(path)
    assert rec.format == "hdf5" and [z.name for z in rec.stacks] == ["round 0", "round 1"]
    assert any("unfinished round" in n for n in rec.notes)
    for i, z in enumerate(rec.stacks):
        np.testing.assert_array_equal(z.data, stacks[i])
        assert z.pixel_um == pytest.approx(s.camera.pixel_size_um) and z.z_step_um == pytest.approx(s.stack.z_step_um)
        assert np.mean(z.z_um) == pytest.approx(1.5 + i)           # focus_um is the stack's mean focus
        assert z.units == "adu"
        assert str(z.provenance["pixel_x_um"]) == "file: HDF5 attribute 'settings_yaml' camera.pixel_size_um"
        assert "focus_um" in z.provenance["z_um"].detail
    (z,) = read_recording(path, pixel_um=0.05).stacks[:1]
    assert z.pixel_um == 0.05 and z.provenance["pixel_x_um"].source == "flag"


# ----------------------------------------------------------------------------- read-only
def test_reading_never_modifies_the_file(tmp_path: Path, imspector: dict) -> None:
    tif = tmp_path / "copy.tif"
    tif.write_bytes(REAL.read_bytes())
    h5 = tmp_path / "walk.h5"
    with h5py.File(h5, "w") as f:
        f.attrs["format"] = "autoalign-beadwalk"
        f.attrs["format_version"] = 1
        f.attrs["settings_yaml"] = "camera: {pixel_size_um: 0.04}\nstack: {z_step_um: 0.05}\n"
        f["stack"] = np.ones((1, 4, 8, 8))
        f["round"] = np.zeros(1, int)
        f["focus_um"] = np.zeros(1)
    for path in (tif, Path(imspector["path"]), h5):
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
        before = (path.read_bytes(), path.stat().st_mtime_ns)
        rec = read_recording(path)
        assert rec.stacks or rec.scans
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before


# ----------------------------------------------------------------------------- the scanner
def test_recorded_scanner_replays_the_scans(imspector: dict) -> None:
    scanner = RecordedScanner(imspector["path"], repeat=False)
    assert isinstance(scanner, SectionScanner)
    with pytest.raises(DeviceNotConnected):
        scanner.channels()
    with scanner:
        assert scanner.channels() == ["STED 775", "Confocal 640"]
        first = scanner.scan_sections()
        assert first.channel == "STED 775" and [s.plane for s in first.sections()] == ["xy", "xz", "yz"]
        np.testing.assert_array_equal(first.xy.image, imspector["written"]["sted"][0])
        first.xy.image[:] = 0                     # a copy: the recording is not changed
        conf = scanner.scan_sections("Confocal 640")
        np.testing.assert_array_equal(conf.xz.image, imspector["written"]["conf"][1])
        with pytest.raises(DeviceError, match="replayed"):
            scanner.scan_sections("STED 775")
        with pytest.raises(ValueError, match="GFP"):
            scanner.scan_sections("GFP")
    with RecordedScanner(imspector["path"]) as again:       # repeat: starts over
        a, b = again.scan_sections(), again.scan_sections()
        np.testing.assert_array_equal(a.xy.image, b.xy.image)
        np.testing.assert_array_equal(a.xy.image, imspector["written"]["sted"][0])
    with pytest.raises(DeviceError, match="holds no section scans"):
        RecordedScanner(REAL).open()
    with pytest.raises(DeviceError, match="no such file"):
        RecordedScanner("/nonexistent/x.obf").open()


# ----------------------------------------------------------------------------- resampling
def _moments(img: np.ndarray, step: float) -> tuple[float, float, float, float, float]:
    """(row centroid, column centroid, row sigma, column sigma, total) in µm about pixel n // 2."""
    img = img - np.median(np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]))
    k = (np.arange(img.shape[0]) - img.shape[0] // 2) * step
    j = (np.arange(img.shape[1]) - img.shape[1] // 2) * step
    w = img.sum()
    r, c = (img.sum(1) * k).sum() / w, (img.sum(0) * j).sum() / w
    sr = np.sqrt((img.sum(1) * (k - r) ** 2).sum() / w)
    sc = np.sqrt((img.sum(0) * (j - c) ** 2).sum() / w)
    return float(r), float(c), float(sr), float(sc), float(w)


def _gaussian_scans(pixel: float = 0.01, n: int = 300, true=(0.0173, -0.0231, 0.0412), sigma=(0.1, 0.25),
                    bg: float = 5.0) -> SectionScans:
    c = (np.arange(n) - n // 2) * pixel
    rows, cols = np.meshgrid(c, c, indexing="ij")
    x, y, z = true
    sxy, sz = sigma
    g = lambda r0, c0, sr, sc: 1000 * np.exp(-((rows - r0) ** 2 / (2 * sr**2) + (cols - c0) ** 2 / (2 * sc**2))) + bg
    return SectionScans(SectionScan("xy", g(y, x, sxy, sxy), (pixel, pixel)),
                        SectionScan("xz", g(z, x, sz, sxy), (pixel, pixel)),
                        SectionScan("yz", g(z, y, sz, sxy), (pixel, pixel)), name="gaussian")


def test_resample_gaussian_keeps_centroid_sigma_and_signal() -> None:
    true = (0.0173, -0.0231, 0.0412)
    scans = _gaussian_scans(true=true)
    out = resample_scans(scans, 0.065, 40, 0.065, centre_zyx_um=(0.0, 0.0, 0.0))
    assert out.outside_fraction == (0.0, 0.0, 0.0) and out.scale == pytest.approx((6.5**2,) * 3)
    x, y, z = true
    for sec, (r_true, c_true), (sr_true, sc_true), scan in zip(
            out.sections, [(y, x), (z, x), (z, y)], [(0.1, 0.1), (0.25, 0.1), (0.25, 0.1)], scans.sections()):
        r, c, sr, sc, total = _moments(sec, 0.065)
        assert abs(r - r_true) < 0.002 and abs(c - c_true) < 0.002                  # within 2 nm
        assert sr == pytest.approx(sr_true, rel=0.02) and sc == pytest.approx(sc_true, rel=0.02)
        assert total == pytest.approx((scan.image - 5.0).sum(), rel=0.005)          # photometric
    assert out.background == pytest.approx((5.0 * 6.5**2,) * 3, rel=1e-3)
    # the default centre is the bead's (robust centroid), within a few nm
    auto = resample_scans(scans, 0.065, 40, 0.065)
    assert auto.centre_zyx_um == pytest.approx((true[2], true[1], true[0]), abs=0.003)
    np.testing.assert_array_equal(sections_from_scans(scans, 0.065, 40, 0.065), auto.sections)


def test_resample_suppresses_aliasing() -> None:
    """A sine above the new Nyquist limit: its alias in the resampled image has < 5 % of the power
    a naive decimation (point sampling) gives it."""
    p, n, p_out, n_out = 0.01, 600, 0.065, 64
    x = (np.arange(n) - n // 2) * p
    k = np.arange(n_out) - n_out // 2
    win = np.hanning(n_out)
    for f_out in (0.6, 0.8, 1.2):             # cycles per output pixel (Nyquist: 0.5)
        f = f_out / p_out
        image = 100 + 50 * np.sin(2 * np.pi * f * x)[None, :] * np.ones((n, 1))
        out = resample_scans(SectionScans(xy=SectionScan("xy", image, (p, p))), p_out, n_out, p_out,
                             centre_zyx_um=(0.0, 0.0, 0.0))
        res = out.sections[0] / out.scale[0]
        naive = 100 + 50 * np.sin(2 * np.pi * f * k * p_out)
        f_alias = abs(f_out - round(f_out))
        power = lambda v, fa=f_alias: abs(((v - v.mean()) * win * np.exp(-2j * np.pi * fa * k)).sum()) ** 2
        ratio = np.mean([power(row) for row in res]) / power(naive)
        assert ratio < 0.05, (f_out, ratio)
        assert res.mean() == pytest.approx(100, rel=1e-3)          # the mean level is kept


def test_resample_outside_the_data_is_background() -> None:
    scans = _gaussian_scans(n=100)                # 1 µm field
    out = resample_scans(scans, 0.065, 32, 0.065, centre_zyx_um=(0.0, 0.0, 0.0))   # 2.08 µm grid
    expected = 1 - (np.sum(np.abs((np.arange(32) - 16) * 0.065) <= 0.505) / 32) ** 2
    assert out.outside_fraction == pytest.approx((expected,) * 3, abs=0.01) and out.outside > 0.5
    assert out.sections[0][0, 0] == out.background[0] == pytest.approx(5.0 * 6.5**2, rel=1e-3)
    xz_missing = resample_scans(SectionScans(xy=scans.xy), 0.065, 32, 0.065)
    assert xz_missing.outside_fraction[1:] == (1.0, 1.0)


def test_resample_stack_gaussian_volume() -> None:
    p, n = 0.02, 96
    c = (np.arange(n) - n // 2) * p
    zz, yy, xx = np.meshgrid(c, c, c, indexing="ij")
    true = (0.031, -0.012, 0.007)                 # z, y, x
    vol = 500 * np.exp(-((xx - true[2]) ** 2 + (yy - true[1]) ** 2) / (2 * 0.1**2) - (zz - true[0]) ** 2 / (2 * 0.25**2)) + 3
    stack = ZStack(vol, p, p, c)
    origin = (0.0, -c[0], -c[0])                  # y, x of pixel [0, 0] are 0: the frame's centre at c = 0
    out = resample_stack(stack, 0.065, 32, 0.08, centre_zyx_um=origin)
    xy, xz, yz = out.sections
    assert xy[16, 16] == pytest.approx(xz[16, 16]) and xz[16, 16] == pytest.approx(yz[16, 16])   # one volume
    r, col, sr, sc, total = _moments(xy, 0.065)
    assert abs(r - true[1]) < 0.002 and abs(col - true[2]) < 0.002
    assert sr == pytest.approx(0.1, rel=0.02) and sc == pytest.approx(0.1, rel=0.02)
    plane = np.interp(0.0, c, np.arange(n))       # photometric: the plane's signal, x the lateral area ratio
    assert out.scale[0] == pytest.approx((0.065 / p) ** 2)
    zr, _, szr, _, _ = _moments(xz, 0.08)
    assert abs(zr - true[0]) < 0.003 and szr == pytest.approx(0.25, rel=0.02)
    ref = (vol[int(plane)] - 3).sum()
    assert total == pytest.approx(ref, rel=0.01)
    auto = resample_stack(stack, 0.065, 32, 0.08)
    assert auto.centre_zyx_um == pytest.approx((true[0], true[1] - c[0], true[2] - c[0]), abs=0.005)


def test_resample_real_stack_peak_at_centre() -> None:
    (stack,) = read_recording(REAL).stacks
    for pixel, n, dz in ((0.08, 32, 0.08), (0.065, 64, 0.065), (0.2, 32, 0.3)):
        out = resample_stack(stack, pixel, n, dz)
        assert out.outside_fraction == (0.0, 0.0, 0.0)
        sections = sections_from_stack(stack, pixel, n, dz)
        np.testing.assert_array_equal(sections, out.sections)
        for sec in sections:
            peak = np.unravel_index(np.argmax(sec), sec.shape)
            assert max(abs(int(peak[0]) - n // 2), abs(int(peak[1]) - n // 2)) <= 1, (pixel, peak)
        assert out.background == pytest.approx((111 * (pixel / stack.pixel_um) ** 2,) * 3, rel=0.05)


def test_resample_recorded_donut_scans(imspector: dict) -> None:
    """The recorded STED scans (10 nm) on a 65 nm grid: the donut's null at the centre pixel."""
    sted = read_recording(imspector["path"]).scans[0]
    out = resample_scans(sted, 0.065, 24, 0.065)
    assert out.centre_zyx_um == pytest.approx((BEAD_M[2] * 1e6, BEAD_M[1] * 1e6, BEAD_M[0] * 1e6), abs=0.01)
    xy = out.sections[0]
    assert xy[12, 12] < 0.15 * xy.max()
    r, c, *_ = _moments(xy, 0.065)
    assert abs(r) < 0.01 and abs(c) < 0.01
