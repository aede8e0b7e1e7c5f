"""A whole training step with the loss's straight-line threefry draw against jax.random.normal.

Issue 20 asks whether `noisy_softmax_jax/_noise.py`'s copy of threefry (straight-line code in
place of `jax.random.normal`'s while loop on XLA:CPU, the same bits) saves anything measurable
in a whole training step. The jitted train step of `train/train.py` for the default config
(`loss="noisy"`, small CNN, MNIST, batch 128) is compiled three times: with the copy, with
`_noise.standard_normal` replaced by `jax.random.normal` while it is traced, and with
`loss="softmax"` for scale. Each is lowered and compiled explicitly (so no tracing cache can
mix the two noise variants up; their HLO is checked to differ: a while loop only with
`jax.random.normal`), then the three are timed interleaved, round by round.

    python benchmarks/noise_draw_bench.py --budget 60 --min-repeats 30
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _timing  # noqa: E402
from noisy_softmax_jax import _noise  # noqa: E402
from train import input_pipeline, steps  # noqa: E402
from train.configs import default  # noqa: E402


def _jax_random_normal(rng, shape, dtype):
    return jax.random.normal(rng, shape, dtype=dtype)


def compiled_step(loss, *, jax_random, images, labels, num_steps=10_000):
    config = default.get_config()
    config.loss = loss
    functions = steps.jitted_functions(config, num_steps, jax.devices())
    state = functions.init()
    batch = (jax.device_put(images, functions.sharded), jax.device_put(labels, functions.sharded))
    original = _noise.standard_normal
    if jax_random:
        _noise.standard_normal = _jax_random_normal
    try:
        jax.clear_caches()  # no jaxpr traced under the other variant is reused
        compiled = functions.train_step.lower(state, *batch).compile()
    finally:
        _noise.standard_normal = original
    return compiled, state, batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--min-repeats", type=int, default=30)
    args = parser.parse_args(argv)
    base = default.get_config()
    info = input_pipeline.DATASETS[base.dataset]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (base.batch_size, *info.image_shape), dtype=np.uint8)
    labels = rng.integers(0, info.num_classes, (base.batch_size,), dtype=np.int32)

    runs, hlo = {}, {}
    for name, loss, jax_random in (("threefry_copy", "noisy", False),
                                   ("jax_random", "noisy", True),
                                   ("softmax", "softmax", False)):
        compiled, state, batch = compiled_step(loss, jax_random=jax_random, images=images,
                                               labels=labels)
        hlo[name] = compiled.as_text()
        runs[name] = [compiled, state, batch]
    loops = {name: text.count(" while(") for name, text in hlo.items()}
    assert loops["jax_random"] > loops["threefry_copy"], loops  # the variants differ
    times, repeats = _timing.interleaved_train_steps(runs, min_repeats=args.min_repeats,
                                                     budget_s=args.budget)
    median = _timing.medians(times)
    print(_timing.device_line())
    print(f"# while loops in the compiled step: {loops}; {repeats} rounds, batch "
          f"{base.batch_size}")
    for name in runs:
        print(f"{name:>14} {1e3 * median[name]:8.2f} ms  {base.batch_size / median[name]:8.1f} "
              "img/s")
    print(f"jax_random / threefry_copy: ratio {median['jax_random'] / median['threefry_copy']:.4f}"
          f"  paired {_timing.paired_ratio(times, 'jax_random', 'threefry_copy'):.4f}")
    print(f"threefry_copy / softmax: {median['threefry_copy'] / median['softmax']:.4f};  "
          f"jax_random / softmax: {median['jax_random'] / median['softmax']:.4f}")


if __name__ == "__main__":
    main()
