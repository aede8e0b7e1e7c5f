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
:func:`checked_noisy_softmax_cross_entropy` always run it, with the class axis
moved last first (free when it is last already). ``tests/test_loss_paths.py``
pins the two equal, values and gradients. This module checks the arguments
and documents the functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from noisy_softmax_jax import _fused, _plain, _validation
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

_STATIC = ("noise", "shared_noise", "negative", "axis")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _loss(logits, labels, rng, alpha, sigma, amplitude, where, *, noise, shared_noise,
          negative, axis):
    dtype = _compute_dtype(logits.dtype)
    alpha, sigma = jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)
    if amplitude is not None:
        amplitude = amplitude.astype(dtype)
    loss = _fused.cross_entropy(jnp.moveaxis(logits, axis, -1), labels, rng, alpha, sigma,
                                amplitude, noise=noise, shared_noise=shared_noise,
                                negative=negative)
    if where is not None:
        loss = jnp.where(where, loss, jnp.zeros_like(loss))
    return loss


@functools.partial(jax.jit, static_argnames=_STATIC)
def _noisy_logits(logits, labels, rng, alpha, sigma, amplitude, *, noise, shared_noise,
                  negative, axis):
    return _plain.noisy_logits(logits, labels, rng, alpha, sigma, amplitude, noise=noise,
                               shared_noise=shared_noise, negative=negative, axis=axis)[0]


def _check_arguments(logits, labels, rng, alpha, amplitude, noise, sigma, where, axis):
    """Validates and converts the arguments shared by the loss, its checked variant and
    `noisy_logits`; returns them with `axis` made non-negative."""
    logits = _validation.check_floating("logits", logits, "of shape [..., num_classes]")
    axis = _validation.check_class_axis(axis, logits)
    labels = _validation.check_labels_along_axis(labels, logits, axis)
    rng = _validation.check_rng(rng)
    alpha = _validation.check_nonnegative_scalar("alpha", alpha)
    sigma = _validation.check_nonnegative_scalar("sigma", sigma)
    _validation.check_noise(noise, amplitude)
    if noise == "free":
        amplitude = None  # "free" noise does not depend on the amplitude.
    if amplitude is not None:
        amplitude = _validation.check_per_example("amplitude", amplitude, labels, floating=True)
    if where is not None:
        where = _validation.check_per_example("where", where, labels, floating=False)
        where = where.astype(bool)
    return logits, labels, rng, alpha, amplitude, sigma, where, axis


