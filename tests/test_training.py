"""Training end to end on a tiny data set: the validation loss drops, checkpoints/logs are
written, resume and warm start work, evaluation and the commands run."""
import csv
import json

import numpy as np
import pytest
import torch

from autoalign.settings import load_settings
from autoalign.models.data import NoiseTransform, PSFDataset, compute_normalisation
from autoalign.models.predictor import Predictor, build_model
from autoalign.models.train import evaluate_loss, train
from autoalign.simulation.dataset import write_dataset

SMALL = {"camera.roi_px": 32, "stack.planes": 32, "optics.pupil_samples": 48,
         "dataset.modes": [5, 7, 11], "model.modes": [5, 7, 11], "dataset.max_coefficient_rad": 0.8,
         "dataset.peak_photons_range": [2000.0, 5000.0], "model.architecture": "Net11",
         # a tiny, easy problem: modest aberrations, no offset, no unlabelled modes
         "dataset.max_total_rms_rad": 1.0, "dataset.rms_mix": [[1.0, 1.0]], "dataset.max_offset": 0.0,
         "model.predict_offset": False, "dataset.unlabelled_modes": []}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    # one thread: on a shared 2-core machine two OpenMP threads fighting for one core are ~5x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    s = load_settings().replace(**SMALL)
    root = tmp_path_factory.mktemp("train")
    data = write_dataset(s, 500, root / "data.h5", seed=0, workers=1, progress=False)
    yield s, data, root
    torch.set_num_threads(threads)


def test_tiny_training_lowers_validation_loss(setup):
    s, data, root = setup
    out = root / "run"
    summary = train(data, out, s, epochs=6, batch=32, lr=2e-3, seed=0, progress=False)
    # untrained model of the same seed, same validation noise
    ds = PSFDataset(data, "val", NoiseTransform.from_settings(s, 2), 2)
    torch.manual_seed(0)
    fresh = build_model("Net11", 3, False, 16, compute_normalisation(PSFDataset(data, "train", ds.transform, 2)))
    initial, _ = evaluate_loss(fresh, ds, 3, 64, torch.device("cpu"))
    zero = float((ds.labels**2).mean(0).sum())  # loss of always predicting 0
    assert summary["best_val_loss"] < 0.5 * initial
    assert summary["best_val_loss"] < 0.75 * zero, (summary["best_val_loss"], zero)
    for name in ("best.pt", "last.pt", "log.csv"):
        assert (out / name).exists()
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 7))
    raw = torch.load(out / "best.pt", weights_only=True)
    assert raw["arch"] == "Net11" and raw["modes"] == [5, 7, 11] and "optimizer_state" in raw
    assert raw["optics"]["roi_px"] == 32 and raw["training"]["epochs"] == 6
    p = Predictor.load(out / "best.pt", s)
    assert p.modes == [5, 7, 11]


def test_resume_and_warm_start(setup):
    """An interrupted run resumed from last.pt ends with exactly the weights, optimizer state and
    learning rate of an uninterrupted run (model, optimizer, schedule and epoch restored)."""
    s, data, root = setup
    straight = train(data, root / "straight", s, epochs=2, batch=64, seed=1, progress=False, tensorboard=False,
                     limit=128)
    out = root / "resume"
    train(data, out, s, epochs=2, batch=64, seed=1, progress=False, tensorboard=False, limit=128,
          stop_after=1)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
    summary = train(data, out, s, epochs=0, batch=64, seed=1, progress=False, resume=out / "last.pt",
                    tensorboard=False, limit=128)
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and summary["epochs"] == 2
    assert len(list(csv.DictReader(open(out / "log.csv")))) == 2
    a = torch.load(root / "straight" / "last.pt", weights_only=True)
    b = torch.load(out / "last.pt", weights_only=True)
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=1e-6)
    assert a["scheduler_state"]["last_epoch"] == b["scheduler_state"]["last_epoch"]
    assert a["optimizer_state"]["param_groups"][0]["lr"] == pytest.approx(b["optimizer_state"]["param_groups"][0]["lr"])
    assert straight["history"][-1]["val_loss"] == pytest.approx(summary["history"][-1]["val_loss"], rel=1e-5)
    warm = train(data, root / "warm", s, epochs=1, batch=64, seed=2, progress=False,
                 warm_start=out / "best.pt", tensorboard=False, export=root / "exported.pt")
    assert warm["epochs"] == 1
    exported = torch.load(root / "exported.pt", weights_only=True)
    assert "optimizer_state" not in exported
    Predictor.load(root / "exported.pt", s)


