"""Argument checks shared by the loss and the diagnostics.

Shapes and dtypes are static, so they are checked in every call, traced or not. Values (the
label range, the sign of ``alpha`` and ``sigma``, whether ``alpha`` is 0) are checked only
where they can be read without a device-to-host transfer (see `host_value`): Python numbers,
lists and NumPy arrays, and ``jax.Array``s on CPU devices. Under ``jax.jit`` they are tracers,
and on an accelerator reading them would block until they are computed and copy them to the
host; there the checked mode (:func:`noisy_softmax_jax.checked_noisy_softmax_cross_entropy`)
covers them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

NOISE_VARIANTS = ("annealed", "amplitude", "free")
"""Names accepted by the ``noise`` argument: the paper's method and its ablations."""

_NEEDS_AMPLITUDE = ("annealed", "amplitude")


def host_value(x) -> np.ndarray | None:
    """Returns ``x`` as a NumPy array when its values are on the host, else None.

    On the host: Python numbers and sequences, NumPy arrays, and a ``jax.Array`` whose every
    shard lives on a CPU device (reading it waits for the computation that produces it, but
    copies nothing off a device). Not on the host: a tracer (under ``jit``, ``vmap``,
    ``grad``, ...), a ``jax.Array`` on an accelerator (reading it would be a blocking
    device-to-host transfer), and one spread over several processes (no process sees all
    its values).
    """
    if isinstance(x, jax.core.Tracer):
        return None
    if isinstance(x, jax.Array) and not (x.is_fully_addressable and _on_host_devices(x)):
        return None
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _on_host_devices(x: jax.Array) -> bool:
    """Whether every shard of `x` is on a CPU device (then reading it copies nothing)."""
    return all(getattr(device, "platform", None) == "cpu" for device in x.sharding.device_set)


def is_known_zero(x) -> bool:
    """Whether ``x`` is on the host (see `host_value`) and equal to 0."""
    value = host_value(x)
    return value is not None and value.size == 1 and bool(value == 0)


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


def _is_int(axis) -> bool:
    return isinstance(axis, int | np.integer) and not isinstance(axis, bool)


def check_class_axes(axis, logits: jax.Array) -> tuple[int, ...]:
    """The class axis or axes of `logits`, as Optax's ``axis``: non-negative, in the order given.

    An int is one class axis; a tuple of ints is several, whose slice of `logits` is read as
    one flat class index, row-major in the order of the tuple.
    """
    _require_class_axis(logits)
    axes = (axis,) if _is_int(axis) else axis
    if not isinstance(axes, tuple) or not axes or not all(_is_int(a) for a in axes):
        raise TypeError(
            "`axis` must be an int, the class axis of `logits`, or a non-empty tuple of ints, "
            f"its class axes (as in Optax); got {type(axis).__name__} {axis!r}."
        )
    for a in axes:
        if not -logits.ndim <= a < logits.ndim:
            raise ValueError(
                f"`axis` must lie in [{-logits.ndim}, {logits.ndim}) for logits of shape "
                f"{logits.shape}; got axis = {axis}."
            )
    axes = tuple(int(a) % logits.ndim for a in axes)
    if len(set(axes)) != len(axes):
        raise ValueError(f"`axis` names an axis twice: {axis} for logits of shape {logits.shape}.")
    return axes


def batch_shape(logits: jax.Array | jax.ShapeDtypeStruct, axes: tuple[int, ...]) -> tuple:
    """The shape of `logits` without its class axes: the shape of the labels and the loss."""
    return tuple(n for i, n in enumerate(logits.shape) if i not in axes)


def _shape_without(logits, axes: tuple[int, ...]) -> str:
    if axes == (logits.ndim - 1,):
        return "logits.shape[:-1]"
    if len(axes) == 1:
        return f"logits.shape without axis {axes[0]}"
    return f"logits.shape without axes {axes}"


def check_labels(
    labels,
    logits: jax.Array | jax.ShapeDtypeStruct,
    axes: tuple[int, ...] = (-1,),
    *,
    examples: np.ndarray | None = None,
    check_values: bool = True,
) -> jax.Array:
    """Checks integer labels against `logits` with class axes `axes`; returns them as a jax.Array.

    Always the dtype and the shape. The range ``[0, num_classes)`` too when the labels are on
    the host (`host_value`) and `check_values`, for the examples that `examples` (a boolean
    host array of the labels' shape; None: all) keeps: a label masked out by ``where`` may be
    anything (padding, -1).
    """
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
    axes = tuple(a % logits.ndim for a in axes)
    expected = batch_shape(logits, axes)
    if labels.shape != expected:
        raise ValueError(
            f"`labels` must have shape {_shape_without(logits, axes)} = {expected}; got "
            f"labels.shape = {labels.shape} for logits.shape = {logits.shape}."
        )
    values = host_value(labels) if check_values else None
    if values is not None and values.size:
        num_classes = math.prod(logits.shape[a] for a in axes)
        bad = (values < 0) | (values >= num_classes)
        if examples is not None:
            bad = bad & examples
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"`labels` must lie in [0, {num_classes}) for logits with {num_classes} "
                f"classes, unless `where` masks their example out; labels{list(index)} = "
                f"{values[index]}."
            )
    return jnp.asarray(labels) if not isinstance(labels, jax.Array) else labels


def _mask(name: str, x) -> jax.Array:
    if not isinstance(x, jax.Array):
        # A mask: truth taken on the host, so an int64 2**32 stays True instead of wrapping to 0.
        host = np.asarray(x)
        x = host != 0 if np.issubdtype(host.dtype, np.number) else host
    return _as_array(name, x)


