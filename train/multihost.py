"""Joining the processes of a multi-host run, and checking that they run the same thing.

  initialize        `jax.distributed.initialize` with auto-detection (TPU VMs, SLURM, Open MPI)
                    or explicit coordinator, count and id, and timeouts short enough that a dead
                    peer is seen within about a minute (JAX's defaults wait up to 5 minutes).
  check_same_run    every process publishes a digest of each config key and of the code; any
                    difference stops every process with one line naming the differing keys,
                    before anything is written to the workdir.
  lost_peer         recognises the errors that say another process is gone (a collective
                    failing on a closed connection); `exit_on_lost_peer` then ends the process
                    with one line instead of a traceback and JAX's abort at exit.

Both run before anything touches a device. On one process `check_same_run` does nothing.
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

from train import errors

# Keys that say where a host reads its data or how it shows progress: hosts may differ in them.
PER_HOST_KEYS = frozenset({"data_dir", "prepare_data", "progress_bar"})
# The packages whose source every process must share.
CODE_PACKAGES = ("noisy_softmax_jax", "train")
_REPO = pathlib.Path(__file__).resolve().parents[1]
_KEY_PREFIX = "noisy_softmax_jax/run_digest"


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


def check_same_run(config: ml_collections.ConfigDict, *, timeout_s: int = 60) -> None:
    """Stops every process, with the same one line, if any differs in config or code.

    Each process publishes its `run_digest` in the coordination service's key-value store and
    reads every other's, so all of them reach the same verdict.

    Raises:
      HostMismatchError: naming each differing process and key.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # pylint: disable=g-import-not-at-top  # the KV store
    client = distributed.global_state.client
    client.key_value_set(f"{_KEY_PREFIX}/{jax.process_index()}", json.dumps(run_digest(config)))
    digests = [
        json.loads(client.blocking_key_value_get(f"{_KEY_PREFIX}/{index}", timeout_s * 1000))
        for index in range(jax.process_count())
    ]
    differences = differing_keys(digests)
    if differences:
        detail = "; ".join(f"process {index} differs from process 0 in {', '.join(keys)}"
                           for index, keys in differences.items())
        raise HostMismatchError(
            f"the processes do not run the same config and code: {detail}. Run the same command "
            "from the same checkout on every host.")
