"""Images per second of a full training step with softmax and with noisy softmax, same run.

For each model (the default small MNIST CNN and the paper's VGG nets) the jitted train step of
`train.train` (forward, backward, SGD update and the saturation metrics it logs) is built twice
from the same config, once with `loss="softmax"` (Optax's cross-entropy) and once with
`loss="noisy"` (annealed noise, alpha = 0.1). The two are warmed up and then timed in
alternation on the same random batch, `block_until_ready` after each step; the table gives the
median images/s of each and the median of the per-round time ratios noisy / softmax.

    python benchmarks/train_step_bench.py                    # small_cnn, vgg_mnist, vgg_cifar
    python benchmarks/train_step_bench.py --quick            # small_cnn only, a few seconds
    python benchmarks/train_step_bench.py --models small_cnn --batch-size 256 --json out.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _timing  # noqa: E402
from train import (
    input_pipeline,  # noqa: E402
    steps,  # noqa: E402
)
from train.configs import cifar10, default, mnist_paper  # noqa: E402

# model name -> (config module, the config's own global batch size is used unless overridden)
MODELS = {
    "small_cnn": default,
    "vgg_mnist": mnist_paper,
    "vgg_cifar": cifar10,
}


def build(config, num_steps):
    functions = steps.jitted_functions(config, num_steps, jax.devices())
    return functions, functions.init()


def bench_model(name, *, batch_size, min_repeats, budget_s, num_steps=10_000):
    base = MODELS[name].get_config()
    if batch_size:
        base.batch_size = batch_size
    batch_size = base.batch_size
    info = input_pipeline.DATASETS[base.dataset]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch_size, *info.image_shape), dtype=np.uint8)
    labels = rng.integers(0, info.num_classes, (batch_size,), dtype=np.int32)

    runs = {}
    for loss in ("softmax", "noisy"):
        config = base.copy_and_resolve_references()
        config.loss = loss
        functions, state = build(config, num_steps)
        batch = (jax.device_put(images, functions.sharded),
                 jax.device_put(labels, functions.sharded))
        runs[loss] = [functions.train_step, state, batch]

    times, repeat = _timing.interleaved_train_steps(runs, min_repeats=min_repeats,
                                                    budget_s=budget_s)
    median = _timing.medians(times)
    return {
        "model": name,
        "dataset": base.dataset,
        "batch_size": batch_size,
        "repeats": repeat,
        "softmax_s": median["softmax"],
        "noisy_s": median["noisy"],
        "softmax_images_per_s": batch_size / median["softmax"],
        "noisy_images_per_s": batch_size / median["noisy"],
        "ratio": median["noisy"] / median["softmax"],
        "paired_ratio": _timing.paired_ratio(times, "noisy", "softmax"),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(MODELS))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch size (default: each config's own)")
    parser.add_argument("--quick", action="store_true", help="small_cnn only, short run")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per model (default 20, quick 3)")
    parser.add_argument("--min-repeats", type=int, default=None,
                        help="timed rounds at least (default 10, quick 5)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    models = args.models or (["small_cnn"] if args.quick else list(MODELS))
    budget = args.budget if args.budget is not None else (3.0 if args.quick else 20.0)
    min_repeats = args.min_repeats or (5 if args.quick else 10)

    print(_timing.device_line())
    print(f"{'model':>10} {'batch':>6} {'softmax img/s':>14} {'noisy img/s':>12} "
          f"{'ratio':>6} {'paired':>6} {'n':>4}")
    results = []
    for name in models:
        row = bench_model(name, batch_size=args.batch_size, min_repeats=min_repeats,
                          budget_s=budget)
        results.append(row)
        print(f"{name:>10} {row['batch_size']:>6} {row['softmax_images_per_s']:14.1f} "
              f"{row['noisy_images_per_s']:12.1f} {row['ratio']:6.3f} "
              f"{row['paired_ratio']:6.3f} {row['repeats']:4d}", flush=True)
    _timing.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
