"""alpha_schedule: a constant or an Optax schedule, evaluated at the step under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import noisy_softmax_jax as nsj


def test_constant_and_schedule():
    assert float(nsj.alpha_schedule(0.1)(0)) == float(nsj.alpha_schedule(0.1)(10**6)) == \
        np.float32(0.1)
    linear = optax.linear_schedule(0.2, 0.0, 100)
    assert nsj.alpha_schedule(linear) is linear


def test_schedule_drives_the_loss_inside_jit_without_recompiling():
    schedule = nsj.alpha_schedule(optax.linear_schedule(1.0, 0.0, 10))
    logits = jnp.zeros((8, 2))
    labels = jnp.zeros((8,), jnp.int32)

    @jax.jit
    def loss_at(step):
        return nsj.noisy_softmax_cross_entropy(logits, labels, jax.random.key(0),
                                               schedule(step), noise="free").mean()

    losses = [float(loss_at(step)) for step in (0, 5, 10)]
    assert losses[0] > losses[1] > losses[2]
    np.testing.assert_allclose(losses[2], np.log(2.0), rtol=1e-6)
    assert loss_at._cache_size() == 1
