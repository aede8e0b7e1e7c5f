"""Forward + backward cost of noisy_softmax_cross_entropy against Optax's integer-label loss.

For each size and dtype, in one process and interleaved (so machine noise hits both):

* Optax: ``jax.value_and_grad`` of the mean of
  ``optax.softmax_cross_entropy_with_integer_labels`` with respect to the logits;
* ours: ``jax.value_and_grad`` of the mean of ``noisy_softmax_cross_entropy`` (annealed
  noise, alpha = 0.1, traced) with respect to the logits and the amplitude;
* copy: ``-x``, a read and a write of the logits, the machine's bandwidth for this shape.

Each is jitted, warmed up, then timed call by call with ``block_until_ready``; the table
shows medians. GB/s counts the least traffic any implementation needs, one read of the
logits and one write of their gradient, over the measured time.

    python benchmarks/loss_bench.py                 # all sizes, float32 and bfloat16
    python benchmarks/loss_bench.py --quick         # small sizes, a few seconds
    python benchmarks/loss_bench.py --json out.json --sizes 1024x1000 --dtypes float32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import noisy_softmax_jax as nsj  # noqa: E402
from benchmarks import _timing  # noqa: E402

DEFAULT_SIZES = ("256x10", "1024x100", "1024x1000", "4096x1000", "1024x10000", "1024x100000")
QUICK_SIZES = ("256x10", "1024x100", "1024x1000")
ALPHA = 0.1


def make_inputs(batch, num_classes, dtype, seed=0):
    """Logits of a bias-free linear classifier, labels and the amplitude ||W_y|| ||x||."""
    k_logits, k_labels, k_norms = jax.random.split(jax.random.key(seed), 3)
    logits = 3.0 * jax.random.normal(k_logits, (batch, num_classes), jnp.float32)
    labels = jax.random.randint(k_labels, (batch,), 0, num_classes)
    # Any amplitude >= |f_y| is a valid ||W_y|| ||x||; this one keeps cos(theta_y) in [-1, 1].
    amplitude = jnp.abs(logits).max(axis=-1) * jax.random.uniform(
        k_norms, (batch,), minval=1, maxval=2)
    return logits.astype(dtype), labels, amplitude


def make_steps():
    rng = jax.random.key(0)

    @jax.jit
    def optax_step(logits, labels):
        return jax.value_and_grad(
            lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, labels).mean())(logits)

    @jax.jit
    def ours_step(logits, labels, amplitude, alpha):
        return jax.value_and_grad(
            lambda lg, amp: nsj.noisy_softmax_cross_entropy(
                lg, labels, rng, alpha, amplitude=amp).mean(),
            argnums=(0, 1))(logits, amplitude)

    copy_step = jax.jit(lambda x: -x)
    return optax_step, ours_step, copy_step


def time_once(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def bench_size(batch, num_classes, dtype, steps, *, min_repeats, budget_s):
    optax_step, ours_step, copy_step = steps
    logits, labels, amplitude = make_inputs(batch, num_classes, dtype)
    alpha = jnp.float32(ALPHA)
    calls = {
        "optax": (optax_step, (logits, labels)),
        "ours": (ours_step, (logits, labels, amplitude, alpha)),
        "copy": (copy_step, (logits,)),
    }
    for fn, args in calls.values():  # compile and warm up
        for _ in range(3):
            jax.block_until_ready(fn(*args))
    times, repeat = _timing.interleaved_times(
        {name: lambda fn=fn, args=args: time_once(fn, *args) for name, (fn, args) in calls.items()},
        min_repeats=min_repeats, budget_s=budget_s)
    median = _timing.medians(times)
    paired = _timing.paired_ratio(times, "ours", "optax")
    nbytes = logits.size * logits.dtype.itemsize
    return {
        "batch": batch,
        "num_classes": num_classes,
        "dtype": jnp.dtype(dtype).name,
        "repeats": repeat,
        "optax_s": median["optax"],
        "ours_s": median["ours"],
        "copy_s": median["copy"],
        "ratio": median["ours"] / median["optax"],
        "paired_ratio": paired,
        # one read of the logits and one write of the gradient
        "optax_gbps": 2 * nbytes / median["optax"] / 1e9,
        "ours_gbps": 2 * nbytes / median["ours"] / 1e9,
        "copy_gbps": 2 * nbytes / median["copy"] / 1e9,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=None, help="BATCHxCLASSES, e.g. 1024x1000")
    parser.add_argument("--dtypes", nargs="+", default=("float32", "bfloat16"))
    parser.add_argument("--quick", action="store_true", help="small sizes, short runs")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per size and dtype (default 8, quick 1)")
    parser.add_argument("--min-repeats", type=int, default=None,
                        help="timed rounds at least (default 15, quick 5)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES)
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 8.0)
    min_repeats = args.min_repeats or (5 if args.quick else 15)

    steps = make_steps()
    print(_timing.device_line(optax=optax.__version__))
    header = (f"{'size':>12} {'dtype':>8} {'optax ms':>10} {'ours ms':>10} {'ratio':>6} "
              f"{'paired':>6} {'optax GB/s':>10} {'ours GB/s':>9} {'copy GB/s':>9} {'n':>5}")
    print(header)
    results = []
    for dtype in args.dtypes:
        for size in sizes:
            batch, num_classes = (int(v) for v in size.lower().split("x"))
            row = bench_size(batch, num_classes, jnp.dtype(dtype), steps,
                             min_repeats=min_repeats, budget_s=budget)
            results.append(row)
            print(f"{size:>12} {row['dtype']:>8} {row['optax_s'] * 1e3:10.3f} "
                  f"{row['ours_s'] * 1e3:10.3f} {row['ratio']:6.3f} {row['paired_ratio']:6.3f} "
                  f"{row['optax_gbps']:10.2f} {row['ours_gbps']:9.2f} {row['copy_gbps']:9.2f} "
                  f"{row['repeats']:5d}", flush=True)
    _timing.write_json(args.json, results, optax=optax.__version__, alpha=ALPHA)
    return results


if __name__ == "__main__":
    main()
