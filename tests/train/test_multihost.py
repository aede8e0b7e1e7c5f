"""Multi-process training with real processes joined by `jax.distributed` on this machine.

Each test starts processes with `train.launch_local.LocalProcesses` (each in its own process
group, with a deadline, killed by group when a test fails; a failing test prints every
process's log tail), running `python -m tests.mock_data_cli` (the real command line under TFDS's
mock data, the same arrays in every process) with single-threaded XLA:CPU, so fingerprints are
reproducible from run to run. Gloo carries the cross-process collectives.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train import test_main
from train import launch_local, multihost, preemption

NUM_STEPS = 30
RUN_FLAGS = [
    *test_main.run_flags(num_steps=NUM_STEPS, checkpoint_every_steps=5),
    # A small step: at the default 0.05 this tiny batch's training amplifies the last-bit
    # differences of cross-process sums to ~1% in the test loss within 30 steps.
    "--config.learning_rate=0.005",
]
DEADLINE_S = 150


def launch(workdir, num_processes, devices_per_process, *extra, extra_args=None):
    return launch_local.LocalProcesses(
        [*RUN_FLAGS, f"--workdir={workdir}", *extra], num_processes=num_processes,
        devices_per_process=devices_per_process, module="tests.mock_data_cli",
        env=test_main.environment(), echo=False, extra_args=extra_args)


def finish(launched, expected_codes, timeout_s=DEADLINE_S, grace_s=60.0):
    """Waits for every process; fails with each process's log tail unless the codes match."""
    try:
        codes = launched.wait(timeout_s, grace_s)
    finally:
        launched.kill()
    assert codes == list(expected_codes), launched.log_tails()
    return codes


def fingerprints(launched):
    """The params_sha256 each process reported."""
    reported = []
    for index, log in enumerate(launched.logs):
        text = "".join(log)
        if index == 0:
            reported.append(json.loads(text[text.index("{\n"):text.index("\n}") + 2])
                            ["params_sha256"])
        else:
            line = next(line for line in log if "params_sha256" in line)
            reported.append(line.split()[-1])
    return reported


def run(workdir, num_processes, devices_per_process, *extra):
    launched = launch(workdir, num_processes, devices_per_process, *extra)
    finish(launched, [0] * num_processes)
    return launched


def wait_for_step(launched, workdir, step):
    deadline = time.monotonic() + DEADLINE_S
    while test_main.last_step(workdir) < step:
        if time.monotonic() > deadline or launched.processes[0].poll() is not None:
            launched.kill()
            pytest.fail(f"step {step} not reached:\n{launched.log_tails()}")
        time.sleep(0.05)


