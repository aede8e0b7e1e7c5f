"""Streaming input vs the whole split in host memory: training images/s and peak host memory.

Each run is `python -m train` on the default config (the small MNIST CNN) for `--steps` steps in
a fresh process, with single-threaded XLA (as the determinism tests run it), in one of the modes

  stream    every batch read from the split's `tfds.data_source` (`--config.in_memory_max_mib=0`),
            prefetched by a Grain thread;
  memory    both splits decoded into host memory first (`in_memory_max_mib` unbounded), as every
            run did before streaming;
  default   the default `in_memory_max_mib` (256: MNIST in memory, 10x MNIST streamed);
  baseline  `python -m train` of another checkout (`--baseline_repo`, e.g. the main branch).

The modes run in alternation, `--repeats` rounds; the table gives each mode's median images/s
(training time only, from results.json), the median of the per-round ratios to the first mode,
the peak resident memory of each process (`wait4`'s rusage) and the distinct params_sha256 (the
modes train on the same batches, so there is one).

    python benchmarks/input_pipeline_bench.py --data_dir ~/tensorflow_datasets
    python benchmarks/input_pipeline_bench.py --modes baseline,stream,default \
        --baseline_repo ../main --data_dir D --json out.json

For memory that stays flat as the data grows, run it on a data_dir whose `mnist` has 10x the
examples (a CSV of the training split repeated ten times, prepared with
`python -m train.prepare_data --dataset mnist --source_dir ...`).

Whole runs on a shared machine vary by +-20% from one minute to the next. `--steps_only` times,
in one process, the jitted training step of the default config fed four ways, in alternating
rounds of `--steps` steps (after a warm-up): the training split in memory, each batch cut in
the loop as before streaming ("memory-direct") or read by the Grain prefetch thread
("memory-prefetch"), and the split read from disk in the loop ("stream-direct") or by the
prefetch thread ("stream-prefetch"); it prints the median per-round time of each relative to
memory-direct.

    python benchmarks/input_pipeline_bench.py --steps_only --steps 30 --repeats 24 --data_dir D
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODE_FLAGS = {"stream": ["--config.in_memory_max_mib=0"],
              "memory": ["--config.in_memory_max_mib=1000000"], "default": [], "baseline": []}


def run(mode: str, data_dir: str, steps: int, workdir: str, baseline_repo: str | None) -> dict:
    """One training run in a fresh process: its results.json and peak RSS (MiB)."""
    command = [sys.executable, "-m", "train", "--config", "train/configs/default.py",
               "--workdir", workdir, f"--config.data_dir={data_dir}",
               f"--config.num_steps={steps}", "--config.progress_bar=False",
               "--config.prepare_data=False", f"--config.log_every_steps={min(50, steps)}",
               *MODE_FLAGS[mode]]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    env.pop("PYTHONPATH", None)
    cwd = baseline_repo if mode == "baseline" else REPO
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{mode} run failed:\n{stderr[-3000:]}")
    results = json.loads((Path(workdir) / "results.json").read_text())
    return {"images_per_sec": results["images_per_sec"], "peak_rss_mib": usage.ru_maxrss / 1024,
            "params_sha256": results["params_sha256"]}


def time_steps(data_dir: str, steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per round of `steps` training steps, for each way of feeding the batches."""
    os.environ.setdefault(
        "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    import time  # pylint: disable=g-import-not-at-top

    import jax  # pylint: disable=g-import-not-at-top

    sys.path.insert(0, str(REPO))
    from train import input_pipeline  # pylint: disable=g-import-not-at-top
    from train import steps as train_steps
    from train.configs import default  # pylint: disable=g-import-not-at-top

    config = default.get_config()
    jitted = train_steps.jitted_functions(config, 10**6, jax.devices())
    stream = input_pipeline.SourceRecords("mnist", "train", data_dir, prepare=False)
    memory = input_pipeline.in_memory(stream, max_mib=np.inf)
    feeds = {"memory-direct": (memory, False), "memory-prefetch": (memory, True),
             "stream-direct": (stream, False), "stream-prefetch": (stream, True)}

    def one_round(records, prefetched, start):
        batches = input_pipeline.TrainBatches(records, global_batch_size=config.batch_size,
                                              seed=0)
        state, pending = jitted.init(), []
        jax.block_until_ready(state)
        begin = time.perf_counter()
        source = (input_pipeline.prefetch(batches, start, start + steps) if prefetched
                  else (batches(step) for step in range(start, start + steps)))
        for batch in source:
            state, metrics = jitted.train_step(state, *jitted.global_batch(*batch))
            pending.append(metrics)
            if len(pending) > 8:  # the training loop's bound on the steps in flight
                jax.block_until_ready(pending[-9])
        jax.block_until_ready(state)
        return time.perf_counter() - begin

    for records, prefetched in feeds.values():  # warm-up: compilation, caches
        one_round(records, prefetched, 0)
    times: dict[str, list[float]] = {name: [] for name in feeds}
    for repeat in range(repeats):
        for name, (records, prefetched) in feeds.items():
            times[name].append(one_round(records, prefetched, steps * (repeat + 1)))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="~/tensorflow_datasets")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="memory,stream,default")
    parser.add_argument("--baseline_repo", help="the checkout that mode 'baseline' runs")
    parser.add_argument("--json", help="also write the runs here")
    parser.add_argument("--steps_only", action="store_true",
                        help="time the training step fed four ways, in one process")
    args = parser.parse_args()
    if args.steps_only:
        times = time_steps(os.path.expanduser(args.data_dir), args.steps, args.repeats)
        print(f"{args.repeats} rounds of {args.steps} steps, median seconds per round and "
              "median per-round ratio to memory-direct")
        for name, values in times.items():
            ratio = statistics.median(t / m for t, m in zip(values, times["memory-direct"]))
            print(f"{name:16} {statistics.median(values):8.3f} s {ratio:8.4f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "times": times}, indent=2))
        return
    modes = args.modes.split(",")
    if "baseline" in modes and not args.baseline_repo:
        parser.error("mode 'baseline' needs --baseline_repo")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="input_pipeline_bench_") as scratch:
        for repeat in range(args.repeats):
            for mode in modes:
                workdir = os.path.join(scratch, f"{mode}_{repeat}")
                runs[mode].append(run(mode, os.path.expanduser(args.data_dir), args.steps,
                                      workdir, args.baseline_repo))
                print(f"round {repeat}: {mode}: {runs[mode][-1]}", flush=True)
    first = modes[0]
    print(f"\n{args.steps} steps of train/configs/default.py, data_dir {args.data_dir}, "
          f"{args.repeats} rounds")
    print(f"{'mode':9} {'median images/s':>16} {'ratio to ' + first:>18} {'peak RSS MiB':>13}")
    for mode in modes:
        ratio = statistics.median(r["images_per_sec"] / b["images_per_sec"]
                                  for r, b in zip(runs[mode], runs[first]))
        print(f"{mode:9} {statistics.median(r['images_per_sec'] for r in runs[mode]):16.1f} "
              f"{ratio:18.3f} {max(r['peak_rss_mib'] for r in runs[mode]):13.0f}")
    fingerprints = {r["params_sha256"] for rs in runs.values() for r in rs}
    print(f"distinct params_sha256: {len(fingerprints)} ({', '.join(sorted(fingerprints))})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
