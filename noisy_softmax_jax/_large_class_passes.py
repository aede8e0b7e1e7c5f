"""The fused loss's two passes over the blocks of classes, per shard and over all shards.

The forward pass reduces every block to what the loss needs per example (a running logsumexp
of the logits other than the target's, the target logit and its class weight's norm); the
backward pass recomputes each block's logits and writes that block of the kernel's gradient.
The per-example part in between (the noise, a margin) and the ``jax.custom_vjp`` that joins
the passes are in ``large_class.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _blocks, _labels
from noisy_softmax_jax._blocks import Config


def _forward_shard(features, kernel, local_labels, config: Config, dtype):
    """One shard's pass over its classes: what the loss needs of them, per example.

    Returns the running maximum and sum of exponentials of the logits other than the
    target's, and the target logit f_y and ||W_y|| (zero where this shard does not own the
    label). The target column is left out of the sum because the loss replaces its logit by
    the noisy one, which needs f_y and ||W_y|| from every block first.
    """
    batch = features.shape[0]

    def body(carry, block, start):
        maximum, total, target_logit, class_norm = carry
        logits, _ = _blocks.block_logits(features, block, config, dtype)
        is_target = _labels.is_target(local_labels, block.shape[config.kernel_class_dim],
                                      start=start)
        zero = jnp.zeros((), dtype)
        # The target's logit is read off the same matmul, so it is the materialised
        # computation's f_y to the bit.
        target_logit = target_logit + jnp.sum(jnp.where(is_target, logits, zero), axis=-1)
        class_norm = class_norm + jnp.sum(
            jnp.where(is_target, _blocks.class_norms(block, config, dtype)[None, :], zero),
            axis=-1)
        others = jnp.where(is_target, -jnp.inf, logits)
        new_maximum = jnp.maximum(maximum, jnp.max(others, axis=-1))
        # A row whose logits so far are all -inf keeps total 0 without exp(-inf - -inf).
        shift = jnp.where(jnp.isfinite(new_maximum), new_maximum, zero)
        total = (total * jnp.exp(maximum - shift)
                 + jnp.sum(jnp.exp(others - shift[:, None]), axis=-1))
        return new_maximum, total, target_logit, class_norm

    zeros = jnp.zeros((batch,), dtype)
    carry = (jnp.full((batch,), -jnp.inf, dtype), zeros, zeros, zeros)
    return _blocks.over_blocks(body, carry, kernel, config)


def _backward_shard(features, kernel, local_labels, d_loss, log_normalizer, d_target_logit,
                    d_class_norm_scale, config: Config, dtype):
    """One shard's backward pass: the kernel's gradient block by block, and its share of dx.

    d loss / d f_j = p~_j for every column but the target's, where the gradient goes through
    f~_y instead: d_target_logit (d loss / d f_y) and d_class_norm_scale (d loss / d ||W_y||
    over ||W_y||, since d ||W_y|| / d W_y = W_y / ||W_y||). Both are per-example numbers, so
    each block's gradient is one matmul plus a scaled copy of the block's columns, written
    once.

    Cosine logits f_j = x^T W_j r_j with r_j = 1 / ||W_j||: with g_j = d loss / d f_j, the
    matmuls take g_j r_j, and d r_j / d W_j = -r_j^3 W_j adds -r_j^2 (sum_b g_bj f_bj) W_j
    to column j, a per-class number times the block: the gradient through the per-class
    norm, block by block (it projects W_j's gradient onto the directions orthogonal to W_j).
    """

    def body(carry, block, start):
        d_features, d_kernel = carry
        logits, inverse = _blocks.block_logits(features, block, config, dtype)
        is_target = _labels.is_target(local_labels, block.shape[config.kernel_class_dim],
                                      start=start)
        probs = jnp.exp(logits - log_normalizer[:, None])
        d_logits = jnp.where(is_target, d_target_logit[:, None], d_loss[:, None] * probs)
        column_scale = jnp.sum(
            jnp.where(is_target, d_class_norm_scale[:, None], jnp.zeros((), dtype)), axis=0)
        if inverse is not None:
            d_logits = d_logits * inverse[None, :]
        d_logits = d_logits.astype(config.matmul_dtype)
        # In the block's own layout, [dim, chunk] or [chunk, dim], as the kernel's gradient is.
        d_matmul = _blocks.block_gradient(features, d_logits, config, dtype)
        weights = block.astype(dtype)
        if inverse is not None:
            # sum_b g_bj f_bj = W_j . (sum_b g_bj r_j x_b), the matmul's column j: read off
            # the block's gradient, so no [batch, chunk] array outlives the matmuls.
            column_scale = column_scale - inverse * inverse * jnp.sum(
                weights * d_matmul, axis=1 - config.kernel_class_dim)
        d_block = d_matmul + weights * _blocks.per_class(column_scale, config)
        if config.batch_axes:
            # Data parallelism: each batch shard holds part of every class weight's gradient.
            # Summed block by block, so no partial gradient of the whole kernel shard waits
            # for one all-reduce after the loop (512 MiB at 1M classes on a 2 x 4 mesh).
            d_block = jax.lax.psum(d_block, config.batch_axes)
        d_features = d_features + _blocks.features_gradient(d_logits, block, config, dtype)
        d_kernel = jax.lax.dynamic_update_slice_in_dim(
            d_kernel, d_block.astype(kernel.dtype), start, axis=config.kernel_class_dim)
        return d_features, d_kernel

    carry = (jnp.zeros(features.shape, dtype), jnp.zeros(kernel.shape, kernel.dtype))
    return _blocks.over_blocks(body, carry, kernel, config)


def forward_pass(features, kernel, labels, config: Config, dtype):
    """Per example: logsumexp of the non-target logits, f_y and ||W_y||, over all shards."""

    def shard(features, kernel, labels):
        local_labels = labels.astype(jnp.int32) - _blocks.shard_offset(kernel, config)
        maximum, total, target_logit, class_norm = _forward_shard(
            features, kernel, local_labels, config, dtype)
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
    rows = _blocks.rows_spec(config)
    return _blocks.shard_map(
        shard, config, in_specs=(_blocks.feature_spec(config), _blocks.kernel_spec(config), rows),
        out_specs=(rows, rows, rows), out_like=(labels,) * 3)(features, kernel, labels)


def backward_pass(features, kernel, labels, d_loss, log_normalizer, d_target_logit,
                  d_class_norm_scale, config: Config, dtype):
    """The gradients with respect to features (logits part) and kernel, over all shards."""

    def shard(features, kernel, labels, d_loss, log_normalizer, d_target_logit,
              d_class_norm_scale):
        local_labels = labels.astype(jnp.int32) - _blocks.shard_offset(kernel, config)
        d_features, d_kernel = _backward_shard(
            features, kernel, local_labels, d_loss, log_normalizer, d_target_logit,
            d_class_norm_scale, config, dtype)
        if config.class_axis is not None:
            # The one [batch, dim] reduction of the backward pass.
            d_features = jax.lax.psum(d_features, config.class_axis)
        return d_features, d_kernel

    per_example = (d_loss, log_normalizer, d_target_logit, d_class_norm_scale)
    if config.mesh is None:
        return shard(features, kernel, labels, *per_example)
    rows = _blocks.rows_spec(config)
    features_spec, kernel_spec = _blocks.feature_spec(config), _blocks.kernel_spec(config)
    return _blocks.shard_map(
        shard, config, in_specs=(features_spec, kernel_spec, rows) + (rows,) * 4,
        out_specs=(features_spec, kernel_spec), out_like=(features, kernel),
    )(features, kernel, labels, *per_example)
