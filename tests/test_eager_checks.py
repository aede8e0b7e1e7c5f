"""Eager value checks read only what is on the host: no device-to-host transfer, no sync.

Python numbers, lists, NumPy arrays and jax.Arrays on CPU devices are read and checked; the
values of a jax.Array on an accelerator are not (reading them would block on a copy off the
device), so there the loss behaves as under jit. On this CPU-only machine "on an accelerator"
is simulated by patching the one predicate that decides it; `benchmarks/gpu_check.sh` style
runs on a GPU check the real thing with `jax.transfer_guard_device_to_host("disallow")`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj
from noisy_softmax_jax import _validation

LOGITS = jnp.zeros((4, 3))
KEY = jax.random.key(0)


@pytest.fixture
def on_an_accelerator(monkeypatch):
    """Every jax.Array counts as living on an accelerator."""
    monkeypatch.setattr(_validation, "_on_host_devices", lambda x: False)


def test_host_data_and_cpu_arrays_are_read():
    assert _validation.host_value([1, 2]).tolist() == [1, 2]
    assert _validation.host_value(np.float32(0.5)) == 0.5
    cpu = jax.device_put(jnp.arange(3), jax.devices("cpu")[0])
    assert _validation.host_value(cpu).tolist() == [0, 1, 2]
    assert _validation.is_known_zero(jax.device_put(0.0, jax.devices("cpu")[0]))


def test_tracers_are_not_read():
    seen = []
    jax.jit(lambda x: seen.append(_validation.host_value(x)) or x)(jnp.ones(2))
    jax.vmap(lambda x: seen.append(_validation.host_value(x)) or x)(jnp.ones(2))
    assert seen == [None, None]


def test_arrays_off_the_host_are_not_read(on_an_accelerator):
    labels = jnp.array([0, 1, 2, 7])  # 7 is out of range: not seen, NaN as under jit
    assert _validation.host_value(labels) is None
    loss = nsj.noisy_softmax_cross_entropy(LOGITS, labels, KEY, jnp.float32(0.1), noise="free")
    assert np.isnan(loss[3]) and np.all(np.isfinite(loss[:3]))


def test_an_alpha_off_the_host_is_not_known_to_be_zero(on_an_accelerator):
    # Noise may be drawn, so the amplitude is required, as under jit.
    with pytest.raises(ValueError, match=r"needs `amplitude`"):
        nsj.noisy_softmax_cross_entropy(LOGITS, jnp.array([0, 1, 2, 0]), KEY, jnp.float32(0.0))
    # A Python 0 is still known.
    nsj.noisy_softmax_cross_entropy(LOGITS, jnp.array([0, 1, 2, 0]), KEY, 0.0)


def test_a_mask_off_the_host_leaves_host_labels_unchecked(on_an_accelerator):
    # With the mask's values unknown, any label may be padding: none is checked, and the
    # unmasked out-of-range one gives NaN as under jit.
    labels = np.array([7, -1, 2, 0])
    where = np.array([True, False, True, True])
    loss = nsj.noisy_softmax_cross_entropy(LOGITS, labels, KEY, 0.1, noise="free",
                                           where=jnp.asarray(where))
    assert np.isnan(loss[0]) and loss[1] == 0
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 3\).*labels\[0\] = 7"):
        nsj.noisy_softmax_cross_entropy(LOGITS, labels, KEY, 0.1, noise="free", where=where)


@pytest.mark.parametrize("function", ["loss", "checked", "noisy_logits", "saturation_metrics",
                                      "fused"])
def test_no_device_to_host_transfer_on_any_backend(function):
    # On CPU the guard cannot fire (nothing leaves a device); on an accelerator it would.
    device = jax.devices()[0]
    logits, labels = jax.device_put((LOGITS, jnp.array([0, 1, 2, 0])), device)
    alpha, amplitude = jax.device_put((jnp.float32(0.1), jnp.ones(4)), device)
    features, kernel = jax.device_put((jnp.ones((4, 2)), jnp.ones((2, 3))), device)
    call = {
        "loss": lambda: nsj.noisy_softmax_cross_entropy(logits, labels, KEY, alpha,
                                                        amplitude=amplitude),
        "checked": lambda: nsj.checked_noisy_softmax_cross_entropy(logits, labels, KEY, alpha,
                                                                   amplitude=amplitude)[1],
        "noisy_logits": lambda: nsj.noisy_logits(logits, labels, KEY, alpha, amplitude=amplitude),
        "saturation_metrics": lambda: nsj.saturation_metrics(
            logits, labels, amplitude=amplitude, rng=KEY, alpha=alpha)["target_prob"],
        "fused": lambda: nsj.fused_noisy_softmax_cross_entropy(features, kernel, labels, KEY,
                                                               alpha),
    }[function]
    call()  # compiled outside the guard
    with jax.transfer_guard_device_to_host("disallow"):
        result = call()
    assert result is not None
