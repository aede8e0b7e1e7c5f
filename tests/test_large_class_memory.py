"""Per-device memory of the class-sharded fused loss: the kernel splits, the temporaries stay put.

Compile only (`memory_analysis()` of the compiled, sharded `value_and_grad`), on the 8 emulated
CPU devices of tests/conftest.py, so the numbers are exact and free of machine noise. The
class count 2**20 splits into whole blocks of the default chunk (4096 classes at batch 512) on
1, 4 and 8 shards, so no shard has a partial last block whose size would move its
temporaries by a few MiB.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import noisy_softmax_jax as nsj
from tests.test_large_class import class_mesh

BATCH, DIM, CLASSES = 512, 512, 2**20
FLOAT, INT = 4, 4  # bytes of a float32 and an int32
MiB = 2**20


def memory(shape, names, fused=True):
    """memory_analysis() of jit(value_and_grad(mean loss)) w.r.t. features and kernel."""
    mesh = class_mesh(shape, names)
    rows = "data" if "data" in names else None
    if fused:
        loss_fn = lambda f, k, y, a: nsj.fused_noisy_softmax_cross_entropy(
            f, k, y, jax.random.key(0), a, mesh=mesh, class_axis="classes")
    else:  # the materialised loss on the same shardings, partitioned by XLA
        loss_fn = lambda f, k, y, a: nsj.noisy_softmax_cross_entropy(
            f @ k, y, jax.random.key(0), a, amplitude=nsj.target_amplitude(f, k, y))
    specs = (PartitionSpec(rows), PartitionSpec(None, "classes"), PartitionSpec(rows),
             PartitionSpec())
    shardings = [NamedSharding(mesh, spec) for spec in specs]
    args = [jax.ShapeDtypeStruct(dims, dtype, sharding=sharding) for dims, dtype, sharding in
            zip([(BATCH, DIM), (DIM, CLASSES), (BATCH,), ()],
                [jnp.float32, jnp.float32, jnp.int32, jnp.float32], shardings)]
    step = jax.jit(jax.value_and_grad(lambda *a: loss_fn(*a).mean(), (0, 1)),
                   out_shardings=(shardings[3], (shardings[0], shardings[1])))
    return step.lower(*args).compile().memory_analysis()


def assert_outputs(analysis, gradients):
    """The outputs are the loss and the gradients, plus XLA's tables of the output tuples.

    The tables are pointers: 24 bytes for (loss, (d_features, d_kernel)).
    """
    assert 0 <= analysis.output_size_in_bytes - (FLOAT + gradients) <= 64


@pytest.mark.slow
def test_per_device_kernel_scales_as_one_over_devices_and_temporaries_stay_constant():
    temps = {}
    for shards in (1, 4, 8):
        analysis = memory((shards,), ("classes",))
        kernel_shard = DIM * CLASSES // shards * FLOAT
        # Exactly: features, labels and alpha replicated, and 1/shards of the kernel ...
        assert analysis.argument_size_in_bytes == (
            BATCH * DIM * FLOAT + BATCH * INT + FLOAT + kernel_shard)
        # ... and the loss, the features' gradient and 1/shards of the kernel's gradient.
        assert_outputs(analysis, BATCH * DIM * FLOAT + kernel_shard)
        temps[shards] = analysis.temp_size_in_bytes
    # A few [batch, chunk] blocks, the same on every shard whatever its number of classes
    # (measured 33.02 MiB); the collectives add [batch]- and [batch, dim]-sized buffers.
    assert max(temps.values()) <= 64 * MiB
    assert max(temps.values()) - min(temps.values()) <= BATCH * DIM * FLOAT
    # The materialised loss partitioned the same way needs [batch, classes / shards] arrays:
    # its temporaries do scale as 1/shards, from 2 GiB (2,060 MiB measured at one shard).
    assert memory((8,), ("classes",), fused=False).temp_size_in_bytes > 4 * temps[8]


@pytest.mark.slow
def test_data_by_class_mesh_splits_the_batch_and_the_kernel():
    analysis = memory((2, 4), ("data", "classes"))
    kernel_shard = DIM * CLASSES // 4 * FLOAT
    assert analysis.argument_size_in_bytes == (
        BATCH // 2 * DIM * FLOAT + BATCH // 2 * INT + FLOAT + kernel_shard)
    assert_outputs(analysis, BATCH // 2 * DIM * FLOAT + kernel_shard)
    # Data parallelism: each block's partial gradient is summed over "data" as it is made, so
    # the temporaries are blocks, not a partial gradient of the kernel shard (512 MiB here,
    # which summing once after the loop needed; measured 24.5 MiB).
    assert analysis.temp_size_in_bytes <= 64 * MiB
