"""The drop-in promise: what Optax's integer-label cross-entropy accepts, the loss accepts.

Each behaviour of ``optax.softmax_cross_entropy_with_integer_labels`` (one example or a batch
of any shape, one class axis anywhere, a tuple of class axes, a mask per example or per
logit, gradients, ``jit``, half precision) is checked three ways, all under ``jax.jit``:

- without noise (``alpha = 0``, or no key): our loss is Optax's, and a float64 NumPy
  reference's;
- Optax's loss of :func:`noisy_softmax_jax.noisy_logits` is our loss with noise (the same
  key, ``axis`` and ``where``): the noise composes with Optax's own handling of both;
- with noise, shapes, dtypes, masks and gradients against the float64 reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import noisy_softmax_jax as nsj
from tests import reference
from tests.test_loss import abs_xi_of

RNG = jax.random.key(11)
ALPHA = 0.3
BATCH_SHAPES = [((), 3), ((5,), 4), ((2, 3), 6), ((2, 1, 3), 2)]
INT_AXES = [((4, 5, 6), 0), ((4, 5, 6), 1), ((4, 5, 6), 2), ((4, 5, 6), -1), ((4, 5, 6), -3)]
TUPLE_AXES = [(1, 3), (3, 2), (2, 3), (-3, -1), (-1, -2), (-2, -1), (0, 1, 3), (-4, -3, -1),
              (2,)]
NO_NOISE = ["alpha_zero", "no_key"]


def optax_loss(logits, labels, axis=-1, where=None):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels, axis=axis,
                                                           where=where)


def problem(shape, axes, seed=0, dtype=jnp.float32):
    """Logits of `shape` with class axes `axes`, labels, and a valid amplitude (>= |f_y|)."""
    k_logits, k_labels, k_scale = jax.random.split(jax.random.key(seed), 3)
    logits = 3.0 * jax.random.normal(k_logits, shape, jnp.float32)
    axes = tuple(a % len(shape) for a in axes)
    batch = tuple(n for i, n in enumerate(shape) if i not in axes)
    num_classes = int(np.prod([shape[a] for a in axes]))
    labels = jax.random.randint(k_labels, batch, 0, num_classes)
    target = np.take_along_axis(np.asarray(classes_last(logits, axes)),
                                np.asarray(labels)[..., None], axis=-1)[..., 0]
    amplitude = np.abs(target) * np.asarray(jax.random.uniform(k_scale, batch, minval=1,
                                                               maxval=2)) + 0.5
    return logits.astype(dtype), labels, jnp.asarray(amplitude, jnp.float32)


def classes_last(x, axes):
    """Optax's reading of `axes`: moved last in the order given, flattened (NumPy)."""
    x = np.asarray(x)
    axes = tuple(a % x.ndim for a in axes)
    rest = tuple(a for a in range(x.ndim) if a not in axes)
    x = np.transpose(x, rest + axes)
    return x.reshape(x.shape[:len(rest)] + (-1,))


def no_noise_loss(how, logits, labels, **kwargs):
    if how == "alpha_zero":  # a key and a concrete alpha = 0, no amplitude
        return nsj.noisy_softmax_cross_entropy(logits, labels, RNG, 0.0, **kwargs)
    return nsj.noisy_softmax_cross_entropy(logits, labels, None, ALPHA, **kwargs)


def noisy_loss(logits, labels, amplitude, **kwargs):
    return nsj.noisy_softmax_cross_entropy(logits, labels, RNG, ALPHA, amplitude=amplitude,
                                           **kwargs)


def optax_of_noisy_logits(logits, labels, amplitude, axis=-1, where=None):
    noisy = nsj.noisy_logits(logits, labels, RNG, ALPHA, amplitude=amplitude, axis=axis,
                             where=where)
    return optax_loss(noisy, labels, axis=axis, where=where)


def noisy_reference(logits, labels, amplitude, axes=(-1,), where=None):
    """The float64 loss with the noise the loss draws, class axes moved last."""
    last = classes_last(logits, axes)
    noisy = reference.noisy_logits(last, labels, abs_xi_of(RNG, labels.shape), ALPHA, amplitude)
    if where is not None and np.ndim(where) == last.ndim + len(axes) - 1:
        where = classes_last(where, axes)
    return reference.masked_cross_entropy(noisy, labels, where)


# ------------------------------------------------------------------------ shapes of the batch


