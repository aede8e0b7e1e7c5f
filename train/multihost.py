"""Joining the processes of a multi-host run, and checking that they run the same thing.

  initialize        `jax.distributed.initialize` with auto-detection (TPU VMs, SLURM, Open MPI)
                    or explicit coordinator, count and id, and timeouts short enough that a dead
                    peer is seen within about a minute (JAX's defaults wait up to 5 minutes).
  check_same_run    the processes exchange a digest of each config key and of the code (an
                    all-gather, `jax.experimental.multihost_utils.process_allgather`); any
                    difference stops every process with one line naming the differing keys,
                    before anything is written to the workdir.
  lost_peer         recognises the errors that say another process is gone (a collective
                    failing on a closed connection); `exit_on_lost_peer` then ends the process
                    with one line instead of a traceback and JAX's abort at exit.

`initialize` runs before anything touches a device, `check_same_run` right after it, before
the data or the workdir. On one process `check_same_run` does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from train import errors

# Keys that say where a host reads its data or how it shows progress: hosts may differ in them.
PER_HOST_KEYS = frozenset({"data_dir", "prepare_data", "progress_bar"})
# The packages whose source every process must share.
CODE_PACKAGES = ("noisy_softmax_jax", "train")
_REPO = pathlib.Path(__file__).resolve().parents[1]


class HostMismatchError(errors.RunError):
    """The processes of a multi-host run differ in their config or code."""


class PeerError(errors.RunError):
    """Another process of a multi-host run failed or was lost."""


# What JAX reports when a peer is gone: gloo's collectives when its sockets close or time out
# (the first sign, within a step of a SIGKILL), the coordination service after missed heartbeats.
_LOST_PEER = re.compile(
    r"Gloo \w+ failed.*(Connection closed by peer|Connection reset|Read timeout|Timed out)"
    r"|heartbeat timeout|tasks have crashed|tasks are unhealthy")


def lost_peer(error: BaseException) -> PeerError | None:
    """A PeerError if `error` (or an exception it chains) says another process is gone."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _LOST_PEER.search(str(current)):
            detail = " ".join(str(current).split())[:300]
            return PeerError(
                f"process {jax.process_index()} lost a peer ({detail}): another process of the "
                "run died or was killed; see its log. Rerun every process to resume from the "
                "last checkpoint.")
        current = current.__cause__ or current.__context__
    return None


def exit_on_lost_peer(peer: PeerError) -> None:
    """Prints the one line of a PeerError and exits with its code, skipping JAX's exit hooks.

    Not sys.exit: at exit JAX's distributed shutdown would wait for the lost peer, then abort
    with the coordination service's error and a C++ stack trace.
    """
    print(f"{peer.prefix}: {peer}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(peer.exit_code)


def initialize(*, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, initialization_timeout_s: int = 60,
               heartbeat_timeout_s: int = 30, shutdown_timeout_s: int = 30) -> None:
    """Joins this process to the others through `jax.distributed.initialize`.

    Arguments left None are auto-detected as `jax.distributed.initialize()` does (TPU pod
    slices, SLURM, Open MPI). JAX's preemption service starts with it: SIGTERM then goes to
    JAX's notifier, and `preemption.PreemptionGuard` asks JAX's sync service.

    Args:
      coordinator_address: `host:port` of process 0's coordination service.
      num_processes: the number of processes.
      process_id: this process's index, 0 to num_processes - 1.
      initialization_timeout_s: how long to wait for every process to join.
      heartbeat_timeout_s: a process silent this long is declared dead, and the others stop.
      shutdown_timeout_s: how long a finishing process waits for the others at exit.
    """
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=initialization_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        shutdown_timeout_seconds=shutdown_timeout_s,
    )


def code_digest(packages: tuple[str, ...] = CODE_PACKAGES) -> str:
    """sha256 over the paths and bytes of the Python sources of `packages`."""
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((_REPO / package).rglob("*.py")):
            digest.update(f"{path.relative_to(_REPO)};".encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_digest(config: ml_collections.ConfigDict) -> dict[str, str]:
    """A short digest per config key (but the per-host ones), of the code and of JAX's version."""
    values = json.loads(config.to_json(sort_keys=True))
    digests = {
        f"config.{key}": hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
        for key, value in values.items() if key not in PER_HOST_KEYS
    }
    digests["code"] = code_digest()[:16]
    digests["jax_version"] = jax.__version__
    return digests


def differing_keys(digests: list[dict[str, Any]]) -> dict[int, list[str]]:
    """For each process whose digest differs from process 0's, the keys that differ."""
    reference = digests[0]
    differences = {}
    for index, other in enumerate(digests[1:], start=1):
        keys = sorted(key for key in reference.keys() | other.keys()
                      if reference.get(key) != other.get(key))
        if keys:
            differences[index] = keys
    return differences


def gather_digests(digest: dict[str, str]) -> list[dict[str, str]]:
    """Every process's `digest`, in process order: a collective that every process must call.

    The digests travel as UTF-8 JSON bytes, padded to the longest so that the all-gather sees
    the same shape everywhere.
    """
    data = np.frombuffer(json.dumps(digest, sort_keys=True).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:length].tobytes()) for row, length in zip(gathered, lengths[:, 0])]


def check_same_run(config: ml_collections.ConfigDict) -> None:
    """Stops every process, with the same one line, if any differs in config or code.

    Each process gathers every process's `run_digest` (`gather_digests`), so all of them reach
    the same verdict.

    Raises:
      HostMismatchError: naming each differing process and key.
    """
    if jax.process_count() == 1:
        return
    differences = differing_keys(gather_digests(run_digest(config)))
    if differences:
        detail = "; ".join(f"process {index} differs from process 0 in {', '.join(keys)}"
                           for index, keys in differences.items())
        raise HostMismatchError(
            f"the processes do not run the same config and code: {detail}. Run the same command "
            "from the same checkout on every host.")
