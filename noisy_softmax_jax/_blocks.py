"""Blocks of classes: what the fused loss and `fused_top_k` share.

Both walk over the kernel's classes ``chunk_size`` at a time, never forming the
``[batch, classes]`` logits, optionally with the classes split over a mesh axis
(``jax.shard_map``). Here: the static configuration of such a walk, the loop over blocks, a
block's logits (plain or cosine), and the ``shard_map`` plumbing.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from noisy_softmax_jax import _validation
from noisy_softmax_jax.amplitude import safe_norm


class Config(NamedTuple):
    """The static (hashable) part of a call: what jit specializes on."""

    chunk_size: int
    mesh: Mesh | None
    class_axis: str | None
    batch_axes: tuple[str, ...]
    # The kernel's dimension that holds the classes: 1 for [dim, classes] (Flax), 0 for
    # [classes, dim] (Equinox, PyTorch). Blocks are sliced along it as the kernel is stored.
    kernel_class_dim: int
    # The noise, for the loss only (fused_top_k has none); None: no noise is drawn.
    noise: str | None = "annealed"
    shared_noise: bool = False
    negative: bool = False
    # The matmul's dtype: the features and each block of the kernel are cast to it, the kernel
    # block by block inside the loop (a whole cast copy of it is what the blocks avoid).
    matmul_dtype: np.dtype = np.dtype(np.float32)
    # Cosine logits: each class weight divided by its norm, block by block (the features are
    # normalised by the caller). With a margin, the loss's margin.
    cosine: bool = False
    margin: str | None = None


def checked_config(features, kernel, *, kernel_layout, chunk_size, mesh, class_axis, dtype,
                   cosine=False) -> tuple[jax.Array, jax.Array, Config]:
    """The features, the kernel and the blocks' configuration, checked (``_validation``)."""
    features, kernel, fields = _validation.check_blocks(
        features, kernel, kernel_layout=kernel_layout, chunk_size=chunk_size, mesh=mesh,
        class_axis=class_axis, dtype=dtype)
    return features, kernel, Config(**fields, cosine=cosine)


def num_classes(kernel: jax.Array, config: Config) -> int:
    return kernel.shape[config.kernel_class_dim]


def _dot(a, b, contract, dtype):
    """`a` and `b` contracted over `contract` in their common dtype, accumulated in `dtype`."""
    common = jnp.result_type(a, b)
    return jax.lax.dot_general(a.astype(common), b.astype(common), (contract, ((), ())),
                               preferred_element_type=dtype)


def over_blocks(body, carry, kernel, config: Config):
    """Folds ``body(carry, block, start)`` over the blocks of ``chunk_size`` classes of ``kernel``.

    Blocks are sliced along the kernel's class dimension, cast to the matmul's dtype one at a
    time, and handed to ``body`` in the kernel's layout (``[dim, chunk]`` or ``[chunk,
    dim]``): nothing is transposed, neither the kernel nor a block (XLA:CPU copies a
    transposed block rather than folding the transpose into the matmul). The full blocks go
    through one loop; a last partial block is sliced statically and run once after it, so
    nothing is padded (padding the kernel would copy it whole).
    """
    chunk_size, class_dim = config.chunk_size, config.kernel_class_dim
    total = kernel.shape[class_dim]
    full, rest = divmod(total, chunk_size)

    def step(index, carry):
        # The barrier makes the kernel a new value in every iteration. Without it XLA
        # rewrites convert(slice(kernel)) as slice(convert(kernel)) and hoists a cast copy of
        # the whole kernel out of the loop (XLA:CPU also widens half-precision matmul
        # operands to float32, which makes that copy float32).
        whole, start = jax.lax.optimization_barrier((kernel, index * chunk_size))
        block = jax.lax.dynamic_slice_in_dim(whole, start, chunk_size, axis=class_dim)
        return body(carry, block.astype(config.matmul_dtype), start)

    if full:
        carry = jax.lax.fori_loop(0, full, step, carry)
    if rest:
        start = full * chunk_size
        block = jax.lax.slice_in_dim(kernel, start, total, axis=class_dim)
        carry = body(carry, block.astype(config.matmul_dtype), jnp.asarray(start, jnp.int32))
    return carry


