"""Workdirs as `train.train_and_evaluate` leaves them, with made-up numbers, for the runner and
report tests (which must not train a network)."""

import json
import os


def read(path):
    with open(path) as f:
        return f.read()


def fake_run(config, workdir, *, test_error=None, steps=30, train_full=None):
    """Writes what train_and_evaluate writes, with made-up numbers (or fails for seed 99).

    `train_full` ({step: {"train_full_...": value}}) adds whole-subset saturation records.
    """
    if config.seed == 99:
        raise RuntimeError("boom")
    os.makedirs(os.path.join(workdir, "checkpoints"), exist_ok=True)
    noisy = config.loss == "noisy"
    if test_error is None:
        test_error = 0.03 - (0.005 if noisy and config.alpha == 0.1 else 0.0) + 0.001 * config.seed
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for step in range(10, steps + 1, 10):
            f.write(json.dumps({
                "step": step, "kind": "train", "loss": 1.0 / step, "accuracy": 1 - 1.0 / step,
                "target_prob": 1 - 1.0 / step, "saturated_fraction": step / steps,
                "target_grad": 1.0 / step, "amplitude": 10.0, "logit_std": 3.0}) + "\n")
            if train_full and step in train_full:
                f.write(json.dumps({"step": step, "kind": "train_full", **train_full[step]}) + "\n")
            if step % 20 == 0 or step == steps:
                f.write(json.dumps({"step": step, "kind": "eval", "test_loss": 0.1,
                                    "test_accuracy": 1 - test_error}) + "\n")
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())
    results = {"dataset": config.dataset, "loss": config.loss,
               "noise": config.noise if noisy else None, "alpha": config.alpha if noisy else None,
               "seed": config.seed, "steps": steps, "test_accuracy": 1 - test_error,
               "test_error": test_error, "train_time_s": 12.0}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    return results
