"""Memory and time of fused_noisy_softmax_cross_entropy against the materialised loss.

Two tables, float32 and bfloat16:

* memory: ``memory_analysis().temp_size_in_bytes`` of the jitted forward + backward
  (``jax.value_and_grad`` of the mean loss with respect to features and kernel), compile
  only (``jax.ShapeDtypeStruct`` inputs, nothing allocated), for the fused loss and for the
  materialised one (``noisy_softmax_cross_entropy(features @ kernel, ...)`` with
  ``amplitude=target_amplitude(...)``), at each number of classes; with compile times.
* time: both run, interleaved round by round in one process, at sizes where the
  materialised version fits; ``ratio`` is fused / materialised (medians), ``paired`` the
  median of the per-round ratios.
* with ``--layouts``, a third table: the fused loss on a ``[classes, dim]`` kernel
  (``kernel_layout="classes_features"``, Equinox's and PyTorch's layout) against the same
  kernel as ``[dim, classes]``, timed interleaved the same way; ``ratio`` is
  classes_features / features_classes.

    python benchmarks/large_class_bench.py                   # batch 512, dim 512; 100k/1M/4M
    python benchmarks/large_class_bench.py --quick           # small sizes, seconds
    python benchmarks/large_class_bench.py --json out.json --time-classes 100000
    python benchmarks/large_class_bench.py --memory-classes --layouts   # layouts' time only
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import noisy_softmax_jax as nsj  # noqa: E402
from benchmarks import _timing  # noqa: E402

ALPHA = 0.1


def fused_step(chunk_size=None, kernel_layout="features_classes"):
    """The jitted value-and-gradient step of the fused loss."""
    rng = jax.random.key(0)

    def fused(features, kernel, labels, alpha):
        return nsj.fused_noisy_softmax_cross_entropy(
            features, kernel, labels, rng, alpha, chunk_size=chunk_size,
            kernel_layout=kernel_layout).mean()

    return jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))


def make_steps(chunk_size=None):
    """The jitted value-and-gradient steps of both losses, keyed by name."""
    rng = jax.random.key(0)

    def materialised(features, kernel, labels, alpha):
        return nsj.noisy_softmax_cross_entropy(
            features @ kernel, labels, rng, alpha,
            amplitude=nsj.target_amplitude(features, kernel, labels)).mean()

    return {"fused": fused_step(chunk_size),
            "materialised": jax.jit(jax.value_and_grad(materialised, argnums=(0, 1)))}


def shapes(batch, dim, num_classes, dtype):
    return (jax.ShapeDtypeStruct((batch, dim), dtype),
            jax.ShapeDtypeStruct((dim, num_classes), dtype),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.float32))


def memory_row(steps, batch, dim, num_classes, dtype):
    row = {"batch": batch, "dim": dim, "num_classes": num_classes,
           "dtype": jnp.dtype(dtype).name}
    for name, step in steps.items():
        start = time.perf_counter()
        compiled = step.lower(*shapes(batch, dim, num_classes, dtype)).compile()
        row[f"{name}_compile_s"] = time.perf_counter() - start
        row[f"{name}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
    return row


def make_inputs(batch, dim, num_classes, dtype, seed=0):
    k_x, k_w, k_y = jax.random.split(jax.random.key(seed), 3)
    features = jax.random.normal(k_x, (batch, dim), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(k_w, (dim, num_classes), jnp.float32) / dim**0.5).astype(dtype)
    labels = jax.random.randint(k_y, (batch,), 0, num_classes)
    return features, kernel, labels, jnp.float32(ALPHA)


def time_once(fn, *args):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def interleaved(calls, *, min_repeats, budget_s):
    """Times ``{name: (step, args)}`` interleaved, after two warm-up calls of each."""
    for step, args in calls.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(step(*args))
    return _timing.interleaved_times(
        {name: lambda step=step, args=args: time_once(step, *args)
         for name, (step, args) in calls.items()},
        min_repeats=min_repeats, budget_s=budget_s)


def time_row(steps, batch, dim, num_classes, dtype, *, min_repeats, budget_s):
    args = make_inputs(batch, dim, num_classes, dtype)
    times, repeats = interleaved({name: (step, args) for name, step in steps.items()},
                                 min_repeats=min_repeats, budget_s=budget_s)
    median = _timing.medians(times)
    return {"batch": batch, "dim": dim, "num_classes": num_classes,
            "dtype": jnp.dtype(dtype).name, "repeats": repeats,
            "fused_s": median["fused"], "materialised_s": median["materialised"],
            "ratio": median["fused"] / median["materialised"],
            "paired_ratio": _timing.paired_ratio(times, "fused", "materialised")}


def layout_row(chunk_size, batch, dim, num_classes, dtype, *, min_repeats, budget_s):
    """The fused step on a [classes, dim] kernel against the same kernel as [dim, classes]."""
    features, kernel, labels, alpha = make_inputs(batch, dim, num_classes, dtype)
    # Transposed once, before timing: the stored layout of an Equinox or PyTorch weight.
    weight = jnp.array(kernel.T)
    times, repeats = interleaved({
        layout: (fused_step(chunk_size, layout), (features, w, labels, alpha))
        for layout, w in (("features_classes", kernel), ("classes_features", weight))},
        min_repeats=min_repeats, budget_s=budget_s)
    median = _timing.medians(times)
    return {"batch": batch, "dim": dim, "num_classes": num_classes,
            "dtype": jnp.dtype(dtype).name, "repeats": repeats,
            "features_classes_s": median["features_classes"],
            "classes_features_s": median["classes_features"],
            "ratio": median["classes_features"] / median["features_classes"],
            "paired_ratio": _timing.paired_ratio(times, "classes_features", "features_classes")}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--memory-classes", type=int, nargs="*", default=None,
                        help="class counts of the memory table (default 100000 1000000 4000000)")
    parser.add_argument("--time-classes", type=int, nargs="*", default=None,
                        help="class counts of the time table (default 100000)")
    parser.add_argument("--dtypes", nargs="+", default=("float32", "bfloat16"))
    parser.add_argument("--chunk-size", type=int, default=None, help="default: the loss's own")
    parser.add_argument("--quick", action="store_true", help="batch 64, dim 64, small counts")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timing per row (default 60, quick 2)")
    parser.add_argument("--min-repeats", type=int, default=None,
                        help="timed rounds at least (default 7, quick 3)")
    parser.add_argument("--layouts", action="store_true",
                        help="also time the fused loss on a [classes, dim] kernel against "
                             "[dim, classes] at --time-classes")
    parser.add_argument("--skip-materialised", action="store_true",
                        help="no time table of fused against materialised (with --layouts)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.dim = 64, 64
    memory_classes = args.memory_classes if args.memory_classes is not None else (
        (10_000, 100_000) if args.quick else (100_000, 1_000_000, 4_000_000))
    time_classes = args.time_classes if args.time_classes is not None else (
        (10_000,) if args.quick else (100_000,))
    budget = args.budget if args.budget is not None else (2.0 if args.quick else 60.0)
    min_repeats = args.min_repeats or (3 if args.quick else 7)

    steps = make_steps(args.chunk_size)
    print(_timing.device_line())
    print(f"# memory: temporary bytes of value_and_grad, compile only; batch {args.batch}, "
          f"dim {args.dim}")
    print(f"{'classes':>10} {'dtype':>8} {'fused MiB':>10} {'mat. MiB':>10} "
          f"{'fused compile s':>15} {'mat. compile s':>14}")
    memory = []
    for dtype in args.dtypes:
        for num_classes in memory_classes:
            row = memory_row(steps, args.batch, args.dim, num_classes, jnp.dtype(dtype))
            memory.append(row)
            print(f"{num_classes:>10} {row['dtype']:>8} {row['fused_temp_bytes'] / 2**20:10.1f} "
                  f"{row['materialised_temp_bytes'] / 2**20:10.1f} "
                  f"{row['fused_compile_s']:15.2f} {row['materialised_compile_s']:14.2f}",
                  flush=True)
    print(f"# time: forward + backward, fused / materialised; batch {args.batch}, dim {args.dim}")
    print(f"{'classes':>10} {'dtype':>8} {'fused s':>9} {'mat. s':>9} {'ratio':>6} "
          f"{'paired':>6} {'n':>4}")
    timing = []
    for dtype in args.dtypes:
        for num_classes in time_classes if not args.skip_materialised else ():
            row = time_row(steps, args.batch, args.dim, num_classes, jnp.dtype(dtype),
                           min_repeats=min_repeats, budget_s=budget)
            timing.append(row)
            print(f"{num_classes:>10} {row['dtype']:>8} {row['fused_s']:9.3f} "
                  f"{row['materialised_s']:9.3f} {row['ratio']:6.3f} {row['paired_ratio']:6.3f} "
                  f"{row['repeats']:4d}", flush=True)
    layouts = []
    if args.layouts:
        print(f"# time: fused, kernel [classes, dim] / [dim, classes]; batch {args.batch}, "
              f"dim {args.dim}")
        print(f"{'classes':>10} {'dtype':>8} {'layout':>16} {'[dim,cls] s':>11} "
              f"{'[cls,dim] s':>11} {'ratio':>6} {'paired':>6} {'n':>4}")
        for dtype in args.dtypes:
            for num_classes in time_classes:
                row = layout_row(args.chunk_size, args.batch, args.dim, num_classes,
                                 jnp.dtype(dtype), min_repeats=min_repeats, budget_s=budget)
                layouts.append(row)
                # Eight columns, so gpu_check.sh's parser of the seven-column table skips them.
                print(f"{num_classes:>10} {row['dtype']:>8} {'classes_features':>16} "
                      f"{row['features_classes_s']:11.3f} {row['classes_features_s']:11.3f} "
                      f"{row['ratio']:6.3f} {row['paired_ratio']:6.3f} {row['repeats']:4d}",
                      flush=True)
    _timing.write_json(args.json, timing, memory=memory, layouts=layouts, alpha=ALPHA,
                       chunk_size=args.chunk_size)
    return memory, timing, layouts


if __name__ == "__main__":
    main()
