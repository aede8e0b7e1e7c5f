"""Runs N training processes on this machine, joined by `jax.distributed`: a pod in miniature.

    python -m train.launch_local --num_processes 2 --devices_per_process 2 -- \\
        --config train/configs/default.py --workdir /tmp/run --config.num_steps=60

Each process runs `python -m train ARGS --coordinator_address localhost:PORT --num_processes N
--process_id I` (PORT free, picked here) with D emulated CPU devices, in its own process group;
its output is printed prefixed with `[I]`. When a process fails, the others get `--grace_s`
seconds to stop by themselves (they notice the lost peer) and are then killed by process group;
so are all when `--timeout_s` passes. SIGTERM or Ctrl-C to the launcher is passed on to every
process (what a maintenance event does to every host of a pod). The exit code is 0 when all
succeed, else the first failure's (143 for a preemption, 124 for the timeout). It is for
development and tests, not a scheduler: nothing is restarted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

EXIT_TIMEOUT = 124  # what `timeout` exits with


def free_port() -> int:
    """A TCP port free on localhost now (another program could take it before we bind it)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def process_environment(devices_per_process: int, base: dict[str, str] | None = None
                        ) -> dict[str, str]:
    """`base` (default: this environment) with D emulated CPU devices and the CPU platform."""
    env = dict(os.environ if base is None else base)
    env["JAX_NUM_CPU_DEVICES"] = str(devices_per_process)
    xla_flags = [flag for flag in env.get("XLA_FLAGS", "").split()
                 if not flag.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        xla_flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalProcesses:
    """N processes of one multi-process run on this machine, each in its own process group.

    Args:
      args: the training command's arguments (without the distributed flags).
      num_processes: N.
      devices_per_process: the CPU devices each process emulates.
      module: the module run with `python -m` (tests use `tests.mock_data_cli`).
      env: the environment to start from (default: this process's).
      log_dir: if given, process I's output also goes to `<log_dir>/process_I.log`.
      echo: print each process's output, prefixed with `[I] `.
      extra_args: per process, arguments appended to its command (tests use it to make one
        process differ).
    """

    def __init__(self, args: Sequence[str], *, num_processes: int, devices_per_process: int,
                 module: str = "train", env: dict[str, str] | None = None,
                 log_dir: str | None = None, echo: bool = True,
                 extra_args: Sequence[Sequence[str]] | None = None):
        self.port = free_port()
        self.logs: list[list[str]] = [[] for _ in range(num_processes)]
        self.processes: list[subprocess.Popen] = []
        self._threads = []
        environment = process_environment(devices_per_process, env)
        for index in range(num_processes):
            command = [sys.executable, "-m", module, *args,
                       f"--coordinator_address=localhost:{self.port}",
                       f"--num_processes={num_processes}", f"--process_id={index}",
                       *(extra_args[index] if extra_args else ())]
            process = subprocess.Popen(
                command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", start_new_session=True)
            self.processes.append(process)
            log_path = None if log_dir is None else os.path.join(log_dir, f"process_{index}.log")
            thread = threading.Thread(target=self._pump, args=(index, process, log_path, echo),
                                      daemon=True)
            thread.start()
            self._threads.append(thread)

    def _pump(self, index: int, process: subprocess.Popen, log_path: str | None, echo: bool):
        log = open(log_path, "w") if log_path else contextlib.nullcontext()  # pylint: disable=consider-using-with
        with log:
            for line in process.stdout:
                self.logs[index].append(line)
                if log_path:
                    log.write(line)
                    log.flush()
                if echo:
                    sys.stdout.write(f"[{index}] {line}")
                    sys.stdout.flush()

    def signal_all(self, signum: int) -> None:
        for process in self.processes:
            self.signal(process, signum)

    @staticmethod
    def signal(process: subprocess.Popen, signum: int) -> None:
        """Sends `signum` to the process group of `process`, if it still runs."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)

    def wait(self, timeout_s: float, grace_s: float = 60.0) -> list[int]:
        """Waits for every process; returns their exit codes (negative: killed by a signal).

        A process that fails gives the others `grace_s` seconds to stop by themselves before
        they are killed; at `timeout_s` all are killed.
        """
        deadline = time.monotonic() + timeout_s
        failed_at = None
        while any(process.poll() is None for process in self.processes):
            now = time.monotonic()
            if failed_at is None and any(process.poll() not in (None, 0)
                                         for process in self.processes):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + grace_s):
                self.signal_all(signal.SIGKILL)
                break
            time.sleep(0.1)
        codes = [process.wait() for process in self.processes]
        self._close()
        return codes

    def _close(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)
        for process in self.processes:
            process.stdout.close()

    def kill(self) -> None:
        """Kills every process group that still runs (e.g. when a test fails)."""
        self.signal_all(signal.SIGKILL)
        for process in self.processes:
            process.wait()
        self._close()

    def log_tails(self, lines: int = 30) -> str:
        """The last `lines` lines of each process's output, for a failure report."""
        return "\n".join(
            f"--- process {index} (exit {process.poll()}) ---\n" + "".join(log[-lines:])
            for index, (process, log) in enumerate(zip(self.processes, self.logs)))


def exit_code(codes: Sequence[int], timed_out: bool) -> int:
    """0 if all succeeded; else the timeout's code, or the first failure's (a signal as 128+n)."""
    if timed_out:
        return EXIT_TIMEOUT
    for code in codes:
        if code:
            return code if code > 0 else 128 - code
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.launch_local", description=__doc__.split("\n\n")[0],
        usage="%(prog)s --num_processes N --devices_per_process D [options] -- TRAIN_ARGS...")
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--module", default="train", help="module to run (default: train)")
    parser.add_argument("--timeout_s", type=float, default=0,
                        help="kill every process after this many seconds (0: no limit)")
    parser.add_argument("--grace_s", type=float, default=60,
                        help="after a failure, seconds the others get to stop by themselves")
    parser.add_argument("--log_dir", default=None, help="also write process_I.log files here")
    parser.add_argument("train_args", nargs=argparse.REMAINDER)
    options = parser.parse_args(argv)
    train_args = options.train_args[1:] if options.train_args[:1] == ["--"] else (
        options.train_args)
    if options.num_processes < 1 or options.devices_per_process < 1:
        parser.error("--num_processes and --devices_per_process must be at least 1")
    if options.log_dir:
        os.makedirs(options.log_dir, exist_ok=True)

    launched = LocalProcesses(train_args, num_processes=options.num_processes,
                              devices_per_process=options.devices_per_process,
                              module=options.module, log_dir=options.log_dir)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, frame: launched.signal_all(received))
    timeout = options.timeout_s or float("inf")
    start = time.monotonic()
    codes = launched.wait(timeout, options.grace_s)
    timed_out = time.monotonic() - start > timeout
    code = exit_code(codes, timed_out)
    if code:
        why = f"timed out after {options.timeout_s:g} s" if timed_out else "failed"
        print(f"launch_local: {why}; exit codes by process: {codes}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
