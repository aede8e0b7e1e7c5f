"""The fast path of the noisy softmax cross-entropy: `_plain.cross_entropy`, fused.

The same function as the plain definition in ``_plain.py`` (``tests/test_loss_paths.py`` pins
values and gradients), written so that a training step costs what Optax's integer-label loss
costs: no one-hot array, no noisy copy of the logits, no select materialized before a
reduction, one exponential per element on CPU. Everything here is about how XLA compiles it,
mostly XLA:CPU; the math is in ``_plain.py``. The class axis is the last one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _labels, _noise
from noisy_softmax_jax._plain import compute_dtype, noisy_target_logit


def _is_target(logits, labels):
    return _labels.is_target(labels, logits.shape[-1])


def _noisy_logits(logits, labels, noisy_target):
    """The logits with the target column replaced by the noisy target, the others untouched.

    The same values as ``jnp.where(labels == column, noisy_target, logits)``, bit for bit,
    infinities and NaN included, but written with min/max against +-inf: XLA:CPU fuses this
    form into its reduction kernels, where it would first write a select out to memory.
    """
    if logits.shape[-1] > 2**24:  # column indices would no longer be exact in float32
        return jnp.where(_is_target(logits, labels), noisy_target[..., None], logits)
    columns = _labels.class_indices(logits.shape[-1], dtype=logits.dtype)
    distance = jnp.abs(columns - labels[..., None].astype(logits.dtype))
    off_target = (distance - 0.5) * jnp.inf  # +inf off the target column, -inf on it
    return jnp.maximum(jnp.minimum(logits, off_target),
                       jnp.minimum(noisy_target[..., None], -off_target))


def _put_target(x, labels, values):
    """`x` with each example's label column set to its value: a scatter of one value per
    example, with the leading axes as batch dimensions. (``jnp.put_along_axis`` builds
    explicit (example, label) index pairs instead, which a batch sharded over devices
    all-gathers first.)"""
    batch = tuple(range(x.ndim - 1))
    numbers = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(x.ndim - 1,),
        scatter_dims_to_operand_dims=(x.ndim - 1,), operand_batching_dims=batch,
        scatter_indices_batching_dims=batch)
    return jax.lax.scatter(x, labels[..., None], values, numbers, indices_are_sorted=True,
                           unique_indices=True, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


# How far (in nats) the noise may push a target that is the largest logit below that
# logit before the shortcut in `_log_normalizer_shift` falls back to the exact maximum.
_MAX_SHIFT_GAP = 30.0


def _log_normalizer_shift(logits, labels, target_logit, noisy_target, exact):
    """A per-example shift m for logsumexp(noisy_logits) = m + log(sum(exp(noisy_logits - m))).

    `exact`: the maximum of the noisy logits, the larger of the noisy target and the largest
    of the other logits, from one reduction with the target column left out. It branches on
    nothing, so a batch sharded over devices needs no collective, and on accelerators the
    select fuses into the reduction, which reads the logits once as a plain maximum would.

    Not `exact` (XLA:CPU on one device, where that select costs as much again as the plain
    maximum, a third of the forward pass): the largest logit and the noisy target give the
    maximum exactly unless the target is the largest logit and the noise lowered it. Then
    the largest logit is still a safe shift as long as the noisy target is within
    _MAX_SHIFT_GAP of it: the sum keeps a term >= exp(-30). Rows beyond that gap (noise of
    more than 30 nats on a dominant target) get the exact maximum from one more pass, run
    only when such a row exists: a branch on the whole batch, which is why it is kept to a
    single device.

    Either way the shift is the plain maximum of the logits when alpha = 0, as in
    `jax.nn.logsumexp` (Optax's bits). `logits` may be in half precision (the maximum is
    exact in any dtype); the rest is in the compute dtype.
    """
    dtype = noisy_target.dtype
    if exact:
        others = jnp.max(jnp.where(_is_target(logits, labels), -jnp.inf, logits), axis=-1)
        shift = jnp.maximum(others.astype(dtype), noisy_target)
    else:
        largest = jnp.max(logits, axis=-1).astype(dtype)
        shift = jnp.maximum(largest, noisy_target)
        far = (target_logit >= largest) & (noisy_target < shift - _MAX_SHIFT_GAP)

        def exact_where_far():
            noisy_logits = _noisy_logits(logits.astype(dtype), labels, noisy_target)
            return jnp.where(far, jnp.max(noisy_logits, axis=-1), shift)

        shift = jax.lax.cond(jnp.any(far), exact_where_far, lambda: shift)
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0))


# The loss, per example and unmasked, as a `jax.custom_jvp`. Its value is the plain
# definition, logsumexp of the noisy logits minus the noisy target, computed with the
# operations of Optax's loss (alpha = 0 gives Optax's bits). Its derivative
#
#   d loss = sum_j (p~_j - [j = y]) d n_j + (p~_y - 1) (d f~_y through alpha, sigma, amplitude)
#   d n_j  = d f_j for j != y,   d n_y = (d f~_y / d f_y) d f_y,
#
# with n the noisy logits and p~ = softmax(n), is written so that, transposed for reverse
# mode, the gradient of the logits costs what Optax's does: no one-hot array, no select
# materialized before a reduction, no scatter into a fresh zero array, and the amplitude's
# gradient is a per-example product. A custom JVP rather than a custom VJP keeps forward
# mode, `jax.hessian` and higher orders working.
#
# `keep_exponentials` picks how p~ reaches the backward pass:
# - True (CPU): exp(logits - shift) is written once (the target column then overwritten in
#   place), summed, and scaled in place into the gradient, which takes over its buffer: one
#   exponential per element and the same passes as XLA makes of Optax's loss. For
#   half-precision logits the gradient is written in one pass straight from the float32
#   exponentials (one float32 array kept; Optax keeps two).
# - False (accelerators): nothing [..., classes] is kept; the sum of exponentials is fused
#   into one read of the logits and the backward pass recomputes exp(n - logsumexp(n))
#   while it writes the gradient: three reads and one write, where memory, not exp, is
#   the cost.
@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8, 9, 10))
def _noisy_cross_entropy(logits, labels, rng, alpha, sigma, amplitude, noise, shared_noise,
                         negative, keep_exponentials, exact_shift):
    del keep_exponentials  # the plain forward pass never keeps them
    dtype = compute_dtype(logits.dtype)
    target_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(dtype)
    noisy_target = noisy_target_logit(
        target_logit, rng, alpha, sigma, amplitude,
        noise=noise, shared_noise=shared_noise, negative=negative)
    shift = _log_normalizer_shift(logits, labels, target_logit, noisy_target, exact_shift)
    noisy_logits = _noisy_logits(logits.astype(dtype), labels, noisy_target)
    total = jnp.sum(jnp.exp(noisy_logits - shift[..., None]), axis=-1)
    return (jnp.log(total) + shift) - noisy_target


@_noisy_cross_entropy.defjvp
def _noisy_cross_entropy_jvp(noise, shared_noise, negative, keep_exponentials, exact_shift,
                             primals, tangents):
    logits, labels, rng, alpha, sigma, amplitude = primals
    d_logits, _, _, d_alpha, d_sigma, d_amplitude = tangents
    # Half-precision logits come in as they are and are widened where they are read, so
    # that no float32 copy of them is written out.
    dtype = compute_dtype(logits.dtype)
    half_precision = logits.dtype != dtype
    d_logits = d_logits.astype(dtype)
    target_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(dtype)

    def noisy_target_of(target_logit, alpha, sigma, amplitude):
        return noisy_target_logit(target_logit, rng, alpha, sigma, amplitude,
                                  noise=noise, shared_noise=shared_noise, negative=negative)

    # f~_y depends on each example's own f_y and amplitude only, so its derivative in f_y is
    # the per-example slope that one JVP with a tangent of ones returns.
    noisy_target, slope = jax.jvp(
        lambda t: noisy_target_of(t, alpha, sigma, amplitude),
        (target_logit,), (jnp.ones_like(target_logit),))
    _, d_noisy_target_rest = jax.jvp(
        lambda a, s, amp: noisy_target_of(target_logit, a, s, amp),
        (alpha, sigma, amplitude), (d_alpha, d_sigma, d_amplitude))
    slope = _noise.computed_once(slope)
    is_target = _is_target(logits, labels)
    shift = _log_normalizer_shift(logits, labels, target_logit, noisy_target, exact_shift)
    logits = logits.astype(dtype)
    if keep_exponentials:
        # exp(logits - shift) with the target column then overwritten in place by
        # exp(f~_y - shift): the [..., classes] loops are exactly Optax's, and the target
        # column costs one scatter of a value per example.
        target_exponential = jnp.exp(noisy_target - shift)
        exponentials = _put_target(jnp.exp(logits - shift[..., None]), labels,
                                   target_exponential)
        total = jnp.sum(exponentials, axis=-1)
        log_normalizer = jnp.log(total) + shift
        inverse_total = 1 / total
        probs = exponentials * inverse_total[..., None]
        target_prob = target_exponential * inverse_total
        # d loss / d logits is p~ everywhere but on the target column, where it is
        # (p~_y - 1) d f~_y / d f_y.
        if half_precision:
            # One pass that writes the half-precision gradient directly. The target column's
            # value is a per-example product selected in that pass (probs there is
            # target_prob, bit for bit): written as (probs - 1) * slope over the whole
            # array, XLA may materialize that product as a float32 [..., classes] array.
            target_gradient = (target_prob - 1) * slope
            d_loss_d_logits = jnp.where(is_target, target_gradient[..., None], probs)
            d_loss = jnp.sum(d_loss_d_logits * d_logits, axis=-1)
        else:
            # p~ plus a per-example correction at the label, which reverse mode adds in
            # place (the transpose of a gather), as in Optax's loss.
            d_target = jnp.take_along_axis(d_logits, labels[..., None], axis=-1)[..., 0]
            d_loss = (jnp.sum(probs * d_logits, axis=-1)
                      + ((target_prob - 1) * slope - target_prob) * d_target)
    else:
        total = jnp.sum(jnp.exp(_noisy_logits(logits, labels, noisy_target) - shift[..., None]),
                        axis=-1)
        log_normalizer = jnp.log(total) + shift
        target_prob = jnp.exp(noisy_target - log_normalizer)
        probs = jnp.exp(jnp.where(is_target, noisy_target[..., None], logits)
                        - log_normalizer[..., None])
        # d loss / d logits: p~ off the target, (p~_y - 1) d f~_y / d f_y on it, in one
        # elementwise pass (the target's value per example: probs there is target_prob).
        d_loss_d_logits = jnp.where(is_target, ((target_prob - 1) * slope)[..., None], probs)
        d_loss = jnp.sum(d_loss_d_logits * d_logits, axis=-1)
    loss = log_normalizer - noisy_target
    d_loss = d_loss + (target_prob - 1) * d_noisy_target_rest
    return loss, d_loss


def cross_entropy(logits: jax.Array, labels: jax.Array, rng: jax.Array | None,
                  alpha: jax.Array, sigma: jax.Array, amplitude: jax.Array | None, *,
                  noise: str | None, shared_noise: bool, negative: bool) -> jax.Array:
    """`_plain.cross_entropy` without `where`, class axis last, labels in range; alpha and
    sigma in the compute dtype. Keeps the exponentials for the backward pass on CPU only
    (see above), and takes the exact shift, which needs no branch, unless it runs on XLA:CPU
    with a single device (see `_log_normalizer_shift`)."""
    keep_exponentials = jax.default_backend() == "cpu"
    exact_shift = not keep_exponentials or jax.device_count() > 1
    return _noisy_cross_entropy(logits, labels, rng, alpha, sigma, amplitude,
                                noise, shared_noise, negative, keep_exponentials, exact_shift)
