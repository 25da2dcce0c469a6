"""``autoalign analyse`` and ``autoalign calibrate instrument`` on recorded files: a simulated TIFF
whose truth is known (fast), and the real widefield bead stack (slow)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from autoalign.app.cli import main
from autoalign.simulation.instrument import Instrument

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "data" / "aovift-widefield-bead" / "WF_150ms.tif"
REAL_FLAGS = ["--na", "1.0", "--immersion-index", "1.33", "--wavelength-um", "0.515", "--beam", "none",
              "--offset-adu", "100", "--electrons-per-adu", "0.22", "--read-noise-e", "1.8"]
SIM_FLAGS = ["--na", "1.0", "--immersion-index", "1.33", "--wavelength-um", "0.515", "--beam", "none",
             "--offset-adu", "100", "--electrons-per-adu", "0.25", "--read-noise-e", "1.5",
             "--bead-diameter-um", "0.1", "--z-range-um", "1.3", "--plane-step", "1", "--max-noll", "11"]


def _sim_tiff(path: Path, aberration: dict[int, float]) -> None:
    from tests.test_psf_fit import simulated_stack

    true = Instrument(numerical_aperture=1.0, immersion_index=1.33, wavelength_um=0.515, polarisation="unpolarised",
                      bead_diameter_um=0.1)
    stack = simulated_stack(true, aberration, seed=7, photons=6e4)
    tifffile.imwrite(path, stack.data.astype(np.uint16), imagej=True, resolution=(1 / 0.097, 1 / 0.097),
                     metadata={"spacing": 0.3, "unit": "um", "axes": "ZYX"})


def test_analyse_a_simulated_tiff_recovers_its_aberration(tmp_path, capsys):
    """The command reads the voxel sizes from the ImageJ TIFF, fits, says the model explains the
    stack, and reports the known aberration within 4 sigma; the PNG is ours, the file untouched."""
    tif = tmp_path / "bead.tif"
    truth = {6: 0.08, 7: -0.05, 11: 0.06}
    _sim_tiff(tif, truth)
    before = tif.read_bytes()
    rc = main(["analyse", str(tif), *SIM_FLAGS, "--no-retrieval", "--out", str(tmp_path / "out"), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    st = out["stacks"][0]
    assert st["provenance"]["pixel_x_um"].startswith("file")
    assert st["fit"]["valid"], st["fit"]["verdict"]
    for j, c in truth.items():
        assert abs(st["fit"]["coefficients_rad"][str(j)] - c) < 4 * st["fit"]["sigma_rad"][str(j)] + 0.005
    png = Path(st["report_png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tif.read_bytes() == before


def test_instrument_file_found_checked_and_refused_for_other_optics(tmp_path, monkeypatch, capsys):
    """./instrument.yaml is used when its nominal optics match the flags (and the command says
    so), and an explicit --instrument calibrated for another NA is refused, naming both."""
    tif = tmp_path / "bead.tif"
    _sim_tiff(tif, {6: 0.05})
    ins = Instrument(numerical_aperture=0.98, immersion_index=1.33, wavelength_um=0.515, bead_diameter_um=0.1,
                     nominal={"numerical_aperture": 1.0, "immersion_index": 1.33, "wavelength_um": 0.515})
    ins.save(tmp_path / "instrument.yaml")
    monkeypatch.chdir(tmp_path)
    rc = main(["analyse", str(tif), *SIM_FLAGS, "--no-retrieval", "--out", str(tmp_path / "o1")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "./instrument.yaml found" in text and "NA 0.98" in text
    flags = [f if f != "1.0" else "1.2" for f in SIM_FLAGS]
    rc = main(["analyse", str(tif), *flags, "--instrument", "instrument.yaml", "--no-retrieval"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "numerical_aperture 1.2 (calibrated from 1)" in err


def test_a_foreign_results_file_is_never_replaced(tmp_path, capsys):
    """A JSON of the same name in --out that autoalign did not write is refused, unchanged."""
    tif = tmp_path / "bead.tif"
    _sim_tiff(tif, {6: 0.05})
    out = tmp_path / "out"
    out.mkdir()
    (out / "bead.json").write_text('{"mine": 1}')
    rc = main(["analyse", str(tif), *SIM_FLAGS, "--no-retrieval", "--out", str(out)])
    assert rc == 2
    assert "not written by autoalign analyse" in capsys.readouterr().err
    assert (out / "bead.json").read_text() == '{"mine": 1}'


def test_a_file_without_a_bead_is_refused_by_name(tmp_path, capsys):
    tif = tmp_path / "dark.tif"
    rng = np.random.default_rng(0)
    tifffile.imwrite(tif, (100 + rng.poisson(3, (9, 32, 32))).astype(np.uint16), imagej=True,
                     resolution=(1 / 0.097, 1 / 0.097), metadata={"spacing": 0.3, "unit": "um", "axes": "ZYX"})
    rc = main(["analyse", str(tif), *SIM_FLAGS, "--no-retrieval", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "no bead" in capsys.readouterr().err


@pytest.mark.slow
def test_real_stack_calibrate_then_analyse(tmp_path):
    """The README's real-data claims: the instrument calibration of the real widefield stack, then
    its analysis with that instrument and the independent phase retrieval, on this machine."""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    exe = [sys.executable, "-m", "autoalign.app.cli"]
    cal = subprocess.run([*exe, "calibrate", "instrument", str(REAL), *REAL_FLAGS, "--out",
                          str(tmp_path / "instrument.yaml"), "--json"], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=1800)
    assert cal.returncode == 0, cal.stderr[-2000:]
    res = json.loads(cal.stdout)
    after = res["after"][0]
    before = res["before"][0]
    assert after["deviance_per_dof"] < before["deviance_per_dof"]
    ana = subprocess.run([*exe, "analyse", str(REAL), *REAL_FLAGS, "--out", str(tmp_path / "a"), "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1800)
    assert ana.returncode == 0, ana.stderr[-2000:]
    out = json.loads(ana.stdout)
    st = out["stacks"][0]
    assert "instrument.yaml found" in ana.stderr
    cmp_ = st["comparison"]
    # the measured state (docs/real_data.md): the fit and the phase retrieval agree on the large modes
    assert cmp_["correlation"] > 0.8
    assert cmp_["rms_difference_rad"] < 0.05
    assert st["fit"]["deviance_per_dof"] == pytest.approx(after["deviance_per_dof"], abs=0.02)
