"""Closed loop on the simulated microscope, previous (Noll 5..15) vs new (5..22 + offset) model:
true residual RMS and true null depth per iteration, a few hidden-error cases, fixed seeds."""
import sys

from autoalign.app.estimators import make_estimator
from autoalign.app.loop import AlignmentLoop
from autoalign.models.predictor import Predictor
from autoalign.settings import load_settings

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from tests.test_loop_support import sim_devices  # noqa: E402

NEW = sys.argv[1] if len(sys.argv) > 1 else "models/weights/modes5-22_offset.pt"
CASES = [("0.9 rad (5..15)", 0.9, [0.0, 0.0]), ("0.7 rad + offset (0.07, 0.07)", 0.7, [0.07, 0.07]),
         ("1.8 rad (5..15)", 1.8, [0.0, 0.0])]
for label, rms, off in CASES:
    for name, ck, extra in (("previous", "models/weights/default.pt",
                             {"model.modes": list(range(5, 16)), "model.predict_offset": False}),
                            ("new", NEW, {"model.modes": list(range(5, 23)), "model.predict_offset": True})):
        for seed in (7, 8):
            s = load_settings().replace(**{"simulation.aberration_rms_rad": rms, "simulation.seed": seed,
                                           "simulation.mask_offset": off, "model.fine_checkpoint": "", **extra})
            p = Predictor.load(ck, settings=s)
            dev = sim_devices(s, None, bead_um=(0.1, -0.06, 0.1), seed=seed)
            with dev:
                loop = AlignmentLoop(dev, s, make_estimator("model", s, p))
                loop.zero_slm()
                res, null = [loop.true_residual_rms()], []
                for k in range(5):
                    r = loop.correct_once(iteration=k)
                    res.append(loop.true_residual_rms())
                    null.append(r.metrics.get("true_null_depth", float("nan")))
            print(f"{label:32s} {name:9s} seed {seed}: residual {[round(x, 3) for x in res]} "
                  f"null {[round(x, 4) for x in null]}", flush=True)
