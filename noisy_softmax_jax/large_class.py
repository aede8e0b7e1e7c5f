"""Noisy softmax cross-entropy for very many classes: from features and class weights, in blocks.

With 10^5 to 10^7 classes (face recognition) the ``[batch, classes]`` logits and their
gradient dominate memory. :func:`fused_noisy_softmax_cross_entropy` computes the same loss
as :func:`noisy_softmax_jax.noisy_softmax_cross_entropy` on ``features @ kernel`` without ever
holding them: it walks over blocks of classes with a running maximum and sum of exponentials,
recomputes each block's logits in the backward pass, and, given a mesh, splits the classes
over one of its axes and combines the shards with collectives of size ``[batch]``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify
from jax.interpreters import ad
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import noisy_softmax_jax
from noisy_softmax_jax import _labels, _validation
from noisy_softmax_jax.amplitude import KernelLayout, checked_kernel, safe_norm

__all__ = ["checked_fused_noisy_softmax_cross_entropy", "fused_noisy_softmax_cross_entropy"]

# Logits per block (batch x chunk) that the default chunk size aims at: 2**21 float32 values
# are 8 MiB, a few of which (logits, exponentials, their gradient) stay far below the
# 64 MiB of temporary memory the loss is meant to need at batch 512.
_BLOCK_ELEMENTS = 2**21
_CHUNK_MULTIPLE = 128  # lane width of accelerators; keeps blocks aligned on every backend


class _Config(NamedTuple):
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


def _compute_dtype(*dtypes) -> jnp.dtype:
    """bfloat16 and float16 are computed in float32; float64 stays float64."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _dot(a, b, contract, dtype):
    """`a` and `b` contracted over `contract` in their common dtype, accumulated in `dtype`."""
    common = jnp.result_type(a, b)
    return jax.lax.dot_general(a.astype(common), b.astype(common), (contract, ((), ())),
                               preferred_element_type=dtype)


def _over_blocks(body, carry, kernel, chunk_size, class_dim, block_dtype):
    """Folds ``body(carry, block, start)`` over the blocks of ``chunk_size`` classes of ``kernel``.

    Blocks are sliced along ``class_dim``, the kernel's class dimension, cast to
    ``block_dtype`` one at a time, and handed to ``body`` in the kernel's layout
    (``[dim, chunk]`` or ``[chunk, dim]``): nothing is transposed, neither the kernel nor a
    block (XLA:CPU copies a transposed block rather than folding the transpose into the
    matmul). The full blocks go through one loop; a last partial block is sliced statically
    and run once after it, so nothing is padded (padding the kernel would copy it whole).
    """
    num_classes = kernel.shape[class_dim]
    full, rest = divmod(num_classes, chunk_size)

    def step(index, carry):
        # The barrier makes the kernel a new value in every iteration. Without it XLA
        # rewrites convert(slice(kernel)) as slice(convert(kernel)) and hoists a cast copy of
        # the whole kernel out of the loop (XLA:CPU also widens half-precision matmul
        # operands to float32, which makes that copy float32).
        whole, start = jax.lax.optimization_barrier((kernel, index * chunk_size))
        block = jax.lax.dynamic_slice_in_dim(whole, start, chunk_size, axis=class_dim)
        return body(carry, block.astype(block_dtype), start)

    if full:
        carry = jax.lax.fori_loop(0, full, step, carry)
    if rest:
        start = full * chunk_size
        block = jax.lax.slice_in_dim(kernel, start, num_classes, axis=class_dim)
        carry = body(carry, block.astype(block_dtype), jnp.asarray(start, jnp.int32))
    return carry


def _block_logits(features, block, class_dim, dtype):
    """``[batch, chunk]`` logits of a block in either layout, contracted over its ``dim``."""
    return _dot(features, block, ((1,), (1 - class_dim,)), dtype)


def _per_class(values, class_dim):
    """``[chunk]`` values broadcastable against a block in the kernel's layout."""
    return jnp.expand_dims(values, 1 - class_dim)


def _is_target(local_labels, start, width):
    """``[batch, width]`` mask of the label's column in the block starting at ``start``."""
    return _labels.is_target(local_labels, width, start=start)


