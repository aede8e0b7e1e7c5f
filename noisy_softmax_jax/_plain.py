r"""The noisy softmax cross-entropy as defined by the paper (Eq. 5 and 6), in plain JAX.

.. math::
  \tilde f_y = f_y - \alpha\,\sigma\,|\xi|\; s, \qquad \xi \sim \mathcal{N}(0, 1),
  \qquad s = \max(a - f_y, 0),\ \max(a, 0)\ \text{or}\ 1,

  \ell = \operatorname{logsumexp}(f \text{ with } f_y \text{ replaced by } \tilde f_y) - \tilde f_y,

with :math:`a = \|W_y\|\|x\|` the amplitude and :math:`s` the factor of the ``"annealed"``
(the paper's), ``"amplitude"`` and ``"free"`` noise. This module is the reference:
:func:`noisy_softmax_jax.noisy_logits` is `noisy_logits` below, and
:func:`noisy_softmax_jax.noisy_softmax_cross_entropy` computes `cross_entropy` below through
the fused fast path of ``_fused.py``, which ``tests/test_loss_paths.py`` pins to it (values and
gradients). Half-precision logits are computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _noise


def compute_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
    """bfloat16 and float16 are computed in float32; float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def noisy_target_logit(target_logit: jax.Array, rng: jax.Array, alpha: jax.Array,
                       sigma: jax.Array, amplitude: jax.Array | None, *, noise: str,
                       shared_noise: bool, negative: bool) -> jax.Array:
    """f~_y from f_y, shape ``[...]``; inputs already checked and in the compute dtype."""
    dtype = target_logit.dtype
    shape = () if shared_noise else target_logit.shape
    # xi is a sampled constant: no gradient reaches alpha, sigma or the key. Computed once,
    # else XLA redoes the hash and erfinv in every [..., classes] kernel that reads xi.
    xi = _noise.computed_once(_noise.standard_normal(rng, shape, dtype))
    magnitude = jnp.asarray(alpha, dtype) * jnp.asarray(sigma, dtype) * jnp.abs(xi)
    if noise == "annealed":
        # a - f_y = ||W_y|| ||x|| (1 - cos theta) >= 0, but it can round to a tiny negative
        # value when x is aligned with W_y: clamped, so the noise never raises the target.
        gap = jnp.asarray(amplitude, dtype) - target_logit
        scale = jnp.where(gap > 0, gap, jnp.zeros_like(gap))
    elif noise == "amplitude":
        amplitude = jnp.asarray(amplitude, dtype)
        scale = jnp.where(amplitude > 0, amplitude, jnp.zeros_like(amplitude))
    else:  # "free"
        scale = jnp.ones_like(target_logit)
    injected = magnitude * scale
    return target_logit + injected if negative else target_logit - injected


def noisy_logits(logits: jax.Array, labels: jax.Array, rng: jax.Array, alpha: jax.Array,
                 sigma: jax.Array, amplitude: jax.Array | None, *, noise: str,
                 shared_noise: bool, negative: bool, axis: int = -1
                 ) -> tuple[jax.Array, jax.Array]:
    """The logits with the target entry along `axis` replaced by f~_y, and f~_y."""
    logits = logits.astype(compute_dtype(logits.dtype))
    target = jnp.take_along_axis(logits, jnp.expand_dims(labels, axis), axis=axis)
    noisy_target = noisy_target_logit(
        jnp.squeeze(target, axis), rng, alpha, sigma, amplitude,
        noise=noise, shared_noise=shared_noise, negative=negative)
    # Class indices in int32, not the labels' dtype: uint8 labels must not wrap at 256.
    is_target = jnp.expand_dims(labels, axis) == jax.lax.broadcasted_iota(
        jnp.int32, logits.shape, axis % logits.ndim)
    return jnp.where(is_target, jnp.expand_dims(noisy_target, axis), logits), noisy_target


def cross_entropy(logits: jax.Array, labels: jax.Array, rng: jax.Array, alpha: jax.Array,
                  sigma: jax.Array, amplitude: jax.Array | None, where: jax.Array | None = None,
                  *, noise: str, shared_noise: bool, negative: bool, axis: int = -1
                  ) -> jax.Array:
    """Per-example noisy softmax cross-entropy, shape ``[...]``; masked examples give 0."""
    perturbed, noisy_target = noisy_logits(
        logits, labels, rng, alpha, sigma, amplitude,
        noise=noise, shared_noise=shared_noise, negative=negative, axis=axis)
    loss = jax.nn.logsumexp(perturbed, axis=axis) - noisy_target
    return loss if where is None else jnp.where(where, loss, jnp.zeros_like(loss))
