"""The fused heads (Linen and NNX) against the materialised head and the main loss.

The reference is `NoisySoftmaxHead` with the same kernel, its logits and amplitude fed to
`noisy_softmax_cross_entropy` with the same key: values and gradients (with respect to the
parameters and the features) must agree to rounding, and top-k must be that of its logits.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, PartitionSpec

import noisy_softmax_jax as nsj
from noisy_softmax_jax import nnx as nsj_nnx
from tests.test_large_class import assert_close, class_mesh

BATCH, DIM, CLASSES = 12, 8, 37


def make_problem(seed):
    k_x, k_y = jax.random.split(jax.random.key(seed))
    features = jax.random.normal(k_x, (BATCH, DIM), jnp.float32)
    labels = jax.random.randint(k_y, (BATCH,), 0, CLASSES)
    # Targets in the first column and in the last, partial block (37 = 7 * 5 + 2).
    return features, labels.at[:2].set(jnp.array([0, CLASSES - 1]))


def materialised_loss(params, features, labels, rng, alpha, **kwargs):
    out = nsj.NoisySoftmaxHead(num_classes=CLASSES).apply(params, features)
    return nsj.noisy_softmax_cross_entropy(out.logits, labels, rng, alpha,
                                           amplitude=out.amplitude(labels), **kwargs)


def weighted_value_and_grads(loss_fn, params, features):
    """Per-example losses, and the gradients of a weighted sum (every row counts differently)."""
    weights = jnp.linspace(0.5, 1.5, BATCH)

    def total(params, features):
        loss = loss_fn(params, features)
        return jnp.sum(loss * weights), loss

    (_, loss), grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(
        params, features)
    return loss, grads


def test_linen_heads_have_the_same_parameters():
    # Same module name, same key: the same kernel, so checkpoints load into either head.
    features = jnp.ones((2, DIM))
    dense = nsj.NoisySoftmaxHead(num_classes=CLASSES).init(jax.random.key(3), features)
    fused = nsj.FusedNoisySoftmaxHead(num_classes=CLASSES).init(jax.random.key(3), features)
    assert jax.tree.structure(dense) == jax.tree.structure(fused)
    np.testing.assert_array_equal(dense["params"]["kernel"], fused["params"]["kernel"])
    assert fused["params"]["kernel"].shape == (DIM, CLASSES)


@pytest.mark.parametrize("noise, alpha, kwargs", [
    ("annealed", 0.3, {}),
    ("annealed", 0.0, {}),
    ("amplitude", 0.3, dict(shared_noise=True)),
    ("free", 0.3, dict(negative=True)),
])
def test_linen_fused_head_matches_the_materialised_head(noise, alpha, kwargs):
    features, labels = make_problem(0)
    rng = jax.random.key(5)
    head = nsj.FusedNoisySoftmaxHead(num_classes=CLASSES, chunk_size=5)
    params = head.init(jax.random.key(1), features)
    fused = lambda p, x: head.apply(p, x, labels, rng, alpha, method="loss", noise=noise,
                                    **kwargs)
    reference = lambda p, x: materialised_loss(p, x, labels, rng, alpha, noise=noise, **kwargs)
    loss, grads = weighted_value_and_grads(fused, params, features)
    expected_loss, expected_grads = weighted_value_and_grads(reference, params, features)
    assert_close(loss, expected_loss, 1e-5)
    assert_close(grads, expected_grads, 1e-5)
    assert jax.tree.structure(grads) == jax.tree.structure(expected_grads)
    if alpha == 0.0:  # no noise at all: a different key gives the same loss
        np.testing.assert_array_equal(
            loss, head.apply(params, features, labels, jax.random.key(6), 0.0, method="loss"))


def test_linen_fused_head_output_passes_through_jit_and_gives_top_k():
    features, labels = make_problem(1)
    head = nsj.FusedNoisySoftmaxHead(num_classes=CLASSES, chunk_size=6)
    params = head.init(jax.random.key(2), features)
    out = jax.jit(head.apply)(params, features)  # a pytree whose config is static
    assert isinstance(out, nsj.FusedHeadOutput) and out.chunk_size == 6
    values, classes = out.top_k(5)
    logits = nsj.NoisySoftmaxHead(num_classes=CLASSES).apply(params, features).logits
    expected_values, expected_classes = jax.lax.top_k(logits, 5)
    np.testing.assert_array_equal(classes, expected_classes)
    assert_close(values, expected_values, 1e-6)
    np.testing.assert_array_equal(head.apply(params, features, 5, method="top_k")[1], classes)
    expected_amplitude = (np.linalg.norm(features, axis=-1)
                          * np.linalg.norm(params["params"]["kernel"], axis=0)[labels])
    assert_close(out.amplitude(labels), expected_amplitude, 1e-6)


def test_linen_fused_head_sharded_over_classes_equals_unsharded():
    features, labels = make_problem(2)
    rng = jax.random.key(7)
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "classes"))
    kwargs = dict(num_classes=36, chunk_size=5)  # 9 classes per shard: a partial block each
    params = nsj.FusedNoisySoftmaxHead(**kwargs).init(jax.random.key(1), features)
    labels = labels % 36
    sharded = nsj.FusedNoisySoftmaxHead(**kwargs, mesh=mesh, class_axis="classes")
    unsharded = nsj.FusedNoisySoftmaxHead(**kwargs)

    def value_and_grads(head):
        loss_fn = lambda p, x: head.apply(p, x, labels, rng, 0.3, method="loss")
        return weighted_value_and_grads(loss_fn, params, features)

    results = [value_and_grads(sharded), value_and_grads(unsharded)]
    assert_close(*results, 1e-6)
    np.testing.assert_array_equal(sharded.apply(params, features, 3, method="top_k")[1],
                                  unsharded.apply(params, features, 3, method="top_k")[1])


@pytest.mark.parametrize("alpha", [0.3, 0.0])
def test_nnx_fused_head_matches_the_materialised_head(alpha):
    features, labels = make_problem(3)
    rng = jax.random.key(8)
    head = nsj_nnx.FusedNoisySoftmaxHead(DIM, CLASSES, chunk_size=5, rngs=nnx.Rngs(4))
    dense = nsj_nnx.NoisySoftmaxHead(DIM, CLASSES, rngs=nnx.Rngs(4))
    np.testing.assert_array_equal(head.kernel[...], dense.kernel[...])  # interchangeable
    params = {"params": {"kernel": head.kernel[...]}}
    weights = jnp.linspace(0.5, 1.5, BATCH)

    @nnx.jit
    def fused_value_and_grads(head, features):
        def total(head, features):
            loss = head.loss(features, labels, rng, alpha)
            return jnp.sum(loss * weights), loss
        return nnx.value_and_grad(total, argnums=(0, 1), has_aux=True)(head, features)

    (_, loss), (head_grads, feature_grads) = fused_value_and_grads(head, features)
    expected_loss, (expected_params, expected_features) = weighted_value_and_grads(
        lambda p, x: materialised_loss(p, x, labels, rng, alpha), params, features)
    assert_close(loss, expected_loss, 1e-5)
    assert_close(head_grads["kernel"][...], expected_params["params"]["kernel"], 1e-5)
    assert_close(feature_grads, expected_features, 1e-5)
    values, classes = head.top_k(features, 4)
    expected_values, expected_classes = jax.lax.top_k(dense(features).logits, 4)
    np.testing.assert_array_equal(classes, expected_classes)
    assert_close(values, expected_values, 1e-6)


def test_bfloat16_head_computes_in_float32():
    features, labels = make_problem(4)
    head = nsj.FusedNoisySoftmaxHead(num_classes=CLASSES, dtype=jnp.bfloat16, chunk_size=8)
    params = head.init(jax.random.key(1), features)
    out = head.apply(params, features)
    # The kernel stays float32: it is cast block by block inside the loss (issue 19, item 9).
    assert out.features.dtype == out.dtype == jnp.bfloat16 and out.kernel.dtype == jnp.float32
    loss = out.loss(labels, jax.random.key(0), 0.1)
    assert loss.dtype == jnp.float32
    expected = nsj.fused_noisy_softmax_cross_entropy(
        features.astype(jnp.bfloat16), params["params"]["kernel"].astype(jnp.bfloat16), labels,
        jax.random.key(0), 0.1, chunk_size=8)
    np.testing.assert_array_equal(loss, expected)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_linen_fused_head_creates_its_kernel_split_over_the_class_axis(axis_type):
    features, labels = make_problem(5)
    mesh = class_mesh((2, 2), ("data", "classes"), axis_type)
    head = nsj.FusedNoisySoftmaxHead(num_classes=36, chunk_size=5, mesh=mesh,
                                     class_axis="classes")
    abstract = jax.eval_shape(head.init, jax.random.key(1), features)
    assert nn.get_partition_spec(abstract) == {"params": {"kernel": PartitionSpec(
        None, "classes")}}
    # Flax's recipe: the shardings from the metadata, and jit creates each device's part.
    params = jax.jit(head.init, out_shardings=nn.get_sharding(abstract, mesh))(
        jax.random.key(1), features)
    kernel = params["params"]["kernel"]
    assert isinstance(kernel, nn.Partitioned) and kernel.names == (None, "classes")
    assert kernel.value.sharding.spec == PartitionSpec(None, "classes")
    assert {shard.data.shape for shard in kernel.value.addressable_shards} == {(DIM, 18)}
    # The same kernel as the unsharded head's, and the same loss and gradients.
    unsharded = nsj.FusedNoisySoftmaxHead(num_classes=36, chunk_size=5)
    plain = unsharded.init(jax.random.key(1), features)
    np.testing.assert_array_equal(kernel.value, plain["params"]["kernel"])
    labels, rng = labels % 36, jax.random.key(2)
    loss_fn = lambda head: lambda p, x: head.apply(p, x, labels, rng, 0.3, method="loss")
    loss, grads = weighted_value_and_grads(loss_fn(head), params, features)
    expected_loss, expected_grads = weighted_value_and_grads(loss_fn(unsharded), plain, features)
    assert_close(loss, expected_loss, 1e-6)
    assert_close(grads, expected_grads, 1e-6)
    assert grads[0]["params"]["kernel"].value.sharding.spec == PartitionSpec(None, "classes")


def test_linen_fused_head_keeps_a_kernel_init_partitioned_by_the_user():
    mesh = class_mesh((4,), ("classes",))
    init = nn.with_partitioning(nn.initializers.lecun_normal(), ("features", "classes"))
    head = nsj.FusedNoisySoftmaxHead(num_classes=36, mesh=mesh, class_axis="classes",
                                     kernel_init=init)
    abstract = jax.eval_shape(head.init, jax.random.key(1), jnp.ones((4, DIM)))
    assert nn.get_partition_spec(abstract) == {"params": {"kernel": PartitionSpec(
        "features", "classes")}}


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_nnx_fused_head_creates_its_kernel_split_over_the_class_axis(axis_type):
    features, labels = make_problem(6)
    mesh = class_mesh((2, 2), ("data", "classes"), axis_type)
    head = nsj_nnx.FusedNoisySoftmaxHead(DIM, 36, chunk_size=5, mesh=mesh, class_axis="classes",
                                         rngs=nnx.Rngs(4))
    kernel = head.kernel[...]
    assert kernel.sharding.spec == PartitionSpec(None, "classes")
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(DIM, 18)}
    assert nnx.get_partition_spec(nnx.state(head))["kernel"].get_value() == PartitionSpec(
        None, "classes")
    optimizer = nnx.Optimizer(head, optax.sgd(0.1, momentum=0.9), wrt=nnx.Param)
    (momentum,) = [x for x in jax.tree.leaves(nnx.state(optimizer, nnx.OptState)) if x.ndim]
    assert momentum.sharding.spec == PartitionSpec(None, "classes")
    # The same kernel as the unsharded head's, and the same loss.
    unsharded = nsj_nnx.FusedNoisySoftmaxHead(DIM, 36, chunk_size=5, rngs=nnx.Rngs(4))
    np.testing.assert_array_equal(kernel, unsharded.kernel[...])
    labels, rng = labels % 36, jax.random.key(2)
    assert_close(head.loss(features, labels, rng, 0.3),
                 unsharded.loss(features, labels, rng, 0.3), 1e-6)
    # A kernel_init from nnx.with_partitioning keeps its own metadata.
    init = nnx.with_partitioning(nnx.initializers.lecun_normal(), ("data", "classes"),
                                 mesh=mesh)
    own = nsj_nnx.FusedNoisySoftmaxHead(DIM, 36, mesh=mesh, class_axis="classes",
                                        kernel_init=init, rngs=nnx.Rngs(4))
    assert own.kernel[...].sharding.spec == PartitionSpec("data", "classes")
