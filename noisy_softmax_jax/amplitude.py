"""The amplitude ||W_y|| * ||x|| that the noisy softmax scales its noise by.

For users who own their class weights (Equinox, PyTorch-converted weights,
plain JAX); the Flax heads (:class:`noisy_softmax_jax.NoisySoftmaxHead`,
:class:`noisy_softmax_jax.nnx.NoisySoftmaxHead`) return the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _labels, _plain, _validation
from noisy_softmax_jax._validation import KERNEL_LAYOUTS, KernelLayout

__all__ = ["KERNEL_LAYOUTS", "KernelLayout", "safe_norm", "target_amplitude"]


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
    x = x.astype(_plain.compute_dtype(x.dtype))
    squared = jnp.sum(x * x, axis=axis)
    positive = squared > 0
    # The inner where keeps sqrt's infinite derivative at 0 out of the backward pass.
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def label_amplitude(labels: jax.Array, num_classes: int, where: jax.Array | None,
                    amplitude_of: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """``amplitude_of(labels)``, with the loss's rule for the labels that index no class.

    A label outside ``[0, num_classes)`` is replaced by class 0 before it indexes anything
    (-1 is not the last class); its amplitude is NaN, as its loss is, unless ``where`` masks
    its example out: then 0, with no gradient, as any masked example's loss.
    """
    valid = _labels.in_range(labels, num_classes)
    amplitude = amplitude_of(_labels.safe(labels, valid))
    amplitude = jnp.where(valid, amplitude, jnp.nan)
    if where is not None:
        amplitude = jnp.where(where, amplitude, jnp.zeros_like(amplitude))
    return amplitude


def checked_labels(labels, where, batch_shape: tuple, num_classes: int
                   ) -> tuple[jax.Array, jax.Array | None]:
    """The labels and per-example mask of an amplitude, checked as the loss checks them."""
    return _validation.check_masked_labels(
        labels, where, jax.ShapeDtypeStruct(tuple(batch_shape) + (num_classes,), jnp.float32),
        per_logit=False)


def target_amplitude(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    kernel_layout: KernelLayout = "features_classes",
    where: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    r"""Computes the per-example amplitude :math:`\|W_{y}\| \|x\|`.

    For a bias-free linear classifier with class weights :math:`W_j` (logits
    :math:`f_j = W_j^\top x`) this is the ``amplitude`` argument of
    :func:`noisy_softmax_jax.noisy_softmax_cross_entropy`: the largest value
    the target logit :math:`f_y = \|W_y\|\|x\|\cos\theta_y` can take. Gradients
    flow to both ``features`` and ``kernel``, as the paper's derivation
    requires; the norms have a zero (not NaN) gradient at zero.

    The class weights are read along the axis ``kernel_layout`` names. A
    kernel in the other layout fails with an error saying so, except when
    ``num_features == num_classes``: a square kernel fits both layouts, and
    the wrong one silently gives the norms of the wrong vectors. Pass the
    layout of the library the weights come from.

    Args:
      features: The classifier's input, shape ``[..., num_features]``.
      kernel: Class weights, shape ``[num_features, num_classes]`` (the
        default layout, Flax's ``nn.Dense`` / ``nnx.Linear``: ``logits =
        features @ kernel``) or ``[num_classes, num_features]`` (Equinox's
        ``eqx.nn.Linear.weight``, PyTorch's ``nn.Linear.weight``: ``logits =
        features @ kernel.T``).
      labels: Integer class indices, shape ``[...]``. Labels that index no class follow
        the loss's rule: one that ``where`` masks out may be anything (padding such as -1)
        and gets amplitude 0; an unmasked one raises eagerly (where its value is on the
        host) and gives NaN under ``jit``. None is ever wrapped around (-1 is not the last
        class).
      kernel_layout: ``"features_classes"`` (default) or ``"classes_features"``.
      where: Optional boolean mask of the examples, shape ``[...]``, as given to the loss.

    Returns:
      Amplitudes, shape ``[...]``, in at least float32; 0 where ``where`` is False.

    Examples:
      >>> import jax.numpy as jnp
      >>> from noisy_softmax_jax import target_amplitude
      >>> features = jnp.array([[3.0, 4.0]])
      >>> kernel = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])  # Flax: [2 features, 3 classes]
      >>> target_amplitude(features, kernel, jnp.array([1]))
      Array([10.], dtype=float32)

      Equinox or PyTorch-style weights, ``[classes, features]``:

      >>> weight = kernel.T  # e.g. eqx.nn.Linear(2, 3, use_bias=False, key=key).weight
      >>> target_amplitude(features, weight, jnp.array([1]), kernel_layout="classes_features")
      Array([10.], dtype=float32)

      Padding labels, masked out as for the loss:

      >>> target_amplitude(jnp.ones((2, 2)), kernel, jnp.array([1, -1]),
      ...                  where=jnp.array([True, False]))
      Array([2.828427, 0.      ], dtype=float32)
    """
    features, kernel, class_axis = _validation.check_kernel(features, kernel, kernel_layout)
    num_classes = kernel.shape[class_axis]
    labels, where = checked_labels(labels, where, features.shape[:-1], num_classes)
    feature_norm = safe_norm(features, axis=-1)
    class_norm = safe_norm(kernel, axis=1 - class_axis)
    return label_amplitude(labels, num_classes, where, lambda y: feature_norm * class_norm[y])
