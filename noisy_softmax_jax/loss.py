"""Noisy softmax cross-entropy (Chen, Deng & Du, CVPR 2017).

The loss is plain softmax cross-entropy with integer labels in which the
target logit, and only the target logit, is lowered by a sampled, non-negative
noise before the softmax. Everything here is a pure function of its inputs
and an explicit PRNG key.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from noisy_softmax_jax import _noise, _validation
from noisy_softmax_jax._validation import NOISE_VARIANTS

__all__ = [
    "NOISE_VARIANTS",
    "checked_noisy_softmax_cross_entropy",
    "noisy_softmax_cross_entropy",
    "noisy_target_logit",
]


def _compute_dtype(dtype) -> jnp.dtype:
    """bfloat16 and float16 are computed in float32; float64 stays float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _noisy_target_logit(target_logit, rng, alpha, sigma, amplitude, *, noise, shared_noise,
                        negative):
    """Unchecked core of :func:`noisy_target_logit`; inputs already in the compute dtype."""
    dtype = target_logit.dtype
    shape = () if shared_noise else target_logit.shape
    # xi is a sampled constant: no gradient reaches alpha, sigma or the key. Computed once:
    # else XLA redoes the hash and erfinv in every per-example kernel that reads xi.
    xi = _computed_once(_noise.standard_normal(rng, shape, dtype))
    magnitude = jnp.asarray(alpha, dtype) * jnp.asarray(sigma, dtype) * jnp.abs(xi)
    if noise == "annealed":
        # ||W_y|| ||x|| (1 - cos theta) = amplitude - f_y is >= 0 in exact arithmetic
        # but can round to a tiny negative value when x is aligned with W_y. Clamping it
        # at zero keeps the noise from ever raising the target logit; where the clamp is
        # active the factor and its gradient are exactly zero.
        gap = amplitude.astype(dtype) - target_logit
        scale = jnp.where(gap > 0, gap, jnp.zeros_like(gap))
    elif noise == "amplitude":
        amplitude = amplitude.astype(dtype)
        scale = jnp.where(amplitude > 0, amplitude, jnp.zeros_like(amplitude))
    else:  # "free"
        scale = jnp.ones_like(target_logit)
    injected = magnitude * scale
    return target_logit + injected if negative else target_logit - injected


def _is_target(logits, labels):
    return labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)


def _noisy_logits(logits, labels, noisy_target):
    """The logits with the target column replaced by the noisy target, the others untouched.

    The same values as ``jnp.where(labels == column, noisy_target, logits)``, bit for bit,
    infinities and NaN included, but written with min/max against +-inf: XLA:CPU fuses this
    form into its reduction kernels, where it would first write a select out to memory.
    """
    if logits.shape[-1] > 2**24:  # column indices would no longer be exact in float32
        return jnp.where(_is_target(logits, labels), noisy_target[..., None], logits)
    columns = jnp.arange(logits.shape[-1], dtype=logits.dtype)
    distance = jnp.abs(columns - labels[..., None].astype(logits.dtype))
    off_target = (distance - 0.5) * jnp.inf  # +inf off the target column, -inf on it
    return jnp.maximum(jnp.minimum(logits, off_target),
                       jnp.minimum(noisy_target[..., None], -off_target))


