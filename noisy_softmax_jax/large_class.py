"""Noisy softmax cross-entropy for very many classes: from features and class weights, in blocks.

With 10^5 to 10^7 classes (face recognition) the ``[batch, classes]`` logits and their
gradient dominate memory. :func:`fused_noisy_softmax_cross_entropy` computes the same loss
as :func:`noisy_softmax_jax.noisy_softmax_cross_entropy` on ``features @ kernel`` (or, with a
CosFace or ArcFace margin, as :func:`noisy_softmax_jax.margin_logits` on their cosines)
without ever holding them: it walks over blocks of classes with a running maximum and sum of
exponentials, recomputes each block's logits in the backward pass, and, given a mesh, splits
the classes over one of its axes and combines the shards with collectives of size
``[batch]``. Here: the ``jax.custom_vjp`` and the public functions; the blocks and the mesh
are in ``_blocks.py``, the two passes over them in ``_large_class_passes.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify
from jax.interpreters import ad
from jax.sharding import Mesh

from noisy_softmax_jax import _blocks, _labels, _plain, _validation, _value_checks
from noisy_softmax_jax._large_class_passes import backward_pass, forward_pass
from noisy_softmax_jax._validation import KernelLayout
from noisy_softmax_jax.amplitude import safe_norm
from noisy_softmax_jax.margins import unit

__all__ = ["checked_fused_noisy_softmax_cross_entropy", "fused_noisy_softmax_cross_entropy"]


def _noisy_target(config, target_logit, features, class_norm, rng, alpha, sigma, scale,
                  margin_value):
    """f~_y, through the noise draw the materialised loss uses: the same noise for a key.

    The amplitude is ||x|| ||W_y|| of the plain logits, or the scale s of cosine logits
    s cos theta_j (whose margin then goes on after the noise).
    """
    if config.cosine:
        amplitude = jnp.broadcast_to(scale, target_logit.shape)
    elif config.noise is None:  # no key, or alpha known to be 0: the plain cross-entropy
        return target_logit
    else:
        amplitude = safe_norm(features, axis=-1) * class_norm
    return _plain.noisy_target_logit(
        target_logit, rng, alpha, sigma, amplitude, noise=config.noise,
        shared_noise=config.shared_noise, negative=config.negative, margin=config.margin,
        margin_value=margin_value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _fused_loss(features, kernel, labels, rng, alpha, sigma, scale, margin_value, config):
    return _fused_loss_fwd(features, kernel, labels, rng, alpha, sigma, scale, margin_value,
                           config)[0]


def _fused_loss_fwd(features, kernel, labels, rng, alpha, sigma, scale, margin_value, config):
    dtype = _plain.compute_dtype(config.matmul_dtype)
    # Cast here rather than before the custom VJP, so the features' gradient is rounded once,
    # to their own dtype, not to the matmul's first. ||x|| is the norm of what is multiplied.
    x = features.astype(config.matmul_dtype)
    others, target_logit, class_norm = forward_pass(x, kernel, labels, config, dtype)
    noisy_target = _noisy_target(config, target_logit, x.astype(dtype), class_norm, rng,
                                 alpha, sigma, scale, margin_value)
    log_normalizer = jnp.logaddexp(others, noisy_target)
    residuals = (features, kernel, labels, rng, alpha, sigma, scale, margin_value, target_logit,
                 class_norm, log_normalizer)
    return log_normalizer - noisy_target, residuals


def _fused_loss_bwd(config, residuals, d_loss):
    (features, kernel, labels, rng, alpha, sigma, scale, margin_value, target_logit, class_norm,
     log_normalizer) = residuals
    dtype = log_normalizer.dtype

    # f~_y is a per-example function of f_y, ||x||, ||W_y||, alpha and sigma (and of the scale
    # and margin of cosine logits): its VJP is [batch] and [batch, dim] sized.
    # d loss / d f~_y = p~_y - 1.
    def noisy_target_of(target_logit, features, class_norm, alpha, sigma, scale, margin_value):
        return _noisy_target(config, target_logit, features, class_norm, rng, alpha, sigma,
                             scale, margin_value)

    x = features.astype(config.matmul_dtype)
    noisy_target, noisy_target_vjp = jax.vjp(
        noisy_target_of, target_logit, x.astype(dtype), class_norm, alpha, sigma, scale,
        margin_value)
    target_prob = jnp.exp(noisy_target - log_normalizer)
    (d_target_logit, d_features_norm, d_class_norm, d_alpha, d_sigma, d_scale,
     d_margin_value) = noisy_target_vjp(d_loss * (target_prob - 1))
    # d ||W_y|| / d W_y = W_y / ||W_y||, and 0 at W_y = 0 as in safe_norm.
    positive = class_norm > 0
    d_class_norm_scale = jnp.where(
        positive, d_class_norm / jnp.where(positive, class_norm, 1), jnp.zeros((), dtype))
    d_features, d_kernel = backward_pass(
        x, kernel, labels, d_loss, log_normalizer, d_target_logit, d_class_norm_scale,
        config, dtype)
    d_features = (d_features + d_features_norm).astype(features.dtype)
    return d_features, d_kernel, None, None, d_alpha, d_sigma, d_scale, d_margin_value


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
def _loss(features, kernel, labels, rng, alpha, sigma, scale, margin_value, where, *, config):
    dtype = _plain.compute_dtype(config.matmul_dtype)
    alpha, sigma = jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)
    if config.cosine:
        # Cosine logits s cos(theta_j): the features normalised and scaled here, where JAX
        # differentiates it ([batch, dim] only); each class weight divided by its norm inside
        # the blocks.
        scale, margin_value = jnp.asarray(scale, dtype), jnp.asarray(margin_value, dtype)
        features = scale * unit(features.astype(dtype))
    # An out-of-range label (under jit or on an accelerator, where its value is not checked)
    # is replaced by a safe one and its loss by NaN, as in the materialised loss; a masked
    # one (padding) then gives 0 like any masked example.
    in_range = _labels.in_range(labels, _blocks.num_classes(kernel, config))
    loss = _fused_loss(features, kernel, _labels.safe(labels, in_range), rng, alpha, sigma,
                       scale, margin_value, config)
    loss = jnp.where(in_range, loss, jnp.nan)
    if where is not None:
        loss = jnp.where(where, loss, jnp.zeros_like(loss))
    return loss


def _check_arguments(features, kernel, labels, rng, alpha, *, noise, sigma, where,
                     shared_noise, negative, margin, scale, margin_value, chunk_size, mesh,
                     class_axis, kernel_layout, dtype):
    """Validates and converts the arguments shared by the checked and unchecked loss."""
    scale, margin_value = _validation.check_margin(margin, scale, margin_value)
    features, kernel, config = _blocks.checked_config(
        features, kernel, kernel_layout=kernel_layout, chunk_size=chunk_size, mesh=mesh,
        class_axis=class_axis, dtype=dtype, cosine=margin is not None)
    labels, where = _validation.check_block_labels(labels, where, features.shape[0],
                                                   _blocks.num_classes(kernel, config))
    # The amplitude is computed here: ||x|| ||W_y||, or the scale of cosine logits.
    rng, alpha, sigma, noise, _ = _validation.check_noise_arguments(rng, alpha, sigma, noise)
    config = config._replace(noise=noise, shared_noise=bool(shared_noise),
                             negative=bool(negative), margin=margin)
    return (features, kernel, labels, rng, alpha, sigma, scale, margin_value, where), config


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
    margin: str | None = None,
    scale: jax.typing.ArrayLike | None = None,
    margin_value: jax.typing.ArrayLike | None = None,
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

    With ``margin="cosface"`` or ``"arcface"`` the logits are cosine logits
    :math:`s\cos\theta_j` (features and class weights L2-normalised, each class weight
    block by block: no normalised copy of the kernel), the noise goes on the target with
    amplitude :math:`s`, and the margin after it: the value and gradients of
    ``optax.softmax_cross_entropy_with_integer_labels(margin_logits(class_cosines(features,
    kernel), labels, rng, alpha, margin=..., scale=..., margin_value=...), labels)``
    (:func:`noisy_softmax_jax.margin_logits`, which gives the math), with mesh and either
    kernel layout too. Gradients also flow to ``scale`` and ``margin_value``.

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
      margin: ``None`` (default: the paper's linear logits :math:`x^\top W_j`),
        ``"cosface"`` (:math:`s(\cos\theta_y - m)` on the target) or ``"arcface"``
        (:math:`s\cos(\theta_y + m)`, with InsightFace's fallback beyond :math:`\pi`);
        see :data:`noisy_softmax_jax.MARGINS`.
      scale: The cosine logits' scale :math:`s > 0`, traced; with a margin only
        (default 64).
      margin_value: The margin :math:`m \ge 0`, traced; with a margin only (default 0.35
        for CosFace, 0.5 radians for ArcFace).
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

      ArcFace with the noise, the loss of the materialised margin logits:

      >>> import optax
      >>> from noisy_softmax_jax import class_cosines, margin_logits
      >>> arc = fused_noisy_softmax_cross_entropy(
      ...     features, kernel, jnp.array([1, 0]), jax.random.key(0), 0.1, margin="arcface",
      ...     scale=30.0, chunk_size=2)
      >>> logits = margin_logits(class_cosines(features, kernel), jnp.array([1, 0]),
      ...                        jax.random.key(0), 0.1, margin="arcface", scale=30.0)
      >>> expected = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([1, 0]))
      >>> bool(jnp.allclose(arc, expected, rtol=1e-5))
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
        shared_noise=shared_noise, negative=negative, margin=margin, scale=scale,
        margin_value=margin_value, chunk_size=chunk_size, mesh=mesh, class_axis=class_axis,
        kernel_layout=kernel_layout, dtype=dtype)
    return _reverse_mode_only("fused_noisy_softmax_cross_entropy",
                              functools.partial(_loss, config=config), arguments)


def _checks(features, kernel, labels, alpha, sigma, scale, margin_value, where, *,
            num_classes):
    """The checks of the checked variant, on the inputs only (``_value_checks``): the loss is
    computed beside them, not inside `checkify` (which fails to differentiate the
    custom_vjp)."""
    _value_checks.labels_in_range(labels, num_classes, where)  # masked labels may be padding
    _value_checks.finite("features", features)
    _value_checks.finite("kernel", kernel)
    _value_checks.nonnegative_and_finite(alpha=alpha, sigma=sigma)
    if scale is not None:
        _value_checks.nonnegative_and_finite(("scale",), scale=scale, margin_value=margin_value)


_check_values = _value_checks.checker(_checks, static_argnames=("num_classes",))


def _checked_loss(features, kernel, labels, rng, alpha, sigma, scale, margin_value, where, *,
                  config):
    error = _check_values(features, kernel, labels, alpha, sigma, scale, margin_value, where,
                          num_classes=_blocks.num_classes(kernel, config))
    return error, _loss(features, kernel, labels, rng, alpha, sigma, scale, margin_value,
                        where, config=config)


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
    margin: str | None = None,
    scale: jax.typing.ArrayLike | None = None,
    margin_value: jax.typing.ArrayLike | None = None,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    class_axis: str | None = None,
    kernel_layout: KernelLayout = "features_classes",
    dtype: jax.typing.DTypeLike | None = None,
) -> tuple[checkify.Error, jax.Array]:
    """:func:`fused_noisy_softmax_cross_entropy` with value checks that work under ``jax.jit``.

    Reports labels outside ``[0, classes)`` (except where ``where`` masks their example
    out), non-finite ``features`` or ``kernel``, a negative or infinite ``alpha`` or
    ``sigma`` and, with a margin, a non-positive or infinite ``scale`` or a negative or
    infinite ``margin_value`` through ``jax.experimental.checkify``, as
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
        shared_noise=shared_noise, negative=negative, margin=margin, scale=scale,
        margin_value=margin_value, chunk_size=chunk_size, mesh=mesh, class_axis=class_axis,
        kernel_layout=kernel_layout, dtype=dtype)
    return _reverse_mode_only("checked_fused_noisy_softmax_cross_entropy",
                              functools.partial(_checked_loss, config=config), arguments)