def _forward_shard(features, kernel, local_labels, *, chunk_size, class_dim, dtype):
    """One shard's pass over its classes: what the loss needs of them, per example.

    Returns the running maximum and sum of exponentials of the logits other than the
    target's, and the target logit f_y and ||W_y|| (zero where this shard does not own the
    label). The target column is left out of the sum because the loss replaces its logit by
    the noisy one, which needs f_y and ||W_y|| from every block first.
    """
    batch = features.shape[0]

    def body(carry, block, start):
        maximum, total, target_logit, class_norm = carry
        logits = _block_logits(features, block, class_dim, dtype)
        is_target = _is_target(local_labels, start, block.shape[class_dim])
        zero = jnp.zeros((), dtype)
        # The target's logit is read off the same matmul, so it is the materialised
        # computation's f_y to the bit.
        target_logit = target_logit + jnp.sum(jnp.where(is_target, logits, zero), axis=-1)
        class_norm = class_norm + jnp.sum(
            jnp.where(is_target, safe_norm(block, axis=1 - class_dim).astype(dtype)[None, :],
                      zero), axis=-1)
        others = jnp.where(is_target, -jnp.inf, logits)
        new_maximum = jnp.maximum(maximum, jnp.max(others, axis=-1))
        # A row whose logits so far are all -inf keeps total 0 without exp(-inf - -inf).
        shift = jnp.where(jnp.isfinite(new_maximum), new_maximum, zero)
        total = (total * jnp.exp(maximum - shift)
                 + jnp.sum(jnp.exp(others - shift[:, None]), axis=-1))
        return new_maximum, total, target_logit, class_norm

    zeros = jnp.zeros((batch,), dtype)
    carry = (jnp.full((batch,), -jnp.inf, dtype), zeros, zeros, zeros)
    return _over_blocks(body, carry, kernel, chunk_size, class_dim, features.dtype)


def _backward_shard(features, kernel, local_labels, d_loss, log_normalizer, d_target_logit,
                    d_class_norm_scale, *, chunk_size, class_dim, batch_axes, dtype):
    """One shard's backward pass: the kernel's gradient block by block, and its share of dx.

    d loss / d f_j = p~_j for every column but the target's, where the gradient goes through
    f~_y instead: d_target_logit (d loss / d f_y) and d_class_norm_scale (d loss / d ||W_y||
    over ||W_y||, since d ||W_y|| / d W_y = W_y / ||W_y||). Both are per-example numbers, so
    each block's gradient is one matmul plus a scaled copy of the block's labelled columns,
    written once.
    """
    matmul_dtype = features.dtype  # the kernel's blocks are cast to it

    def body(carry, block, start):
        d_features, d_kernel = carry
        logits = _block_logits(features, block, class_dim, dtype)
        is_target = _is_target(local_labels, start, block.shape[class_dim])
        probs = jnp.exp(logits - log_normalizer[:, None])
        d_logits = jnp.where(is_target, d_target_logit[:, None], d_loss[:, None] * probs)
        column_scale = jnp.sum(
            jnp.where(is_target, d_class_norm_scale[:, None], jnp.zeros((), dtype)), axis=0)
        d_logits = d_logits.astype(matmul_dtype)
        # In the block's own layout, [dim, chunk] or [chunk, dim], as the kernel's gradient is.
        d_matmul = (_dot(features, d_logits, ((0,), (0,)), dtype) if class_dim == 1
                    else _dot(d_logits, features, ((0,), (0,)), dtype))
        d_block = d_matmul + block.astype(dtype) * _per_class(column_scale, class_dim)
        if batch_axes:
            # Data parallelism: each batch shard holds part of every class weight's gradient.
            # Summed block by block, so no partial gradient of the whole kernel shard waits
            # for one all-reduce after the loop (512 MiB at 1M classes on a 2 x 4 mesh).
            d_block = jax.lax.psum(d_block, batch_axes)
        d_features = d_features + _dot(d_logits, block, ((1,), (class_dim,)), dtype)
        d_kernel = jax.lax.dynamic_update_slice_in_dim(
            d_kernel, d_block.astype(kernel.dtype), start, axis=class_dim)
        return d_features, d_kernel

    carry = (jnp.zeros(features.shape, dtype), jnp.zeros(kernel.shape, kernel.dtype))
    return _over_blocks(body, carry, kernel, chunk_size, class_dim, features.dtype)


def _shard_offset(kernel, config):
    """The first class of this shard's kernel block (0 without a mesh)."""
    if config.class_axis is None:
        return 0
    return jax.lax.axis_index(config.class_axis) * kernel.shape[config.kernel_class_dim]


