"""Argument checks shared by every public function: the losses, the heads, the diagnostics.

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
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

NOISE_VARIANTS = ("annealed", "amplitude", "free")
"""Names accepted by the ``noise`` argument: the paper's method and its ablations."""

_NEEDS_AMPLITUDE = ("annealed", "amplitude")

KernelLayout = Literal["features_classes", "classes_features"]
KERNEL_LAYOUTS: tuple[KernelLayout, ...] = ("features_classes", "classes_features")
"""Names accepted by ``kernel_layout``.

``"features_classes"``: shape ``[num_features, num_classes]``, column ``j`` is
:math:`W_j`; Flax's ``nn.Dense`` and ``nnx.Linear`` kernels (the default).
``"classes_features"``: shape ``[num_classes, num_features]``, row ``j`` is
:math:`W_j`; Equinox's ``eqx.nn.Linear.weight``, PyTorch's ``nn.Linear.weight``
and InsightFace-style class centres.
"""

_SHAPES = {
    "features_classes": "[num_features, num_classes]",
    "classes_features": "[num_classes, num_features]",
}
_OWNERS = {
    "features_classes": "Flax's nn.Dense / nnx.Linear kernel",
    "classes_features": "Equinox's eqx.nn.Linear.weight, PyTorch's nn.Linear.weight",
}

MARGINS = ("cosface", "arcface")
"""Names accepted by ``margin``: CosFace's additive cosine margin, ArcFace's additive angle."""

# The papers' values: CosFace (Wang et al., 2018) s = 64, m = 0.35; ArcFace (Deng et al.,
# 2019) s = 64, m = 0.5.
DEFAULT_SCALE = 64.0
DEFAULT_MARGIN_VALUES = {"cosface": 0.35, "arcface": 0.5}

# Logits per block (batch x chunk) that the fused losses' default chunk size aims at: 2**21
# float32 values are 8 MiB, a few of which (logits, exponentials, their gradient) stay far
# below the 64 MiB of temporary memory the loss is meant to need at batch 512.
_BLOCK_ELEMENTS = 2**21
_CHUNK_MULTIPLE = 128  # lane width of accelerators; keeps blocks aligned on every backend


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


def check_nonnegative_scalar(name: str, x, *, positive: bool = False) -> jax.Array:
    """A real scalar, >= 0 (> 0 if `positive`) and finite where its value is on the host."""
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
    if value is not None and not (value > 0 if positive else value >= 0):
        raise ValueError(f"`{name}` must be {'> 0' if positive else '>= 0'}; got {name} = {value}.")
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


def check_noise_arguments(
    rng, alpha, sigma, noise: str, amplitude=None, *, examples: tuple | None = None,
) -> tuple[jax.Array | None, jax.Array, jax.Array, str | None, jax.Array | None]:
    """The noise's arguments, as every loss checks them; returns what the computation reads.

    Returns ``(rng, alpha, sigma, noise, amplitude)``: `rng` and `noise` None where no noise
    is drawn (no key, or an ``alpha`` known to be 0), `amplitude` checked against the
    `examples` shape where given (``"free"`` noise does not read it) and returned only where
    the drawn noise reads it. `examples` None: the caller computes the amplitude itself (the
    fused losses), so none is needed.
    """
    rng, alpha, sigma, drawn = check_noise_scale(rng, alpha, sigma)
    check_noise(noise, True if examples is None else amplitude, drawn=drawn)
    if examples is not None and amplitude is not None and noise != "free":
        amplitude = check_per_example("amplitude", amplitude, examples, floating=True)
    if not drawn:
        return None, alpha, sigma, None, None
    return rng, alpha, sigma, noise, None if noise == "free" else amplitude


def check_masked_labels(labels, where, logits: jax.Array | jax.ShapeDtypeStruct,
                        axes: tuple[int, ...] = (-1,), *, per_logit: bool = True
                        ) -> tuple[jax.Array, jax.Array | None]:
    """The labels and the mask ``where``, as every loss checks them: returns both.

    ``where`` has one entry per example or, if `per_logit`, may have one per logit. A label
    that the mask's host values show masked out may be anything (padding such as -1); with
    the mask's values unknown (traced), no label value is checked.
    """
    _require_class_axis(logits)
    axes = tuple(a % logits.ndim for a in axes)
    kept = None
    if where is not None:
        where, kept = check_where(where, logits if per_logit else None,
                                  batch_shape(logits, axes), axes)
    labels = check_labels(labels, logits, axes, examples=kept,
                          check_values=where is None or kept is not None)
    return labels, where


