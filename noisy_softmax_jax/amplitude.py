"""The amplitude ||W_y|| * ||x|| that the noisy softmax scales its noise by.

For users who own their class weights (NNX, Equinox, plain JAX); Flax Linen
users get the same numbers from :class:`noisy_softmax_jax.NoisySoftmaxHead`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _validation

__all__ = ["safe_norm", "target_amplitude"]


def safe_norm(x: jax.typing.ArrayLike, axis: int = -1) -> jax.Array:
    """Euclidean norm along ``axis`` whose gradient at zero is 0, not NaN.

    ``jnp.linalg.norm`` has a NaN gradient at the zero vector. A ReLU feature
    vector can be exactly zero, and a network escaping too large a noise drives
    its features there, so the noisy softmax needs a norm that stays finite.
    Computed in at least float32.

    Args:
      x: Input array.
      axis: The axis to reduce.

    Returns:
      ``||x||`` along ``axis``.
    """
    x = jnp.asarray(x)
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    squared = jnp.sum(x * x, axis=axis)
    positive = squared > 0
    # The inner where keeps sqrt's infinite derivative at 0 out of the backward pass.
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def target_amplitude(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
) -> jax.Array:
    r"""Computes the per-example amplitude :math:`\|W_{y}\| \|x\|`.

    For a bias-free linear classifier ``logits = features @ kernel`` this is
    the ``amplitude`` argument of
    :func:`noisy_softmax_jax.noisy_softmax_cross_entropy`: the largest value
    the target logit :math:`f_y = \|W_y\|\|x\|\cos\theta_y` can take. Gradients
    flow to both ``features`` and ``kernel``, as the paper's derivation
    requires; the norms have a zero (not NaN) gradient at zero.

    Args:
      features: The classifier's input, shape ``[..., num_features]``.
      kernel: Class weights, shape ``[num_features, num_classes]`` (Flax's
        ``Dense`` layout: column ``j`` is :math:`W_j`).
      labels: Integer class indices, shape ``[...]``.

    Returns:
      Amplitudes, shape ``[...]``, in at least float32.

    Examples:
      >>> import jax.numpy as jnp
      >>> from noisy_softmax_jax import target_amplitude
      >>> features = jnp.array([[3.0, 4.0]])
      >>> kernel = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> target_amplitude(features, kernel, jnp.array([1]))
      Array([10.], dtype=float32)
    """
    features = _validation.check_floating("features", features, "of shape [..., num_features]")
    kernel = _validation.check_floating("kernel", kernel, "of shape [num_features, num_classes]")
    if kernel.ndim != 2 or features.ndim < 1 or kernel.shape[0] != features.shape[-1]:
        raise ValueError(
            "`kernel` must have shape [num_features, num_classes] with num_features = "
            f"features.shape[-1]; got features.shape = {features.shape}, "
            f"kernel.shape = {kernel.shape}."
        )
    class_logits = jnp.zeros(features.shape[:-1] + (kernel.shape[1],), features.dtype)
    labels = _validation.check_labels(labels, class_logits)
    return safe_norm(features, axis=-1) * safe_norm(kernel, axis=0)[labels]
