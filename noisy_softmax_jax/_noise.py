"""The loss's noise draw: ``jax.random.normal``, per example under ``jax.vmap`` too.

Two pieces the draw needs beyond ``jax.random.normal``: `per_example_normal`, whose batching
rule gives every example of a ``jax.vmap`` its own noise, and `computed_once`, which keeps XLA
from redoing a per-example draw for every class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap


@custom_vmap
def per_example_normal(rng: jax.Array, template: jax.Array) -> jax.Array:
    """One standard normal per entry of `template` (its shape and dtype), drawn from `rng`.

    ``jax.random.normal(rng, template.shape, template.dtype)``, with a batching rule. Inside
    ``jax.vmap`` a function sees one example, so a plain draw would have the example's shape
    and give every example of the mapped axis the same noise from one key. Here:

    - one (unmapped) key and a mapped `template`: the draw is that of the mapped axis as a
      leading batch axis, ``jax.random.normal(rng, (axis_size,) + shape)``, so that
      ``jax.vmap(loss)(x, y)`` equals ``loss(x, y)`` with the same key (nested maps nest);
    - a mapped key: each key draws for its own call, as ``jax.vmap`` of the plain draw does.

    `template` carries no gradient (callers pass a ``stop_gradient``): only which of its axes
    are mapped matters.
    """
    return jax.random.normal(rng, template.shape, template.dtype)


@per_example_normal.def_vmap
def _per_example_normal_vmap(axis_size, in_batched, rng, template):
    del axis_size
    rng_mapped, template_mapped = in_batched
    if rng_mapped:
        shape = template.shape[1:] if template_mapped else template.shape
        return jax.vmap(lambda key: jax.random.normal(key, shape, template.dtype))(rng), True
    # The mapped axis leads `template`: drawing for its whole shape numbers the examples
    # row-major with that axis first, as the call on the batched arrays does.
    return per_example_normal(rng, template), True


@jax.custom_jvp
def computed_once(x: jax.Array) -> jax.Array:
    """`x`, unchanged, as the result of a reduction that XLA computes once.

    XLA fuses a cheap per-example computation (the noise draw, or the slope d f~_y / d f_y
    derived from it) into the [..., classes] loop that reads it and redoes it for every
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


@computed_once.defjvp
def _computed_once_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    return computed_once(x), dx
