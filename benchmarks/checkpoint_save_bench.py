"""How long `Checkpoints.save` blocks the training loop, on a state with a 100k-class head.

The state is a training state's shape for 100,000 classes: a [features, classes] kernel and a
bias with their SGD momentum (Optax's trace), a step count and key data, on JAX's default
device. Between two saves a jitted, donating "step" changes every leaf (as a training step
does), so each save sees a new state and the old buffers are reused. Each round times the
`save` call alone (what the loop waits for), then waits for the background write (untimed),
and the table gives the median over rounds, with the time of the state's sha256 digest and
of a host copy of the state for scale.

    python benchmarks/checkpoint_save_bench.py                       # [128, 100000], 15 saves
    python benchmarks/checkpoint_save_bench.py --features 128 --classes 100000 --saves 25
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _timing  # noqa: E402
from train import checkpointing  # noqa: E402


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    momentum: dict
    key_data: jax.Array


def make_state(features: int, classes: int) -> State:
    key = jax.random.key(0)
    params = {"kernel": jax.random.normal(key, (features, classes), jnp.float32),
              "bias": jnp.zeros((classes,), jnp.float32)}
    return State(step=jnp.asarray(0, jnp.int32), params=params,
                 momentum=jax.tree.map(jnp.zeros_like, params),
                 key_data=jax.random.key_data(key))


def _advance(state: State) -> State:
    floats = lambda tree: jax.tree.map(lambda x: x * 0.999 + 0.001, tree)
    return state.replace(step=state.step + 1, params=floats(state.params),
                         momentum=floats(state.momentum))


advance = jax.jit(_advance, donate_argnums=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--saves", type=int, default=15)
    args = parser.parse_args()

    state = make_state(args.features, args.classes)
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    blocked, digest, host_copy = [], [], []
    with tempfile.TemporaryDirectory() as workdir:
        checkpoints = checkpointing.Checkpoints(workdir, max_to_keep=2)
        for step in range(1, args.saves + 2):  # the first save (warm-up) is not counted
            state = jax.block_until_ready(advance(state))
            start = time.perf_counter()
            checkpoints.save(step, state, checkpointing.TrainTime())
            elapsed = time.perf_counter() - start
            checkpoints.wait_until_finished()
            start = time.perf_counter()
            checkpointing.tree_sha256(state)
            digest_s = time.perf_counter() - start
            start = time.perf_counter()
            jax.tree.map(lambda x: np.array(x, copy=True), state)
            copy_s = time.perf_counter() - start
            if step > 1:
                blocked.append(elapsed)
                digest.append(digest_s)
                host_copy.append(copy_s)
        checkpoints.close()
    print(_timing.device_line())
    print(f"# state: [{args.features}, {args.classes}] kernel + bias, with momentum: "
          f"{size / 2**20:.1f} MiB; {len(blocked)} saves")
    print("| what | median ms | min ms | max ms |")
    print("| --- | --- | --- | --- |")
    for name, times in (("save() blocks the loop", blocked), ("tree_sha256(state)", digest),
                        ("host copy of the state", host_copy)):
        print(f"| {name} | {1e3 * statistics.median(times):.1f} | {1e3 * min(times):.1f} "
              f"| {1e3 * max(times):.1f} |")


if __name__ == "__main__":
    main()
