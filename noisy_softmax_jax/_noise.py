"""The loss's noise draw: ``jax.random.normal``, bit for bit, without its while loop on XLA:CPU.

Kept apart from the loss because it re-derives JAX's threefry bits; ``tests/test_noise_draw.py``
pins the equality with ``jax.random.normal`` for every case it handles and the fallback for the
others, so a change in JAX's derivation fails the tests instead of changing the noise. Also here:
`computed_once`, which keeps XLA from redoing such a per-example draw for every class.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_batching import custom_vmap

# Threefry-2x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011):
# 20 rounds in 5 groups of 4, rotation constants alternating between the two rows below,
# a key injection after each group.
_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_THREEFRY_PARITY = np.uint32(0x1BD11BDA)


def _threefry2x32(key, x0, x1):
    """The Threefry-2x32 block function of the counter pair (x0, x1), as straight-line code."""
    keys = (key[0], key[1], key[0] ^ key[1] ^ _THREEFRY_PARITY)
    x0, x1 = x0 + keys[0], x1 + keys[1]
    for group in range(5):
        for rotation in _THREEFRY_ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = (jax.lax.shift_left(x1, np.uint32(rotation))
                  | jax.lax.shift_right_logical(x1, np.uint32(32 - rotation)))
            x1 = x0 ^ x1
        x0 = x0 + keys[(group + 1) % 3]
        x1 = x1 + keys[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def _is_threefry_key(rng) -> bool:
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(rng)) == "threefry2x32"
    # A legacy uint32[2] key. The attribute is the value in effect (context managers included);
    # JAX's type stubs do not declare it.
    return jax.config.jax_default_prng_impl == "threefry2x32"  # type: ignore[attr-defined]


def standard_normal(rng, shape, dtype):
    """``jax.random.normal(rng, shape, dtype)``, bit for bit, without its loop on CPU.

    On XLA:CPU JAX lowers the threefry hash to a five-step while loop (to keep compile times
    short), and each step runs a dozen small kernels: for the one normal per example this
    loss draws, that loop costs more than the [batch, classes] work of a small batch. For a
    float32 draw from a threefry key (partitionable mode, JAX's default) the same bits are
    computed here as one straight-line elementwise computation, then turned into normals as
    ``jax.random.normal`` does (uniform in [nextafter(-1, 0), 1) from the top 23 bits, then
    sqrt(2) erfinv). Any other key, dtype, mode or backend calls ``jax.random.normal``.
    ``tests/test_noise_draw.py`` pins the equality.
    """
    size = math.prod(shape)
    partitionable = jax.config.jax_threefry_partitionable  # type: ignore[attr-defined]
    if not (dtype == jnp.float32 and size < 2**32 and jax.default_backend() == "cpu"
            and partitionable and _is_threefry_key(rng)):
        return jax.random.normal(rng, shape, dtype=dtype)
    key = jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    # The counter of element i (row-major) is the 64-bit integer i, as (high, low) words;
    # written with broadcasted iotas, which a sharded batch partitions without gathering.
    low = jnp.zeros(shape, jnp.uint32)
    for axis in range(len(shape)):
        stride = np.uint32(math.prod(shape[axis + 1:]))
        low = low + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * stride
    bits0, bits1 = _threefry2x32(key, jnp.zeros(shape, jnp.uint32), low)
    bits = bits0 ^ bits1
    # A float in [1, 2) with the top 23 bits as its mantissa, moved to [lo, 1).
    one = np.float32(1.0)
    lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
    floats = jax.lax.bitcast_convert_type(
        jax.lax.shift_right_logical(bits, np.uint32(9)) | one.view(np.uint32), jnp.float32) - one
    uniform = jax.lax.max(lo, floats * (one - lo) + lo)
    return np.float32(np.sqrt(2)) * jax.lax.erf_inv(uniform)


@custom_vmap
def per_example_normal(rng: jax.Array, template: jax.Array) -> jax.Array:
    """One standard normal per entry of `template` (its shape and dtype), drawn from `rng`.

    ``standard_normal(rng, template.shape, template.dtype)``, with a batching rule. Inside
    ``jax.vmap`` a function sees one example, so a plain draw would have the example's shape
    and give every example of the mapped axis the same noise from one key. Here:

    - one (unmapped) key and a mapped `template`: the draw is that of the mapped axis as a
      leading batch axis, ``standard_normal(rng, (axis_size,) + shape)``, so that
      ``jax.vmap(loss)(x, y)`` equals ``loss(x, y)`` with the same key (nested maps nest);
    - a mapped key: each key draws for its own call, as ``jax.vmap`` of the plain draw does.

    `template` carries no gradient (callers pass a ``stop_gradient``): only which of its axes
    are mapped matters.
    """
    return standard_normal(rng, template.shape, template.dtype)


@per_example_normal.def_vmap
def _per_example_normal_vmap(axis_size, in_batched, rng, template):
    del axis_size
    rng_mapped, template_mapped = in_batched
    if rng_mapped:
        shape = template.shape[1:] if template_mapped else template.shape
        return jax.vmap(lambda key: standard_normal(key, shape, template.dtype))(rng), True
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