def _forward_pass(features, kernel, labels, config, dtype):
    """Per example: logsumexp of the non-target logits, f_y and ||W_y||, over all shards."""

    def shard(features, kernel, labels):
        local_labels = labels.astype(jnp.int32) - _shard_offset(kernel, config)
        maximum, total, target_logit, class_norm = _forward_shard(
            features, kernel, local_labels, chunk_size=config.chunk_size,
            class_dim=config.kernel_class_dim, dtype=dtype)
        if config.class_axis is not None:
            # Combined over the class shards with [batch]-sized collectives. Only the shard
            # owning a label adds a non-zero f_y and ||W_y||, so those sums are exact.
            largest = jax.lax.pmax(maximum, config.class_axis)
            safe = jnp.where(jnp.isfinite(largest), largest, jnp.zeros((), dtype))
            total = jax.lax.psum(total * jnp.exp(maximum - safe), config.class_axis)
            target_logit = jax.lax.psum(target_logit, config.class_axis)
            class_norm = jax.lax.psum(class_norm, config.class_axis)
            maximum = largest
        shift = jnp.where(jnp.isfinite(maximum), maximum, jnp.zeros((), dtype))
        return jnp.log(total) + shift, target_logit, class_norm

    if config.mesh is None:
        return shard(features, kernel, labels)
    rows = PartitionSpec(config.batch_axes or None)
    return _shard_map(shard, config, in_specs=(_feature_spec(config), _kernel_spec(config), rows),
                      out_specs=(rows, rows, rows), out_like=(labels,) * 3)(
        features, kernel, labels)


def _backward_pass(features, kernel, labels, d_loss, log_normalizer, d_target_logit,
                   d_class_norm_scale, config, dtype):
    """The gradients with respect to features (logits part) and kernel, over all shards."""

    def shard(features, kernel, labels, *per_example):
        local_labels = labels.astype(jnp.int32) - _shard_offset(kernel, config)
        d_features, d_kernel = _backward_shard(
            features, kernel, local_labels, *per_example, chunk_size=config.chunk_size,
            class_dim=config.kernel_class_dim, batch_axes=config.batch_axes, dtype=dtype)
        if config.class_axis is not None:
            # The one [batch, dim] reduction of the backward pass.
            d_features = jax.lax.psum(d_features, config.class_axis)
        return d_features, d_kernel

    per_example = (d_loss, log_normalizer, d_target_logit, d_class_norm_scale)
    if config.mesh is None:
        return shard(features, kernel, labels, *per_example)
    rows = PartitionSpec(config.batch_axes or None)
    return _shard_map(
        shard, config,
        in_specs=(_feature_spec(config), _kernel_spec(config), rows) + (rows,) * 4,
        out_specs=(_feature_spec(config), _kernel_spec(config)), out_like=(features, kernel),
    )(features, kernel, labels, *per_example)


def _feature_spec(config):
    return PartitionSpec(config.batch_axes or None, None)


def _kernel_spec(config):
    """The kernel split along its class dimension over ``class_axis``, whole along ``dim``."""
    if config.kernel_class_dim == 1:
        return PartitionSpec(None, config.class_axis)
    return PartitionSpec(config.class_axis, None)


def _shard_map(fn, config, *, in_specs, out_specs, out_like):
    """``fn`` under ``jax.shard_map``, as a function of the (global) arguments.

    On a mesh with Explicit axes (``jax.make_mesh``'s default) the arguments' sharding is
    part of their type, so they are resharded to ``in_specs`` on the way in and the results
    to the sharding of the arrays in ``out_like`` on the way out.
    """
    # check_vma=False: the loops' carries start as replicated zeros and become per-shard
    # values; every output that leaves a shard as replicated over an axis has been reduced
    # over it (pmax/psum) just before, which the sharded tests check against one device.
    mapped = jax.shard_map(fn, mesh=config.mesh, in_specs=in_specs, out_specs=out_specs,
                           check_vma=False)
    if AxisType.Explicit not in config.mesh.axis_types:
        return mapped

    def call(*args):
        resharded = [jax.reshard(x, NamedSharding(config.mesh, spec))
                     for x, spec in zip(args, in_specs)]
        return tuple(
            jax.reshard(y, NamedSharding(config.mesh, jax.typeof(like).sharding.spec))
            for y, like in zip(mapped(*resharded), out_like))

    return call