def check_margin(margin: str | None, scale, margin_value, *, optional: bool = True
                 ) -> tuple[jax.Array | None, jax.Array | None]:
    """The margin's arguments; returns ``scale`` and ``margin_value`` as arrays (None without).

    `scale` and `margin_value` default to the papers' values for the margin (see
    `DEFAULT_SCALE`, `DEFAULT_MARGIN_VALUES`); given without a margin, they are an error
    rather than ignored.
    """
    if margin is None and optional:
        if scale is not None or margin_value is not None:
            raise ValueError(
                "`scale` and `margin_value` go with a margin: pass margin='cosface' or "
                f"margin='arcface' (got scale = {scale!r}, margin_value = {margin_value!r}, "
                "margin = None). For cosine logits without a margin, margin='cosface' with "
                "margin_value=0.")
        return None, None
    if margin not in MARGINS:
        allowed = ", ".join(repr(v) for v in MARGINS)
        raise ValueError(f"`margin` must be one of {allowed}"
                         f"{' or None' if optional else ''}; got {margin!r}.")
    scale = check_nonnegative_scalar("scale", DEFAULT_SCALE if scale is None else scale,
                                     positive=True)
    margin_value = check_nonnegative_scalar(
        "margin_value", DEFAULT_MARGIN_VALUES[margin] if margin_value is None else margin_value)
    return scale, margin_value


def check_kernel(features, kernel, kernel_layout: str) -> tuple[jax.Array, jax.Array, int]:
    """Checks a classifier's ``kernel`` against its input; returns both and the class axis.

    A kernel in the other layout is detected when ``num_features != num_classes`` and named
    in the error; when they are equal (a square kernel) only the caller knows which axis
    holds the classes.
    """
    if kernel_layout not in KERNEL_LAYOUTS:
        raise ValueError(
            f"`kernel_layout` must be one of {', '.join(repr(v) for v in KERNEL_LAYOUTS)}; "
            f"got {kernel_layout!r}."
        )
    shape = _SHAPES[kernel_layout]
    features = check_floating("features", features, "of shape [..., num_features]")
    kernel = check_floating("kernel", kernel, f"of shape {shape}")
    class_axis = 1 if kernel_layout == "features_classes" else 0
    feature_axis = 1 - class_axis
    if kernel.ndim != 2 or features.ndim < 1 or kernel.shape[feature_axis] != features.shape[-1]:
        message = (
            f"`kernel` must have shape {shape} with num_features = features.shape[-1] "
            f"(kernel_layout={kernel_layout!r}, {_OWNERS[kernel_layout]}); got "
            f"features.shape = {features.shape}, kernel.shape = {kernel.shape}."
        )
        transposed = kernel.ndim == 2 and features.ndim >= 1 and (
            kernel.shape[class_axis] == features.shape[-1])
        if transposed:
            other = next(layout for layout in KERNEL_LAYOUTS if layout != kernel_layout)
            message += (
                f" The kernel looks like {_SHAPES[other]} ({_OWNERS[other]}): pass "
                f"kernel_layout={other!r}."
            )
        raise ValueError(message)
    return features, kernel, class_axis


# -- the fused losses' blocks and mesh -------------------------------------------------------


