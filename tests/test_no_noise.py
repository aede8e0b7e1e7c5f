"""No noise without a key or with alpha = 0: the plain cross-entropy, no amplitude needed.

`rng=None` means no noise (evaluation, like Flax's `Dropout(deterministic=True)`), and so does
an alpha known to be 0; only where noise is really drawn does the paper's noise need the
amplitude, and the error then names both heads' APIs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import noisy_softmax_jax as nsj
from tests.test_large_class import make_problem

LOGITS = jax.random.normal(jax.random.key(0), (6, 5)) * 3
LABELS = jnp.array([0, 4, 2, 1, 3, 0])
KEY = jax.random.key(1)
# Ways to ask for no noise: (rng, alpha)
NO_NOISE = {
    "no_key": (None, 0.1),
    "no_key_traced_alpha": (None, jnp.float32(0.7)),
    "python_zero": (KEY, 0.0),
    "int_zero": (KEY, 0),
    "numpy_zero": (KEY, np.float32(0.0)),
    "cpu_array_zero": (KEY, "a jax.Array 0 on a CPU device"),
    "no_key_zero": (None, 0.0),
}


def no_noise(case):
    """(rng, alpha) of a case; a jax.Array alpha is put on a CPU device, where its value is
    read without a device-to-host transfer (on an accelerator it would count as unknown)."""
    rng, alpha = NO_NOISE[case]
    if isinstance(alpha, str):
        alpha = jax.device_put(np.float32(0.0), jax.devices("cpu")[0])
    return rng, alpha
PLAIN = optax.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS)


@pytest.mark.parametrize("noise", nsj.NOISE_VARIANTS)
@pytest.mark.parametrize("case", sorted(NO_NOISE))
def test_no_noise_is_optax_without_an_amplitude(case, noise):
    rng, alpha = no_noise(case)
    loss = nsj.noisy_softmax_cross_entropy(LOGITS, LABELS, rng, alpha, noise=noise)
    np.testing.assert_array_equal(loss, PLAIN)


@pytest.mark.parametrize("case", sorted(NO_NOISE))
def test_checked_loss_without_noise_is_optax_without_an_amplitude(case):
    rng, alpha = no_noise(case)
    error, loss = nsj.checked_noisy_softmax_cross_entropy(LOGITS, LABELS, rng, alpha)
    assert error.get() is None
    np.testing.assert_array_equal(loss, PLAIN)


@pytest.mark.parametrize("case", sorted(NO_NOISE))
def test_noisy_logits_without_noise_are_the_logits(case):
    rng, alpha = no_noise(case)
    np.testing.assert_array_equal(nsj.noisy_logits(LOGITS, LABELS, rng, alpha), LOGITS)


@pytest.mark.parametrize("case", sorted(NO_NOISE))
def test_noisy_target_logit_without_noise_is_the_target(case):
    rng, alpha = no_noise(case)
    target = jnp.take_along_axis(LOGITS, LABELS[:, None], axis=-1)[:, 0]
    np.testing.assert_array_equal(nsj.noisy_target_logit(target, rng, alpha), target)


@pytest.mark.parametrize("case", sorted(NO_NOISE))
def test_saturation_metrics_without_noise_need_no_amplitude(case):
    rng, alpha = no_noise(case)
    metrics = nsj.saturation_metrics(LOGITS, LABELS, rng=rng, alpha=alpha)
    clean = nsj.saturation_metrics(LOGITS, LABELS)
    assert float(metrics["noise"]) == 0.0
    for name in clean:
        np.testing.assert_array_equal(metrics[name], clean[name], err_msg=name)


def test_no_key_under_jit_with_a_traced_alpha_is_optax_and_its_gradient():
    @jax.jit
    def value_and_grad(logits, alpha):
        return jax.value_and_grad(lambda lg: nsj.noisy_softmax_cross_entropy(
            lg, LABELS, None, alpha).sum())(logits)

    loss, grad = value_and_grad(LOGITS, 0.5)
    expected_loss, expected_grad = jax.jit(jax.value_and_grad(
        lambda lg: optax.softmax_cross_entropy_with_integer_labels(lg, LABELS).sum()))(LOGITS)
    np.testing.assert_array_equal(loss, expected_loss)
    np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("case", ["no_key", "python_zero"])
def test_fused_loss_without_noise_is_optax_of_the_materialised_logits(case):
    rng, alpha = no_noise(case)
    features, kernel, labels = make_problem(0)

    def fused(features, kernel):
        return nsj.fused_noisy_softmax_cross_entropy(features, kernel, labels, rng, alpha,
                                                     chunk_size=16)

    def plain(features, kernel):
        return optax.softmax_cross_entropy_with_integer_labels(features @ kernel, labels)

    np.testing.assert_allclose(fused(features, kernel), plain(features, kernel), rtol=1e-5)
    grads = jax.grad(lambda f, k: fused(f, k).sum(), argnums=(0, 1))(features, kernel)
    expected = jax.grad(lambda f, k: plain(f, k).sum(), argnums=(0, 1))(features, kernel)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("noise", ["annealed", "amplitude"])
@pytest.mark.parametrize("function", ["loss", "checked", "noisy_logits", "noisy_target_logit",
                                      "saturation_metrics"])
def test_drawn_noise_still_needs_the_amplitude_and_the_error_names_both_heads(function, noise):
    target = LOGITS[:, 0]
    call = {
        "loss": lambda: nsj.noisy_softmax_cross_entropy(LOGITS, LABELS, KEY, 0.1, noise=noise),
        "checked": lambda: nsj.checked_noisy_softmax_cross_entropy(LOGITS, LABELS, KEY, 0.1,
                                                                   noise=noise),
        "noisy_logits": lambda: nsj.noisy_logits(LOGITS, LABELS, KEY, 0.1, noise=noise),
        "noisy_target_logit": lambda: nsj.noisy_target_logit(target, KEY, 0.1, noise=noise),
        "saturation_metrics": lambda: nsj.saturation_metrics(LOGITS, LABELS, rng=KEY,
                                                             alpha=0.1, noise=noise),
    }[function]
    with pytest.raises(ValueError, match=rf"noise='{noise}' needs `amplitude`") as raised:
        call()
    message = str(raised.value)
    for name in ("noisy_softmax_jax.NoisySoftmaxHead", "noisy_softmax_jax.nnx.NoisySoftmaxHead",
                 "out.amplitude(labels)", "target_amplitude", "rng=None"):
        assert name in message, name


def test_a_traced_alpha_with_a_key_still_needs_the_amplitude():
    # Under jit alpha could be anything: noise is drawn, so the amplitude is required.
    with pytest.raises(ValueError, match=r"needs `amplitude`"):
        jax.jit(lambda a: nsj.noisy_softmax_cross_entropy(LOGITS, LABELS, KEY, a))(0.0)


def test_no_key_still_checks_the_other_arguments():
    with pytest.raises(ValueError, match=r"`alpha` must be >= 0"):
        nsj.noisy_softmax_cross_entropy(LOGITS, LABELS, None, -1.0)
    with pytest.raises(ValueError, match=r"`noise` must be one of"):
        nsj.noisy_softmax_cross_entropy(LOGITS, LABELS, None, 0.1, noise="gaussian")
    with pytest.raises(ValueError, match=r"`amplitude` must have one entry per example"):
        nsj.noisy_softmax_cross_entropy(LOGITS, LABELS, None, 0.1, amplitude=jnp.ones(3))