def _noisy_target(config, target_logit, features, class_norm, rng, alpha, sigma):
    """f~_y through the public noise draw: the same noise as the materialised loss."""
    if config.noise is None:  # no key, or alpha known to be 0: the plain cross-entropy
        return target_logit
    amplitude = safe_norm(features, axis=-1) * class_norm
    return noisy_softmax_jax.noisy_target_logit(
        target_logit, rng, alpha, amplitude=amplitude, noise=config.noise, sigma=sigma,
        shared_noise=config.shared_noise, negative=config.negative)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_loss(features, kernel, labels, rng, alpha, sigma, config):
    return _fused_loss_fwd(features, kernel, labels, rng, alpha, sigma, config)[0]


def _fused_loss_fwd(features, kernel, labels, rng, alpha, sigma, config):
    dtype = _compute_dtype(config.matmul_dtype)
    # Cast here rather than before the custom VJP, so the features' gradient is rounded once,
    # to their own dtype, not to the matmul's first. ||x|| is the norm of what is multiplied.
    x = features.astype(config.matmul_dtype)
    others, target_logit, class_norm = _forward_pass(x, kernel, labels, config, dtype)
    noisy_target = _noisy_target(config, target_logit, x.astype(dtype), class_norm, rng,
                                 alpha, sigma)
    log_normalizer = jnp.logaddexp(others, noisy_target)
    residuals = (features, kernel, labels, rng, alpha, sigma, target_logit, class_norm,
                 log_normalizer)
    return log_normalizer - noisy_target, residuals


def _fused_loss_bwd(config, residuals, d_loss):
    (features, kernel, labels, rng, alpha, sigma, target_logit, class_norm,
     log_normalizer) = residuals
    dtype = log_normalizer.dtype

    # f~_y is a per-example function of f_y, ||x||, ||W_y||, alpha and sigma: its VJP is
    # [batch] and [batch, dim] sized. d loss / d f~_y = p~_y - 1.
    def noisy_target_of(target_logit, features, class_norm, alpha, sigma):
        return _noisy_target(config, target_logit, features, class_norm, rng, alpha, sigma)

    x = features.astype(config.matmul_dtype)
    noisy_target, noisy_target_vjp = jax.vjp(
        noisy_target_of, target_logit, x.astype(dtype), class_norm, alpha, sigma)
    target_prob = jnp.exp(noisy_target - log_normalizer)
    d_target_logit, d_features_norm, d_class_norm, d_alpha, d_sigma = noisy_target_vjp(
        d_loss * (target_prob - 1))
    # d ||W_y|| / d W_y = W_y / ||W_y||, and 0 at W_y = 0 as in safe_norm.
    positive = class_norm > 0
    d_class_norm_scale = jnp.where(
        positive, d_class_norm / jnp.where(positive, class_norm, 1), jnp.zeros((), dtype))
    d_features, d_kernel = _backward_pass(
        x, kernel, labels, d_loss, log_normalizer, d_target_logit, d_class_norm_scale,
        config, dtype)
    d_features = (d_features + d_features_norm).astype(features.dtype)
    return d_features, d_kernel, None, None, d_alpha, d_sigma


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)

_FORWARD_MODE_ERROR = (
    "`{name}` has no forward-mode derivative (jax.jvp, jax.jacfwd, jax.linearize): it is a "
    "jax.custom_vjp, whose backward pass recomputes each block of logits so that its memory "
    "does not grow with the number of classes. Reverse mode works (jax.grad, jax.vjp, "
    "jax.value_and_grad, and forward-over-reverse such as jax.hessian). For forward mode use "
    "the materialised loss, noisy_softmax_cross_entropy(features @ kernel, labels, rng, alpha, "
    "amplitude=target_amplitude(features, kernel, labels), ...): the same values and "
    "derivatives in every mode, at the cost of the [batch, classes] logits."
)


def _reverse_mode_only(name, call, arguments):
    """``call(*arguments)``, with a clear error where forward-mode autodiff reaches it.

    Forward mode shows in the arguments (JVP tracers) when the transformation is applied
    around this call, and as JAX's generic custom_vjp error raised inside it otherwise (a
    ``vmap`` between the two, say). Applied around a ``jax.jit`` that contains the call,
    neither is visible here and JAX's own error is all there is.
    """
    if any(isinstance(x, ad.JVPTracer) for x in jax.tree.leaves(arguments)):
        raise TypeError(_FORWARD_MODE_ERROR.format(name=name))
    try:
        return call(*arguments)
    except TypeError as error:
        if "forward-mode autodiff" not in str(error):
            raise
        raise TypeError(_FORWARD_MODE_ERROR.format(name=name)) from None


