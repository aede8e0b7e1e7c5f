"""The fused fast path (`_fused.py`) computes the plain definition (`_plain.py`): same values and
gradients, for every noise variant, shared or per-example noise, negative noise, a mask, float32
and bfloat16, and both of the fused backward passes (CPU's and the accelerators')."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj
from noisy_softmax_jax import _fused, _plain

BATCH, CLASSES = 24, 11
OPTIONS = {
    "per_example": {},
    "shared": {"shared_noise": True},
    "negative": {"negative": True},
    "where": {"where": True},
    "shared_negative_where": {"shared_noise": True, "negative": True, "where": True},
}


def make_inputs(dtype):
    k_logits, k_labels, k_scale = jax.random.split(jax.random.key(0), 3)
    logits = 4.0 * jax.random.normal(k_logits, (BATCH, CLASSES))
    labels = jax.random.randint(k_labels, (BATCH,), 0, CLASSES)
    target = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    # ||W_y|| ||x|| >= |f_y|; the first rows are aligned (a = f_y: the annealing clamp's kink)
    # and the last one is dominant with a large amplitude (noise of tens of nats: the fused
    # path's shift must be the exact maximum of the noisy logits).
    amplitude = jnp.abs(target) * jax.random.uniform(k_scale, (BATCH,), minval=1, maxval=3)
    amplitude = amplitude.at[:3].set(jnp.abs(target[:3]))
    logits = logits.at[-1, labels[-1]].set(60.0)
    amplitude = amplitude.at[-1].set(400.0)
    where = jnp.arange(BATCH) % 3 != 1
    return logits.astype(dtype), labels, amplitude, where


def fused_unchecked(logits, labels, rng, alpha, sigma, amplitude, where, *, noise, shared_noise,
                    negative, keep_exponentials, exact_shift):
    """The fused loss with the given backward pass and shift, masked as the public loss
    masks it."""
    loss = _fused._noisy_cross_entropy(logits, labels, rng, alpha, sigma, amplitude, noise,
                                       shared_noise, negative, keep_exponentials, exact_shift)
    return loss if where is None else jnp.where(where, loss, 0.0)


@functools.partial(jax.jit, static_argnames=("loss_fn",))
def values_and_gradients(logits, amplitude, alpha, loss_fn):
    """Per-example losses and the gradients of their sum in logits, amplitude and alpha."""
    def total(logits, amplitude, alpha):
        loss = loss_fn(logits, amplitude, alpha)
        return loss.sum(), loss

    (_, loss), grads = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(
        logits, amplitude, alpha)
    return loss, grads


def _cases():
    """Every combination; a few seconds each (three compiles), so all but the per-example
    float32 ones are marked slow."""
    for noise in nsj.NOISE_VARIANTS:
        for options in OPTIONS:
            for dtype in (jnp.float32, jnp.bfloat16):
                fast = options == "per_example" and dtype == jnp.float32
                yield pytest.param(noise, options, dtype, id=f"{noise}-{options}-{dtype.dtype}",
                                   marks=() if fast else pytest.mark.slow)


@pytest.mark.parametrize("noise, options, dtype", list(_cases()))
def test_fused_path_equals_the_plain_definition(noise, options, dtype):
    logits, labels, amplitude, where = make_inputs(dtype)
    options = OPTIONS[options]
    where = where if options.get("where") else None
    static = {"noise": noise, "shared_noise": options.get("shared_noise", False),
              "negative": options.get("negative", False)}
    rng, sigma = jax.random.key(7), jnp.float32(1.0)
    alpha = jnp.float32(0.5)

    def plain(lg, amp, a):
        return _plain.cross_entropy(lg, labels, rng, a, sigma, amp, where, **static)

    def public(lg, amp, a):  # the fused path with the backward pass of this backend (CPU)
        return nsj.noisy_softmax_cross_entropy(lg, labels, rng, a, amplitude=amp, where=where,
                                               **static)

    def accelerator(lg, amp, a):  # the fused path with the accelerators' backward pass
        return fused_unchecked(lg, labels, rng, a, sigma, amp, where, keep_exponentials=False,
                               exact_shift=True, **static)

    def one_cpu_device(lg, amp, a):  # CPU's backward pass with the one-device shift
        return fused_unchecked(lg, labels, rng, a, sigma, amp, where, keep_exponentials=True,
                               exact_shift=False, **static)

    expected_loss, expected_grads = values_and_gradients(logits, amplitude, alpha, plain)
    scale = 1.0 + np.abs(np.asarray(logits, np.float32)).max()
    # bfloat16 gradients are float32 ones rounded to bfloat16 (8 bits): a difference in the
    # last float32 bits can round to the neighbouring bfloat16.
    grad_rtol = 1e-5 if dtype == jnp.float32 else 2 ** -7
    for fused in (public, accelerator, one_cpu_device):
        loss, grads = values_and_gradients(logits, amplitude, alpha, fused)
        # The public loss is in the logits' dtype (rounded once), the internal one float32.
        assert expected_loss.dtype == jnp.float32
        assert loss.dtype == (logits.dtype if fused is public else jnp.float32)
        rtol = 1e-6 if loss.dtype == jnp.float32 else 2 ** -8
        np.testing.assert_allclose(np.asarray(loss, np.float32), expected_loss, rtol=rtol,
                                   atol=1e-6 * scale)
        for name, got, want in zip(("logits", "amplitude", "alpha"), grads, expected_grads):
            assert got.dtype == want.dtype, name
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                       rtol=grad_rtol, atol=1e-6, err_msg=name)
    if where is not None:
        np.testing.assert_array_equal(expected_loss[~where], 0.0)
