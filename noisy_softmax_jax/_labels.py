"""Integer labels inside the computations: class indices, the target mask, the valid range.

One place for what every loss does with its labels, so that the narrow label dtypes (uint8
with more than 256 classes) and the padding labels (-1, masked out by ``where``) behave the
same on every path: class indices are int32 whatever the labels' dtype, and a label outside
``[0, num_classes)`` is replaced by 0 before it indexes anything (the caller turns its loss
into NaN, or 0 when the example is masked), so that no path wraps -1 around to the last class.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def class_indices(num_classes: int, dtype: jax.typing.DTypeLike = jnp.int32,
                  start: jax.typing.ArrayLike = 0) -> jax.Array:
    """``[start, start + num_classes)`` in ``dtype`` (int32 by default, never the labels' dtype,
    which may be too narrow: uint8 would wrap at 256)."""
    return jnp.asarray(start + jnp.arange(num_classes, dtype=dtype))


def is_target(labels: jax.Array, num_classes: int, *, start: jax.typing.ArrayLike = 0
              ) -> jax.Array:
    """``[..., num_classes]`` mask of each label's column among classes ``start, start + 1, ...``.

    The labels are compared as int32 (labels in range fit: at most 2**31 - 1 classes).
    """
    return labels.astype(jnp.int32)[..., None] == class_indices(num_classes, start=start)


def in_range(labels: jax.Array, num_classes: int) -> jax.Array:
    """Whether each label lies in ``[0, num_classes)``, in the labels' own dtype.

    Bounds the dtype cannot hold are left out rather than converted: ``uint8_labels < 300``
    would overflow, and every uint8 is below 300 anyway.
    """
    info = np.iinfo(labels.dtype)
    valid = jnp.ones(labels.shape, bool)
    if info.min < 0:
        valid = valid & (labels >= 0)
    if num_classes <= info.max:
        valid = valid & (labels < num_classes)
    return valid


def safe(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """int32 labels with every invalid one replaced by class 0, which indexes safely."""
    return jnp.where(valid, labels, jnp.zeros((), labels.dtype)).astype(jnp.int32)