@functools.partial(jax.jit, static_argnames=("config",))
def _loss(features, kernel, labels, rng, alpha, sigma, where, *, config):
    dtype = _compute_dtype(config.matmul_dtype)
    alpha, sigma = jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)
    # An out-of-range label (under jit or on an accelerator, where its value is not checked)
    # is replaced by a safe one and its loss by NaN, as in the materialised loss; a masked
    # one (padding) then gives 0 like any masked example.
    in_range = _labels.in_range(labels, kernel.shape[config.kernel_class_dim])
    loss = _fused_loss(features, kernel, _labels.safe(labels, in_range), rng, alpha, sigma,
                       config)
    loss = jnp.where(in_range, loss, jnp.nan)
    if where is not None:
        loss = jnp.where(where, loss, jnp.zeros_like(loss))
    return loss


def _check_labels(labels, batch, num_classes, *, examples=None, check_values=True):
    if np.shape(labels) != (batch,):
        raise ValueError(
            f"`labels` must have shape [batch] = ({batch},), one class per row of `features`; "
            f"got labels.shape = {np.shape(labels)}.")
    if num_classes > np.iinfo(np.int32).max:
        raise ValueError(f"at most {np.iinfo(np.int32).max} classes; got {num_classes}.")
    # The main loss's checks (dtype, and the range when the values are concrete), with the
    # shape of the logits that are never formed.
    return _validation.check_labels(
        labels, jax.ShapeDtypeStruct((batch, num_classes), jnp.float32), examples=examples,
        check_values=check_values)


def _check_sharding(mesh, class_axis, batch, num_classes, class_dim):
    """The mesh axes the batch is split over; checks that the mesh fits the shapes."""
    if mesh is None and class_axis is None:
        return ()
    if mesh is None or class_axis is None:
        raise ValueError(
            "`mesh` and `class_axis` go together: the kernel's classes are split over the mesh "
            f"axis `class_axis`; got mesh = {mesh!r}, class_axis = {class_axis!r}.")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    if class_axis not in mesh.axis_names:
        raise ValueError(
            f"`class_axis` must name an axis of `mesh`, one of {mesh.axis_names}; "
            f"got {class_axis!r}.")
    shards = mesh.shape[class_axis]
    if num_classes % shards:
        raise ValueError(
            f"the number of classes (kernel.shape[{class_dim}] = {num_classes}) must be "
            f"divisible by the size of mesh axis {class_axis!r} ({shards}), which splits them.")
    batch_axes = tuple(name for name in mesh.axis_names if name != class_axis)
    batch_shards = math.prod(mesh.shape[name] for name in batch_axes)
    if batch % batch_shards:
        raise ValueError(
            f"the batch (features.shape[0] = {batch}) must be divisible by {batch_shards}, the "
            f"size of the mesh axes {batch_axes} other than `class_axis`, which split it.")
    return batch_axes


