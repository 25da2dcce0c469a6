"""Networks, section preparation, noise, checkpoints (optics lock, tampering, corruption) and the
Predictor API the loop uses."""
from pathlib import Path

import numpy as np
import pytest
import torch

from autoalign.settings import load_settings
from autoalign.models.data import NoiseTransform, add_noise_numpy, bin_sections, prepare_sections
from autoalign.models.networks import NETWORKS, build_network
from autoalign.models.predictor import (
    CheckpointError, Prediction, Predictor, build_model, optics_lock, read_checkpoint, save_checkpoint,
)

OFFSET_NETS = {"OffsetNet2", "OffsetNet13", "MultiOffsetNet13"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _sections(rng, n=64, peak=1000.0, bg=8.0):
    from autoalign.simulation import PSFSimulator

    sim = PSFSimulator.from_settings(pupil_samples=32)
    c = np.zeros(15)
    c[4:15] = rng.uniform(-0.2, 0.2, 11)
    return rng.poisson(sim.orthosections(c) * peak + bg).astype(np.float32)


def test_prepare_sections_is_scale_invariant_and_binned():
    rng = np.random.default_rng(0)
    x = _sections(rng)
    a = prepare_sections(x, 2)
    assert a.shape == (3, 32, 32) and a.dtype == np.float32
    np.testing.assert_allclose(prepare_sections(7.5 * x, 2), a, atol=1e-5)
    assert abs(a.max() - 1.0) < 1e-6
    assert abs(np.median(a[0, :2])) < 0.05  # background removed (border)
    batch = torch.from_numpy(np.stack([x, 3 * x]))
    b = prepare_sections(batch, 2)
    assert isinstance(b, torch.Tensor) and b.shape == (2, 3, 32, 32)
    np.testing.assert_allclose(b[0].numpy(), a, atol=1e-5)
    np.testing.assert_allclose(b[1].numpy(), a, atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        prepare_sections(np.zeros((2, 8, 8)), 2)
    with pytest.raises(ValueError, match="NaN"):
        prepare_sections(np.full((3, 8, 8), np.nan), 2)


def test_noise_on_binned_pixels_matches_binned_noise():
    """Poisson + read noise drawn on 2x2-binned intensities has the mean and variance of noise
    drawn per pixel and then binned (what the loader relies on)."""
    intensity = np.full((2000, 3, 4, 4), 0.05, np.float32)
    peak, bg = np.full(2000, 800.0), np.full(2000, 6.0)
    full = add_noise_numpy(intensity, peak, bg, 0.8, 1.5, np.random.default_rng(1))
    ref = bin_sections(torch.from_numpy(full), 2).numpy()
    t = NoiseTransform(0.8, 1.5, binning=2, read_noise_scale=(1.0, 1.0))
    binned = t(bin_sections(torch.from_numpy(intensity), 2), torch.tensor(peak, dtype=torch.float32),
               torch.tensor(bg, dtype=torch.float32), torch.Generator().manual_seed(0)).numpy()
    assert abs(binned.mean() / ref.mean() - 1) < 0.01
    assert abs(binned.var() / ref.var() - 1) < 0.05


@pytest.mark.parametrize("name", list(NETWORKS))
def test_architecture_output_shape_and_eval_determinism(name):
    torch.manual_seed(0)
    offset = name in OFFSET_NETS
    net = build_network(name, 11, predict_offset=offset, input_size=32).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        a, b = net(x), net(x)
    assert a.shape == (4, 13 if offset else 11)
    assert torch.equal(a, b)
    assert any(isinstance(m, torch.nn.Dropout) for m in net.modules()) or name == "ResNet"
    # output size follows the mode list
    assert build_network(name, 3, predict_offset=True, input_size=16).eval()(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_single_section_nets_ignore_other_sections():
    net = build_network("Net11", 11).eval()
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[:, 1:] = 0
    with torch.no_grad():
        assert torch.equal(net(x), net(y))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown architecture"):
        build_network("Net99", 11)
    with pytest.raises(ValueError, match="offset"):
        build_network("OffsetNet13", 11, predict_offset=False)


def _checkpoint(settings, arch="Net11", predict_offset=False):
    torch.manual_seed(1)
    modes = list(settings.model.modes)
    model = build_model(arch, len(modes), predict_offset, settings.camera.roi_px // settings.model.binning,
                        {"mean": [0.1, 0.1, 0.1], "std": [0.2, 0.2, 0.2]})
    return {"arch": arch, "modes": modes, "predict_offset": predict_offset,
            "n_outputs": len(modes) + 2 * predict_offset, "input_size": settings.camera.roi_px // settings.model.binning,
            "binning": settings.model.binning, "normalisation": {"mean": [0.1] * 3, "std": [0.2] * 3},
            "optics": optics_lock(settings), "training": {"epochs": 0}, "epoch": 0, "history": [],
            "state_dict": model.state_dict(), "optimizer_state": torch.optim.Adam(model.parameters()).state_dict()}


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_checkpoint(_checkpoint(load_settings()), path)
    return path


def test_checkpoint_is_plain_and_predictor_api(ckpt_path):
    raw = torch.load(ckpt_path, weights_only=True)
    assert raw["format"].startswith("autoalign-checkpoint") and raw["arch"] == "Net11"
    settings = load_settings()
    p = Predictor.load(str(ckpt_path), settings)
    assert p.modes == list(settings.model.modes) and p.predicts_offset is False
    x = _sections(np.random.default_rng(2))
    pred = p.predict(x)
    assert isinstance(pred, Prediction) and pred.mask_offset is None
    assert sorted(pred.coefficients) == p.modes
    assert all(isinstance(v, float) and np.isfinite(v) for v in pred.coefficients.values())
    batch = p.predict_batch(np.stack([x, 2 * x]))
    assert batch.shape == (2, len(settings.model.modes))
    np.testing.assert_allclose(batch[0], batch[1], atol=1e-5)  # scale-invariant input
    np.testing.assert_allclose(batch[0], [pred.coefficients[m] for m in p.modes], atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        p.predict(np.zeros((3, 32, 32)))


def test_offset_prediction(tmp_path):
    s = load_settings().replace(**{"model.predict_offset": True})
    path = save_checkpoint(_checkpoint(s, "MultiOffsetNet13", True), tmp_path / "off.pt")
    p = Predictor.load(path, s)
    pred = p.predict(_sections(np.random.default_rng(3)))
    assert p.predicts_offset and len(pred.mask_offset) == 2
    assert p.predict_batch(np.zeros((1, 3, 64, 64)) + 1).shape == (1, len(s.model.modes) + 2)


def test_relative_path_resolves_against_repository(ckpt_path, monkeypatch):
    import autoalign.models.predictor as mp

    monkeypatch.setattr(mp, "REPO_ROOT", ckpt_path.parent)
    s = load_settings().replace(**{"model.checkpoint": ckpt_path.name})
    assert Predictor.load(None, s).path == ckpt_path


def test_mismatched_checkpoint_is_refused_listing_differences(ckpt_path):
    other = load_settings().replace(**{
        "optics.wavelength_um": 0.66, "camera.pixel_size_um": 0.05, "stack.z_step_um": 0.05,
        "model.modes": [5, 6, 7], "dataset.modes": [5, 6, 7]})
    with pytest.raises(CheckpointError) as exc:
        Predictor.load(ckpt_path, other)
    msg = str(exc.value)
    assert str(ckpt_path) in msg and "4 difference" in msg
    for key in ("wavelength_um", "pixel_size_um", "z_step_um", "modes"):
        assert key in msg
    forced = Predictor.load(ckpt_path, other, force=True)
    assert len(forced.lock_differences) == 4 and forced.modes == list(load_settings().model.modes)


def test_tampered_corrupt_and_foreign_checkpoints(ckpt_path, tmp_path):
    ckpt = torch.load(ckpt_path, weights_only=True)
    key = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][key] = ckpt["state_dict"][key] + 0.01
    tampered = tmp_path / "tampered.pt"
    torch.save(ckpt, tampered)
    with pytest.raises(CheckpointError, match=r"tampered\.pt: checksum mismatch"):
        Predictor.load(tampered, load_settings())
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["modes"] = list(range(5, 16))[::-1]
    torch.save(ckpt, tampered)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        read_checkpoint(tampered)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(ckpt_path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"corrupt\.pt: not a readable checkpoint"):
        read_checkpoint(corrupt)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"garbage\.pt"):
        read_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match=r"foreign\.pt: not an autoalign checkpoint"):
        read_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_checkpoint(tmp_path / "missing.pt")


def test_inference_benchmark(ckpt_path):
    from autoalign.models.benchmark import inference_benchmark

    r = inference_benchmark(str(ckpt_path), load_settings(), repeats=5, batch=8, batch_repeats=2)
    assert r["single_ms_median"] > 0 and r["batch"] == 8 and r["batch_triplets_per_s"] > 0


SHIPPED_SETTINGS = load_settings()
SHIPPED = Path(__file__).resolve().parent.parent / SHIPPED_SETTINGS.model.checkpoint
# documented accuracy of the shipped model up to 1 rad RMS (docs/model.md), with margin
SHIPPED_MODE_RMSE_LIMIT = 0.08
SHIPPED_OFFSET_RMSE_LIMIT = 0.05


@pytest.mark.skipif(not SHIPPED.exists(), reason="no shipped model")
def test_shipped_model_reads_aberrations_and_offset():
    """The shipped model (settings.model.checkpoint), loaded as the loop loads it, reads fresh
    simulated aberrations and the mask offset (default randomised instrument, aberrations up to
    1 rad RMS, 2000 photons) to within its documented accuracy (docs/model.md) with margin."""
    from autoalign.simulation.dataset import generate_chunk

    s = SHIPPED_SETTINGS
    domain = {"dataset.rms_mix": [[1.0, min(1.0, 1.0 / s.dataset.max_total_rms_rad)]], "dataset.modes": s.model.modes}
    if not s.model.predict_offset:  # the previous (Noll 5..15) model's domain: no offset, nominal instrument
        domain.update({"dataset.max_offset": 0.0, "dataset.unlabelled_modes": [],
                       "dataset.na_scale_range": [1.0, 1.0], "dataset.wavelength_scale_range": [1.0, 1.0],
                       "dataset.pixel_scale_range": [1.0, 1.0], "dataset.polarisation_impurity_range": [0.0, 0.0],
                       "dataset.slm_stroke_range": [1.0, 1.0]})
    s = s.replace(**domain)
    p = Predictor.load(None, s)
    assert p.modes == list(s.model.modes) and p.predicts_offset == s.model.predict_offset
    d = generate_chunk(s, 987, 0, 64)
    photons = add_noise_numpy(d["img"], np.full(64, 2000.0), np.full(64, 5.0), 0.8, 1.5, np.random.default_rng(0))
    pred = p.predict_batch(photons)
    J = len(p.modes)
    rmse = np.sqrt(((pred[:, :J] - d["labels"][:, :J]) ** 2).mean())
    assert rmse < SHIPPED_MODE_RMSE_LIMIT, rmse
    zero = np.sqrt((d["labels"][:, :J] ** 2).mean())  # predicting nothing
    assert rmse < 0.5 * zero  # explains > 75 % of the variance
    if p.predicts_offset:
        off = np.sqrt(((pred[:, J:] - d["labels"][:, J:]) ** 2).mean())
        assert off < SHIPPED_OFFSET_RMSE_LIMIT and off < 0.5 * np.sqrt((d["labels"][:, J:] ** 2).mean()), off


def test_parallel_pair_reads_both_networks_as_each_alone(tmp_path, ckpt_path, monkeypatch, caplog):
    """The coarse + fine pair in one concurrent call gives each network's own eager outputs; a
    pair that cannot be traced faithfully is refused (logged) and the estimator runs the two one
    after the other, with the same estimate."""
    import logging
    from types import SimpleNamespace

    import autoalign.models.predictor as mp
    from autoalign.models.estimator import CNNEstimator

    s = load_settings()
    other = tmp_path / "offset.pt"
    save_checkpoint(_checkpoint(s, "ResNet", predict_offset=True), other)
    first, second = Predictor.load(other, s), Predictor.load(ckpt_path, s, fast=False)
    pair = mp.ParallelPair.make(first, second)
    assert pair is not None and mp.ParallelPair.make(first, second) is pair  # made once, reused
    for k in range(3):
        x = _sections(np.random.default_rng(10 + k))
        a, b = pair.predict(x)
        ea, eb = (Predictor.load(p, s, fast=False).predict(x) for p in (other, ckpt_path))
        assert a.coefficients == pytest.approx(ea.coefficients, abs=1e-4)
        assert a.mask_offset == pytest.approx(ea.mask_offset, abs=1e-4) and b.mask_offset is None
        assert b.coefficients == pytest.approx(eb.coefficients, abs=1e-4)
    far_off = s.replace(**{"model.fine_below_rad": 100.0, "model.fine_below_offset": 100.0})
    meas = SimpleNamespace(sections=_sections(np.random.default_rng(3)))
    together = CNNEstimator(far_off, first, second).estimate(meas)
    monkeypatch.setattr(mp, "FAST_PATH_TOLERANCE", -1.0)
    with caplog.at_level(logging.INFO, logger="autoalign.models.predictor"):
        est = CNNEstimator(far_off, Predictor.load(other, s), Predictor.load(ckpt_path, s, fast=False))
        assert est.pair is None
        apart = est.estimate(meas)
    assert "one after the other" in caplog.text
    assert together.extras["stage"] == apart.extras["stage"] == "fine"
    assert together.coefficients == pytest.approx(apart.coefficients, abs=1e-4)


def test_torchscript_fast_path_matches_eager_and_falls_back(ckpt_path, monkeypatch, caplog):
    """The predictor runs the traced/frozen network only when it reproduces the eager outputs;
    otherwise it logs why and keeps the eager model (same API, same numbers)."""
    import logging

    import autoalign.models.predictor as mp

    s = load_settings()
    x = np.stack([_sections(np.random.default_rng(k)) for k in range(3)])
    fast = Predictor.load(ckpt_path, s)
    eager = Predictor.load(ckpt_path, s, fast=False)
    assert fast.engine == "torchscript" and eager.engine == "eager"
    assert fast.fast_path_difference <= mp.FAST_PATH_TOLERANCE
    np.testing.assert_allclose(fast.predict_batch(x), eager.predict_batch(x), atol=1e-4)
    monkeypatch.setattr(mp, "FAST_PATH_TOLERANCE", -1.0)  # no traced model can pass
    with caplog.at_level(logging.INFO, logger="autoalign.models.predictor"):
        fallback = Predictor.load(ckpt_path, s)
    assert fallback.engine == "eager" and "using the eager model" in caplog.text
    np.testing.assert_allclose(fallback.predict_batch(x), eager.predict_batch(x), atol=0)
