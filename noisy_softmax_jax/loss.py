"""Noisy softmax cross-entropy (Chen, Deng & Du, CVPR 2017): the public functions.

The loss is plain softmax cross-entropy with integer labels in which the
target logit, and only the target logit, is lowered by a sampled, non-negative
noise before the softmax. Everything here is a pure function of its inputs
and an explicit PRNG key.

One definition, two implementations. ``_plain.py`` is the definition as the
paper writes it (``take_along_axis``, the noisy target, ``logsumexp``): read
it for the math. It runs in :func:`noisy_logits`, whose output any
cross-entropy consumes, and in the tests as the reference. ``_fused.py`` is
the same function as a ``jax.custom_jvp`` written for XLA (on CPU one array of
exponentials whose buffer becomes the gradient, on accelerators nothing
``[..., classes]`` kept): :func:`noisy_softmax_cross_entropy` and
:func:`checked_noisy_softmax_cross_entropy` run it, with the class axes moved
last and flattened first (free when the one class axis is last already), except
with a ``where`` of the logits' shape, a normalizer over some of the classes,
which runs the plain definition. ``tests/test_loss_paths.py`` pins the two
equal, values and gradients. This module checks the arguments, handles the
labels that index nothing (out of range: NaN; masked padding: 0) and documents
the functions.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from noisy_softmax_jax import _fused, _labels, _plain, _validation, _value_checks
from noisy_softmax_jax._plain import compute_dtype as _compute_dtype
from noisy_softmax_jax._plain import noisy_target_logit as _noisy_target_logit
from noisy_softmax_jax._validation import NOISE_VARIANTS

__all__ = [
    "NOISE_VARIANTS",
    "checked_noisy_softmax_cross_entropy",
    "noisy_logits",
    "noisy_softmax_cross_entropy",
    "noisy_target_logit",
]

_STATIC = ("noise", "shared_noise", "negative", "axes")
_STATIC_LOGITS = (*_STATIC, "margin")


def _classes_last(x, axes):
    """`x` with its class axes moved last, in the order of `axes`, and flattened into one.

    Optax's reading of a tuple ``axis``: a label is a row-major flat index into the slice of
    the class axes taken in the order given. With one class axis this is ``jnp.moveaxis``
    (nothing at all when it is last already).
    """
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    x = jnp.transpose(x, rest + axes)
    return x.reshape(x.shape[:len(rest)] + (-1,))


def _classes_back(x, shape, axes):
    """Undoes `_classes_last` for an array of the logits' `shape`."""
    rest = tuple(a for a in range(len(shape)) if a not in axes)
    x = x.reshape(tuple(shape[a] for a in rest + axes))
    return jnp.transpose(x, tuple(np.argsort(rest + axes)))


def _masks(labels, where, num_classes, axes, ndim):
    """In-range labels, and the masks, from the labels and ``where`` as the user gave them.

    Returns the labels with every out-of-range one replaced by 0 (so that nothing indexes
    with it: -1 would wrap to the last class), whether each was in range, the logit-shaped
    mask with its class axes last (or None) and the examples kept (or None: all).
    """
    valid = _labels.in_range(labels, num_classes)
    class_where = _classes_last(where, axes) if where is not None and where.ndim == ndim else None
    kept = where if class_where is None else jnp.any(class_where, axis=-1)
    return _labels.safe(labels, valid), valid, class_where, kept


def _in_compute_dtype(logits, alpha, sigma, amplitude, margin_value=None):
    """`alpha`, `sigma`, `amplitude` (and a margin's value) in the logits' compute dtype."""
    dtype = _compute_dtype(logits.dtype)
    alpha, sigma = jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)
    amplitude = None if amplitude is None else amplitude.astype(dtype)
    return alpha, sigma, amplitude, None if margin_value is None else margin_value.astype(dtype)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _loss(logits, labels, rng, alpha, sigma, amplitude, where, *, noise, shared_noise,
          negative, axes):
    alpha, sigma, amplitude, _ = _in_compute_dtype(logits, alpha, sigma, amplitude)
    classes_last = _classes_last(logits, axes)
    labels, valid, class_where, kept = _masks(labels, where, classes_last.shape[-1], axes,
                                              logits.ndim)
    options = dict(noise=noise, shared_noise=shared_noise, negative=negative)
    if class_where is None:
        loss = _fused.cross_entropy(classes_last, labels, rng, alpha, sigma, amplitude,
                                    **options)
    else:
        # A mask of the logits' shape is a normalizer over a subset of the classes: the
        # plain definition with `logsumexp(where=...)`, as in Optax, differentiated by JAX.
        loss = _plain.cross_entropy(classes_last, labels, rng, alpha, sigma, amplitude,
                                    class_where, **options)
    # An out-of-range label (under jit, or on an accelerator, where its value is not
    # checked) gives NaN, unless its example is masked out (padding): then 0, as any masked
    # example, with no gradient.
    loss = jnp.where(valid, loss, jnp.nan)
    if kept is not None:
        loss = jnp.where(kept, loss, jnp.zeros_like(loss))
    return loss.astype(logits.dtype)  # Optax's dtype: the logits'


