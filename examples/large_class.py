"""A classifier over a million classes on a 2-D data x class mesh, with the fused noisy softmax.

Synthetic embeddings with class structure: each labelled class has a centre in the input
space and its samples scatter around it. A linear embedding and a bias-free classifier
(``kernel`` ``[dim, classes]``) are trained with SGD on
:func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy`. The kernel's classes are split
over the mesh's ``model`` axis and the batch over its ``data`` axis; no device ever holds
the ``[batch, classes]`` logits or the whole kernel.

Labels are drawn from ``--labelled`` classes spread evenly over all of them, so that a few
hundred steps see each a few dozen times; every class (a million by default) is in the
softmax's normalizer, which is the part whose cost and memory the fused loss removes.

    python examples/large_class.py                      # 8 emulated CPU devices, 2 x 4 mesh
    python examples/large_class.py --num-classes 100000 --steps 100

On a CPU the 8 devices are emulated (``--xla_force_host_platform_device_count``), set here
before JAX starts unless XLA_FLAGS already says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import noisy_softmax_jax as nsj  # noqa: E402


def make_batch(key, centres, labelled_classes, batch, spread):
    """Samples around the centres of randomly drawn labelled classes."""
    k_class, k_noise = jax.random.split(key)
    which = jax.random.randint(k_class, (batch,), 0, centres.shape[0])
    inputs = centres[which] + spread * jax.random.normal(k_noise, (batch, centres.shape[1]))
    return inputs, labelled_classes[which]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-classes", type=int, default=1_000_000)
    parser.add_argument("--labelled", type=int, default=64,
                        help="classes that labels are drawn from (spread over all classes)")
    parser.add_argument("--dim", type=int, default=16, help="embedding size")
    parser.add_argument("--input-dim", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=8.0,
                        help="SGD step of the kernel (each class's gradient is ~1/batch)")
    parser.add_argument("--embed-learning-rate", type=float, default=0.5)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--mesh", type=int, nargs=2, default=(2, 4), metavar=("DATA", "MODEL"))
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)

    data, model = args.mesh
    mesh = Mesh(np.array(jax.devices()[:data * model]).reshape(data, model), ("data", "model"))
    kernel_sharding = NamedSharding(mesh, PartitionSpec(None, "model"))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())

    key = jax.random.key(0)
    k_centres, k_embed, k_kernel, k_data, k_noise = jax.random.split(key, 5)
    centres = jax.random.normal(k_centres, (args.labelled, args.input_dim))
    centres = centres / jnp.linalg.norm(centres, axis=-1, keepdims=True)
    labelled_classes = jnp.linspace(0, args.num_classes - 1, args.labelled).astype(jnp.int32)
    params = {
        "embed": jax.device_put(
            jax.random.normal(k_embed, (args.input_dim, args.dim)) / np.sqrt(args.input_dim),
            replicated),
        # Created directly in shards: the whole kernel never sits on one device.
        "kernel": jax.jit(lambda k: 0.01 * jax.random.normal(k, (args.dim, args.num_classes)),
                          out_shardings=kernel_sharding)(k_kernel),
    }

    def loss_fn(params, inputs, labels, step):
        features = inputs @ params["embed"]
        loss = nsj.fused_noisy_softmax_cross_entropy(
            features, params["kernel"], labels, jax.random.fold_in(k_noise, step), args.alpha,
            mesh=mesh, class_axis="model")
        return loss.mean()

    def train_step(params, step):
        inputs, labels = make_batch(jax.random.fold_in(k_data, step), centres, labelled_classes,
                                    args.batch, spread=0.3)
        inputs = jax.lax.with_sharding_constraint(inputs, batch_sharding)
        labels = jax.lax.with_sharding_constraint(labels, batch_sharding)
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, labels, step)
        rates = {"embed": args.embed_learning_rate, "kernel": args.learning_rate}
        params = {name: params[name] - rates[name] * grads[name] for name in params}
        return params, loss

    compiled = jax.jit(train_step, donate_argnums=0).lower(params, 0).compile()
    memory = compiled.memory_analysis()
    kernel_shard = params["kernel"].addressable_shards[0].data
    print(f"{args.num_classes} classes, dim {args.dim}, batch {args.batch}, mesh data {data} x "
          f"model {model} on {jax.devices()[0].platform}")
    print(f"per device: kernel shard {kernel_shard.shape} = {kernel_shard.nbytes / 2**20:.1f} MiB "
          f"(whole kernel {params['kernel'].nbytes / 2**20:.1f} MiB); temporary memory of the "
          f"train step {memory.temp_size_in_bytes / 2**20:.1f} MiB")
    # The loss of one batch of 32 moves by +-1; each line shows the mean since the last.
    losses, window, start = [], [], time.perf_counter()
    for step in range(args.steps):
        params, loss = compiled(params, step)
        # Read back every step, so one step is in flight at a time: with emulated devices on
        # a few cores, a step queued behind another can take the threads its predecessor's
        # all-reduce waits for (XLA:CPU aborts after 40 s). Real devices lose only overlap.
        window.append(float(loss))
        if step % args.log_every == 0 or step == args.steps - 1:
            losses.append(float(np.mean(window)))
            window = []
            print(f"step {step:4d}  mean loss {losses[-1]:.3f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {args.steps} steps "
          f"(log {args.num_classes} = {np.log(args.num_classes):.3f})")
    return losses


if __name__ == "__main__":
    main()
