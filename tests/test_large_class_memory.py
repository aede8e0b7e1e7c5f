"""Per-device memory of the class-sharded fused loss: the kernel splits, the temporaries stay put.

Compile only (`memory_analysis()` of the compiled, sharded `value_and_grad`), on the 8 emulated
CPU devices of tests/conftest.py, so the numbers are exact and free of machine noise. The
class count 2**20 splits into whole blocks of the default chunk (4096 classes at batch 512) on
1, 4 and 8 shards, so no shard has a partial last block whose size would move its
temporaries by a few MiB.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import noisy_softmax_jax as nsj
from noisy_softmax_jax import nnx as nsj_nnx
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


# The fused heads: what a training step holds per device, parameters and optimizer state
# included, at 100k classes x 128 features (issue 19, item 9). Compiled only.

HEAD_BATCH, HEAD_DIM, HEAD_CLASSES = 512, 128, 100_000
HEAD_KERNEL = HEAD_DIM * HEAD_CLASSES * FLOAT  # the float32 kernel, 48.8 MiB
MOMENTUM = optax.sgd(0.1, momentum=0.9)


def linen_head_memory(dtype, mesh):
    """memory_analysis() of creating (params, opt_state) and of one SGD step, Flax's recipe.

    The shardings come from the head's own partitioning metadata (nn.get_sharding of the
    abstract state), and jit(create, out_shardings=...) creates each device's part.
    """
    head = nsj.FusedNoisySoftmaxHead(HEAD_CLASSES, dtype=dtype, mesh=mesh,
                                     class_axis=None if mesh is None else "classes")
    features = jax.ShapeDtypeStruct((HEAD_BATCH, HEAD_DIM), jnp.float32)
    labels = jax.ShapeDtypeStruct((HEAD_BATCH,), jnp.int32)

    def create(key):
        params = head.init(key, jnp.zeros(features.shape, features.dtype))
        return params, MOMENTUM.init(params)

    abstract = jax.eval_shape(create, jax.random.key(0))
    shardings = None if mesh is None else nn.get_sharding(abstract, mesh)
    created = jax.jit(create, out_shardings=shardings).lower(jax.random.key(0)).compile()

    def step(state, features, labels):
        params, opt_state = state
        loss_fn = lambda p: head.apply(p, features, labels, jax.random.key(1), 0.1,
                                       method="loss").mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = MOMENTUM.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    # Each leaf with the sharding that nn.get_sharding gives its box (its prefix).
    state = abstract if mesh is None else jax.tree.map(
        lambda sharding, box: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), box),
        shardings, abstract)
    stepped = jax.jit(step, donate_argnums=0).lower(state, features, labels).compile()
    return abstract, created.memory_analysis(), stepped.memory_analysis()


def nnx_head_memory(dtype, mesh):
    """The same for the NNX head and nnx.Optimizer: created under jit, then one step."""
    def create():
        head = nsj_nnx.FusedNoisySoftmaxHead(HEAD_DIM, HEAD_CLASSES, dtype=dtype, mesh=mesh,
                                             class_axis="classes", rngs=nnx.Rngs(0))
        return head, nnx.Optimizer(head, MOMENTUM, wrt=nnx.Param)

    created = jax.jit(lambda: nnx.state(create())).lower().compile()
    graphdef, abstract = nnx.split(nnx.eval_shape(create))

    def step(state, features, labels):
        head, optimizer = nnx.merge(graphdef, state)
        loss_fn = lambda head: head.loss(features, labels, jax.random.key(1), 0.1).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(head)
        optimizer.update(head, grads)
        return nnx.state((head, optimizer)), loss

    state = jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                             sharding=NamedSharding(mesh, spec)),
        abstract, nnx.get_partition_spec(abstract))
    stepped = jax.jit(step, donate_argnums=0).lower(
        state, jax.ShapeDtypeStruct((HEAD_BATCH, HEAD_DIM), jnp.float32),
        jax.ShapeDtypeStruct((HEAD_BATCH,), jnp.int32)).compile()
    return abstract, created.memory_analysis(), stepped.memory_analysis()


def assert_split_head(created, stepped, step_count_bytes=0):
    """Per device: an eighth of the kernel and an eighth of its momentum, nothing whole."""
    shard = HEAD_KERNEL // 8
    # The parameters and the momentum, 6.1 MiB each, plus the output tuples' pointer tables
    # (and nnx.Optimizer's int32 step count).
    assert 0 <= created.output_size_in_bytes - 2 * shard - step_count_bytes <= 64
    # The initializer's random bits are drawn per device: 18.3 MiB measured, no whole kernel.
    assert created.temp_size_in_bytes < HEAD_KERNEL // 2
    # The step takes the two shards, the features and the labels, exactly.
    assert stepped.argument_size_in_bytes == (
        2 * shard + step_count_bytes + HEAD_BATCH * HEAD_DIM * FLOAT + HEAD_BATCH * INT)
    # The kernel's gradient shard and a few [batch, chunk] blocks: 26.1-26.7 MiB measured.
    assert stepped.temp_size_in_bytes <= 32 * MiB


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_linen_fused_head_creates_and_trains_its_kernel_split_over_the_classes(dtype):
    mesh = class_mesh((8,), ("classes",))
    abstract, created, stepped = linen_head_memory(dtype, mesh)
    assert nn.get_partition_spec(abstract[0]) == {"params": {"kernel": PartitionSpec(
        None, "classes")}}
    assert_split_head(created, stepped)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_nnx_fused_head_creates_and_trains_its_kernel_split_over_the_classes(dtype):
    mesh = class_mesh((8,), ("classes",))
    abstract, created, stepped = nnx_head_memory(dtype, mesh)
    kernel_spec = nnx.get_partition_spec(abstract)[0]["kernel"].get_value()
    assert kernel_spec == PartitionSpec(None, "classes")
    assert_split_head(created, stepped, step_count_bytes=INT)


def fused_head_loss_temps(dtype, num_classes):
    """Temporaries of jit(value_and_grad) of the unsharded Linen head's mean loss."""
    features = jax.ShapeDtypeStruct((HEAD_BATCH, HEAD_DIM), jnp.float32)
    labels = jax.ShapeDtypeStruct((HEAD_BATCH,), jnp.int32)
    head = nsj.FusedNoisySoftmaxHead(num_classes, dtype=dtype)
    params = jax.eval_shape(head.init, jax.random.key(0), features)
    loss_fn = lambda p, x, y: head.apply(p, x, y, jax.random.key(1), 0.1, method="loss").mean()
    compiled = jax.jit(jax.value_and_grad(loss_fn, (0, 1))).lower(params, features, labels)
    return compiled.compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_bfloat16_fused_head_casts_the_kernel_block_by_block():
    # Unsharded, where a cast copy of the kernel shows most. Casting it whole before the loop
    # took 55.8 MiB at 100k classes (28.9 more than float32) and grew with the classes (55.6
    # and 87.6 MiB at 2**17 and 2**18).
    block = HEAD_BATCH * 4096 * 2  # one bfloat16 [batch, chunk] block (the default chunk)
    temps = {dtype: fused_head_loss_temps(dtype, HEAD_CLASSES)
             for dtype in (jnp.float32, jnp.bfloat16)}
    # Measured 26.8 MiB (float32) and 29.4 MiB (bfloat16: its blocks of d logits are cast).
    assert temps[jnp.float32] <= 32 * MiB
    assert temps[jnp.bfloat16] - temps[jnp.float32] <= block
    # Whole blocks only (2**17 and 2**18 classes are 32 and 64 of them): the same temporaries
    # (21.6 MiB measured at both).
    assert abs(fused_head_loss_temps(jnp.bfloat16, 2**18)
               - fused_head_loss_temps(jnp.bfloat16, 2**17)) <= MiB