@functools.partial(jax.jit, static_argnames=_STATIC_LOGITS)
def _noisy_logits(logits, labels, rng, alpha, sigma, amplitude, where, margin_value=None, *,
                  noise, shared_noise, negative, axes, margin=None):
    """The noisy logits; with a `margin` (cosine logits, `amplitude` their scale), the margin
    on the noisy target too (``margins.margin_logits``)."""
    alpha, sigma, amplitude, margin_value = _in_compute_dtype(logits, alpha, sigma, amplitude,
                                                              margin_value)
    dtype = _compute_dtype(logits.dtype)
    # One class axis is perturbed where it is; several are moved last and flattened first.
    axis, moved = (axes[0], logits) if len(axes) == 1 else (-1, _classes_last(logits, axes))
    num_classes = math.prod(logits.shape[a] for a in axes)
    valid = _labels.in_range(labels, num_classes)
    noisy = _plain.noisy_logits(moved, _labels.safe(labels, valid), rng, alpha, sigma,
                                amplitude, noise=noise, shared_noise=shared_noise,
                                negative=negative, axis=axis, margin=margin,
                                margin_value=margin_value)[0]
    # An unmasked out-of-range label has no entry to perturb: its row is NaN, so that any
    # loss of it is NaN too. Masked examples are returned as they are.
    noisy = jnp.where(jnp.expand_dims(valid, axis), noisy, jnp.nan)
    if where is not None:
        kept = jnp.any(where, axis=axes) if where.ndim == logits.ndim else where
        noisy = jnp.where(jnp.expand_dims(kept, axis), noisy, moved.astype(dtype))
    return noisy if len(axes) == 1 else _classes_back(noisy, logits.shape, axes)


def _check_arguments(logits, labels, rng, alpha, amplitude, noise, sigma, where, axis):
    """Validates and converts the arguments shared by the loss, its checked variant and
    `noisy_logits`. Returns them with `axis` as a tuple of non-negative class axes, no `rng`
    and no `amplitude` where no noise is drawn, and the `noise` to draw (None: none)."""
    logits = _validation.check_floating("logits", logits, "of shape [..., num_classes]")
    axes = _validation.check_class_axes(axis, logits)
    labels, where = _validation.check_masked_labels(labels, where, logits, axes)
    rng, alpha, sigma, noise, amplitude = _validation.check_noise_arguments(
        rng, alpha, sigma, noise, amplitude, examples=labels.shape)
    return logits, labels, rng, alpha, sigma, amplitude, where, axes, noise


