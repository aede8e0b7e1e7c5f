"""Argument checks shared by the loss and the diagnostics.

Shapes and dtypes are static, so they are checked in every call, traced or
not. Values (label range, the sign of ``alpha`` and ``sigma``) are checked only
when they are concrete, that is when the function is called eagerly; under
``jax.jit`` they are tracers and the checked mode
(:func:`noisy_softmax_jax.checked_noisy_softmax_cross_entropy`) covers them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NOISE_VARIANTS = ("annealed", "amplitude", "free")
"""Names accepted by the ``noise`` argument: the paper's method and its ablations."""

_NEEDS_AMPLITUDE = ("annealed", "amplitude")


def concrete_value(x) -> np.ndarray | None:
    """Returns ``x`` as a NumPy array, or None when it is a tracer."""
    try:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return None  # spread over several processes: no process sees all values
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _dtype_name(x) -> str:
    return str(jnp.result_type(x)) if hasattr(x, "dtype") else type(x).__name__


def _as_array(name: str, x) -> jax.Array:
    """``jnp.asarray(x)``, with an error that names the argument when ``x`` is not numeric."""
    if isinstance(x, jax.Array):
        return x
    try:
        return jnp.asarray(x)
    except (TypeError, ValueError) as error:  # None, strings, ragged or object arrays
        raise TypeError(
            f"`{name}` must be a numeric array or number; got {type(x).__name__} that JAX "
            f"cannot convert ({error})."
        ) from None


def check_floating(name: str, x, shape_hint: str) -> jax.Array:
    x = _as_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating array {shape_hint} (float32, bfloat16 or "
            f"float16); got dtype {x.dtype}."
        )
    return x


def _require_class_axis(logits: jax.Array | jax.ShapeDtypeStruct) -> None:
    if logits.ndim < 1:
        raise ValueError("`logits` must have a class axis: expected shape [..., C]; got a scalar.")


def check_class_axis(axis, logits: jax.Array) -> int:
    """The class axis of `logits` as a non-negative int, as in Optax's ``axis`` (one axis)."""
    _require_class_axis(logits)
    if isinstance(axis, bool) or not isinstance(axis, int | np.integer):
        raise TypeError(
            f"`axis` must be an int, the class axis of `logits`; got {type(axis).__name__} "
            f"{axis!r}. (Optax's tuple of axes is not supported: reshape the logits instead.)"
        )
    if not -logits.ndim <= axis < logits.ndim:
        raise ValueError(
            f"`axis` must lie in [{-logits.ndim}, {logits.ndim}) for logits of shape "
            f"{logits.shape}; got axis = {axis}."
        )
    return int(axis) % logits.ndim


def check_labels(labels, logits: jax.Array | jax.ShapeDtypeStruct) -> jax.Array:
    return check_labels_along_axis(labels, logits, -1)


def check_labels_along_axis(
    labels, logits: jax.Array | jax.ShapeDtypeStruct, axis: int
) -> jax.Array:
    """`check_labels` for logits whose class axis is `axis` (checked by `check_class_axis`)."""
    if not isinstance(labels, jax.Array):
        # Checked on the host before JAX converts them: without x64, JAX stores int64 labels
        # as int32, which would wrap an out-of-range label such as 2**32 into a valid one.
        try:
            labels = np.asarray(labels)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"`labels` must be an integer array of class indices; got {type(labels).__name__} "
                f"that NumPy cannot convert ({error})."
            ) from None
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(
            f"`labels` must be an integer array of class indices; got dtype {labels.dtype}."
        )
    _require_class_axis(logits)
    axis = axis % logits.ndim
    expected = logits.shape[:axis] + logits.shape[axis + 1:]
    if labels.shape != expected:
        without = ("logits.shape[:-1]" if axis == logits.ndim - 1
                   else f"logits.shape without axis {axis}")
        raise ValueError(
            f"`labels` must have shape {without} = {expected}; got "
            f"labels.shape = {labels.shape} for logits.shape = {logits.shape}."
        )
    values = concrete_value(labels)
    if values is not None and values.size:
        num_classes = logits.shape[axis]
        bad = (values < 0) | (values >= num_classes)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"`labels` must lie in [0, {num_classes}) for logits with {num_classes} "
                f"classes; labels{list(index)} = {values[index]}."
            )
    return jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels


def check_per_example(name: str, x, labels: jax.Array, *, floating: bool) -> jax.Array:
    if not floating and not isinstance(x, jax.Array):
        # A mask: truth taken on the host, so an int64 2**32 stays True instead of wrapping to 0.
        host = np.asarray(x)
        x = host != 0 if np.issubdtype(host.dtype, np.number) else host
    x = _as_array(name, x)
    if floating and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a floating array; got dtype {x.dtype}.")
    if x.shape != labels.shape:
        raise ValueError(
            f"`{name}` must have one entry per example, shape {labels.shape} (the shape of "
            f"`labels`); got {name}.shape = {x.shape}."
        )
    return x


def check_nonnegative_scalar(name: str, x) -> jax.Array:
    x = _as_array(name, x)
    if x.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {x.shape}.")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be a real number; got dtype {x.dtype}.")
    value = concrete_value(x)
    if value is not None and not value >= 0:
        raise ValueError(f"`{name}` must be >= 0; got {name} = {value}.")
    if value is not None and not np.isfinite(value):
        # Also catches a Python float too large for float32 (1e39 becomes inf on conversion).
        raise ValueError(f"`{name}` must be finite; got {name} = {value}.")
    return x


def check_noise(noise: str, amplitude) -> None:
    if noise not in NOISE_VARIANTS:
        raise ValueError(
            f"`noise` must be one of {', '.join(repr(v) for v in NOISE_VARIANTS)}; got {noise!r}."
        )
    if noise in _NEEDS_AMPLITUDE and amplitude is None:
        raise ValueError(
            f"noise={noise!r} needs `amplitude`, the per-example ||W_y|| * ||x|| of the "
            "bias-free classifier. Get it from the head's output `out` as "
            "`out.amplitude(labels)`: Flax Linen "
            "`out = NoisySoftmaxHead(num_classes).apply(variables, features)`, Flax NNX "
            "`out = noisy_softmax_jax.nnx.NoisySoftmaxHead(in_features, num_classes, "
            "rngs=rngs)(features)`; or from "
            "`noisy_softmax_jax.target_amplitude(features, kernel, labels)`; or use "
            "noise='free', which needs none. (NoisySoftmaxDense and nnx.NoisySoftmaxLinear "
            "add the noise themselves and return logits for Optax's loss.)"
        )


def check_rng(rng) -> jax.Array:
    if not isinstance(rng, jax.Array | np.ndarray):
        raise TypeError(
            "`rng` must be a JAX PRNG key (jax.random.key(seed) or a legacy "
            f"jax.random.PRNGKey(seed)); got {type(rng).__name__}."
        )
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"`rng` must be a single key, shape (); got shape {rng.shape}.")
    elif rng.dtype == jnp.uint32:
        if rng.shape != (2,):
            raise ValueError(
                "`rng` as a legacy key must have shape (2,) and dtype uint32; got shape "
                f"{rng.shape}."
            )
    else:
        raise TypeError(
            "`rng` must be a JAX PRNG key (jax.random.key(seed) or a legacy "
            f"jax.random.PRNGKey(seed)); got an array of dtype {rng.dtype}."
        )
    return jnp.asarray(rng)
