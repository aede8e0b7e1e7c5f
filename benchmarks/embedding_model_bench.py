"""Training steps per second of the embedding net on glyph-sized batches, by number of classes.

The jitted `train.steps.train_step` (forward, backward, SGD update, the step's diagnostics) of
an embedding model with the fused head (`config.head = "fused"`, noisy softmax, alpha = 0.1) on
random 32x32x1 uint8 batches, at each class count. Each model and class count is compiled and
warmed up, then all are timed in alternating rounds (`block_until_ready` after each step) so
that load from the rest of the machine hits all alike; the table gives the median seconds per
step, steps/s and images/s, and each row's median per-round time ratio to the first row.

    python benchmarks/embedding_model_bench.py                       # resnet_glyph, 1k and 10k
    python benchmarks/embedding_model_bench.py --models resnet_glyph small_cnn --classes 1000
    python benchmarks/embedding_model_bench.py --json out.json
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _timing  # noqa: E402
from train import models, steps  # noqa: E402
from train.configs import default  # noqa: E402

IMAGE_SHAPE = (32, 32, 1)


def build(name, num_classes, *, batch_size, head, num_steps=10_000):
    """A jitted train step (donating its state), a fresh state and one random batch."""
    config = default.get_config()
    config.update(model=name, head=head, loss="noisy", batch_size=batch_size)
    model = models.create_model(name, num_classes, head=head)
    learning_rate = steps.learning_rate_schedule(config, num_steps)
    state = jax.jit(lambda: steps.create_train_state(
        config, model, steps.create_optimizer(config, learning_rate), IMAGE_SHAPE))()
    # config.dataset is MNIST: its one-channel mean and std normalise the glyphs alike.
    train_step = jax.jit(functools.partial(
        steps.train_step, config=config, learning_rate=learning_rate,
        alpha_fn=steps.alpha_schedule(config, num_steps)), donate_argnums=0)
    rng = np.random.default_rng(0)
    batch = (jax.device_put(rng.integers(0, 256, (batch_size, *IMAGE_SHAPE), dtype=np.uint8)),
             jax.device_put(rng.integers(0, num_classes, batch_size).astype(np.int32)))
    parameters = sum(x.size for x in jax.tree.leaves(state.params))
    return [train_step, state, batch], parameters


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet_glyph"], choices=models.MODELS)
    parser.add_argument("--classes", nargs="+", type=int, default=[1000, 10_000])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--head", default="fused", choices=models.HEADS)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timing rounds")
    parser.add_argument("--min-repeats", type=int, default=10, help="timed rounds at least")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)

    runs, parameters = {}, {}
    for name in args.models:
        for num_classes in args.classes:
            key = f"{name}/{num_classes}"
            runs[key], parameters[key] = build(name, num_classes, batch_size=args.batch_size,
                                               head=args.head)

    times, repeats = _timing.interleaved_train_steps(runs, min_repeats=args.min_repeats,
                                                     budget_s=args.budget)
    median = _timing.medians(times)
    first = next(iter(runs))

    print(_timing.device_line())
    print(f"{'model':>14} {'classes':>8} {'params':>10} {'s/step':>8} {'steps/s':>8} "
          f"{'images/s':>9} {'vs first':>8} {'n':>4}")
    results = []
    for key in runs:
        name, num_classes = key.split("/")
        row = {
            "model": name, "num_classes": int(num_classes), "head": args.head,
            "batch_size": args.batch_size, "parameters": int(parameters[key]),
            "repeats": repeats, "seconds_per_step": median[key],
            "steps_per_s": 1 / median[key], "images_per_s": args.batch_size / median[key],
            "paired_ratio_to_first": _timing.paired_ratio(times, key, first),
        }
        results.append(row)
        print(f"{name:>14} {num_classes:>8} {row['parameters']:>10} "
              f"{row['seconds_per_step']:8.3f} {row['steps_per_s']:8.2f} "
              f"{row['images_per_s']:9.0f} {row['paired_ratio_to_first']:8.3f} {repeats:4d}")
    _timing.write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