def check_per_example(name: str, x, labels: jax.Array | tuple, *, floating: bool) -> jax.Array:
    """Checks an argument with one entry per example; `labels` is the labels or their shape."""
    shape = labels if isinstance(labels, tuple) else labels.shape
    x = _as_array(name, x) if floating else _mask(name, x)
    if floating and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a floating array; got dtype {x.dtype}.")
    if x.shape != shape:
        raise ValueError(
            f"`{name}` must have one entry per example, shape {shape} (the shape of "
            f"`labels`); got {name}.shape = {x.shape}."
        )
    return x


def check_where(
    where, logits: jax.Array | jax.ShapeDtypeStruct | None, examples_shape: tuple,
    axes: tuple[int, ...] = (),
) -> tuple[jax.Array, np.ndarray | None]:
    """Checks a mask ``where``: one entry per example or, given `logits`, one per logit.

    Returns the mask as a boolean jax.Array and, when its values are on the host, which
    examples it keeps (a logit-shaped mask keeps an example with at least one class left).
    """
    mask = _mask("where", where)
    if logits is None or mask.shape != logits.shape:
        if mask.shape != examples_shape:
            per_logit = ("" if logits is None else
                         f", or one per logit, shape {logits.shape} (the shape of `logits`)")
            raise ValueError(
                f"`where` must have one entry per example, shape {examples_shape} (the shape "
                f"of `labels`){per_logit}; got where.shape = {mask.shape}."
            )
    mask = mask.astype(bool)
    values = host_value(where)  # the argument as given: host values are host values
    if values is None:
        return mask, None
    kept = np.asarray(values != 0 if np.issubdtype(values.dtype, np.number) else values, bool)
    if logits is not None and mask.shape == logits.shape and axes:
        kept = np.asarray(kept.any(axis=axes))
    return mask, kept


def check_nonnegative_scalar(name: str, x) -> jax.Array:
    # Read before the conversion: under jit, jnp.asarray makes even a Python number a tracer.
    raw = x
    x = _as_array(name, x)
    if x.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {x.shape}.")
    if not (jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer)):
        raise TypeError(f"`{name}` must be a real number; got dtype {x.dtype}.")
    value = host_value(x)
    raw_value = host_value(raw)
    if value is None and raw_value is not None:
        # A Python or NumPy number under jit: its value as it will be converted (1e39 is inf
        # in float32).
        value = np.asarray(raw_value, np.float64)
        if jnp.issubdtype(x.dtype, jnp.floating) and abs(value) > jnp.finfo(x.dtype).max:
            value = np.copysign(np.inf, value)
    if value is not None and not value >= 0:
        raise ValueError(f"`{name}` must be >= 0; got {name} = {value}.")
    if value is not None and not np.isfinite(value):
        # Also catches a Python float too large for float32 (1e39 becomes inf on conversion).
        raise ValueError(f"`{name}` must be finite; got {name} = {value}.")
    return x


def check_noise(noise: str, amplitude, *, drawn: bool = True) -> None:
    """Checks the noise variant, and that the `amplitude` is given where drawn noise needs it."""
    if noise not in NOISE_VARIANTS:
        raise ValueError(
            f"`noise` must be one of {', '.join(repr(v) for v in NOISE_VARIANTS)}; got {noise!r}."
        )
    if drawn and noise in _NEEDS_AMPLITUDE and amplitude is None:
        raise ValueError(
            f"noise={noise!r} needs `amplitude`, the per-example ||W_y|| * ||x|| of the "
            "bias-free classifier, whenever noise is drawn (a key and an alpha not known to "
            "be 0). Get it from the head's output `out` as `out.amplitude(labels)`: Flax Linen "
            "`out = noisy_softmax_jax.NoisySoftmaxHead(num_classes).apply(variables, "
            "features)`, Flax NNX `out = noisy_softmax_jax.nnx.NoisySoftmaxHead(in_features, "
            "num_classes, rngs=rngs)(features)`; or from "
            "`noisy_softmax_jax.target_amplitude(features, kernel, labels)`. Without noise "
            "(rng=None, or alpha=0) none is needed, nor with noise='free'. (NoisySoftmaxDense "
            "and nnx.NoisySoftmaxLinear add the noise themselves and return logits for Optax's "
            "loss.)"
        )


def check_noise_scale(rng, alpha, sigma) -> tuple[jax.Array | None, jax.Array, jax.Array, bool]:
    """Checks the key, ``alpha`` and ``sigma``; returns them and whether noise is drawn.

    Noise is drawn given a key and an ``alpha`` not known to be 0 (`is_known_zero`, read
    before the conversion, which under jit makes even a Python number a tracer).
    """
    rng = check_rng(rng)
    alpha_is_zero = is_known_zero(alpha)
    alpha = check_nonnegative_scalar("alpha", alpha)
    sigma = check_nonnegative_scalar("sigma", sigma)
    return rng, alpha, sigma, rng is not None and not alpha_is_zero


def check_rng(rng) -> jax.Array | None:
    """Checks a PRNG key; None (no noise) passes through."""
    if rng is None:
        return None
    if not isinstance(rng, jax.Array | np.ndarray):
        raise TypeError(
            "`rng` must be a JAX PRNG key (jax.random.key(seed) or a legacy "
            f"jax.random.PRNGKey(seed)), or None for no noise; got {type(rng).__name__}."
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