def noisy_softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array | None,
    alpha: jax.typing.ArrayLike,
    *,
    amplitude: jax.typing.ArrayLike | None = None,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    where: jax.typing.ArrayLike | None = None,
    shared_noise: bool = False,
    negative: bool = False,
    axis: int | tuple[int, ...] = -1,
) -> jax.Array:
    r"""Computes noisy softmax cross-entropy with integer labels.

    Softmax cross-entropy in which the target logit :math:`f_y` is lowered by
    a non-negative noise before the softmax, which keeps the gradient on the
    target from vanishing early in training (postponing softmax saturation).
    For the paper's annealed noise, with the amplitude
    :math:`a = \|W_y\| \|x\|` of a bias-free linear classifier
    (:math:`f_j = W_j^\top x`):

    .. math::
      \tilde f_y = f_y - \alpha\, |\xi|\, (a - f_y)
                 = f_y - \alpha\, |\xi|\, \|W_y\| \|x\| (1 - \cos\theta_y),
      \qquad \xi \sim \mathcal{N}(0, \sigma^2),

      \ell = \log\Big(e^{\tilde f_y} + \sum_{j \ne y} e^{f_j}\Big) - \tilde f_y .

    The noise fades by itself as a feature aligns with its class weight. The
    ablation variants replace :math:`(a - f_y)` by :math:`a` (``"amplitude"``)
    or by 1 (``"free"``). Only :math:`\alpha\sigma` matters; the paper tunes
    ``alpha`` with ``sigma = 1`` and reports about ``alpha = 0.1`` working well.
    Too large an ``alpha`` can make the network escape the noise by shrinking
    its features to zero (every logit equal, chance accuracy): watch the
    amplitude in :func:`noisy_softmax_jax.saturation_metrics`.

    A drop-in replacement for ``optax.softmax_cross_entropy_with_integer_labels``:
    the same ``axis`` (one class axis or a tuple of them) and ``where`` (per
    example or per logit), the same output shape and dtype, and, without noise,
    the same numbers. No noise is drawn with ``rng=None`` (evaluation, like
    ``deterministic=True`` for Flax's ``Dropout``) or a concrete ``alpha = 0``;
    then no ``amplitude`` is needed and the loss is Optax's, bit for bit.

    This is the fast path: one fused computation that costs what
    ``optax.softmax_cross_entropy_with_integer_labels`` costs. Prefer it
    whenever the loss is that plain cross-entropy. To combine the noise with
    another loss (label smoothing, an ArcFace/CosFace margin, a class-sharded
    cross-entropy), use :func:`noisy_logits`, which draws the same noise and
    returns the perturbed logits; it writes one more logits-sized array.

    Gradients flow through ``logits`` and ``amplitude`` (and so through the
    norms of the features and of the class weights); :math:`\xi` is a sampled
    constant. With :math:`c = \alpha|\xi|`, autodiff gives the paper's
    :math:`\partial\tilde f_y/\partial x = (1 + c) W_y - c \|W_y\| x / \|x\|`.
    The factor :math:`a - f_y` is non-negative in exact arithmetic but can
    round below zero when :math:`x` is aligned with :math:`W_y`; it is clamped
    at zero (value and gradient), so the noise never raises the target logit
    unless ``negative=True`` asks for it. Every mode of differentiation works
    (``jax.grad``, ``jax.jvp``, ``jax.hessian``), and so do ``jax.jit`` and
    ``jax.vmap``: mapped over examples with one key, the noise is what the
    batched call draws (``jax.vmap(loss)(x, y)`` equals ``loss(x, y)``), so
    per-example gradients (``jax.vmap(jax.grad(...))``, DP-SGD) see
    independent noise; mapped with one key per call, each key draws its own.

    Called eagerly, the arguments are checked and a bad one raises
    ``TypeError`` or ``ValueError`` before anything is computed: dtypes and
    shapes always, and the values (label range, signs and finiteness of
    ``alpha`` and ``sigma``, whether ``alpha`` is 0) where they are on the host:
    Python numbers and lists, NumPy arrays and ``jax.Array``\ s on CPU. The
    values of a ``jax.Array`` on an accelerator are not read (that would be a
    blocking device-to-host copy), nor any under ``jax.jit``: there an
    out-of-range label gives a NaN loss (where Optax would wrap -1 to the last
    class) and a negative ``alpha`` raises the target logit; use
    :func:`checked_noisy_softmax_cross_entropy` to have those reported.

    Args:
      logits: Unnormalized log probabilities, shape ``[..., num_classes]``
        (the class axis is ``axis``), floating.
      labels: Integer class indices in ``[0, num_classes)``, the shape of
        ``logits`` without the class axes, ``[...]``. A label whose example
        ``where`` masks out may be anything (padding such as -1).
      rng: A PRNG key, typed (``jax.random.key``) or legacy (``uint32[2]``).
        The same key gives the same noise. None: no noise (evaluation).
      alpha: Non-negative noise scale, a Python float or a scalar array. It is
        traced: changing it between calls does not recompile. ``alpha = 0``
        gives exactly ``optax.softmax_cross_entropy_with_integer_labels``.
        The paper uses about 0.1. What our experiments measured (the range that
        trains, the collapse above it, the comparison with plain softmax and label
        smoothing) is on the documentation's Results page (``docs/results.md`` in
        the repository), beside the runs it comes from.
      amplitude: Per-example :math:`\|W_y\|\|x\|`, shape ``[...]``, needed by
        ``"annealed"`` and ``"amplitude"`` noise whenever noise is drawn (a key
        and an ``alpha`` not known to be 0); ignored by ``"free"``. Get it from
        the head, ``out.amplitude(labels)`` with ``out`` the output of
        :class:`noisy_softmax_jax.NoisySoftmaxHead` (Linen) or
        :class:`noisy_softmax_jax.nnx.NoisySoftmaxHead` (NNX), or from
        :func:`noisy_softmax_jax.target_amplitude`.
      noise: ``"annealed"`` (the paper's method), ``"amplitude"`` or ``"free"``.
      sigma: Non-negative standard deviation of :math:`\xi`.
      where: Optional boolean mask, as in Optax. Of the labels' shape ``[...]``:
        masked examples give loss 0 and no gradient, whatever their label. Of
        the logits' shape: masked classes leave the normalizer (the target's
        noisy logit is subtracted even when its class is masked) and get no
        gradient; an example with no class left gives 0.
      shared_noise: If True, draw one :math:`\xi` for the whole call instead of
        one per example (what the first author's Caffe code does).
      negative: If True, the noise raises the target logit instead of lowering
        it: the paper's "negative noise" ablation, reported worse than softmax.
      axis: The class axis of ``logits``, or a tuple of class axes, as in
        Optax: the loss of the logits with those axes moved last, in the order
        given, and flattened into one (a label is a row-major flat index into
        them), noise included. The last axis is the fastest (others are moved
        last first).

    Returns:
      Per-example losses, the shape of ``labels``, no reduction, in the dtype of
      ``logits`` as in Optax: ``bfloat16`` and ``float16`` logits are computed in
      float32 and only the loss is rounded to their dtype (their gradient is
      in their dtype too).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import noisy_softmax_cross_entropy, target_amplitude
      >>> features = jnp.array([[1.0, 2.0], [0.5, -1.0]])
      >>> kernel = jnp.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])  # [features, classes]
      >>> labels = jnp.array([1, 0])
      >>> logits = features @ kernel
      >>> amplitude = target_amplitude(features, kernel, labels)
      >>> loss = noisy_softmax_cross_entropy(
      ...     logits, labels, jax.random.key(0), 0.1, amplitude=amplitude)
      >>> loss.shape
      (2,)

      Without a key there is no noise, and no amplitude is needed (evaluation):

      >>> import optax
      >>> clean = noisy_softmax_cross_entropy(logits, labels, None, 0.1)
      >>> bool(jnp.all(clean == optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
      True

    References:
      Chen, Deng & Du, `Noisy Softmax: Improving the Generalization Ability of
      DCNN via Postponing the Early Softmax Saturation
      <https://arxiv.org/abs/1708.03769>`_, CVPR 2017.
    """
    logits, labels, rng, alpha, sigma, amplitude, where, axes, noise = _check_arguments(
        logits, labels, rng, alpha, amplitude, noise, sigma, where, axis)
    return _loss(logits, labels, rng, alpha, sigma, amplitude, where, noise=noise,
                 shared_noise=bool(shared_noise), negative=bool(negative), axes=axes)