@pytest.mark.parametrize("how", NO_NOISE)
@pytest.mark.parametrize("batch, num_classes", BATCH_SHAPES)
def test_without_noise_any_batch_shape_is_optax_bit_for_bit(batch, num_classes, how):
    logits, labels, _ = problem(batch + (num_classes,), (-1,))
    ours = jax.jit(functools.partial(no_noise_loss, how))(logits, labels)
    theirs = jax.jit(optax_loss)(logits, labels)
    assert ours.shape == theirs.shape == batch and ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(ours, reference.masked_cross_entropy(logits, labels),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch, num_classes", BATCH_SHAPES)
def test_with_noise_any_batch_shape_is_optax_of_the_noisy_logits(batch, num_classes):
    logits, labels, amplitude = problem(batch + (num_classes,), (-1,))
    ours = jax.jit(noisy_loss)(logits, labels, amplitude)
    composed = jax.jit(optax_of_noisy_logits)(logits, labels, amplitude)
    assert ours.shape == composed.shape == batch
    np.testing.assert_allclose(ours, composed, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, noisy_reference(logits, labels, amplitude), rtol=2e-5,
                               atol=2e-6)


# ------------------------------------------------------------------------------ one class axis


@pytest.mark.parametrize("how", NO_NOISE)
@pytest.mark.parametrize("shape, axis", INT_AXES)
def test_without_noise_one_class_axis_anywhere_is_optax(shape, axis, how):
    logits, labels, _ = problem(shape, (axis,))
    ours = jax.jit(functools.partial(no_noise_loss, how, axis=axis))(logits, labels)
    theirs = jax.jit(functools.partial(optax_loss, axis=axis))(logits, labels)
    assert ours.shape == theirs.shape == labels.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        ours, reference.masked_cross_entropy(classes_last(logits, (axis,)), labels),
        rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, axis", INT_AXES)
def test_with_noise_one_class_axis_anywhere_is_optax_of_the_noisy_logits(shape, axis):
    logits, labels, amplitude = problem(shape, (axis,))
    ours = jax.jit(functools.partial(noisy_loss, axis=axis))(logits, labels, amplitude)
    composed = jax.jit(functools.partial(optax_of_noisy_logits, axis=axis))(
        logits, labels, amplitude)
    np.testing.assert_allclose(ours, composed, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, noisy_reference(logits, labels, amplitude, (axis,)),
                               rtol=2e-5, atol=2e-6)


# -------------------------------------------------------------------------- a tuple of axes


@pytest.mark.parametrize("how", NO_NOISE)
@pytest.mark.parametrize("axes", TUPLE_AXES)
def test_without_noise_a_tuple_of_class_axes_is_optax(axes, how):
    logits, labels, _ = problem((2, 3, 4, 5), axes)
    ours = jax.jit(functools.partial(no_noise_loss, how, axis=axes))(logits, labels)
    theirs = jax.jit(functools.partial(optax_loss, axis=axes))(logits, labels)
    assert ours.shape == theirs.shape == labels.shape
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        ours, reference.masked_cross_entropy(classes_last(logits, axes), labels),
        rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("axes", TUPLE_AXES)
def test_with_noise_a_tuple_of_class_axes_is_optax_of_the_noisy_logits(axes):
    logits, labels, amplitude = problem((2, 3, 4, 5), axes)
    ours = jax.jit(functools.partial(noisy_loss, axis=axes))(logits, labels, amplitude)
    composed = jax.jit(functools.partial(optax_of_noisy_logits, axis=axes))(
        logits, labels, amplitude)
    assert ours.shape == labels.shape
    np.testing.assert_allclose(ours, composed, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, noisy_reference(logits, labels, amplitude, axes),
                               rtol=2e-5, atol=2e-6)


# -------------------------------------------------------------------------------------- masks

# Optax's two kinds of mask on a 3 x 4 batch: per example, and per logit with one example
# that keeps one class (not its label's), one that keeps none and one that keeps all.
EXAMPLE_MASK = np.array([True, False, True])
LOGIT_MASK = np.array([[True, False, False, False], [False] * 4, [True] * 4])
MASKS = {"per_example": EXAMPLE_MASK, "per_logit": LOGIT_MASK}


def masked_problem():
    logits, labels, amplitude = problem((3, 4), (-1,), seed=5)
    return logits, labels.at[0].set(2), amplitude  # example 0's label class is masked out


@pytest.mark.parametrize("how", NO_NOISE)
@pytest.mark.parametrize("mask", sorted(MASKS))
def test_without_noise_a_mask_is_optax(mask, how):
    logits, labels, _ = masked_problem()
    where = jnp.asarray(MASKS[mask])

    @jax.jit
    def losses_and_grads(logits):
        def both(fn):
            return jax.value_and_grad(lambda lg: fn(lg).sum())(logits)[1], fn(logits)

        return (both(lambda lg: no_noise_loss(how, lg, labels, where=where)),
                both(lambda lg: optax_loss(lg, labels, where=where)))

    (grad, ours), (expected_grad, theirs) = losses_and_grads(logits)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, reference.masked_cross_entropy(logits, labels, MASKS[mask]),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-7)
    kept = MASKS[mask] if MASKS[mask].ndim == 1 else MASKS[mask].any(-1)
    np.testing.assert_array_equal(ours[~kept], 0.0)
    np.testing.assert_array_equal(grad[~kept], 0.0)


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_with_noise_a_mask_is_optax_of_the_noisy_logits(mask):
    logits, labels, amplitude = masked_problem()
    where = jnp.asarray(MASKS[mask])

    @jax.jit
    def losses_and_grads(logits, amplitude):
        def both(fn):
            grads = jax.grad(lambda lg, amp: fn(lg, amp).sum(), argnums=(0, 1))(logits, amplitude)
            return grads, fn(logits, amplitude)

        return (both(lambda lg, amp: noisy_loss(lg, labels, amp, where=where)),
                both(lambda lg, amp: optax_of_noisy_logits(lg, labels, amp, where=where)))

    (grads, ours), (expected_grads, composed) = losses_and_grads(logits, amplitude)
    np.testing.assert_allclose(ours, composed, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, noisy_reference(logits, labels, amplitude, where=MASKS[mask]),
                               rtol=2e-5, atol=2e-6)
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    kept = MASKS[mask] if MASKS[mask].ndim == 1 else MASKS[mask].any(-1)
    np.testing.assert_array_equal(ours[~kept], 0.0)
    np.testing.assert_array_equal(grads[0][~kept], 0.0)
    np.testing.assert_array_equal(grads[1][~kept], 0.0)
    if MASKS[mask].ndim == 2:  # a masked class other than the target gets no gradient
        is_target = np.arange(4) == np.asarray(labels)[:, None]
        np.testing.assert_array_equal(grads[0][~MASKS[mask] & ~is_target], 0.0)


