"""noisy_softmax_cross_entropy against a float64 NumPy reference, Optax and the paper."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jax.test_util import check_grads
from scipy import stats

import noisy_softmax_jax as nsj
from noisy_softmax_jax import loss as loss_lib
from tests import reference

VARIANTS = ["annealed", "amplitude", "free"]


def make_batch(seed, batch=(16,), num_classes=10, scale=3.0, dtype=jnp.float32):
    """Logits of a bias-free linear classifier, with the amplitude that goes with them."""
    k_x, k_w, k_y = jax.random.split(jax.random.key(seed), 3)
    features = jax.random.normal(k_x, batch + (8,), jnp.float32)
    kernel = scale * jax.random.normal(k_w, (8, num_classes), jnp.float32) / np.sqrt(8)
    labels = jax.random.randint(k_y, batch, 0, num_classes)
    logits = (features @ kernel).astype(dtype)
    return features, kernel, logits, labels, nsj.target_amplitude(features, kernel, labels)


def abs_xi_of(rng, shape, shared=False, dtype=jnp.float32):
    """|xi| as the loss draws it, recovered through the public noisy_target_logit."""
    zeros = jnp.zeros(shape, dtype)
    return -nsj.noisy_target_logit(zeros, rng, 1.0, noise="free", shared_noise=shared)


@pytest.mark.parametrize("noise", VARIANTS)
@pytest.mark.parametrize("negative", [False, True])
def test_matches_float64_reference(noise, negative):
    _, _, logits, labels, amplitude = make_batch(0, batch=(4, 8))
    rng = jax.random.key(42)
    loss_fn = jax.jit(lambda *a: nsj.noisy_softmax_cross_entropy(
        *a, amplitude=amplitude, noise=noise, negative=negative))
    for alpha in (0.05, 0.1, 1.0):
        loss = loss_fn(logits, labels, rng, alpha)
        expected = reference.noisy_softmax_loss(
            logits, labels, abs_xi_of(rng, labels.shape), alpha, amplitude, noise, negative)
        assert loss.shape == labels.shape and loss.dtype == jnp.float32
        np.testing.assert_allclose(loss, expected, rtol=2e-5, atol=2e-5, err_msg=f"{alpha=}")


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 2, 4)])
@pytest.mark.parametrize("noise", VARIANTS)
def test_alpha_zero_is_optax(shape, noise):
    _, _, logits, labels, amplitude = make_batch(1, batch=shape, num_classes=13)
    ours = jax.jit(lambda lg, lb, a: nsj.noisy_softmax_cross_entropy(
        lg, lb, jax.random.key(3), 0.0, amplitude=a, noise=noise))(logits, labels, amplitude)
    theirs = jax.jit(optax.softmax_cross_entropy_with_integer_labels)(logits, labels)
    np.testing.assert_array_equal(ours, theirs)


def test_noise_only_lowers_the_target_and_raises_the_loss():
    _, _, logits, labels, amplitude = make_batch(2, batch=(256,))
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    rng = jax.random.key(0)
    for noise in VARIANTS:
        noisy = nsj.noisy_softmax_cross_entropy(logits, labels, rng, 0.1, amplitude=amplitude,
                                                noise=noise)
        raised = nsj.noisy_softmax_cross_entropy(logits, labels, rng, 0.1, amplitude=amplitude,
                                                 noise=noise, negative=True)
        assert jnp.all(noisy >= plain) and jnp.mean(noisy - plain) > 1e-3
        assert jnp.all(raised <= plain) and jnp.mean(plain - raised) > 1e-3


def test_annealing_factor_never_raises_the_target_logit():
    # An aligned feature has amplitude == f_y; rounding can put amplitude a hair below f_y.
    logits = jnp.array([[5.0, 1.0, -2.0], [0.5, 3.0, 0.0]])
    labels = jnp.array([0, 1])
    amplitude = jnp.array([5.0 - 1e-6, 3.0 - 1e-6])
    loss, grad = jax.value_and_grad(lambda lg, amp: nsj.noisy_softmax_cross_entropy(
        lg, labels, jax.random.key(0), 10.0, amplitude=amp).sum(), argnums=(0, 1))(
        logits, amplitude)
    np.testing.assert_array_equal(loss, optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).sum())
    np.testing.assert_array_equal(grad[1], 0.0)
    assert jnp.all(jnp.isfinite(grad[0]))


def test_injected_noise_is_half_normal_with_scale_sigma():
    # Two classes with zero logits and free noise: the loss is softplus(n) with n the
    # injected noise, so n = log(expm1(loss)) recovers alpha * |xi| from the loss value.
    n, alpha, sigma = 20_000, 0.5, 2.0
    logits = jnp.zeros((n, 2))
    labels = jnp.zeros((n,), jnp.int32)
    loss = nsj.noisy_softmax_cross_entropy(logits, labels, jax.random.key(7), alpha,
                                           noise="free", sigma=sigma)
    noise = np.log(np.expm1(np.asarray(loss, np.float64))) / alpha
    assert np.all(noise > -1e-3)
    result = stats.kstest(noise, stats.halfnorm(scale=sigma).cdf)
    assert result.pvalue > 1e-3, result
    # A wrong scale is rejected: the test can fail.
    assert stats.kstest(noise, stats.halfnorm(scale=1.1 * sigma).cdf).pvalue < 1e-6
    np.testing.assert_allclose(noise.mean(), sigma * np.sqrt(2 / np.pi), rtol=0.02)


def test_one_noise_per_example_or_one_per_batch():
    logits = jnp.zeros((64, 2))
    labels = jnp.zeros((64,), jnp.int32)
    rng = jax.random.key(0)
    per_example = nsj.noisy_softmax_cross_entropy(logits, labels, rng, 1.0, noise="free")
    shared = nsj.noisy_softmax_cross_entropy(logits, labels, rng, 1.0, noise="free",
                                             shared_noise=True)
    assert np.unique(np.asarray(per_example)).size == 64
    assert np.unique(np.asarray(shared)).size == 1 and shared[0] > np.log(2.0)


def test_same_key_same_loss_different_key_different_noise():
    _, _, logits, labels, amplitude = make_batch(3)
    def loss(rng):
        return nsj.noisy_softmax_cross_entropy(logits, labels, rng, 0.1, amplitude=amplitude)

    np.testing.assert_array_equal(loss(jax.random.key(5)), loss(jax.random.key(5)))
    assert not np.allclose(loss(jax.random.key(5)), loss(jax.random.key(6)))


def test_legacy_and_typed_keys_draw_the_same_noise():
    _, _, logits, labels, amplitude = make_batch(4)
    typed = nsj.noisy_softmax_cross_entropy(logits, labels, jax.random.key(9), 0.1,
                                            amplitude=amplitude)
    legacy = nsj.noisy_softmax_cross_entropy(logits, labels, jax.random.PRNGKey(9), 0.1,
                                             amplitude=amplitude)
    np.testing.assert_array_equal(typed, legacy)


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("noise", VARIANTS)
def test_gradient_matches_closed_form(noise, negative):
    _, _, logits, labels, amplitude = make_batch(5, batch=(32,))
    rng = jax.random.key(1)

    def total(lg):
        return nsj.noisy_softmax_cross_entropy(
            lg, labels, rng, 0.3, amplitude=amplitude, noise=noise, negative=negative).sum()

    grad = jax.jit(jax.grad(total))(logits)
    expected = reference.noisy_softmax_target_gradient(
        logits, labels, abs_xi_of(rng, labels.shape), 0.3, amplitude, noise, negative)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_gradient_through_features_and_weights_is_the_papers():
    # The paper (Chen, Deng & Du 2017): with c = alpha|xi| held constant,
    #   d f~_y/dx   = (1 + c) W_y - c ||W_y|| x / ||x||
    #   d f~_y/dW_y = (1 + c) x   - c ||x|| W_y / ||W_y||
    with jax.enable_x64(True):
        features, kernel, _, labels, _ = make_batch(6, batch=(1,))
        x, kernel, y = features[0].astype(jnp.float64), kernel.astype(jnp.float64), labels[0]
        rng, alpha = jax.random.key(2), 0.4

        def noisy_target(x, kernel):
            f_y = (x @ kernel)[y]
            amplitude = nsj.target_amplitude(x[None], kernel, y[None])[0]
            return nsj.noisy_target_logit(f_y[None], rng, alpha, amplitude=amplitude[None])[0]

        c = alpha * float(abs_xi_of(rng, (1,), dtype=jnp.float64)[0])
        w_y = kernel[:, y]
        dx, dkernel = jax.grad(noisy_target, argnums=(0, 1))(x, kernel)
        np.testing.assert_allclose(
            dx, (1 + c) * w_y - c * jnp.linalg.norm(w_y) * x / jnp.linalg.norm(x), rtol=1e-10)
        np.testing.assert_allclose(
            dkernel[:, y], (1 + c) * x - c * jnp.linalg.norm(x) * w_y / jnp.linalg.norm(w_y),
            rtol=1e-10)
        np.testing.assert_array_equal(np.delete(np.asarray(dkernel), int(y), axis=1), 0.0)


@pytest.mark.parametrize("noise", VARIANTS)
def test_check_grads_float64(noise):
    with jax.enable_x64(True):
        _, _, logits, labels, amplitude = make_batch(7, batch=(6,), dtype=jnp.float64)
        amplitude = amplitude.astype(jnp.float64) + 0.5  # away from the clamp's kink
        rng = jax.random.key(3)
        def fn(lg, amp):
            return nsj.noisy_softmax_cross_entropy(lg, labels, rng, 0.2, amplitude=amp,
                                                   noise=noise)

        check_grads(fn, (logits, amplitude), order=2, modes=["fwd", "rev"], eps=1e-4)


def test_changing_alpha_or_sigma_does_not_recompile():
    _, _, logits, labels, amplitude = make_batch(8)
    rng = jax.random.key(0)

    @jax.jit
    def step(logits, alpha, sigma):
        return nsj.noisy_softmax_cross_entropy(logits, labels, rng, alpha, amplitude=amplitude,
                                               sigma=sigma).mean()

    values = [step(logits, alpha, sigma) for alpha, sigma in [(0.1, 1.0), (0.2, 1.0), (0.5, 2.0)]]
    assert len({float(v) for v in values}) == 3
    assert step._cache_size() == 1
    # Eager calls reuse one compiled program too.
    before = loss_lib._loss._cache_size()
    for alpha in (0.01, 0.02, 0.03):
        nsj.noisy_softmax_cross_entropy(logits, labels, rng, alpha, amplitude=amplitude)
    assert loss_lib._loss._cache_size() - before <= 1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_is_computed_in_float32_and_returned_in_its_dtype(dtype):
    _, _, logits, labels, amplitude = make_batch(9, batch=(64,), scale=20.0)
    low = logits.astype(dtype)
    rng = jax.random.key(0)
    loss = nsj.noisy_softmax_cross_entropy(low, labels, rng, 0.1, amplitude=amplitude)
    assert loss.dtype == dtype  # Optax's dtype (issue 19; float32 before)
    # The same (rounded) values in float32 give the same loss, rounded once at the end:
    # nothing was computed in half precision.
    expected = nsj.noisy_softmax_cross_entropy(low.astype(jnp.float32), labels, rng, 0.1,
                                               amplitude=amplitude)
    np.testing.assert_array_equal(loss, expected.astype(dtype))
    grad = jax.grad(lambda lg: nsj.noisy_softmax_cross_entropy(
        lg, labels, rng, 0.1, amplitude=amplitude).sum())(low)
    assert grad.dtype == dtype and jnp.all(jnp.isfinite(grad.astype(jnp.float32)))


@pytest.mark.parametrize("noise", VARIANTS)
def test_extreme_logits_are_finite_and_correct(noise):
    logits = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3], [3e4, 3e4, -3e4]], jnp.float32)
    labels = jnp.array([1, 0, 2])
    amplitude = jnp.abs(logits).max(axis=-1) * 2
    rng = jax.random.key(0)
    loss, grad = jax.value_and_grad(lambda lg: nsj.noisy_softmax_cross_entropy(
        lg, labels, rng, 0.1, amplitude=amplitude, noise=noise).sum())(logits)
    per_example = nsj.noisy_softmax_cross_entropy(logits, labels, rng, 0.1, amplitude=amplitude,
                                                  noise=noise)
    assert jnp.isfinite(loss) and jnp.all(jnp.isfinite(grad))
    expected = reference.noisy_softmax_loss(logits, labels, abs_xi_of(rng, (3,)), 0.1,
                                            amplitude, noise)
    np.testing.assert_allclose(per_example, expected, rtol=1e-5)


def test_where_masks_examples_out():
    _, _, logits, labels, amplitude = make_batch(10, batch=(8,))
    where = jnp.array([True, False] * 4)
    rng = jax.random.key(0)
    def fn(lg, w):
        return nsj.noisy_softmax_cross_entropy(lg, labels, rng, 0.1, amplitude=amplitude,
                                               where=w)

    masked, full = fn(logits, where), fn(logits, None)
    np.testing.assert_array_equal(masked[~where], 0.0)
    np.testing.assert_array_equal(masked[where], full[where])
    grad = jax.grad(lambda lg: fn(lg, where).sum())(logits)
    np.testing.assert_array_equal(grad[~where], 0.0)
    assert jnp.all(jnp.abs(grad[where]).sum(-1) > 0)


def test_vmap_over_a_leading_axis_with_a_key_each():
    _, _, logits, labels, amplitude = make_batch(11, batch=(3, 5))
    keys = jax.random.split(jax.random.key(0), 3)
    def fn(lg, lb, k, amp):
        return nsj.noisy_softmax_cross_entropy(lg, lb, k, 0.1, amplitude=amp)

    batched = jax.vmap(fn)(logits, labels, keys, amplitude)
    for i in range(3):
        np.testing.assert_allclose(batched[i], fn(logits[i], labels[i], keys[i], amplitude[i]),
                                   rtol=1e-6)


def test_sharded_over_eight_devices_equals_one_device():
    assert jax.device_count() == 8, "tests/conftest.py emulates 8 CPU devices"
    _, _, logits, labels, amplitude = make_batch(12, batch=(64,))
    rng = jax.random.key(0)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    sharded = [jax.device_put(x, rows) for x in (logits, labels, amplitude)]

    def loss_and_grad(lg, lb, amp):
        return jax.value_and_grad(lambda lg: nsj.noisy_softmax_cross_entropy(
            lg, lb, rng, 0.1, amplitude=amp).mean())(lg)

    loss, grad = jax.jit(loss_and_grad)(*sharded)
    assert len(grad.sharding.device_set) == 8
    expected_loss, expected_grad = loss_and_grad(logits, labels, amplitude)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-8)
    per_example = nsj.noisy_softmax_cross_entropy(*sharded[:2], rng, 0.1, amplitude=sharded[2])
    np.testing.assert_allclose(per_example, nsj.noisy_softmax_cross_entropy(
        logits, labels, rng, 0.1, amplitude=amplitude), rtol=1e-6)


COLLECTIVES = ("all-reduce", "all-gather", "collective-permute", "all-to-all",
               "reduce-scatter")


@pytest.mark.parametrize("case", ["per_example", "shared", "where", "logit_mask", "bfloat16",
                                  "no_key"])
def test_a_sharded_batch_compiles_without_collectives(case):
    # Per-example losses of a batch split over 8 devices need nothing from other devices:
    # no data-dependent branch over the batch (a lax.cond on any example would need an
    # all-reduce), no gather of the noise. Value and gradient, with a per-example cotangent.
    assert jax.device_count() == 8, "tests/conftest.py emulates 8 CPU devices"
    dtype = jnp.bfloat16 if case == "bfloat16" else jnp.float32
    _, _, logits, labels, amplitude = make_batch(13, batch=(64,), dtype=dtype)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    where = {"where": jnp.arange(64) % 3 != 0,
             "logit_mask": jnp.arange(64 * 10).reshape(64, 10) % 7 != 0}.get(case)
    rng = None if case == "no_key" else jax.random.key(0)

    def value_and_vjp(logits, labels, amplitude, where, cotangent):
        def loss_fn(lg, amp):
            return nsj.noisy_softmax_cross_entropy(lg, labels, rng, 0.1, amplitude=amp,
                                                   where=where, shared_noise=case == "shared")

        loss, vjp = jax.vjp(loss_fn, logits, amplitude)
        return loss, vjp(cotangent)

    args = [jax.device_put(x, rows) for x in (logits, labels, amplitude)]
    args += [None if where is None else jax.device_put(where, rows),
             jax.device_put(jnp.ones(64, dtype), rows)]
    hlo = jax.jit(value_and_vjp).lower(*args).compile().as_text()
    found = [name for name in COLLECTIVES if name in hlo]
    assert not found, found
    # And the sharded values are the unsharded ones.
    loss, grads = jax.jit(value_and_vjp)(*args)
    expected_loss, expected_grads = value_and_vjp(logits, labels, amplitude, where,
                                                  jnp.ones(64, dtype))
    np.testing.assert_array_equal(np.asarray(loss, np.float32),
                                  np.asarray(expected_loss, np.float32))
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                   rtol=1e-6, atol=1e-7)
