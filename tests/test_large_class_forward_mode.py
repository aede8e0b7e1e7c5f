"""The fused large-class loss is reverse mode only: forward mode raises an error that says so.

It is a `jax.custom_vjp` (its backward pass recomputes each block of logits, which keeps its
memory independent of the number of classes), and JAX gives such a function no forward mode.
Reverse mode and forward-over-reverse (`jax.hessian`) work; forward mode names the function
and the alternative, the materialised loss, instead of JAX's generic custom_vjp error.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import noisy_softmax_jax as nsj
from tests.test_large_class import make_problem, materialised

FEATURES, KERNEL, LABELS = make_problem(1, batch=4, dim=3, num_classes=7)
KEY = jax.random.key(2)


def fused_total(features, labels=LABELS, alpha=0.2, checked=False):
    if checked:
        return nsj.checked_fused_noisy_softmax_cross_entropy(
            features, KERNEL, labels, KEY, alpha, chunk_size=2)[1].sum()
    return nsj.fused_noisy_softmax_cross_entropy(features, KERNEL, labels, KEY, alpha,
                                                 chunk_size=2).sum()


# Forward mode applied around the call. (Applied around a jax.jit or jax.linearize that holds
# it, the error comes from JAX after the call returned: JAX's own custom_vjp message.)
FORWARD_MODES = {
    "jvp": lambda f: jax.jvp(f, (FEATURES,), (FEATURES,)),
    "jit_of_jvp": lambda f: jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(FEATURES),
    "jacfwd": lambda f: jax.jacfwd(f)(FEATURES),
    "jvp_in_alpha": lambda f: jax.jvp(lambda a: f(FEATURES, alpha=a), (0.2,), (1.0,)),
    "jvp_of_vmap": lambda f: jax.jvp(
        lambda x: jax.vmap(lambda row, y: f(row[None], y[None]))(x, LABELS),
        (FEATURES,), (FEATURES,)),
}


@pytest.mark.parametrize("checked", [False, True])
@pytest.mark.parametrize("mode", sorted(FORWARD_MODES))
def test_forward_mode_raises_naming_the_function_and_the_alternative(mode, checked):
    def total(features, labels=LABELS, alpha=0.2):
        return fused_total(features, labels, alpha=alpha, checked=checked)

    name = "checked_fused_noisy_softmax_cross_entropy" if checked else (
        "fused_noisy_softmax_cross_entropy")
    with pytest.raises(TypeError, match=rf"`{name}` has no forward-mode derivative") as raised:
        FORWARD_MODES[mode](total)
    assert "noisy_softmax_cross_entropy(features @ kernel" in str(raised.value)
    assert "target_amplitude" in str(raised.value)


def plain_total(features):
    return materialised(features, KERNEL, LABELS, KEY, 0.2).sum()


@pytest.mark.parametrize("checked", [False, True])
def test_reverse_mode_works_and_matches_the_materialised_loss(checked):
    np.testing.assert_allclose(jax.grad(fused_total)(FEATURES, checked=checked),
                               jax.grad(plain_total)(FEATURES), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_forward_over_reverse_works_and_the_alternative_has_every_mode():
    np.testing.assert_allclose(jax.hessian(fused_total)(FEATURES),
                               jax.hessian(plain_total)(FEATURES), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jax.jacfwd(plain_total)(FEATURES), jax.grad(plain_total)(FEATURES),
                               rtol=1e-5, atol=1e-6)


def test_other_type_errors_are_not_rewritten():
    with pytest.raises(TypeError, match=r"`features` must be a floating"):
        nsj.fused_noisy_softmax_cross_entropy(jnp.ones((4, 3), jnp.int32), KERNEL, LABELS,
                                              KEY, 0.2)