@jax.custom_jvp
def _computed_once(x):
    """`x`, unchanged, as the result of a reduction that XLA computes once.

    XLA fuses a cheap per-example computation (here the noise sampling behind
    d f~_y / d f_y) into the [..., classes] loop that reads it and redoes it for every
    class; `lax.optimization_barrier` does not stop this on CPU (it is removed before
    fusion). A reduction is not fused into its consumer: here a bitwise or of x's bits with
    zero, exact. (A sum with a zero would be as exact, but XLA:CPU hands float sums to its
    YNNPACK fusions, which can absorb the consumer's broadcast and write a [..., classes]
    array.) Its derivative is the identity.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{x.dtype.itemsize * 8}"))
    stacked = jnp.stack([bits, jnp.zeros_like(bits)], axis=-1)
    bits = jax.lax.reduce(stacked, bits.dtype.type(0), jax.lax.bitwise_or, (stacked.ndim - 1,))
    return jax.lax.bitcast_convert_type(bits, x.dtype)


@_computed_once.defjvp
def _computed_once_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return _computed_once(x), dx


# How far (in nats) the noise may push a target that is the largest logit below that
# logit before the shortcut in `_log_normalizer_shift` falls back to the exact maximum.
_MAX_SHIFT_GAP = 30.0


def _log_normalizer_shift(logits, labels, target_logit, noisy_target):
    """A per-example shift m for logsumexp(noisy_logits) = m + log(sum(exp(noisy_logits - m))).

    The maximum of the noisy logits, without a pass over them: the largest logit and the
    noisy target give it exactly unless the target is the largest logit and the noise
    lowered it (then the largest of the others is unknown). In that case the largest logit
    is still a safe shift as long as the noisy target is within _MAX_SHIFT_GAP of it: the
    sum keeps a term >= exp(-30) and nothing that matters underflows. Rows beyond that gap
    (noise of more than 30 nats on a dominant target) get the exact maximum from one more
    pass, run only when such a row exists. With alpha = 0 the shift is the plain maximum,
    as in `jax.nn.logsumexp`. `logits` may be in half precision (the maximum is exact in
    any dtype); the rest is in the compute dtype.
    """
    dtype = noisy_target.dtype
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
@functools.partial(jax.custom_jvp, nondiff_argnums=(6, 7, 8, 9))
def _noisy_cross_entropy(logits, labels, rng, alpha, sigma, amplitude, noise, shared_noise,
                         negative, keep_exponentials):
    del keep_exponentials  # the plain forward pass never keeps them
    dtype = _compute_dtype(logits.dtype)
    target_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(dtype)
    noisy_target = _noisy_target_logit(
        target_logit, rng, alpha, sigma, amplitude,
        noise=noise, shared_noise=shared_noise, negative=negative)
    shift = _log_normalizer_shift(logits, labels, target_logit, noisy_target)
    noisy_logits = _noisy_logits(logits.astype(dtype), labels, noisy_target)
    total = jnp.sum(jnp.exp(noisy_logits - shift[..., None]), axis=-1)
    return (jnp.log(total) + shift) - noisy_target


@_noisy_cross_entropy.defjvp
def _noisy_cross_entropy_jvp(noise, shared_noise, negative, keep_exponentials, primals,
                             tangents):
    logits, labels, rng, alpha, sigma, amplitude = primals
    d_logits, _, _, d_alpha, d_sigma, d_amplitude = tangents
    # Half-precision logits come in as they are and are widened where they are read, so
    # that no float32 copy of them is written out.
    dtype = _compute_dtype(logits.dtype)
    half_precision = logits.dtype != dtype
    d_logits = d_logits.astype(dtype)
    target_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0].astype(dtype)

    def noisy_target_of(target_logit, alpha, sigma, amplitude):
        return _noisy_target_logit(target_logit, rng, alpha, sigma, amplitude,
                                   noise=noise, shared_noise=shared_noise, negative=negative)

    # f~_y depends on each example's own f_y and amplitude only, so its derivative in f_y is
    # the per-example slope that one JVP with a tangent of ones returns.
    noisy_target, slope = jax.jvp(
        lambda t: noisy_target_of(t, alpha, sigma, amplitude),
        (target_logit,), (jnp.ones_like(target_logit),))
    _, d_noisy_target_rest = jax.jvp(
        lambda a, s, amp: noisy_target_of(target_logit, a, s, amp),
        (alpha, sigma, amplitude), (d_alpha, d_sigma, d_amplitude))
    slope = _computed_once(slope)
    is_target = _is_target(logits, labels)
    shift = _log_normalizer_shift(logits, labels, target_logit, noisy_target)
    logits = logits.astype(dtype)
    if keep_exponentials:
        # exp(logits - shift) with the target column then overwritten in place by
        # exp(f~_y - shift): the [..., classes] loops are exactly Optax's, and the target
        # column costs one scatter of a value per example.
        target_exponential = jnp.exp(noisy_target - shift)
        exponentials = jnp.put_along_axis(
            jnp.exp(logits - shift[..., None]), labels[..., None],
            target_exponential[..., None], axis=-1, inplace=False)
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


@functools.partial(jax.jit, static_argnames=("noise", "shared_noise", "negative"))
def _loss(logits, labels, rng, alpha, sigma, amplitude, where, *, noise, shared_noise,
          negative):
    dtype = _compute_dtype(logits.dtype)
    alpha, sigma = jnp.asarray(alpha, dtype), jnp.asarray(sigma, dtype)
    if amplitude is not None:
        amplitude = amplitude.astype(dtype)
    keep_exponentials = jax.default_backend() == "cpu"
    loss = _noisy_cross_entropy(logits, labels, rng, alpha, sigma, amplitude,
                                noise, shared_noise, negative, keep_exponentials)
    if where is not None:
        loss = jnp.where(where, loss, jnp.zeros_like(loss))
    return loss


def _check_arguments(logits, labels, rng, alpha, amplitude, noise, sigma, where):
    """Validates and converts the arguments shared by the checked and unchecked loss."""
    logits = _validation.check_floating("logits", logits, "of shape [..., num_classes]")
    labels = _validation.check_labels(labels, logits)
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
    return logits, labels, rng, alpha, amplitude, sigma, where


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
      logits: Unnormalized log probabilities, shape ``[..., num_classes]``.
      labels: Integer class indices in ``[0, num_classes)``, shape ``[...]``.
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
        :func:`noisy_softmax_jax.saturation_metrics`.
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
    logits, labels, rng, alpha, amplitude, sigma, where = _check_arguments(
        logits, labels, rng, alpha, amplitude, noise, sigma, where)
    return _loss(logits, labels, rng, alpha, sigma, amplitude, where,
                 noise=noise, shared_noise=bool(shared_noise), negative=bool(negative))


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
                      shared_noise, negative):
    num_classes = logits.shape[-1]
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
                 shared_noise=shared_noise, negative=negative)


_checked_loss = jax.jit(
    checkify.checkify(_loss_with_checks, errors=checkify.user_checks),
    static_argnames=("noise", "shared_noise", "negative"),
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
    logits, labels, rng, alpha, amplitude, sigma, where = _check_arguments(
        logits, labels, rng, alpha, amplitude, noise, sigma, where)
    return _checked_loss(logits, labels, rng, alpha, sigma, amplitude, where, noise=noise,
                         shared_noise=bool(shared_noise), negative=bool(negative))