def check_blocks(features, kernel, *, kernel_layout, chunk_size, mesh, class_axis, dtype):
    """What the fused loss and `fused_top_k` share: features ``[batch, dim]``, the kernel, its
    blocks and their mesh. Returns the arrays and the fields of ``_blocks.Config``."""
    features = check_floating("features", features, "of shape [batch, dim]")
    if features.ndim != 2:
        raise ValueError(f"`features` must have shape [batch, dim]; got shape {features.shape}.")
    # The layout's name and the kernel's shape, with target_amplitude's errors.
    features, kernel, class_dim = check_kernel(features, kernel, kernel_layout)
    if kernel.shape[class_dim] < 1:
        raise ValueError(
            f"`kernel` must have at least one class (kernel.shape[{class_dim}] >= 1).")
    batch, num_classes = features.shape[0], kernel.shape[class_dim]
    batch_axes = check_sharding(mesh, class_axis, batch, num_classes, class_dim)
    shards = 1 if mesh is None else mesh.shape[class_axis]
    fields = dict(chunk_size=check_chunk_size(chunk_size, batch, num_classes // shards),
                  mesh=mesh, class_axis=class_axis, batch_axes=batch_axes,
                  kernel_class_dim=class_dim,
                  matmul_dtype=check_matmul_dtype(dtype, features, kernel))
    return features, kernel, fields


def check_matmul_dtype(dtype, features, kernel) -> np.dtype:
    if dtype is None:
        return np.dtype(jnp.result_type(features, kernel))
    try:
        dtype = np.dtype(jnp.dtype(dtype))
    except TypeError:
        dtype = None
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            "`dtype` must be a floating dtype, the matmul's (jnp.bfloat16, jnp.float16, "
            f"jnp.float32, jnp.float64), or None for that of the inputs; got {dtype!r}.")
    return dtype


def check_sharding(mesh, class_axis, batch, num_classes, class_dim) -> tuple[str, ...]:
    """The mesh axes the batch is split over; checks that the mesh fits the shapes."""
    if mesh is None and class_axis is None:
        return ()
    if mesh is None or class_axis is None:
        raise ValueError(
            "`mesh` and `class_axis` go together: the kernel's classes are split over the mesh "
            f"axis `class_axis`; got mesh = {mesh!r}, class_axis = {class_axis!r}.")
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    if class_axis not in mesh.axis_names:
        raise ValueError(
            f"`class_axis` must name an axis of `mesh`, one of {mesh.axis_names}; "
            f"got {class_axis!r}.")
    shards = mesh.shape[class_axis]
    if num_classes % shards:
        raise ValueError(
            f"the number of classes (kernel.shape[{class_dim}] = {num_classes}) must be "
            f"divisible by the size of mesh axis {class_axis!r} ({shards}), which splits them.")
    batch_axes = tuple(name for name in mesh.axis_names if name != class_axis)
    batch_shards = math.prod(mesh.shape[name] for name in batch_axes)
    if batch % batch_shards:
        raise ValueError(
            f"the batch (features.shape[0] = {batch}) must be divisible by {batch_shards}, the "
            f"size of the mesh axes {batch_axes} other than `class_axis`, which split it.")
    return batch_axes


def check_chunk_size(chunk_size, batch, classes_per_shard) -> int:
    """Classes per block: the given number, or about 2**21 / batch (a multiple of 128), at
    most the classes of a shard."""
    if chunk_size is None:
        chunk_size = max(_CHUNK_MULTIPLE,
                         _BLOCK_ELEMENTS // max(batch, 1) // _CHUNK_MULTIPLE * _CHUNK_MULTIPLE)
    elif (isinstance(chunk_size, bool)
          or not isinstance(chunk_size, int | np.integer) or chunk_size < 1):
        raise ValueError(f"`chunk_size` must be a positive integer or None; got {chunk_size!r}.")
    return int(min(chunk_size, max(classes_per_shard, 1)))


def check_block_labels(labels, where, batch: int, num_classes: int
                       ) -> tuple[jax.Array, jax.Array | None]:
    """The fused loss's labels, one per row of the features, and its per-example mask."""
    if np.shape(labels) != (batch,):
        raise ValueError(
            f"`labels` must have shape [batch] = ({batch},), one class per row of `features`; "
            f"got labels.shape = {np.shape(labels)}.")
    if num_classes > np.iinfo(np.int32).max:
        raise ValueError(f"at most {np.iinfo(np.int32).max} classes; got {num_classes}.")
    # The main loss's checks, with the shape of the logits that are never formed.
    return check_masked_labels(labels, where, jax.ShapeDtypeStruct((batch, num_classes),
                                                                   jnp.float32),
                               per_logit=False)
