"""The amplitude ||W_y|| * ||x|| that the noisy softmax scales its noise by.

For users who own their class weights (Equinox, PyTorch-converted weights,
plain JAX); the Flax heads (:class:`noisy_softmax_jax.NoisySoftmaxHead`,
:class:`noisy_softmax_jax.nnx.NoisySoftmaxHead`) return the same numbers.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _validation

__all__ = ["KERNEL_LAYOUTS", "KernelLayout", "safe_norm", "target_amplitude"]

KernelLayout = Literal["features_classes", "classes_features"]
KERNEL_LAYOUTS: tuple[KernelLayout, ...] = ("features_classes", "classes_features")
"""Names accepted by ``kernel_layout``.

``"features_classes"``: shape ``[num_features, num_classes]``, column ``j`` is
:math:`W_j`; Flax's ``nn.Dense`` and ``nnx.Linear`` kernels (the default).
``"classes_features"``: shape ``[num_classes, num_features]``, row ``j`` is
:math:`W_j`; Equinox's ``eqx.nn.Linear.weight``, PyTorch's ``nn.Linear.weight``
and InsightFace-style class centres.
"""

_SHAPES = {
    "features_classes": "[num_features, num_classes]",
    "classes_features": "[num_classes, num_features]",
}
_OWNERS = {
    "features_classes": "Flax's nn.Dense / nnx.Linear kernel",
    "classes_features": "Equinox's eqx.nn.Linear.weight, PyTorch's nn.Linear.weight",
}


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


def checked_kernel(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    kernel_layout: str,
) -> tuple[jax.Array, jax.Array, int]:
    """Checks a classifier's ``kernel`` against its input; returns both and the class axis.

    A kernel in the other layout is detected when ``num_features !=
    num_classes`` and named in the error; when they are equal (a square
    kernel) only the caller knows which axis holds the classes.
    """
    if kernel_layout not in KERNEL_LAYOUTS:
        raise ValueError(
            f"`kernel_layout` must be one of {', '.join(repr(v) for v in KERNEL_LAYOUTS)}; "
            f"got {kernel_layout!r}."
        )
    shape = _SHAPES[kernel_layout]
    features = _validation.check_floating("features", features, "of shape [..., num_features]")
    kernel = _validation.check_floating("kernel", kernel, f"of shape {shape}")
    class_axis = 1 if kernel_layout == "features_classes" else 0
    feature_axis = 1 - class_axis
    if kernel.ndim != 2 or features.ndim < 1 or kernel.shape[feature_axis] != features.shape[-1]:
        message = (
            f"`kernel` must have shape {shape} with num_features = features.shape[-1] "
            f"(kernel_layout={kernel_layout!r}, {_OWNERS[kernel_layout]}); got "
            f"features.shape = {features.shape}, kernel.shape = {kernel.shape}."
        )
        transposed = kernel.ndim == 2 and features.ndim >= 1 and (
            kernel.shape[class_axis] == features.shape[-1])
        if transposed:
            other = next(layout for layout in KERNEL_LAYOUTS if layout != kernel_layout)
            message += (
                f" The kernel looks like {_SHAPES[other]} ({_OWNERS[other]}): pass "
                f"kernel_layout={other!r}."
            )
        raise ValueError(message)
    return features, kernel, class_axis


def target_amplitude(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    kernel_layout: KernelLayout = "features_classes",
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
      labels: Integer class indices, shape ``[...]``.
      kernel_layout: ``"features_classes"`` (default) or ``"classes_features"``.

    Returns:
      Amplitudes, shape ``[...]``, in at least float32.

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
    """
    features, kernel, class_axis = checked_kernel(features, kernel, kernel_layout)
    num_classes = kernel.shape[class_axis]
    class_logits = jnp.zeros(features.shape[:-1] + (num_classes,), features.dtype)
    labels = _validation.check_labels(labels, class_logits)
    return safe_norm(features, axis=-1) * safe_norm(kernel, axis=1 - class_axis)[labels]