def noisy_softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array,
    alpha: jax.typing.ArrayLike,
    *,
    amplitude: jax.typing.ArrayLike | None = None,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    where: jax.typing.ArrayLike | None = None,
    shared_noise: bool = False,
    negative: bool = False,
    axis: int = -1,
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
    unless ``negative=True`` asks for it.

    Called eagerly, the arguments are checked (dtypes, shapes, label range,
    signs of ``alpha`` and ``sigma``) and a bad one raises ``TypeError`` or
    ``ValueError`` before anything is computed. Under ``jax.jit`` only dtypes
    and shapes can be checked: an out-of-range label then gives a NaN loss
    (as in Optax) and a negative ``alpha`` raises the target logit; use
    :func:`checked_noisy_softmax_cross_entropy` to have those reported.
    ``bfloat16`` and ``float16`` inputs are computed, and returned, in float32.

    Args:
      logits: Unnormalized log probabilities, shape ``[..., num_classes]``
        (the class axis is ``axis``).
      labels: Integer class indices in ``[0, num_classes)``, the shape of
        ``logits`` without the class axis, ``[...]``.
      rng: A PRNG key, typed (``jax.random.key``) or legacy (``uint32[2]``).
        The same key gives the same noise.
      alpha: Non-negative noise scale, a Python float or a scalar array. It is
        traced: changing it between calls does not recompile. ``alpha = 0``
        gives exactly ``optax.softmax_cross_entropy_with_integer_labels``.
        The paper uses about 0.1. Measured safe range (annealed noise, a small
        CNN with SGD + momentum on MNIST and Fashion-MNIST): ``alpha <= 0.2``;
        at 0.5 and above the network escapes the noise by driving its features
        to zero (every logit equal, chance accuracy) within a few dozen steps,
        whatever the learning rate. Watch ``amplitude`` in
        :func:`noisy_softmax_jax.saturation_metrics`. Within that range, on
        full MNIST and Fashion-MNIST and on 1000- and 5000-example subsets
        trained to zero training error (5 seeds each), it matched plain softmax
        within the seed spread; it postponed saturation by 140-250 steps
        (alpha 0.1-0.2, 10-20 %) on 5000 Fashion-MNIST examples and by at most
        80 elsewhere, without a lower test error; label smoothing 0.1 did
        better on the subsets (see the README's Results).
      amplitude: Per-example :math:`\|W_y\|\|x\|`, shape ``[...]``, needed by
        ``"annealed"`` and ``"amplitude"`` noise; ignored by ``"free"``. Get it
        from :class:`noisy_softmax_jax.NoisySoftmaxHead` (``out.amplitude(labels)``)
        or :func:`noisy_softmax_jax.target_amplitude`.
      noise: ``"annealed"`` (the paper's method), ``"amplitude"`` or ``"free"``.
      sigma: Non-negative standard deviation of :math:`\xi`.
      where: Optional boolean mask, shape ``[...]``; masked examples give loss 0
        and no gradient.
      shared_noise: If True, draw one :math:`\xi` for the whole call instead of
        one per example (what the first author's Caffe code does).
      negative: If True, the noise raises the target logit instead of lowering
        it: the paper's "negative noise" ablation, reported worse than softmax.
      axis: The class axis of ``logits``, as in Optax (one axis). Any axis
        gives the loss of ``jnp.moveaxis(logits, axis, -1)``, noise included;
        the last one is the fastest (another is moved last first).

    Returns:
      Per-example losses, shape ``[...]``, no reduction; float32 for
      half-precision inputs, else the dtype of ``logits``.

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

    References:
      Chen, Deng & Du, `Noisy Softmax: Improving the Generalization Ability of
      DCNN via Postponing the Early Softmax Saturation
      <https://arxiv.org/abs/1708.03769>`_, CVPR 2017.
    """
    logits, labels, rng, alpha, amplitude, sigma, where, axis = _check_arguments(
        logits, labels, rng, alpha, amplitude, noise, sigma, where, axis)
    return _loss(logits, labels, rng, alpha, sigma, amplitude, where, noise=noise,
                 shared_noise=bool(shared_noise), negative=bool(negative), axis=axis)


def noisy_logits(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array,
    alpha: jax.typing.ArrayLike,
    *,
    amplitude: jax.typing.ArrayLike | None = None,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    shared_noise: bool = False,
    negative: bool = False,
    axis: int = -1,
) -> jax.Array:
    r"""Returns the logits with only the target entry perturbed by the noisy softmax's noise.

    .. math::
      n_j = f_j \ (j \ne y), \qquad n_y = \tilde f_y
      = f_y - \alpha\, |\xi|\, (a - f_y), \qquad \xi \sim \mathcal{N}(0, \sigma^2),

    the noisy logits of :func:`noisy_softmax_cross_entropy`, drawn from the
    same key in the same way, so that
    ``optax.softmax_cross_entropy_with_integer_labels(noisy_logits(...), labels)``
    equals ``noisy_softmax_cross_entropy(...)`` with the same arguments (to
    float32 rounding). Any cross-entropy can consume them: with label
    smoothing, a margin, or a class-sharded softmax. Gradients flow through
    ``logits`` and ``amplitude`` as in the loss.

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
        ``logits`` without the class axis.
      rng, alpha, amplitude, noise, sigma, shared_noise, negative, axis: as in
        :func:`noisy_softmax_cross_entropy`.

    Returns:
      The noisy logits, the shape of ``logits``; float32 for half-precision
      inputs (so that the noisy target is not rounded), else the dtype of
      ``logits``.

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
    logits, labels, rng, alpha, amplitude, sigma, _, axis = _check_arguments(
        logits, labels, rng, alpha, amplitude, noise, sigma, None, axis)
    return _noisy_logits(logits, labels, rng, alpha, sigma, amplitude, noise=noise,
                         shared_noise=bool(shared_noise), negative=bool(negative), axis=axis)


def noisy_target_logit(
    target_logit: jax.typing.ArrayLike,
    rng: jax.Array,
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
    same key and arguments it draws the same noise as the loss.

    Args:
      target_logit: :math:`f_y`, shape ``[...]``.
      rng, alpha, amplitude, noise, sigma, shared_noise, negative: as in
        :func:`noisy_softmax_cross_entropy`.

    Returns:
      :math:`\tilde f_y`, shape ``[...]``, in at least float32.
    """
    target_logit = _validation.check_floating("target_logit", target_logit, "of shape [...]")
    rng = _validation.check_rng(rng)
    alpha = _validation.check_nonnegative_scalar("alpha", alpha)
    sigma = _validation.check_nonnegative_scalar("sigma", sigma)
    _validation.check_noise(noise, amplitude)
    if noise == "free":
        amplitude = None
    if amplitude is not None:
        amplitude = _validation.check_per_example("amplitude", amplitude, target_logit,
                                                  floating=True)
    target_logit = target_logit.astype(_compute_dtype(target_logit.dtype))
    return _noisy_target_logit(target_logit, rng, alpha, sigma, amplitude, noise=noise,
                               shared_noise=bool(shared_noise), negative=bool(negative))


def _loss_with_checks(logits, labels, rng, alpha, sigma, amplitude, where, *, noise,
                      shared_noise, negative, axis):
    num_classes = logits.shape[axis]
    out_of_range = (labels < 0) | (labels >= num_classes)
    checkify.check(
        ~jnp.any(out_of_range),
        "`labels` must lie in [0, {num_classes}); found label {label}.",
        num_classes=jnp.asarray(num_classes),
        label=jnp.where(jnp.any(out_of_range),
                        labels.ravel()[jnp.argmax(out_of_range.ravel())], 0) if labels.size else 0,
    )
    checkify.check(jnp.all(jnp.isfinite(logits)), "`logits` contains NaN or infinity.")
    if amplitude is not None:
        checkify.check(jnp.all(jnp.isfinite(amplitude)), "`amplitude` contains NaN or infinity.")
    checkify.check(alpha >= 0, "`alpha` must be >= 0; got {alpha}.", alpha=alpha)
    checkify.check(sigma >= 0, "`sigma` must be >= 0; got {sigma}.", sigma=sigma)
    checkify.check(jnp.isfinite(alpha), "`alpha` must be finite; got {alpha}.", alpha=alpha)
    checkify.check(jnp.isfinite(sigma), "`sigma` must be finite; got {sigma}.", sigma=sigma)
    return _loss(logits, labels, rng, alpha, sigma, amplitude, where, noise=noise,
                 shared_noise=shared_noise, negative=negative, axis=axis)


_checked_loss = jax.jit(
    checkify.checkify(_loss_with_checks, errors=checkify.user_checks),
    static_argnames=_STATIC,
)


def checked_noisy_softmax_cross_entropy(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    rng: jax.Array,
    alpha: jax.typing.ArrayLike,
    *,
    amplitude: jax.typing.ArrayLike | None = None,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    where: jax.typing.ArrayLike | None = None,
    shared_noise: bool = False,
    negative: bool = False,
    axis: int = -1,
) -> tuple[checkify.Error, jax.Array]:
    """:func:`noisy_softmax_cross_entropy` with value checks that work under ``jax.jit``.

    Under ``jit`` the label values, ``alpha`` and ``sigma`` are tracers, so the
    plain loss cannot inspect them. This variant uses
    ``jax.experimental.checkify`` to report, after the fact, labels outside
    ``[0, num_classes)``, non-finite ``logits`` or ``amplitude`` and a negative
    or infinite ``alpha`` or ``sigma``. It costs a few reductions over the inputs.

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
    logits, labels, rng, alpha, amplitude, sigma, where, axis = _check_arguments(
        logits, labels, rng, alpha, amplitude, noise, sigma, where, axis)
    return _checked_loss(logits, labels, rng, alpha, sigma, amplitude, where, noise=noise,
                         shared_noise=bool(shared_noise), negative=bool(negative), axis=axis)
