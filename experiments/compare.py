"""Multi-seed comparisons of softmax, label smoothing and noisy softmax: the runner.

Trains a grid of (dataset, configuration, seed) runs one after another, each in its own workdir
`<results>/runs/<dataset>/<configuration>/seed<k>/`, then writes the report
(`experiments/report.py`: Markdown tables from every `results.json`, saturation plots from the
`metrics.jsonl` files):

  python -m experiments.compare --grid main --seeds 0,1,2     # train what is missing, then report
  python -m experiments.compare --grid alpha_range --seeds 0
  python -m experiments.compare --report-only                 # tables and plots from stored runs

(`python -m train.compare` is the same command under its old name.) The grids are data
(`experiments/sweeps.py`): each configuration is a set of config overrides of
`train/configs/compare_short.py`, so configurations differ in the loss alone unless named
otherwise, and each run's `config.json` records everything it varied.

Resumable: a run whose `results.json` exists is skipped, so a crash or a stop loses only the
run in progress (and that one resumes from its last checkpoint). Checkpoints of finished runs are
deleted; `results.json`, `metrics.jsonl`, `config.json` and `run_info.json` stay, which is all
the report needs.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from experiments import report, sweeps
from train import prepare_data

_GRID = flags.DEFINE_list("grid", ["main"], f"Grids among {', '.join(sweeps.GRIDS)}.")
_DATASETS = flags.DEFINE_list(
    "datasets", list(sweeps.GRID_DATASETS), f"Among {', '.join(prepare_data.DATASETS)}."
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Comma-separated integer seeds.")
_CONFIGURATIONS = flags.DEFINE_list(
    "configurations", None, "Only these configuration names (default: the whole grid)."
)
_RESULTS = flags.DEFINE_string("results", "results", "Results root; runs go to <results>/runs.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: the config's, ~/tensorflow_datasets)."
)
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Train nothing; regenerate tables and plots from the stored runs."
)
_LIST = flags.DEFINE_bool("list", False, "List the planned runs and exit.")


def _among(allowed, what: str):
    def check(values) -> bool:
        unknown = [v for v in values or () if v not in allowed]
        if unknown:
            raise flags.ValidationError(
                f"unknown {what} {', '.join(map(repr, unknown))}; choose among {', '.join(allowed)}"
            )
        return True

    return check


flags.register_validator("grid", _among(sweeps.GRIDS, "grid"))
flags.register_validator("datasets", _among(prepare_data.DATASETS, "dataset"))
flags.register_validator("configurations", _among(sweeps.CONFIGURATIONS, "configuration"))
flags.register_validator(
    "seeds",
    lambda seeds: all(s.lstrip("-").isdigit() for s in seeds),
    "--seeds must be comma-separated integers",
)


def _code_version() -> str:
    """The git commit of the code that ran (from a `git archive` snapshot: its CODE_VERSION)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    stamp = os.path.join(root, "CODE_VERSION")
    if os.path.exists(stamp):
        with open(stamp) as f:
            return f.read().strip()
    try:
        commit = subprocess.run(
            ["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "train", "noisy_softmax_jax"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """The code, CPU and JAX a run ran with (for run_info.json)."""
    import jax  # pylint: disable=g-import-not-at-top

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "code": _code_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "jax_devices": len(jax.devices()),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }


def is_done(run: sweeps.Run, results: str) -> bool:
    return os.path.exists(os.path.join(run.workdir(results), "results.json"))


def train_runs(runs: Sequence[sweeps.Run], results: str, data_dir: str | None = None) -> None:
    """Trains every run that has no results.json yet; a failed run is logged and skipped."""
    # Imported here: --list and --report-only need neither JAX nor the training code.
    from train import (
        input_pipeline,  # pylint: disable=g-import-not-at-top
        train,  # pylint: disable=g-import-not-at-top
    )

    todo = [run for run in runs if not is_done(run, results)]
    print(
        f"{len(runs)} runs planned, {len(runs) - len(todo)} already done, {len(todo)} to train",
        flush=True,
    )
    # The runs share the data: each split is decoded once for the whole grid.
    with input_pipeline.cached_splits():
        for index, run in enumerate(todo, 1):
            workdir = run.workdir(results)
            start = time.time()
            print(
                f"[{index}/{len(todo)}] {run.dataset} {run.name} seed {run.seed} -> {workdir}",
                flush=True,
            )
            try:
                outcome = train.train_and_evaluate(sweeps.run_config(run, data_dir), workdir)
            except Exception:  # pylint: disable=broad-except
                # One broken run must not stop the grid; its workdir keeps the traceback.
                os.makedirs(workdir, exist_ok=True)
                with open(os.path.join(workdir, "error.txt"), "w") as f:
                    f.write(traceback.format_exc())
                print(f"  failed; see {os.path.join(workdir, 'error.txt')}", flush=True)
                continue
            wall = time.time() - start
            finished = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            info = {"wall_time_s": wall, "finished_utc": finished, **machine_info()}
            with open(os.path.join(workdir, "run_info.json"), "w") as f:
                json.dump(info, f, indent=2)
            shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
            shutil.rmtree(os.path.join(workdir, "tensorboard"), ignore_errors=True)
            print(f"  test error {100 * outcome['test_error']:.2f}%  ({wall:.0f} s)", flush=True)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    results = _RESULTS.value
    if not _REPORT_ONLY.value:
        runs = sweeps.plan(
            _GRID.value, _DATASETS.value, [int(s) for s in _SEEDS.value], _CONFIGURATIONS.value
        )
        if _LIST.value:
            for run in runs:
                print(f"{'done' if is_done(run, results) else 'todo'}  {run.workdir(results)}")
            return
        train_runs(runs, results, _DATA_DIR.value)
    elif not os.path.isdir(os.path.join(results, "runs")):
        missing = os.path.join(results, "runs")
        raise SystemExit(f"error: no runs to report: {missing} does not exist")
    report.report(results)


def underscored_flag_names(argv: Sequence[str]) -> list[str]:
    """`--report-only` -> `--report_only`: the dashed spellings the argparse runner accepted."""
    spelled = [argv[0]]
    for index, arg in enumerate(argv[1:], 1):
        if arg == "--":  # the rest are not flags
            return spelled + list(argv[index:])
        if arg.startswith("--"):
            name, equals, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + equals + value
        spelled.append(arg)
    return spelled


if __name__ == "__main__":
    app.run(main, argv=underscored_flag_names(sys.argv))