def _ddp_rank(rank, world, port, data, out, settings_yaml):
    import os

    import yaml

    from autoalign.settings import settings_from_dict

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    s = settings_from_dict(yaml.safe_load(settings_yaml))
    result = train(data, out, s, epochs=1, batch=16, seed=3, progress=False, tensorboard=False, limit=96,
                   device="cpu")
    if rank != 0:
        torch.save(result["state_dict"], f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_training_keeps_ranks_identical(setup):
    """Two CPU ranks (gloo) train a few steps with DistributedDataParallel; the weights stay
    identical across ranks (gradients are averaged) and rank 0 alone writes the checkpoints."""
    import socket

    import torch.multiprocessing as tmp

    s, data, root = setup
    out = root / "ddp"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tmp.spawn(_ddp_rank, args=(2, port, str(data), str(out), s.to_yaml()), nprocs=2, join=True)
    rank0 = torch.load(out / "last.pt", weights_only=True)
    rank1 = torch.load(out / "rank1.pt", weights_only=True)
    assert rank0["training"]["world_size"] == 2 and rank0["epoch"] == 1
    fresh = build_model("Net11", 3, False, 16, rank0["normalisation"]).state_dict()
    moved = 0
    for key, value in rank1.items():
        torch.testing.assert_close(rank0["state_dict"][key], value, rtol=0, atol=0)
        moved += int(not torch.equal(fresh[key], value))
    assert moved > 0  # the weights did train
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["best.pt", "last.pt", "rank1.pt"]


def test_evaluate_and_commands(setup, capsys):
    from autoalign.app.cli import main
    from autoalign.models.evaluate import evaluate, to_json

    s, data, root = setup
    cfg = root / "small.yaml"
    cfg.write_text(s.to_yaml())
    out = root / "cli"
    assert main(["train", "--data", str(data), "--out", str(out), "--settings", str(cfg), "--epochs", "1",
                 "--quiet", "--no-tensorboard"]) == 0
    assert (out / "training_curve.png").exists()
    r = evaluate(out / "best.pt", data, "test", resimulate=4)
    assert set(r["per_mode"]) == {"Z5", "Z7", "Z11"} and r["samples"] == 50
    # 50 samples: no target is declared met or missed
    assert r["verdict"]["judged"] is False and r["meets_target"] is None and r["verdict"]["rmse_mean"] is None
    assert 0 < r["correlation"]["true"]["median"] <= 1
    assert r["correlation"]["true"]["median"] > 0.9  # re-simulation reproduces the input
    json.loads(to_json(r))
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "best.pt"), "--data", str(data), "--json",
                 "--resimulate", "2", "--plots", str(root / "plots")]) == 0
    j = json.loads(capsys.readouterr().out)
    assert j["split"] == "test" and "rmse_mean" in j and (root / "plots" / "scatter.png").exists()
    # a checkpoint for other optics is refused by evaluate (the data's settings)
    other = s.replace(**{"optics.wavelength_um": 0.66})
    from autoalign.models.predictor import CheckpointError

    with pytest.raises(CheckpointError, match="wavelength_um"):
        evaluate(out / "best.pt", data, settings=other, resimulate=0)
    assert np.isfinite(evaluate(out / "best.pt", data, settings=other, force=True, resimulate=0)["rmse_mean"])


def test_target_verdicts_need_enough_samples():
    from autoalign.models.evaluate import MIN_SAMPLES_FOR_TARGET, verdict

    assert MIN_SAMPLES_FOR_TARGET >= 500
    few = verdict(0.01, 0.02, 0.001, 499)
    assert few["all_met"] is None and few["rmse_mean"] is None
    ok = verdict(0.04, 0.07, 0.009, 500)
    assert ok["all_met"] is True
    assert verdict(0.04, 0.09, 0.009, 800)["all_met"] is False  # worst mode above 0.08
    assert verdict(0.04, 0.07, 0.02, 800)["offset"] is False
    assert verdict(0.06, 0.07, None, 800)["rmse_mean"] is False


def test_robustness_rows_and_model_on_shared_outputs(setup):
    """The robustness table has the nominal row and one row per factor edge, with finite RMSEs;
    a model is evaluated on the outputs it shares with a data set."""
    from autoalign.models.evaluate import ROBUSTNESS_FACTORS, robustness, robustness_table

    s, data, root = setup
    out = root / "rob"
    train(data, out, s, epochs=1, batch=64, seed=0, progress=False, tensorboard=False, limit=64)
    r = robustness(out / "last.pt", s, count=4, progress=False)
    expected = 1 + sum(len(edges) for _, _, edges in ROBUSTNESS_FACTORS)
    assert len(r["rows"]) == expected and r["rows"][0]["factor"] == "nominal"
    assert all(np.isfinite(row["rmse_mean"]) and row["samples"] == 4 for row in r["rows"])
    assert all(row["verdict"]["all_met"] is None for row in r["rows"])  # 4 samples: not judged
    assert robustness_table(r).count("\n") == expected + 1
    cached = robustness(out / "last.pt", s, count=4, progress=False, cache_dir=root / "cache")
    again = robustness(out / "last.pt", s, count=4, progress=False, cache_dir=root / "cache")
    assert len(list((root / "cache").glob("robustness_*.npz"))) == expected
    assert [row["per_output"] for row in cached["rows"]] == [row["per_output"] for row in again["rows"]]
    assert [row["per_output"] for row in cached["rows"]] == [row["per_output"] for row in r["rows"]]


def test_a_time_budget_ends_the_run_at_the_low_learning_rate(setup, monkeypatch):
    """--max-minutes: with far more epochs than the budget allows, the run stops when the budget is
    spent (validated and saved), and the cosine schedule has reached its floor lr/50 by then."""
    import time

    s, data, root = setup
    out = root / "budget"
    t0 = time.time()
    summary = train(data, out, s, epochs=10_000, batch=32, lr=2e-3, seed=0, progress=False, max_minutes=0.1)
    wall = time.time() - t0
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert 1 <= len(rows) < 10_000 and summary["history"][-1]["epoch"] == len(rows)
    assert wall < 6 + 20  # the 6 s budget, plus one validation and the checkpoints
    assert float(rows[-1]["lr"]) == pytest.approx(2e-3 / 50, rel=0.05)  # the schedule followed the clock
    assert (out / "last.pt").exists() and torch.load(out / "last.pt", weights_only=True)["training"]["max_minutes"] == 0.1
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun each rank's clock would set its own lr
    with pytest.raises(ValueError, match="max_minutes under torchrun"):
        train(data, root / "ddp", s, epochs=1, progress=False, max_minutes=0.1)