@pytest.mark.parametrize("axes", [(0,), (1, 2), (2, 0)])
def test_with_noise_a_logit_mask_with_class_axes_is_optax_of_the_noisy_logits(axes):
    logits, labels, amplitude = problem((3, 4, 5), axes, seed=6)
    where = jax.random.bernoulli(jax.random.key(7), 0.6, logits.shape)
    ours = jax.jit(functools.partial(noisy_loss, axis=axes, where=where))(
        logits, labels, amplitude)
    composed = jax.jit(functools.partial(optax_of_noisy_logits, axis=axes, where=where))(
        logits, labels, amplitude)
    np.testing.assert_allclose(ours, composed, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ours, noisy_reference(logits, labels, amplitude, axes, where),
                               rtol=2e-5, atol=2e-6)


# -------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("case", ["alpha_zero", "no_key", "noise", "noise_logit_mask",
                                  "noise_axes"])
def test_gradients_match_finite_differences_in_float64(case):
    with jax.enable_x64(True):
        shape, axes = ((2, 3, 4), (1, 2)) if case == "noise_axes" else ((3, 4), (-1,))
        logits, labels, amplitude = problem(shape, axes, seed=8, dtype=jnp.float64)
        amplitude = amplitude.astype(jnp.float64)
        where = jnp.asarray(LOGIT_MASK) if case == "noise_logit_mask" else None
        axis = axes if len(axes) > 1 else -1
        if case in NO_NOISE:
            def fn(lg, amp):
                del amp
                return no_noise_loss(case, lg, labels)
        else:
            def fn(lg, amp):
                return noisy_loss(lg, labels, amp, where=where, axis=axis)

        check_grads(jax.jit(fn), (logits, amplitude), order=1, modes=["rev", "fwd"], eps=1e-4)


def test_without_noise_the_gradient_is_optaxs():
    logits, labels, _ = problem((6, 5), (-1,), seed=9)
    grad = jax.jit(jax.grad(lambda lg: no_noise_loss("no_key", lg, labels).sum()))(logits)
    expected = jax.jit(jax.grad(lambda lg: optax_loss(lg, labels).sum()))(logits)
    np.testing.assert_array_equal(grad, expected)


# ---------------------------------------------------------------------------- half precision


@pytest.mark.parametrize("where_kind", [None, "per_example", "per_logit"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_logits_give_a_loss_in_their_dtype(dtype, where_kind):
    logits, labels, amplitude = masked_problem()
    low = logits.astype(dtype)
    where = None if where_kind is None else jnp.asarray(MASKS[where_kind])
    theirs = jax.jit(functools.partial(optax_loss, where=where))(low, labels)
    clean = jax.jit(functools.partial(no_noise_loss, "no_key", where=where))(low, labels)
    noisy = jax.jit(functools.partial(noisy_loss, where=where))(low, labels, amplitude)
    assert theirs.dtype == clean.dtype == noisy.dtype == dtype
    # Computed in float32 and rounded once: the float32 loss of the same values, rounded.
    wide = low.astype(jnp.float32)
    np.testing.assert_array_equal(
        clean, jax.jit(functools.partial(optax_loss, where=where))(wide, labels).astype(dtype))
    np.testing.assert_array_equal(
        noisy, jax.jit(functools.partial(noisy_loss, where=where))(
            wide, labels, amplitude).astype(dtype))
    grad = jax.grad(lambda lg: noisy_loss(lg, labels, amplitude, where=where).sum())(low)
    assert grad.dtype == dtype and jnp.all(jnp.isfinite(grad.astype(jnp.float32)))
