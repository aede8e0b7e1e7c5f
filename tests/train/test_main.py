"""`python -m train` end to end: killed and rerun, it finishes as if never interrupted.

Each test runs the real command line as a subprocess (through tests/mock_data_cli.py, which is
`python -m train` under `tfds.testing.mock_data`, so no dataset is needed and every process sees
the same data): a short run of the small CNN with checkpoints every 3 steps and an evaluation
every 4. Kills come at seeded random moments after the attempt has made progress, so they land
in training steps, evaluations and checkpoint writes alike. The equality checked is that of the
sha256 fingerprint of the final parameters in results.json.

After the kills, metrics.jsonl and the TensorBoard events hold each step once, as those of the
uninterrupted run do (a resumed run drops the lines of steps after its checkpoint).

Also: SIGTERM saves a checkpoint and exits with code 143; a damaged latest checkpoint is moved
aside with a warning and the run resumes from the previous one; bad command lines, a missing or
partly prepared dataset and an unwritable workdir fail with one clear line, a non-zero code and
nothing in the workdir that a later resume could trip over. A full disk (a file-size limit, and
a small tmpfs where the tests may mount one) during a checkpoint, a metrics.jsonl or the
results.json write ends the run with one line and a non-zero code, and rerunning resumes.

The subprocesses share a JAX compilation cache, so only the first of them compiles (a run takes
~10 s instead of ~30 s on 2 CPU cores).
"""

import atexit
import json
import os
import pathlib
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from train import checkpointing, preemption, prepare_data

REPO = pathlib.Path(__file__).resolve().parents[2]
NUM_STEPS = 24


def run_flags(*, num_steps, checkpoint_every_steps):
    """The flags of the tests' short runs of the small CNN on mock data, logged every step (also
    those of tests/train/test_multihost.py)."""
    return [
        "--config", "train/configs/default.py",
        "--config.prepare_data=False", "--config.batch_size=16", "--config.eval_batch_size=16",
        f"--config.num_steps={num_steps}", "--config.log_every_steps=1",
        f"--config.checkpoint_every_steps={checkpoint_every_steps}",
        "--config.max_checkpoints_to_keep=3", "--config.progress_bar=False",
    ]


RUN_FLAGS = run_flags(num_steps=NUM_STEPS, checkpoint_every_steps=3)
TIMEOUT_S = 300


_COMPILATION_CACHE = []


def compilation_cache():
    """A JAX compilation cache shared by this session's subprocesses (removed at exit)."""
    if not _COMPILATION_CACHE:
        _COMPILATION_CACHE.append(tempfile.mkdtemp(prefix="noisy_softmax_jax_test_jit_cache_"))
        atexit.register(shutil.rmtree, _COMPILATION_CACHE[0], ignore_errors=True)
    return _COMPILATION_CACHE[0]


def environment():
    # One CPU device (the fastest start on a small machine), and single-threaded Eigen: XLA:CPU's
    # multi-threaded reductions are not bitwise reproducible from one process to the next, so
    # without it even two uninterrupted runs can differ in the last bits.
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                JAX_COMPILATION_CACHE_DIR=compilation_cache(),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


# Sets the limit in a small Python process that then becomes the training command (exec), so
# the limit is never applied from a fork of this test process: a preexec_fn would run JAX's
# at-fork handler here, whose warning is an error under this suite's settings.
_LIMITED_EXEC = ("import os, resource, signal, sys; "
                 "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                 "limit = int(sys.argv[1]); "
                 "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
                 "os.execv(sys.argv[2], sys.argv[2:])")


def file_size_limited(command, limit_bytes):
    """`command`, run so that no file it writes may grow past `limit_bytes` (`ulimit -f`); a
    write beyond fails with EFBIG, as on a full disk (SIGXFSZ, which would kill it, is ignored,
    and an ignored signal stays ignored across exec)."""
    return [sys.executable, "-c", _LIMITED_EXEC, str(limit_bytes), *command]


