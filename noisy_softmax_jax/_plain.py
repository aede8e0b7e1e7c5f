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
gradients), or, with a mask of the logits' shape, through `cross_entropy` itself.
Half-precision logits are computed in float32. ``noise=None`` draws nothing: the plain
cross-entropy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _labels, _margin, _noise


def compute_dtype(dtype: jax.typing.DTypeLike) -> jnp.dtype:
    """bfloat16 and float16 are computed in float32; float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def noisy_target_logit(target_logit: jax.Array, rng: jax.Array | None, alpha: jax.Array,
                       sigma: jax.Array, amplitude: jax.Array | None, *, noise: str | None,
                       shared_noise: bool, negative: bool, margin: str | None = None,
                       margin_value: jax.Array | None = None) -> jax.Array:
    """f~_y from f_y, shape ``[...]``; inputs already checked and in the compute dtype.

    With a `margin` (cosine logits, whose `amplitude` is the scale s), the margin goes on
    after the noise: the annealing factor stays s (1 - cos theta_y), which fades.
    """
    noisy = _noisy(target_logit, rng, alpha, sigma, amplitude, noise=noise,
                   shared_noise=shared_noise, negative=negative)
    if margin is None:
        return noisy
    assert amplitude is not None and margin_value is not None  # a margin's scale and value
    return _margin.margin_target(noisy, amplitude, margin_value, margin=margin)


def _noisy(target_logit, rng, alpha, sigma, amplitude, *, noise, shared_noise, negative):
    if noise is None:  # nothing is drawn (no key, or alpha known to be 0)
        return target_logit
    dtype = target_logit.dtype
    # xi is a sampled constant: no gradient reaches alpha, sigma or the key. Computed once,
    # else XLA redoes the hash and erfinv in every [..., classes] kernel that reads xi. Per
    # example, the draw knows which axes `jax.vmap` maps (`per_example_normal`).
    if shared_noise:
        xi = jax.random.normal(rng, (), dtype)
    else:
        xi = _noise.per_example_normal(rng, jax.lax.stop_gradient(target_logit))
    xi = _noise.computed_once(xi)
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


def noisy_logits(logits: jax.Array, labels: jax.Array, rng: jax.Array | None, alpha: jax.Array,
                 sigma: jax.Array, amplitude: jax.Array | None, *, noise: str | None,
                 shared_noise: bool, negative: bool, axis: int = -1, margin: str | None = None,
                 margin_value: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The logits with the target entry along `axis` replaced by f~_y, and f~_y.

    `labels` must lie in ``[0, logits.shape[axis])`` (see ``_labels.safe``).
    """
    logits = logits.astype(compute_dtype(logits.dtype))
    axis = axis % logits.ndim
    target = jnp.take_along_axis(logits, jnp.expand_dims(labels, axis), axis=axis)
    noisy_target = noisy_target_logit(
        jnp.squeeze(target, axis), rng, alpha, sigma, amplitude, noise=noise,
        shared_noise=shared_noise, negative=negative, margin=margin, margin_value=margin_value)
    is_target = jnp.moveaxis(_labels.is_target(labels, logits.shape[axis]), -1, axis)
    return jnp.where(is_target, jnp.expand_dims(noisy_target, axis), logits), noisy_target


def cross_entropy(logits: jax.Array, labels: jax.Array, rng: jax.Array | None, alpha: jax.Array,
                  sigma: jax.Array, amplitude: jax.Array | None, where: jax.Array | None = None,
                  *, noise: str | None, shared_noise: bool, negative: bool, axis: int = -1
                  ) -> jax.Array:
    """Per-example noisy softmax cross-entropy, shape ``[...]``.

    `where` as in Optax: of the labels' shape, masked examples give 0; of the logits' shape,
    masked classes leave the normalizer (the target's noisy logit is still subtracted) and
    an example with no class left gives 0.
    """
    perturbed, noisy_target = noisy_logits(
        logits, labels, rng, alpha, sigma, amplitude,
        noise=noise, shared_noise=shared_noise, negative=negative, axis=axis)
    per_logit = where is not None and where.ndim == logits.ndim
    log_normalizer = jax.nn.logsumexp(perturbed, axis=axis, where=where if per_logit else None)
    loss = log_normalizer - noisy_target
    if where is None:
        return loss
    kept = jnp.any(where, axis=axis) if per_logit else where
    return jnp.where(kept, loss, jnp.zeros_like(loss))