def noisy_logits(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array | None,
    alpha: jax.typing.ArrayLike,
    *,
    amplitude: jax.typing.ArrayLike | None = None,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    where: jax.typing.ArrayLike | None = None,
    shared_noise: bool = False,
    negative: bool = False,
    axis: int | tuple[int, ...] = -1,
) -> jax.Array:
    r"""Returns the logits with only the target entry perturbed by the noisy softmax's noise.

    .. math::
      n_j = f_j \ (j \ne y), \qquad n_y = \tilde f_y
      = f_y - \alpha\, |\xi|\, (a - f_y), \qquad \xi \sim \mathcal{N}(0, \sigma^2),

    the noisy logits of :func:`noisy_softmax_cross_entropy`, drawn from the
    same key in the same way, so that
    ``optax.softmax_cross_entropy_with_integer_labels(noisy_logits(...), labels)``
    equals ``noisy_softmax_cross_entropy(...)`` with the same arguments (to
    float32 rounding; pass the same ``axis`` and ``where`` to both). Any
    cross-entropy can consume them: with label smoothing, a margin, or a
    class-sharded softmax. Gradients flow through ``logits`` and ``amplitude``
    as in the loss.

    For the plain integer-label cross-entropy prefer the fused
    :func:`noisy_softmax_cross_entropy`: this transform writes the noisy
    logits out (in float32 for half-precision ``logits``) and the consumer
    reads them again.

    With an additive cosine margin (CosFace, :math:`f_j = s\cos\theta_j`,
    amplitude :math:`a = s`), add the noise first and subtract the margin
    :math:`s\,m` from the noisy target after: the annealing factor is then
    the paper's :math:`a - f_y = s(1 - \cos\theta_y)`, which vanishes as a
    feature aligns with its class weight. Margin first would make it
    :math:`s(1 - \cos\theta_y + m)`, a noise that never fades.

    Args:
      logits: Unnormalized log probabilities, shape ``[..., num_classes]``
        (the class axis is ``axis``).
      labels: Integer class indices in ``[0, num_classes)``, the shape of
        ``logits`` without the class axes. Under ``jit`` an out-of-range label
        that ``where`` does not mask makes its example's logits NaN.
      where: Optional boolean mask of the labels' or the logits' shape, as in
        :func:`noisy_softmax_cross_entropy`: the examples it masks out (all of
        their classes, for a mask of the logits' shape) are returned
        unperturbed, and their labels may be anything (padding such as -1).
      rng, alpha, amplitude, noise, sigma, shared_noise, negative, axis: as in
        :func:`noisy_softmax_cross_entropy`; ``rng=None`` (or ``alpha = 0``)
        returns the logits unperturbed.

    Returns:
      The noisy logits, the shape of ``logits``; float32 for half-precision
      inputs, else the dtype of ``logits``. Unlike the loss, which rounds only
      its result, the noisy logits are an intermediate: rounded to bfloat16 (8
      bits), the noisy target would quantize the noise itself (at a logit of 20
      a bfloat16 step is 0.125, more than typical noise at ``alpha = 0.1``).
      Optax's loss of them is then float32 too; cast it to match the loss's dtype.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from noisy_softmax_jax import noisy_logits, noisy_softmax_cross_entropy
      >>> logits = jnp.array([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0]])
      >>> labels, amplitude = jnp.array([0, 1]), jnp.array([4.0, 5.0])
      >>> noisy = noisy_logits(logits, labels, jax.random.key(0), 0.1, amplitude=amplitude)
      >>> bool(jnp.all((noisy == logits) == (jnp.arange(3) != labels[:, None])))
      True
      >>> loss = noisy_softmax_cross_entropy(
      ...     logits, labels, jax.random.key(0), 0.1, amplitude=amplitude)
      >>> bool(jnp.allclose(
      ...     optax.softmax_cross_entropy_with_integer_labels(noisy, labels), loss))
      True
      >>> smoothed = optax.smooth_labels(jax.nn.one_hot(labels, 3), 0.1)
      >>> optax.softmax_cross_entropy(noisy, smoothed).shape
      (2,)
    """
    logits, labels, rng, alpha, sigma, amplitude, where, axes, noise = _check_arguments(
        logits, labels, rng, alpha, amplitude, noise, sigma, where, axis)
    return _noisy_logits(logits, labels, rng, alpha, sigma, amplitude, where, noise=noise,
                         shared_noise=bool(shared_noise), negative=bool(negative), axes=axes)


