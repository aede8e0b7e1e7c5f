r"""CosFace and ArcFace margins composed with the noise, on materialised cosine logits.

Face-recognition losses replace the logits by :math:`s\cos\theta_j`, the cosines between the
L2-normalised feature and class weights times a scale :math:`s`, and lower the target's by a
margin. :func:`margin_logits` adds the noisy softmax's noise to such logits first, then the
margin; :func:`class_cosines` computes the cosines. For very many classes the same loss runs
without the logits in :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy`
(``margin=``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _plain, _validation
from noisy_softmax_jax import loss as loss_lib
from noisy_softmax_jax._validation import MARGINS, KernelLayout
from noisy_softmax_jax.amplitude import safe_norm

__all__ = ["MARGINS", "class_cosines", "margin_logits"]


def unit(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x / ||x||`` along `axis`, and 0 (with a zero gradient) for the zero vector."""
    norm = jnp.expand_dims(safe_norm(x, axis=axis).astype(x.dtype), axis)
    positive = norm > 0
    return x * jnp.where(positive, 1 / jnp.where(positive, norm, 1), jnp.zeros((), x.dtype))


@functools.partial(jax.jit, static_argnames=("class_axis",))
def _class_cosines(features, kernel, *, class_axis):
    dtype = _plain.compute_dtype(jnp.result_type(features, kernel))
    features, kernel = features.astype(dtype), kernel.astype(dtype)
    dots = jax.lax.dot_general(unit(features), kernel,
                               (((features.ndim - 1,), (1 - class_axis,)), ((), ())))
    # Each class weight's inverse norm scales its column, as the fused loss does per block.
    norms = safe_norm(kernel, axis=1 - class_axis)
    positive = norms > 0
    return dots * jnp.where(positive, 1 / jnp.where(positive, norms, 1), jnp.zeros((), dtype))


def class_cosines(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    *,
    kernel_layout: KernelLayout = "features_classes",
) -> jax.Array:
    r"""Computes :math:`\cos\theta_j = x^\top W_j / (\|x\| \|W_j\|)` for every class.

    The cosine logits of CosFace and ArcFace (before their scale): the feature and every
    class weight L2-normalised. A zero feature or class weight has cosine 0, with a zero
    gradient (not NaN). Half precision is computed in float32.

    Args:
      features: The classifier's input, shape ``[..., num_features]``.
      kernel: Class weights, ``[num_features, num_classes]`` (default, Flax) or
        ``[num_classes, num_features]`` (``kernel_layout="classes_features"``: Equinox,
        PyTorch, InsightFace).
      kernel_layout: ``"features_classes"`` (default) or ``"classes_features"``.

    Returns:
      Cosines, shape ``[..., num_classes]``, in ``[-1, 1]`` up to rounding; float32 for
      half-precision inputs.

    Examples:
      >>> import jax.numpy as jnp
      >>> from noisy_softmax_jax import class_cosines
      >>> features = jnp.array([[3.0, 4.0]])
      >>> kernel = jnp.array([[2.0, 0.0, -1.0], [0.0, 5.0, 0.0]])  # [features, classes]
      >>> class_cosines(features, kernel)
      Array([[ 0.6,  0.8, -0.6]], dtype=float32)
    """
    features, kernel, class_axis = _validation.check_kernel(features, kernel, kernel_layout)
    return _class_cosines(features, kernel, class_axis=class_axis)


@functools.partial(jax.jit, static_argnames=("noise", "shared_noise", "negative", "axes",
                                             "margin"))
def _margin_logits(cosines, labels, rng, alpha, sigma, scale, margin_value, where, *, noise,
                   shared_noise, negative, axes, margin):
    dtype = _plain.compute_dtype(cosines.dtype)
    scale, margin_value = scale.astype(dtype), margin_value.astype(dtype)
    # The amplitude of s cos(theta_j) is s: the annealed noise's factor is s (1 - cos theta_y).
    amplitude = jnp.broadcast_to(scale, labels.shape)
    return loss_lib._noisy_logits(
        scale * cosines.astype(dtype), labels, rng, alpha, sigma, amplitude, where,
        margin_value, noise=noise, shared_noise=shared_noise, negative=negative, axes=axes,
        margin=margin)