def class_norms(block, config: Config, dtype):
    """``[chunk]`` norms ``||W_j||`` of a block's class weights, in `dtype`."""
    return safe_norm(block, axis=1 - config.kernel_class_dim).astype(dtype)


def inverse_norms(block, config: Config, dtype):
    """``[chunk]`` ``1 / ||W_j||`` of a block's class weights, 0 for a zero weight."""
    norms = class_norms(block, config, dtype)
    positive = norms > 0
    return jnp.where(positive, 1 / jnp.where(positive, norms, 1), jnp.zeros((), dtype))


def block_logits(features, block, config: Config, dtype):
    """``[batch, chunk]`` logits of a block in either layout, contracted over its ``dim``.

    With ``config.cosine`` each column is divided by its class weight's norm (the features
    come normalised): ``x^T W_j / ||W_j||``, the cosine times ``||x||``. The columns are
    scaled after the matmul, so no normalised copy of the block is made. Returns the logits
    and the inverse norms (None without ``cosine``).
    """
    logits = _dot(features, block, ((1,), (1 - config.kernel_class_dim,)), dtype)
    if not config.cosine:
        return logits, None
    inverse = inverse_norms(block, config, dtype)
    return logits * inverse[None, :], inverse


def features_gradient(d_logits, block, config: Config, dtype):
    """``[batch, dim]``: the logits' gradient ``[batch, chunk]`` through the matmul."""
    return _dot(d_logits, block, ((1,), (config.kernel_class_dim,)), dtype)


def block_gradient(features, d_logits, config: Config, dtype):
    """The block's gradient through the matmul, in the block's own layout."""
    if config.kernel_class_dim == 1:  # [dim, chunk]
        return _dot(features, d_logits, ((0,), (0,)), dtype)
    return _dot(d_logits, features, ((0,), (0,)), dtype)  # [chunk, dim]


def per_class(values, config: Config):
    """``[chunk]`` values broadcastable against a block in the kernel's layout."""
    return jnp.expand_dims(values, 1 - config.kernel_class_dim)


def shard_offset(kernel, config: Config):
    """The first class of this shard's kernel block (0 without a mesh)."""
    if config.class_axis is None:
        return 0
    return jax.lax.axis_index(config.class_axis) * kernel.shape[config.kernel_class_dim]


def rows_spec(config: Config) -> PartitionSpec:
    """Per-example arrays (and the rows of the features): split over the data axes."""
    return PartitionSpec(config.batch_axes or None)


def feature_spec(config: Config) -> PartitionSpec:
    return PartitionSpec(config.batch_axes or None, None)


def kernel_spec(config: Config) -> PartitionSpec:
    """The kernel split along its class dimension over ``class_axis``, whole along ``dim``."""
    if config.kernel_class_dim == 1:
        return PartitionSpec(None, config.class_axis)
    return PartitionSpec(config.class_axis, None)


def shard_map(fn, config: Config, *, in_specs, out_specs, out_like):
    """``fn`` under ``jax.shard_map``, as a function of the (global) arguments.

    On a mesh with Explicit axes (``jax.make_mesh``'s default) the arguments' sharding is
    part of their type, so they are resharded to ``in_specs`` on the way in and the results
    to the sharding of the arrays in ``out_like`` on the way out.
    """
    # check_vma=False: the loops' carries start as replicated zeros and become per-shard
    # values; every output that leaves a shard as replicated over an axis has been reduced
    # over it (pmax/psum) just before, which the sharded tests check against one device.
    mesh = config.mesh
    assert mesh is not None
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
    if AxisType.Explicit not in mesh.axis_types:
        return mapped

    def call(*args):
        resharded = [jax.reshard(x, NamedSharding(mesh, spec))
                     for x, spec in zip(args, in_specs)]
        return tuple(
            jax.reshard(y, NamedSharding(mesh, jax.typeof(like).sharding.spec))
            for y, like in zip(mapped(*resharded), out_like))

    return call