def noisy_target_logit(
    target_logit: jax.typing.ArrayLike,
    rng: jax.Array | None,
    alpha: jax.typing.ArrayLike,
    *,
    amplitude: jax.typing.ArrayLike | None = None,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    shared_noise: bool = False,
    negative: bool = False,
) -> jax.Array:
    r"""Returns the perturbed target logit :math:`\tilde f_y` of the noisy softmax.

    The piece of :func:`noisy_softmax_cross_entropy` that draws the noise,
    for losses that combine it with something else (a margin, say). With the
    same key and arguments it draws the same noise as the loss (under
    ``jax.vmap`` too).

    Args:
      target_logit: :math:`f_y`, shape ``[...]``.
      rng, alpha, amplitude, noise, sigma, shared_noise, negative: as in
        :func:`noisy_softmax_cross_entropy`; ``rng=None`` (or ``alpha = 0``)
        returns :math:`f_y` itself.

    Returns:
      :math:`\tilde f_y`, shape ``[...]``, in at least float32.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import noisy_target_logit
      >>> target = jnp.array([3.0, 1.0])
      >>> bool(jnp.all(noisy_target_logit(target, jax.random.key(0), 0.1, noise="free") < target))
      True
      >>> noisy_target_logit(target, None, 0.1)  # no key: no noise, no amplitude needed
      Array([3., 1.], dtype=float32)
    """
    target_logit = _validation.check_floating("target_logit", target_logit, "of shape [...]")
    rng, alpha, sigma, drawn, amplitude = _validation.check_noise_arguments(
        rng, alpha, sigma, noise, amplitude, examples=target_logit.shape)
    target_logit = target_logit.astype(_compute_dtype(target_logit.dtype))
    if drawn is None:
        return target_logit
    return _noisy_target_logit(target_logit, rng, alpha, sigma, amplitude, noise=drawn,
                               shared_noise=bool(shared_noise), negative=bool(negative))