def _check_chunk_size(chunk_size, batch, classes_per_shard):
    if chunk_size is None:
        chunk_size = max(_CHUNK_MULTIPLE,
                         _BLOCK_ELEMENTS // max(batch, 1) // _CHUNK_MULTIPLE * _CHUNK_MULTIPLE)
    elif (isinstance(chunk_size, bool)
          or not isinstance(chunk_size, int | np.integer) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive integer or None; got {chunk_size!r}.")
    return int(min(chunk_size, max(classes_per_shard, 1)))


def fused_noisy_softmax_cross_entropy(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array | None,
    alpha: jax.typing.ArrayLike,
    *,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    where: jax.typing.ArrayLike | None = None,
    shared_noise: bool = False,
    negative: bool = False,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    class_axis: str | None = None,
    kernel_layout: KernelLayout = "features_classes",
    dtype: jax.typing.DTypeLike | None = None,
) -> jax.Array:
    r"""Noisy softmax cross-entropy of a bias-free linear classifier, without its logits.

    The value and gradients of

    .. code-block:: python

      noisy_softmax_cross_entropy(features @ kernel, labels, rng, alpha,
                                  amplitude=target_amplitude(features, kernel, labels), ...)

    (the same noise for the same key), computed block by block over the classes so that
    no ``[batch, classes]`` array exists, forward or backward:

    .. math::
      \ell = \log\Big(e^{\tilde f_y} + \sum_{j \ne y} e^{x^\top W_j}\Big) - \tilde f_y,
      \qquad \tilde f_y = f_y - \alpha |\xi| (\|W_y\|\|x\| - f_y).

    Each block of ``chunk_size`` classes contributes to a running maximum and sum of
    exponentials; the target column is replaced by :math:`\tilde f_y`. The backward pass
    recomputes each block's logits (about 4/3 of the materialised loss's matmul work),
    writes each block of the kernel's gradient once, and accumulates the features'
    gradient in float32 (float64 for float64 inputs). Temporary memory grows with
    ``batch * chunk_size``, not with the number of classes.

    With ``mesh`` and ``class_axis`` the kernel's classes are split over that mesh axis
    (``jax.shard_map``); ``features`` and ``labels`` are split over the mesh's other axes
    (data parallelism) and replicated over ``class_axis``. The shards combine their
    maxima, sums and target terms with collectives of size ``[batch]``; the backward pass
    adds one ``[batch, dim]`` reduction over ``class_axis`` (and the usual reduction of the
    kernel's gradient over the data axes).

    A ``[classes, dim]`` kernel (``kernel_layout="classes_features"``: Equinox's
    ``eqx.nn.Linear.weight``, PyTorch's ``nn.Linear.weight``, InsightFace's class centres) is
    read in blocks of rows as it is stored, and its gradient written back in the same layout,
    so it is never transposed whole; with a mesh its rows are split over ``class_axis``.

    Reverse mode only: ``jax.grad``, ``jax.vjp`` and ``jax.value_and_grad`` work, and so
    does forward-over-reverse (``jax.hessian``), but forward mode (``jax.jvp``,
    ``jax.jacfwd``, ``jax.linearize``) does not: the loss is a ``jax.custom_vjp``, whose
    backward pass recomputes each block of logits (a forward-mode rule that JAX could also
    transpose would have to store them). Applied around the call, forward mode raises a
    ``TypeError`` that names the materialised loss,
    ``noisy_softmax_cross_entropy(features @ kernel, ..., amplitude=target_amplitude(...))``,
    which has every mode; around a ``jax.jit`` that contains the call, JAX's own
    custom_vjp error is raised instead. ``jax.vmap`` works, and draws the noise as the
    materialised loss does.

    Args:
      features: Inputs of the classifier, shape ``[batch, dim]``, floating.
      kernel: Class weights, shape ``[dim, classes]`` (the default layout, Flax's ``Dense``,
        the ``kernel`` of :class:`noisy_softmax_jax.NoisySoftmaxHead`) or ``[classes, dim]``
        (``kernel_layout="classes_features"``). A kernel in the other layout is an error
        naming the fix, unless it is square; see :func:`noisy_softmax_jax.target_amplitude`.
      labels: Integer class indices in ``[0, classes)``, shape ``[batch]``. A label that
        ``where`` masks out may be anything (padding such as -1); an unmasked one out of
        range raises eagerly (where its value is on the host) and gives NaN under ``jit``.
      rng: A PRNG key; the same key gives the same noise as the materialised loss. None:
        no noise, the plain cross-entropy of ``features @ kernel``, as with ``alpha = 0``.
      alpha: Non-negative noise scale, traced (changing it does not recompile).
      noise: ``"annealed"`` (the paper's method), ``"amplitude"`` or ``"free"``.
      sigma: Non-negative standard deviation of :math:`\xi`.
      where: Optional boolean mask ``[batch]``; masked examples give 0 and no gradient,
        whatever their label.
      shared_noise: One :math:`\xi` for the whole batch instead of one per example.
      negative: Raise the target logit instead (the paper's ablation).
      chunk_size: Classes per block. Default: about 2**21 / batch, a multiple of 128.
      mesh: A ``jax.sharding.Mesh`` to split the classes over; needs ``class_axis``.
      class_axis: The mesh axis that splits the classes; ``classes`` must be divisible
        by its size, and ``batch`` by the size of the other axes.
      kernel_layout: ``"features_classes"`` (default) or ``"classes_features"``.
      dtype: The matmul's dtype (default: the promoted dtype of ``features`` and ``kernel``).
        ``features`` and each block of ``kernel`` are cast to it inside the loop, so a
        float32 kernel multiplied in bfloat16 is never copied whole (temporaries stay
        ``batch * chunk_size`` sized) and the norms are those of the cast values. Half
        precision accumulates in float32; the gradients have the inputs' dtypes.

    Returns:
      Per-example losses, shape ``[batch]``; float32 for a half-precision matmul, else its
      dtype.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import fused_noisy_softmax_cross_entropy
      >>> features = jnp.array([[1.0, 2.0], [0.5, -1.0]])
      >>> kernel = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])  # [dim, classes]
      >>> loss = fused_noisy_softmax_cross_entropy(
      ...     features, kernel, jnp.array([1, 0]), jax.random.key(0), 0.1, chunk_size=2)
      >>> loss.shape
      (2,)

      Equinox or PyTorch-style weights, ``[classes, dim]``, give the same loss:

      >>> weight = kernel.T  # e.g. eqx.nn.Linear(2, 3, use_bias=False, key=key).weight
      >>> same = fused_noisy_softmax_cross_entropy(
      ...     features, weight, jnp.array([1, 0]), jax.random.key(0), 0.1, chunk_size=2,
      ...     kernel_layout="classes_features")
      >>> bool(jnp.allclose(same, loss))
      True

    References:
      Chen, Deng & Du, `Noisy Softmax <https://arxiv.org/abs/1708.03769>`_, CVPR 2017;
      Wijmans et al., `Cut Your Losses in Large-Vocabulary Language Models
      <https://arxiv.org/abs/2411.09009>`_, 2024 (blockwise cross-entropy);
      An et al., `Partial FC <https://arxiv.org/abs/2203.15565>`_, CVPR 2022 (class-sharded
      softmax).
    """
    arguments, config = _check_arguments(
        features, kernel, labels, rng, alpha, noise=noise, sigma=sigma, where=where,
        shared_noise=shared_noise, negative=negative, chunk_size=chunk_size, mesh=mesh,
        class_axis=class_axis, kernel_layout=kernel_layout, dtype=dtype)
    return _reverse_mode_only("fused_noisy_softmax_cross_entropy",
                              functools.partial(_loss, config=config), arguments)


def _check_blocks(features, kernel, *, kernel_layout, chunk_size, mesh, class_axis,
                  dtype=None) -> tuple[jax.Array, jax.Array, _Config]:
    """Checks what the loss and fused_top_k share; returns the arrays and the blocks' config."""
    features = _validation.check_floating("features", features, "of shape [batch, dim]")
    if features.ndim != 2:
        raise ValueError(f"`features` must have shape [batch, dim]; got shape {features.shape}.")
    # The layout's name and the kernel's shape, with target_amplitude's errors.
    features, kernel, class_dim = checked_kernel(features, kernel, kernel_layout)
    if kernel.shape[class_dim] < 1:
        raise ValueError(
            f"`kernel` must have at least one class (kernel.shape[{class_dim}] >= 1).")
    batch, num_classes = features.shape[0], kernel.shape[class_dim]
    batch_axes = _check_sharding(mesh, class_axis, batch, num_classes, class_dim)
    shards = 1 if mesh is None else mesh.shape[class_axis]
    config = _Config(chunk_size=_check_chunk_size(chunk_size, batch, num_classes // shards),
                     mesh=mesh, class_axis=class_axis, batch_axes=batch_axes,
                     kernel_class_dim=class_dim,
                     matmul_dtype=_check_matmul_dtype(dtype, features, kernel))
    return features, kernel, config


def _check_matmul_dtype(dtype, features, kernel) -> np.dtype:
    if dtype is None:
        return np.dtype(jnp.result_type(features, kernel))
    try:
        dtype = np.dtype(jnp.dtype(dtype))
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            "`dtype` must be a floating dtype, the matmul's (jnp.bfloat16, jnp.float16, "
            f"jnp.float32, jnp.float64), or None for that of the inputs; got {dtype!r}.")
    return dtype


def _check_arguments(features, kernel, labels, rng, alpha, *, noise, sigma, where,
                     shared_noise, negative, chunk_size, mesh, class_axis, kernel_layout, dtype):
    """Validates and converts the arguments shared by the checked and unchecked loss."""
    features, kernel, config = _check_blocks(features, kernel, kernel_layout=kernel_layout,
                                             chunk_size=chunk_size, mesh=mesh,
                                             class_axis=class_axis, dtype=dtype)
    batch, num_classes = features.shape[0], kernel.shape[config.kernel_class_dim]
    kept = None
    if where is not None:
        where, kept = _validation.check_where(where, None, (batch,))
    # A masked label may be anything (padding); with the mask's values unknown, none is checked.
    labels = _check_labels(labels, batch, num_classes, examples=kept,
                           check_values=where is None or kept is not None)
    rng, alpha, sigma, drawn = _validation.check_noise_scale(rng, alpha, sigma)
    _validation.check_noise(noise, amplitude=True)  # the amplitude is computed here
    config = config._replace(noise=noise if drawn else None, shared_noise=bool(shared_noise),
                             negative=bool(negative))
    return (features, kernel, labels, rng if drawn else None, alpha, sigma, where), config


def _value_checks(features, kernel, labels, alpha, sigma, where, *, num_classes):
    """The checks of the checked variant, on the inputs only: the loss is computed beside
    them, not inside `checkify` (which fails to differentiate the custom_vjp)."""
    out_of_range = ~_labels.in_range(labels, num_classes)
    if where is not None:
        out_of_range = out_of_range & where  # masked labels may be padding
    checkify.check(
        ~jnp.any(out_of_range),
        "`labels` must lie in [0, {num_classes}); found label {label}.",
        num_classes=jnp.asarray(num_classes),
        label=labels[jnp.argmax(out_of_range)] if labels.size else jnp.asarray(0))
    for name, x in (("features", features), ("kernel", kernel)):
        checkify.check(jnp.all(jnp.isfinite(x)), f"`{name}` contains NaN or infinity.")
    for name, x in (("alpha", alpha), ("sigma", sigma)):
        checkify.check(x >= 0, f"`{name}` must be >= 0; got {{value}}.", value=x)
        checkify.check(jnp.isfinite(x), f"`{name}` must be finite; got {{value}}.", value=x)


_checked_values = jax.jit(checkify.checkify(_value_checks, errors=checkify.user_checks),
                          static_argnames=("num_classes",))


def _checked_loss(features, kernel, labels, rng, alpha, sigma, where, *, config):
    error, _ = _checked_values(features, kernel, labels, alpha, sigma, where,
                               num_classes=kernel.shape[config.kernel_class_dim])
    return error, _loss(features, kernel, labels, rng, alpha, sigma, where, config=config)


def checked_fused_noisy_softmax_cross_entropy(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array | None,
    alpha: jax.typing.ArrayLike,
    *,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    where: jax.typing.ArrayLike | None = None,
    shared_noise: bool = False,
    negative: bool = False,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    class_axis: str | None = None,
    kernel_layout: KernelLayout = "features_classes",
    dtype: jax.typing.DTypeLike | None = None,
) -> tuple[checkify.Error, jax.Array]:
    """:func:`fused_noisy_softmax_cross_entropy` with value checks that work under ``jax.jit``.

    Reports labels outside ``[0, classes)`` (except where ``where`` masks their example
    out), non-finite ``features`` or ``kernel`` and a negative or infinite ``alpha`` or
    ``sigma`` through ``jax.experimental.checkify``, as
    :func:`noisy_softmax_jax.checked_noisy_softmax_cross_entropy` does for the materialised
    loss. It costs one read of the kernel for the finiteness check. The checks run beside
    the loss, which is differentiated as the unchecked one is.

    Args:
      As in :func:`fused_noisy_softmax_cross_entropy` (``dtype`` included).

    Returns:
      ``(error, loss)``: a ``checkify.Error`` (``error.throw()`` outside ``jit`` raises it)
      and the per-example losses.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import checked_fused_noisy_softmax_cross_entropy
      >>> step = jax.jit(lambda labels: checked_fused_noisy_softmax_cross_entropy(
      ...     jnp.ones((2, 4)), jnp.ones((4, 3)), labels, jax.random.key(0), 0.1))
      >>> error, loss = step(jnp.array([0, 7]))
      >>> print(error.get())
      `labels` must lie in [0, 3); found label 7. ...
    """
    arguments, config = _check_arguments(
        features, kernel, labels, rng, alpha, noise=noise, sigma=sigma, where=where,
        shared_noise=shared_noise, negative=negative, chunk_size=chunk_size, mesh=mesh,
        class_axis=class_axis, kernel_layout=kernel_layout, dtype=dtype)
    return _reverse_mode_only("checked_fused_noisy_softmax_cross_entropy",
                              functools.partial(_checked_loss, config=config), arguments)
