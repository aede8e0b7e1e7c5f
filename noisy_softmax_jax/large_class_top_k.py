"""Top-k classes of a bias-free linear classifier over very many classes, without its logits.

The evaluation side of :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy`: the same
blocks of classes, the same optional class-sharded mesh, and no ``[batch, classes]`` array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from noisy_softmax_jax import _blocks, _plain
from noisy_softmax_jax._validation import KernelLayout
from noisy_softmax_jax.margins import unit

__all__ = ["fused_top_k"]


def _merge(values, indices, new_values, new_indices, k):
    """The k largest of two candidate lists; on ties the earlier list (lower classes) wins."""
    values = jnp.concatenate([values, new_values], axis=-1)
    indices = jnp.concatenate([indices, new_indices], axis=-1)
    values, position = jax.lax.top_k(values, k)
    return values, jnp.take_along_axis(indices, position, axis=-1)


def _top_k_shard(features, kernel, *, k, config, dtype):
    offset = _blocks.shard_offset(kernel, config)
    batch = features.shape[0]

    def body(carry, block, start):
        logits, _ = _blocks.block_logits(features, block, config, dtype)
        values, indices = jax.lax.top_k(logits, min(k, block.shape[config.kernel_class_dim]))
        best_values, best_indices = carry
        return _merge(best_values, best_indices, values, indices + (start + offset), k)

    carry = (jnp.full((batch, k), -jnp.inf, dtype), jnp.full((batch, k), -1, jnp.int32))
    values, indices = _blocks.over_blocks(body, carry, kernel, config)
    if config.class_axis is not None:
        # [batch, k] candidates from every shard, in shard (so class) order: [batch, shards * k].
        values, indices = (jax.lax.all_gather(x, config.class_axis, axis=1, tiled=True)
                           for x in (values, indices))
        values, position = jax.lax.top_k(values, k)
        indices = jnp.take_along_axis(indices, position, axis=-1)
    return values, indices


@functools.partial(jax.jit, static_argnames=("config", "k"))
def _top_k(features, kernel, *, k, config):
    dtype = _plain.compute_dtype(config.matmul_dtype)
    if config.cosine:  # unit features; each class weight is divided by its norm per block
        features = unit(features.astype(dtype))
    features = features.astype(config.matmul_dtype)  # the kernel: block by block
    shard = functools.partial(_top_k_shard, k=k, config=config, dtype=dtype)
    if config.mesh is None:
        return shard(features, kernel)
    rows = _blocks.feature_spec(config)
    return _blocks.shard_map(
        shard, config, in_specs=(rows, _blocks.kernel_spec(config)),
        out_specs=(rows, rows), out_like=(features, features))(features, kernel)


def fused_top_k(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    k: int,
    *,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    class_axis: str | None = None,
    kernel_layout: KernelLayout = "features_classes",
    dtype: jax.typing.DTypeLike | None = None,
    cosine: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The ``k`` largest logits of ``features @ kernel`` and their classes, block by block.

    Equals ``jax.lax.top_k(features @ kernel, k)`` (up to the matmul's rounding) without
    forming the logits: each block of ``chunk_size`` classes is reduced to its top ``k``
    and merged into a running top ``k``. With ``mesh`` and ``class_axis``, as in
    :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy`, each device keeps the top
    ``k`` of its classes and the shards exchange ``[batch, k]`` candidates. Use it for
    top-1 / top-5 accuracy at evaluation (no noise there: it needs the true label).

    With ``cosine=True`` the values are the cosines
    ``jax.lax.top_k(class_cosines(features, kernel), k)``
    (:func:`noisy_softmax_jax.class_cosines`): the evaluation of a CosFace or ArcFace
    model, whose logits :math:`s\\cos\\theta_j` rank the classes as the cosines do. The
    features are normalised once and each class weight divided by its norm block by block,
    so no normalised copy of the kernel is made.

    Args:
      features: Inputs of the classifier, shape ``[batch, dim]``, floating.
      kernel: Class weights, shape ``[dim, classes]`` (default) or ``[classes, dim]``
        (``kernel_layout="classes_features"``: Equinox, PyTorch), read in blocks as stored.
      k: How many classes per example, ``1 <= k <= classes`` (and ``<= classes`` per shard).
      chunk_size, mesh, class_axis, kernel_layout, dtype: As in
        :func:`fused_noisy_softmax_cross_entropy` (``dtype``: the matmul's, each block of
        ``kernel`` cast to it inside the loop).
      cosine: Rank by :math:`\\cos\\theta_j` (features and class weights L2-normalised)
        instead of :math:`x^\\top W_j`.

    Returns:
      ``(values, classes)``, both ``[batch, k]``, largest first; values (logits, or cosines)
      in float32 for a half-precision matmul, classes int32.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import fused_top_k
      >>> features = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> kernel = jnp.array([[0.1, 0.9, 0.5], [0.7, 0.2, 0.4]])
      >>> values, classes = fused_top_k(features, kernel, 2, chunk_size=2)
      >>> classes
      Array([[1, 2],
             [0, 2]], dtype=int32)
      >>> labels = jnp.array([2, 0])
      >>> top1 = jnp.mean(classes[:, 0] == labels)
      >>> top2 = jnp.mean(jnp.any(classes == labels[:, None], axis=-1))
      >>> float(top1), float(top2)
      (0.5, 1.0)

      Equinox or PyTorch-style weights, ``[classes, dim]``:

      >>> weight = kernel.T  # e.g. eqx.nn.Linear(2, 3, use_bias=False, key=key).weight
      >>> fused_top_k(features, weight, 2, kernel_layout="classes_features")[1]
      Array([[1, 2],
             [0, 2]], dtype=int32)
    """
    checked_features, checked_kernel, config = _blocks.checked_config(
        features, kernel, kernel_layout=kernel_layout, chunk_size=chunk_size, mesh=mesh,
        class_axis=class_axis, dtype=dtype, cosine=bool(cosine))
    num_classes = _blocks.num_classes(checked_kernel, config)
    shards = 1 if mesh is None else mesh.shape[class_axis]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes // shards:
        raise ValueError(
            f"`k` must be an integer in [1, {num_classes // shards}] (the classes per shard); "
            f"got k = {k!r}.")
    return _top_k(checked_features, checked_kernel, k=k, config=config)