def _checks(logits, labels, alpha, sigma, amplitude, where, *, axes):
    """The checks of the checked variant, on the inputs only (``_value_checks``)."""
    num_classes = math.prod(logits.shape[a] for a in axes)
    per_logit = where is not None and where.ndim == logits.ndim
    kept = jnp.any(where, axis=axes) if per_logit else where
    # Masked examples (and, for a mask of the logits' shape, masked logits) are not reported:
    # padding labels and -inf logits of excluded classes are what masks are for.
    _value_checks.labels_in_range(labels, num_classes, kept)
    _value_checks.finite("logits", logits, False if where is None else
                         ~(where if per_logit else jnp.expand_dims(where, axes)))
    if amplitude is not None:
        _value_checks.finite("amplitude", amplitude, False if kept is None else ~kept)
    _value_checks.nonnegative_and_finite(alpha=alpha, sigma=sigma)


_check_values = _value_checks.checker(_checks, static_argnames=("axes",))


def checked_noisy_softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array | None,
    alpha: jax.typing.ArrayLike,
    *,
    amplitude: jax.typing.ArrayLike | None = None,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    where: jax.typing.ArrayLike | None = None,
    shared_noise: bool = False,
    negative: bool = False,
    axis: int | tuple[int, ...] = -1,
) -> tuple[checkify.Error, jax.Array]:
    """:func:`noisy_softmax_cross_entropy` with value checks that work under ``jax.jit``.

    Under ``jit`` the label values, ``alpha`` and ``sigma`` are tracers, so the
    plain loss cannot inspect them (nor, eagerly, the values of arrays on an
    accelerator). This variant uses ``jax.experimental.checkify`` to report,
    after the fact, labels outside ``[0, num_classes)``, non-finite ``logits``
    or ``amplitude`` and a negative or infinite ``alpha`` or ``sigma``. What
    ``where`` masks out is not reported (padding labels, ``-inf`` logits of
    masked classes). It costs a few reductions over the inputs.

    Args:
      As in :func:`noisy_softmax_cross_entropy`.

    Returns:
      ``(error, loss)``: a ``checkify.Error`` (call ``error.throw()`` outside
      ``jit`` to raise it, or ``error.get()`` for the message) and the
      per-example losses.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import checked_noisy_softmax_cross_entropy
      >>> step = jax.jit(lambda logits, labels: checked_noisy_softmax_cross_entropy(
      ...     logits, labels, jax.random.key(0), 0.1, noise="free"))
      >>> error, loss = step(jnp.zeros((2, 3)), jnp.array([0, 7]))
      >>> print(error.get())
      `labels` must lie in [0, 3); found label 7. ...
    """
    logits, labels, rng, alpha, sigma, amplitude, where, axes, noise = _check_arguments(
        logits, labels, rng, alpha, amplitude, noise, sigma, where, axis)
    error = _check_values(logits, labels, alpha, sigma, amplitude, where, axes=axes)
    return error, _loss(logits, labels, rng, alpha, sigma, amplitude, where, noise=noise,
                        shared_noise=bool(shared_noise), negative=bool(negative), axes=axes)