def start(workdir, *extra, module="tests.mock_data_cli", max_file_size=None):
    """Starts the training command on `workdir`; its output goes to files beside it (or, under
    a file-size limit, which would cut the log short too, to a pipe: see `output_of`)."""
    workdir = pathlib.Path(workdir)
    command = [sys.executable, "-m", module, "--workdir", str(workdir),
               *RUN_FLAGS, f"--config.data_dir={workdir.parent / 'no_data_here'}", *extra]
    if max_file_size:
        return subprocess.Popen(file_size_limited(command, max_file_size), cwd=REPO,
                                env=environment(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    with open(f"{workdir}.log", "a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command, cwd=REPO, env=environment(), stdout=log,
                                stderr=subprocess.STDOUT)


def output_of(process, workdir):
    """Waits for `process`; its output (also appended to the log beside `workdir`)."""
    log_path = pathlib.Path(f"{workdir}.log")
    if process.stdout is not None:
        output = process.communicate(timeout=TIMEOUT_S)[0]
        with open(log_path, "a") as log:
            log.write(output)
        return output
    log_start = log_path.stat().st_size if log_path.exists() else 0
    process.wait(timeout=TIMEOUT_S)
    return log_path.read_text()[log_start:]


def run_to_completion(workdir, *extra):
    process = start(workdir, *extra)
    assert process.wait(timeout=TIMEOUT_S) == 0, log_of(workdir)
    return json.loads((pathlib.Path(workdir) / "results.json").read_text())


def log_of(workdir):
    path = pathlib.Path(f"{workdir}.log")
    return path.read_text()[-4000:] if path.exists() else ""


def last_step(workdir):
    """The last training step in metrics.jsonl (a line cut short by a kill is skipped)."""
    try:
        lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("kind") == "train":
            return record["step"]
    return 0


def wait_for_step(process, workdir, step, timeout=TIMEOUT_S):
    """Waits until this attempt has logged training step `step`; False if it ended first."""
    deadline = time.monotonic() + timeout
    while last_step(workdir) < step:
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, log_of(workdir)
        time.sleep(0.02)
    return True


def metric_entries(workdir):
    """The (step, kind) of every line of metrics.jsonl, in order (every line must parse)."""
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [(record["step"], record["kind"]) for record in map(json.loads, lines)]


def read_events(path):
    """The events of one TensorBoard event file, up to a record cut short (where TensorBoard
    stops reading the file)."""
    from tensorboardX.proto import event_pb2

    data = pathlib.Path(path).read_bytes()
    while len(data) >= 12:
        (length,) = struct.unpack("Q", data[:8])
        if len(data) < 16 + length:
            return
        yield event_pb2.Event.FromString(data[12:12 + length])
        data = data[16 + length:]


def tensorboard_entries(workdir):
    """The (tag, step) of the scalars TensorBoard shows: the event files read in order, and a
    SessionLog.START at step s (a resumed run's purge_step) discards the earlier events at
    steps >= s, as TensorBoard does."""
    from tensorboardX.proto import event_pb2

    files = [list(read_events(path)) for path in
             (pathlib.Path(workdir) / "tensorboard").glob("events.out.tfevents.*")]
    shown = []
    for file in sorted((f for f in files if f), key=lambda f: f[0].wall_time):  # oldest first
        for event in file:
            if event.session_log.status == event_pb2.SessionLog.START:
                shown = [(tag, step) for tag, step in shown if step < event.step]
            shown += [(value.tag, event.step) for value in event.summary.value]
    return shown


def assert_each_step_logged_once(workdir, uninterrupted_workdir):
    entries, expected = metric_entries(workdir), metric_entries(uninterrupted_workdir)
    assert len(entries) == len(set(entries)), sorted(e for e in entries if entries.count(e) > 1)
    assert sorted(entries) == sorted(expected)
    shown = tensorboard_entries(workdir)
    assert len(shown) == len(set(shown)), sorted(e for e in shown if shown.count(e) > 1)[:10]
    assert sorted(shown) == sorted(tensorboard_entries(uninterrupted_workdir))


@pytest.fixture(scope="module")
def uninterrupted_workdir(tmp_path_factory):
    """The workdir of a run that nothing interrupted."""
    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    results = run_to_completion(workdir)
    assert results["resumed_from_step"] == 0 and results["steps"] == NUM_STEPS
    entries = metric_entries(workdir)
    assert [s for s, kind in entries if kind == "train"] == list(range(1, NUM_STEPS + 1))
    assert len(tensorboard_entries(workdir)) > NUM_STEPS
    return workdir


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_workdir):
    """The fingerprint of a run that nothing interrupted."""
    return json.loads((uninterrupted_workdir / "results.json").read_text())["params_sha256"]


def kill_and_resume(workdir, kills, seed, *extra):
    """SIGKILLs the run at `kills` random moments, then lets it finish; returns the results.

    Kill i comes a random 0-0.5 s after the run logged a randomly drawn step, the steps drawn
    increasing, so every attempt gets further than the last one's checkpoint.
    """
    rng = random.Random(seed)
    targets = sorted(rng.sample(range(1, NUM_STEPS), kills))
    landed = []
    for target in targets:
        process = start(workdir, *extra)
        reached = wait_for_step(process, workdir, target)
        if reached:
            time.sleep(rng.uniform(0.0, 0.5))
        if process.poll() is not None:  # it finished first: no kill to count
            assert process.returncode == 0, log_of(workdir)
            break
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
        landed.append((target, last_step(workdir)))
    results = run_to_completion(workdir, *extra)
    return results, landed


def test_sigkill_at_3_random_moments_then_rerun_equals_uninterrupted(
        tmp_path, uninterrupted, uninterrupted_workdir):
    results, landed = kill_and_resume(tmp_path / "run", kills=3, seed=0)
    assert len(landed) == 3
    assert results["params_sha256"] == uninterrupted, landed
    assert results["resumed_from_step"] > 0
    assert_each_step_logged_once(tmp_path / "run", uninterrupted_workdir)


def test_sigkill_while_streaming_from_disk_then_rerun_equals_the_in_memory_run(
        tmp_path, uninterrupted, uninterrupted_workdir):
    # Every batch read from the source, in a Grain thread: the batches, and so the run, are
    # those of the uninterrupted run with the data in memory.
    results, landed = kill_and_resume(tmp_path / "run", 3, 2, "--config.in_memory_max_mib=0")
    assert len(landed) == 3
    assert results["params_sha256"] == uninterrupted, landed
    assert_each_step_logged_once(tmp_path / "run", uninterrupted_workdir)


@pytest.mark.slow
def test_sigkill_at_20_random_moments_then_rerun_equals_uninterrupted(
        tmp_path, uninterrupted, uninterrupted_workdir):
    results, landed = kill_and_resume(tmp_path / "run", kills=20, seed=1)
    assert len(landed) == 20
    assert results["params_sha256"] == uninterrupted, landed
    assert_each_step_logged_once(tmp_path / "run", uninterrupted_workdir)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resume_equals_uninterrupted(
        tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    process = start(workdir)
    assert wait_for_step(process, workdir, 5), log_of(workdir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT_S) == preemption.EXIT_PREEMPTED, log_of(workdir)
    log = log_of(workdir)
    assert "SIGTERM received: saved a checkpoint at step" in log and "Traceback" not in log
    step = int(log.split("saved a checkpoint at step ")[1].split(" ")[0])
    assert step >= 5 and (workdir / "checkpoints" / str(step)).is_dir()
    assert not (workdir / "results.json").exists()
    results = run_to_completion(workdir)
    assert results["resumed_from_step"] == step
    assert results["params_sha256"] == uninterrupted


def test_ctrl_c_saves_through_the_same_path_then_resume_equals_uninterrupted(
        tmp_path, uninterrupted):
    workdir = tmp_path / "run"
    process = start(workdir, "--config.checkpoint_every_steps=1000")  # no periodic save
    assert wait_for_step(process, workdir, 5), log_of(workdir)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=TIMEOUT_S) != 0, log_of(workdir)
    log = log_of(workdir)
    # The interrupt lands between steps (the state is whole: saved) or inside one (the donated
    # state is gone: nothing to save, the warning says so).
    if "Interrupted: checkpoint at step" in log:
        step = int(log.split("Interrupted: checkpoint at step ")[1].split(";")[0])
        assert step >= 5 and saved_steps(workdir) == [step]
        # Saved like any other: with its digest and training time in the checkpoint metadata.
        metadata = json.loads(
            (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").read_text())
        assert {"state_sha256", "train_time_s", "timed_steps"} <= set(metadata["custom_metadata"])
    else:
        assert "resuming from the last periodic checkpoint" in log, log[-4000:]
        step = 0
    results = run_to_completion(workdir)
    assert results["resumed_from_step"] == step
    assert results["params_sha256"] == uninterrupted


@pytest.mark.parametrize("damage", ["truncate", pytest.param("garble", marks=pytest.mark.slow)])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted, damage):
    workdir = tmp_path / "run"
    process = start(workdir)
    assert wait_for_step(process, workdir, 10), log_of(workdir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT_S) == preemption.EXIT_PREEMPTED, log_of(workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) >= 2, steps
    latest = workdir / "checkpoints" / str(steps[-1])
    files = sorted((p for p in latest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    for path in files[-3:]:  # the largest: array data and its index
        data = bytearray(path.read_bytes())
        if damage == "truncate":
            data = data[: len(data) // 2]
        else:
            data[::5] = bytes(b ^ 0xA5 for b in data[::5])
        path.write_bytes(bytes(data))
    results = run_to_completion(workdir)
    # The whole log: a garbled array can also fail inside Orbax's reader coroutines, whose
    # ignored exceptions print long TensorStore specs after the warning.
    log = pathlib.Path(f"{workdir}.log").read_text()
    warned = f"checkpoint at step {steps[-1]} is damaged" in log and "falling back" in log
    assert warned, log[-4000:]
    assert results["resumed_from_step"] == steps[-2]
    assert results["params_sha256"] == uninterrupted
    assert (workdir / checkpointing.DAMAGED_DIR).is_dir()


# ------------------------------------------------------------------------------ bad command lines


def run_cli(tmp_path, *extra, module="train", data_dir=None, workdir=None):
    workdir = workdir or tmp_path / "workdir"
    command = [sys.executable, "-m", module, "--workdir", str(workdir),
               *RUN_FLAGS, f"--config.data_dir={data_dir or tmp_path / 'no_data_here'}", *extra]
    return subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def assert_clean_failure(result, message, workdir):
    """Non-zero exit, the message, no traceback, and nothing a later resume could trip over."""
    assert result.returncode not in (0, None), result.stdout + result.stderr
    assert message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    workdir = pathlib.Path(workdir)
    if workdir.exists():
        left = sorted(p.name for p in workdir.iterdir())
        written = {"config.json", "checkpoints", checkpointing.LEGACY_DIGESTS_FILE}
        assert not written & set(left), left


@pytest.mark.parametrize("flag, message", [
    ("--config.alpha=-1", "config.alpha=-1.0 is invalid: it must be >= 0"),
    ("--config.loss=focal", "config.loss='focal' is not allowed"),
    ("--config.batch_size=0", "config.batch_size=0 is invalid"),
    ("--config.num_step=5", "unknown config key"),
    ("--config.learning_rate=fast", "error:"),
])
def test_bad_command_line_fails_cleanly(tmp_path, flag, message):
    result = run_cli(tmp_path, flag)
    assert_clean_failure(result, message, tmp_path / "workdir")


def test_missing_dataset_fails_cleanly(tmp_path):
    result = run_cli(tmp_path)  # prepare_data=False and an empty data_dir
    assert_clean_failure(result, "mnist is not prepared in", tmp_path / "workdir")


def _prepare_tiny_mnist(data_dir, source):
    source.mkdir()
    header = "label," + ",".join(f"p{i}" for i in range(784))
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        rows = [",".join(map(str, [rng.integers(10), *rng.integers(0, 256, 784)]))
                for _ in range(32)]
        (source / f"mnist_{split}.csv").write_text("\n".join([header, *rows]) + "\n")
    prepare_data.prepare("mnist", str(data_dir), source_dir=source)
    return next(data_dir.glob("mnist/*/"))


@pytest.mark.parametrize("damage", ["missing_test_split", "truncated_train_split"])
def test_partly_prepared_dataset_fails_cleanly(tmp_path, damage):
    folder = _prepare_tiny_mnist(tmp_path / "tfds", tmp_path / "csv")
    if damage == "missing_test_split":
        for path in folder.glob("mnist-test.array_record*"):
            path.unlink()
    else:
        for path in folder.glob("mnist-train.array_record*"):
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    result = run_cli(tmp_path, data_dir=tmp_path / "tfds")
    assert_clean_failure(result, "is incomplete or damaged", tmp_path / "workdir")
    assert "prepare_data=True" in result.stderr


def test_unwritable_workdir_fails_cleanly(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli(tmp_path, workdir=blocker / "workdir")
    assert_clean_failure(result, "is not writable", blocker / "workdir")
    assert blocker.read_text() == "not a folder"


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    process = start(workdir, "--config.learning_rate=1e12", "--config.checkpoint_every_steps=1")
    assert process.wait(timeout=TIMEOUT_S) not in (0, None)
    log = log_of(workdir)
    assert "error: training loss is" in log and "Traceback" not in log, log
    step = int(log.split("training loss is ")[1].split(" at step ")[1].split(";")[0])
    assert "diagnostics at that step: loss=" in log and "amplitude=" in log
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) == step - 1, (saved, step)  # none of the diverged state
    assert not (workdir / "results.json").exists()


# ------------------------------------------------------------------------------------ full disk

DISK_FULL = "no space left on device writing"


@pytest.fixture(scope="module")
def preempted_workdir(tmp_path_factory):
    """A run stopped by SIGTERM after step 8: (workdir, the step of its last checkpoint)."""
    workdir = tmp_path_factory.mktemp("preempted") / "run"
    process = start(workdir)
    assert wait_for_step(process, workdir, 8), log_of(workdir)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=TIMEOUT_S) == preemption.EXIT_PREEMPTED, log_of(workdir)
    return workdir, max(saved_steps(workdir))


def saved_steps(workdir):
    folder = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def copy_run(source, workdir):
    shutil.copytree(source, workdir)
    return workdir


def assert_disk_full_failure(process, workdir, path, cause):
    """One `error: no space left on device writing <path> ...` line at the end, a non-zero
    code, no traceback, and nothing half-written left in the workdir."""
    log = output_of(process, workdir)
    assert process.returncode == 1, log[-4000:]
    last_line = log.strip().splitlines()[-1]
    assert last_line.startswith(f"error: {DISK_FULL} {path} ({cause}"), log[-4000:]
    assert "free space" in last_line and "rerun the same command to resume" in last_line
    assert "Traceback" not in log, log[-4000:]
    workdir = pathlib.Path(workdir)
    half_written = [p for p in workdir.rglob("*") if "tmp" in p.name or ".partial" in p.name]
    assert not half_written, half_written
    metric_entries(workdir)  # every line of metrics.jsonl is whole
    assert not (workdir / "results.json").exists()


def test_file_size_limit_during_a_checkpoint_write_then_rerun_resumes(
        tmp_path, preempted_workdir, uninterrupted, uninterrupted_workdir):
    source, step = preempted_workdir
    workdir = copy_run(source, tmp_path / "run")
    # A checkpoint of this net is a 2-3 MB file; metrics and TensorBoard stay below 1 MB.
    process = start(workdir, max_file_size=1_000_000)
    failed = (step // 3 + 1) * 3  # the next periodic checkpoint
    assert_disk_full_failure(process, workdir, workdir / "checkpoints" / str(failed), "EFBIG")
    assert saved_steps(workdir)[-1] == step
    assert max(s for s, kind in metric_entries(workdir)) >= failed  # it ran on, then stopped
    results = run_to_completion(workdir)
    assert results["resumed_from_step"] == step
    assert results["params_sha256"] == uninterrupted
    assert_each_step_logged_once(workdir, uninterrupted_workdir)


def test_file_size_limit_during_a_metrics_write_then_rerun_resumes(
        tmp_path, preempted_workdir, uninterrupted, uninterrupted_workdir):
    source, step = preempted_workdir
    workdir = copy_run(source, tmp_path / "run")
    # metrics.jsonl may grow by two lines or so (~450 bytes each); no checkpoint is due.
    limit = (workdir / "metrics.jsonl").stat().st_size + 1000
    process = start(workdir, "--config.checkpoint_every_steps=1000", max_file_size=limit)
    assert_disk_full_failure(process, workdir, workdir / "metrics.jsonl", "EFBIG")
    assert step < max(s for s, kind in metric_entries(workdir)) < NUM_STEPS
    results = run_to_completion(workdir)
    assert results["resumed_from_step"] == step
    assert results["params_sha256"] == uninterrupted
    assert_each_step_logged_once(workdir, uninterrupted_workdir)


def test_file_size_limit_during_the_results_write_then_rerun_finishes(
        tmp_path, uninterrupted, uninterrupted_workdir):
    # A run that wrote its final checkpoint and then could not write results.json.
    workdir = copy_run(uninterrupted_workdir, tmp_path / "run")
    (workdir / "results.json").unlink()
    same_config = f"--config.data_dir={uninterrupted_workdir.parent / 'no_data_here'}"
    # results.json takes ~500 bytes; the rest of what a finished run writes, much less.
    process = start(workdir, same_config, max_file_size=300)
    assert_disk_full_failure(process, workdir, workdir / "results.json", "EFBIG")
    results = run_to_completion(workdir)
    assert results["resumed_from_step"] == NUM_STEPS
    assert results["params_sha256"] == uninterrupted


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted as the workdir `tmp_path/run` (skips where it cannot be mounted:
    not root, or no mounts allowed); yields (workdir, a function that grows it)."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(workdir)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")

    def grow(size):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(workdir)], check=True)

    try:
        yield workdir, grow
    finally:
        subprocess.run(["umount", "-l", str(workdir)], check=False)


def test_full_tmpfs_mid_run_then_rerun_with_space_resumes(
        small_tmpfs, uninterrupted, uninterrupted_workdir):
    workdir, grow = small_tmpfs
    # Checkpoints take ~3.2 MB each: those of steps 3 and 6 fit in 8 MiB, that of step 9 not.
    process = start(workdir)
    assert_disk_full_failure(process, workdir, workdir / "checkpoints" / "9", "ENOSPC")
    saved = saved_steps(workdir)
    assert saved == [3, 6], saved
    # Rerun while the disk is still full: it stops before writing anything and changes nothing.
    before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    filler = workdir / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError):
        while True:
            f.write(b"\0" * 65536)
    assert_disk_full_failure(start(workdir), workdir, workdir, "ENOSPC")
    filler.unlink()
    assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
    grow("64m")  # space freed
    results = run_to_completion(workdir)
    assert results["resumed_from_step"] == saved[-1]
    assert results["params_sha256"] == uninterrupted
    assert_each_step_logged_once(workdir, uninterrupted_workdir)
