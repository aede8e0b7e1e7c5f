"""Streaming input vs the whole split in host memory: training images/s and peak host memory.

Each run is `python -m train` on the default config (the small MNIST CNN) for `--steps` steps in
a fresh process, with single-threaded XLA (as the determinism tests run it). "stream" is the
default input (each batch read from the split's `tfds.data_source`, Grain prefetch);
"memory" decodes both splits into host memory first (`input_pipeline.cached_splits()`, the path
every run took before streaming). The modes run in alternation, `--repeats` times each; the
table gives each mode's median images/s (training time only, from results.json), the median of
the per-round ratios stream / memory, the peak resident memory of each process (from
`wait4`'s rusage) and the params_sha256 of every run (the modes train on the same batches).

    python benchmarks/input_pipeline_bench.py --data_dir ~/tensorflow_datasets
    python benchmarks/input_pipeline_bench.py --data_dir D --steps 50 --repeats 1 --json out.json

For memory that stays flat as the data grows, run it on a data_dir whose `mnist` has 10x the
examples (a CSV of the training split repeated ten times, prepared with
`python -m train.prepare_data --dataset mnist --source_dir ...`).
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

REPO = Path(__file__).resolve().parents[1]

_RUN = """
import contextlib, sys
from absl import app
from train import input_pipeline, main
context = input_pipeline.cached_splits() if sys.argv.pop(1) == "memory" else contextlib.nullcontext()
with context:
    app.run(main.main, flags_parser=main.parse_flags)
"""


def run(mode: str, data_dir: str, steps: int, workdir: str) -> dict:
    """One training run in a fresh process: its results.json and peak RSS (MiB)."""
    command = [sys.executable, "-c", _RUN, mode, "--config", "train/configs/default.py",
               "--workdir", workdir, f"--config.data_dir={data_dir}",
               f"--config.num_steps={steps}", "--config.progress_bar=False",
               "--config.prepare_data=False", f"--config.log_every_steps={min(50, steps)}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"{mode} run failed:\n{stderr[-3000:]}")
    results = json.loads((Path(workdir) / "results.json").read_text())
    return {"images_per_sec": results["images_per_sec"], "peak_rss_mib": usage.ru_maxrss / 1024,
            "params_sha256": results["params_sha256"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="~/tensorflow_datasets")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="stream,memory")
    parser.add_argument("--json", help="also write the runs here")
    args = parser.parse_args()
    modes = args.modes.split(",")
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="input_pipeline_bench_") as scratch:
        for repeat in range(args.repeats):
            for mode in modes:
                workdir = os.path.join(scratch, f"{mode}_{repeat}")
                runs[mode].append(run(mode, os.path.expanduser(args.data_dir), args.steps,
                                      workdir))
                print(f"round {repeat}: {mode}: {runs[mode][-1]}", flush=True)
    print(f"\n{args.steps} steps of train/configs/default.py, data_dir {args.data_dir}")
    print(f"{'mode':8} {'median images/s':>16} {'peak RSS MiB (max)':>19}")
    for mode in modes:
        print(f"{mode:8} {statistics.median(r['images_per_sec'] for r in runs[mode]):16.1f} "
              f"{max(r['peak_rss_mib'] for r in runs[mode]):19.0f}")
    if {"stream", "memory"} <= set(runs):
        ratios = [s["images_per_sec"] / m["images_per_sec"]
                  for s, m in zip(runs["stream"], runs["memory"])]
        print(f"median per-round ratio stream / memory: {statistics.median(ratios):.3f}")
    fingerprints = {r["params_sha256"] for rs in runs.values() for r in rs}
    print(f"distinct params_sha256: {len(fingerprints)} ({', '.join(sorted(fingerprints))})")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
