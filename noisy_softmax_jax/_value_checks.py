"""The value checks of the checked variants: ``checkify`` checks that work under ``jax.jit``.

:func:`noisy_softmax_jax.checked_noisy_softmax_cross_entropy` and
:func:`noisy_softmax_jax.checked_fused_noisy_softmax_cross_entropy` report, after the fact,
what the eager checks of ``_validation.py`` cannot read under ``jit`` (label values, ``alpha``
and ``sigma``, non-finite inputs). The checks run on the inputs only, beside the loss, not
around it inside ``checkify``, so that every transformation of the loss keeps working.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from noisy_softmax_jax import _labels


def checker(checks: Callable[..., None], static_argnames: Sequence[str]
            ) -> Callable[..., checkify.Error]:
    """``checks`` (a function of the inputs that calls ``checkify.check``) as a jitted function
    that returns the ``checkify.Error`` of its user checks."""
    checked = jax.jit(checkify.checkify(checks, errors=checkify.user_checks),
                      static_argnames=tuple(static_argnames))

    def error(*args, **kwargs) -> checkify.Error:
        return checked(*args, **kwargs)[0]

    return error


def labels_in_range(labels: jax.Array, num_classes: int, kept: jax.Array | None) -> None:
    """Every label that `kept` keeps (None: all) lies in ``[0, num_classes)``; the first one
    that does not is named. Masked labels are not reported: padding is what masks are for."""
    out_of_range = ~_labels.in_range(labels, num_classes)
    if kept is not None:
        out_of_range = out_of_range & kept
    checkify.check(
        ~jnp.any(out_of_range),
        "`labels` must lie in [0, {num_classes}); found label {label}.",
        num_classes=jnp.asarray(num_classes),
        label=jnp.where(jnp.any(out_of_range),
                        labels.ravel()[jnp.argmax(out_of_range.ravel())], 0) if labels.size else 0,
    )


def finite(name: str, x: jax.Array, ignored: jax.Array | bool = False) -> None:
    """``x`` has no NaN or infinity, except where `ignored` (broadcast against it) is True."""
    checkify.check(jnp.all(jnp.isfinite(x) | ignored), f"`{name}` contains NaN or infinity.")


def nonnegative_and_finite(positive: tuple[str, ...] = (), **scalars: jax.Array) -> None:
    """Each named scalar (``alpha``, ``sigma``, ...) is >= 0 (> 0 if named in `positive`)
    and finite."""
    for name, x in scalars.items():
        bound = "> 0" if name in positive else ">= 0"
        checkify.check(x > 0 if name in positive else x >= 0,
                       f"`{name}` must be {bound}; got {{value}}.", value=x)
    for name, x in scalars.items():
        checkify.check(jnp.isfinite(x), f"`{name}` must be finite; got {{value}}.", value=x)