def results(workdir):
    with open(os.path.join(workdir, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_by_two(tmp_path_factory):
    """An uninterrupted run of 2 processes x 2 devices, and how long it took."""
    workdir = tmp_path_factory.mktemp("two_by_two")
    start = time.monotonic()
    launched = run(workdir, 2, 2)
    return workdir, launched, time.monotonic() - start


@pytest.mark.slow
def test_two_processes_agree_and_only_process_0_writes(two_by_two):
    workdir, launched, _ = two_by_two
    reported = fingerprints(launched)
    assert len(set(reported)) == 1, reported
    assert reported[0] == results(workdir)["params_sha256"]
    # Only process 0 writes: each step's metrics appear once, one TensorBoard event file.
    steps = [step for step, kind in test_main.metric_entries(workdir) if kind == "train"]
    assert steps == list(range(1, NUM_STEPS + 1))
    assert len(os.listdir(os.path.join(workdir, "tensorboard"))) <= 2


@pytest.mark.slow
def test_two_processes_reading_their_slices_from_disk_equal_the_in_memory_run(two_by_two,
                                                                             tmp_path):
    # Each process reads only its rows of every batch from the source, in a Grain thread.
    launched = run(tmp_path / "w", 2, 2, "--config.in_memory_max_mib=0")
    assert set(fingerprints(launched)) == {results(two_by_two[0])["params_sha256"]}


@pytest.mark.slow
def test_two_processes_equal_one_process_on_four_devices(two_by_two, tmp_path):
    workdir = two_by_two[0]
    single = tmp_path / "single"
    command = [sys.executable, "-m", "tests.mock_data_cli", *RUN_FLAGS, f"--workdir={single}"]
    subprocess.run(command, env=launch_local.process_environment(4, test_main.environment()),
                   check=True, timeout=DEADLINE_S, capture_output=True, start_new_session=True)
    np.testing.assert_allclose(results(workdir)["test_loss"], results(single)["test_loss"],
                               rtol=1e-5)
    assert results(single)["num_devices"] == results(workdir)["num_devices"] == 4


def test_mismatched_config_stops_every_process_before_writing(tmp_path):
    workdir = tmp_path / "w"
    launched = launch(workdir, 2, 1, extra_args=[[], ["--config.seed=7"]])
    finish(launched, [1, 1], timeout_s=60)
    for log in launched.logs:
        lines = [line for line in log if "do not run the same config" in line]
        assert len(lines) == 1 and "process 1 differs from process 0 in config.seed" in lines[0]
    assert not workdir.exists() or not any(workdir.iterdir())


@pytest.mark.parametrize("signalled", ["all", "one"])
@pytest.mark.slow
def test_sigterm_stops_every_process_at_one_step_then_rerun_finishes_the_same(
        two_by_two, tmp_path, signalled):
    workdir = tmp_path / "w"
    launched = launch(workdir, 2, 2)
    wait_for_step(launched, workdir, 8)
    if signalled == "all":
        launched.signal_all(signal.SIGTERM)
    else:
        launched.signal(launched.processes[1], signal.SIGTERM)
    finish(launched, [preemption.EXIT_PREEMPTED] * 2)
    stopped = [line for log in launched.logs for line in log if "saved a checkpoint at" in line]
    assert len(stopped) == 2 and stopped[0] == stopped[1], stopped
    step = int(stopped[0].split("at step ")[1].split()[0])
    assert step < NUM_STEPS and step in test_main.checkpointing.Checkpoints(
        str(workdir), 3).all_steps()
    rerun = run(workdir, 2, 2)
    assert set(fingerprints(rerun)) == {results(two_by_two[0])["params_sha256"]}
    assert results(workdir)["resumed_from_step"] == step


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_others_then_rerun_finishes_the_same(
        two_by_two, tmp_path):
    workdir = tmp_path / "w"
    launched = launch(workdir, 2, 2)
    wait_for_step(launched, workdir, 8)
    killed_at = time.monotonic()
    launched.signal(launched.processes[1], signal.SIGKILL)
    try:
        launched.processes[0].wait(timeout=75)
    finally:
        launched.kill()
    assert time.monotonic() - killed_at < 75
    assert_lost_peer_reported(launched, 0)
    rerun = run(workdir, 2, 2)
    assert set(fingerprints(rerun)) == {results(two_by_two[0])["params_sha256"]}


@pytest.mark.parametrize("message, lost", [
    ("UNKNOWN: Gloo AllGather failed: [pair.cc:547] Connection closed by peer [127.0.0.1]:2", True),
    ("UNAVAILABLE: Task 1 heartbeat timeout. This indicates that the remote task has failed", True),
    ("UNKNOWN: Gloo AllReduce failed: invalid buffer size", False),
    ("mock data of process 1 is missing", False),
])
def test_lost_peer_recognises_a_closed_collective_also_when_chained(message, lost):
    try:
        try:
            raise RuntimeError(message)
        except RuntimeError as cause:
            raise ValueError("checkpoint save failed") from cause
    except ValueError as error:
        peer = multihost.lost_peer(error)
    assert (peer is not None) == lost
    if lost:
        assert str(peer).startswith("process 0 lost a peer (") and message[:40] in str(peer)


def test_differing_keys_names_each_process_and_key():
    digests = [{"config.seed": "a", "code": "x"}, {"config.seed": "a", "code": "x"},
               {"config.seed": "b", "code": "y"}]
    assert multihost.differing_keys(digests) == {2: ["code", "config.seed"]}


def test_gather_digests_round_trips_the_digest_through_the_all_gather():
    # One process here: the all-gather returns this process's digest alone, byte for byte
    # (the multi-process exchange is test_mismatched_config_stops_every_process_before_writing).
    digest = {"config.seed": "0123456789abcdef", "code": "fedcba9876543210", "jax_version": "é"}
    assert multihost.gather_digests(digest) == [digest]


def test_no_module_imports_jax_private_api():
    # jax._src may change in any JAX release; everything here goes through public API.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    offenders = []
    for folder in ("noisy_softmax_jax", "train", "tests", "benchmarks", "examples", "notebooks",
                   "scripts", "docs"):
        for root, _, names in os.walk(os.path.join(repo, folder)):
            for name in names:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    with open(path) as f:
                        text = f.read()
                    if re.search(r"^\s*(from|import)\s+jax\._src\b", text, re.MULTILINE):
                        offenders.append(os.path.relpath(path, repo))
    assert not offenders, offenders


@pytest.mark.slow
def test_an_exception_in_one_process_stops_every_process(tmp_path):
    env = dict(test_main.environment(), MOCK_DATA_FAIL="1:6")  # see tests/mock_data_cli.py
    launched = launch_local.LocalProcesses(
        [*RUN_FLAGS, f"--workdir={tmp_path / 'w'}"], num_processes=2, devices_per_process=1,
        module="tests.mock_data_cli", env=env, echo=False)
    start = time.monotonic()
    try:
        codes = launched.wait(DEADLINE_S, grace_s=60)
    finally:
        launched.kill()
    assert all(code != 0 for code in codes), launched.log_tails()
    assert time.monotonic() - start < DEADLINE_S, launched.log_tails()
    named = [line for line in launched.logs[1] if line.startswith("error: process 1 failed")]
    assert named == ["error: process 1 failed: FileNotFoundError: mock data of process 1 is "
                     "missing\n"], launched.log_tails()
    assert_lost_peer_reported(launched, 0)


def assert_lost_peer_reported(launched, index):
    """The survivor `index` ended non-zero, saying that it lost a peer.

    Whoever notices first decides how: a collective failing on the closed connection raises in
    Python, and the survivor ends with our one line (exit 1, no stack); the coordination
    service noticing first aborts it with JAX's fatal line (exit -6), which JAX offers no hook
    to replace.
    """
    code, log = launched.processes[index].returncode, launched.logs[index]
    text = "".join(log)
    ours = [line for line in log if line.startswith(f"error: process {index} lost a peer (")]
    if code == multihost.PeerError.exit_code:
        assert len(ours) == 1 and "Rerun every process" in ours[0], text[-5000:]
        assert "Traceback" not in text and "stack trace" not in text, text[-5000:]
    else:
        assert code == -signal.SIGABRT, text[-5000:]
        assert "the JAX distributed service detected fatal errors" in text, text[-5000:]


@pytest.mark.slow
def test_four_processes_of_one_device_agree_through_the_launcher_command(tmp_path):
    command = [sys.executable, "-m", "train.launch_local", "--num_processes=4",
               "--devices_per_process=1", "--module=tests.mock_data_cli",
               f"--timeout_s={DEADLINE_S}", "--", *RUN_FLAGS, f"--workdir={tmp_path / 'w'}"]
    done = subprocess.run(command, env=test_main.environment(), capture_output=True, text=True,
                          timeout=DEADLINE_S + 30, start_new_session=True)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    expected = results(tmp_path / "w")["params_sha256"]
    for index in range(1, 4):  # every line prefixed with its process
        assert f"[{index}] process {index}: params_sha256 {expected}\n" in done.stdout
    assert f'[0]   "params_sha256": "{expected}"' in done.stdout
    assert results(tmp_path / "w")["num_devices"] == 4


@pytest.mark.parametrize("codes, timed_out, expected", [
    ([0, 0], False, 0), ([0, 143], False, 143), ([-9, 1], False, 137), ([0, 0], True, 124)])
def test_launcher_exit_code(codes, timed_out, expected):
    assert launch_local.exit_code(codes, timed_out) == expected


def test_launcher_environment_sets_the_device_count_once():
    env = launch_local.process_environment(
        3, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_foo=1"})
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=3"
    assert env["JAX_NUM_CPU_DEVICES"] == "3" and env["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize("layout", [(1, 4), (4, 1)])
@pytest.mark.slow
def test_a_checkpoint_of_two_processes_resumes_in_another_layout(two_by_two, tmp_path, layout):
    workdir = tmp_path / "w"
    launched = launch(workdir, 2, 2)
    wait_for_step(launched, workdir, 8)
    launched.signal_all(signal.SIGTERM)
    finish(launched, [preemption.EXIT_PREEMPTED] * 2)
    step = test_main.checkpointing.Checkpoints(str(workdir), 3).latest_step()
    num_processes, devices_per_process = layout
    rerun = run(workdir, num_processes, devices_per_process)
    assert len(set(fingerprints(rerun))) == 1
    assert results(workdir)["resumed_from_step"] == step > 0
    assert results(workdir)["steps"] == NUM_STEPS
    # Every layout sees the same global batch in the same row order, so only the summation
    # order of the gradient differs from the uninterrupted run.
    np.testing.assert_allclose(results(workdir)["test_loss"],
                               results(two_by_two[0])["test_loss"], rtol=1e-5)