def margin_logits(
    cosines: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array | None,
    alpha: jax.typing.ArrayLike,
    *,
    margin: str = "cosface",
    scale: jax.typing.ArrayLike | None = None,
    margin_value: jax.typing.ArrayLike | None = None,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    where: jax.typing.ArrayLike | None = None,
    shared_noise: bool = False,
    negative: bool = False,
    axis: int | tuple[int, ...] = -1,
) -> jax.Array:
    r"""Returns CosFace or ArcFace logits whose target logit carries the noisy softmax's noise.

    With cosines :math:`c_j = \cos\theta_j` and scale :math:`s`, every logit is
    :math:`s c_j` except the target's, which gets the noise first (its amplitude is
    :math:`s`) and then the margin :math:`m`:

    .. math::
      \tilde f_y = s c_y - \alpha |\xi| \, s (1 - c_y), \quad \xi \sim \mathcal{N}(0, \sigma^2),
      \qquad
      n_y = \begin{cases}
        \tilde f_y - s\,m & \text{CosFace} \\
        s \cos(\tilde\theta_y + m),\ \cos\tilde\theta_y = \tilde f_y / s & \text{ArcFace}
      \end{cases}

    Noise first keeps the paper's annealing factor :math:`s(1 - \cos\theta_y)`, which fades
    as a feature aligns with its class weight; margin first would make it
    :math:`s(1 - \cos\theta_y + m)`, a noise that never fades. ArcFace's
    :math:`\cos(\tilde\theta_y + m)` is replaced, where :math:`\tilde\theta_y + m > \pi`, by
    :math:`\cos\tilde\theta_y - m \sin m` (InsightFace's ``easy_margin=False``), which keeps
    the target logit decreasing in the angle; a noisy cosine below -1 falls there too.
    ``optax.softmax_cross_entropy_with_integer_labels`` of the result is the loss, and
    :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy` with the same ``margin``,
    ``scale`` and ``margin_value`` computes it from the features and class weights without
    the logits (the same noise for the same key). No key (or ``alpha = 0``): the margin
    alone, plain CosFace or ArcFace. ``margin_value=0`` with CosFace: normalised softmax
    (NormFace).

    Args:
      cosines: :math:`\cos\theta_j`, shape ``[..., num_classes]`` (the class axis is
        ``axis``), floating; from :func:`class_cosines`, or any cosine similarity.
      labels: Integer class indices, the shape of ``cosines`` without the class axes.
      rng: A PRNG key; None for no noise (evaluation, or the plain margin loss).
      alpha: Non-negative noise scale (traced: changing it does not recompile).
      margin: ``"cosface"`` (additive cosine margin) or ``"arcface"`` (additive angular
        margin); see :data:`noisy_softmax_jax.MARGINS`.
      scale: :math:`s > 0`, traced; default 64, the papers' value.
      margin_value: :math:`m \ge 0`, traced; default 0.35 for CosFace and 0.5 (radians) for
        ArcFace, the papers' values.
      noise, sigma, where, shared_noise, negative, axis: As in
        :func:`noisy_softmax_jax.noisy_logits`; the examples ``where`` masks out come back
        as :math:`s c_j`, without noise or margin, and their labels may be anything.

    Returns:
      The logits, the shape of ``cosines``; float32 for half-precision cosines, else their
      dtype. Gradients flow to ``cosines`` (and to ``scale`` and ``margin_value``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from noisy_softmax_jax import class_cosines, margin_logits
      >>> features = jnp.array([[1.0, 2.0], [0.5, -1.0]])
      >>> kernel = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])  # [features, classes]
      >>> labels = jnp.array([1, 0])
      >>> cosines = class_cosines(features, kernel)
      >>> logits = margin_logits(cosines, labels, jax.random.key(0), 0.1, margin="arcface",
      ...                        scale=30.0)
      >>> optax.softmax_cross_entropy_with_integer_labels(logits, labels).shape
      (2,)
      >>> plain = margin_logits(cosines, labels, None, 0.1, scale=30.0, margin_value=0.0)
      >>> bool(jnp.allclose(plain, 30.0 * cosines))  # no key, no margin: s cos(theta)
      True

    References:
      Wang et al., `CosFace: Large Margin Cosine Loss for Deep Face Recognition
      <https://arxiv.org/abs/1801.09414>`_, CVPR 2018; Deng et al., `ArcFace: Additive
      Angular Margin Loss for Deep Face Recognition <https://arxiv.org/abs/1801.07698>`_,
      CVPR 2019; Chen, Deng & Du, `Noisy Softmax <https://arxiv.org/abs/1708.03769>`_, CVPR
      2017.
    """
    scale, margin_value = _validation.check_margin(margin, scale, margin_value, optional=False)
    cosines = _validation.check_floating("cosines", cosines, "of shape [..., num_classes]")
    axes = _validation.check_class_axes(axis, cosines)
    labels, where = _validation.check_masked_labels(labels, where, cosines, axes)
    rng, alpha, sigma, drawn, _ = _validation.check_noise_arguments(rng, alpha, sigma, noise)
    return _margin_logits(cosines, labels, rng, alpha, sigma, scale, margin_value, where,
                          noise=drawn, shared_noise=bool(shared_noise), negative=bool(negative),
                          axes=axes, margin=margin)
