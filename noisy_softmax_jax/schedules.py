"""Turning a constant or an Optax schedule into the ``alpha`` of a training step."""

from __future__ import annotations

import numbers

import optax

__all__ = ["alpha_schedule"]


def alpha_schedule(alpha: float | optax.Schedule) -> optax.Schedule:
    """Returns ``alpha`` as an Optax schedule of the training step.

    The paper keeps ``alpha`` constant (its noise anneals through the
    :math:`1 - \\cos\\theta` factor alone); a schedule is an optional extra.
    Evaluate the result at the step inside the jitted update and pass it to
    the loss: ``alpha`` is traced there, so a changing value never recompiles.

    Args:
      alpha: A non-negative number (a constant schedule), or any callable
        ``step -> alpha`` such as ``optax.linear_schedule(0.1, 0.0, 10_000)``.

    Returns:
      A schedule ``step -> alpha``.

    Examples:
      >>> from noisy_softmax_jax import alpha_schedule
      >>> float(alpha_schedule(0.1)(1000))
      0.1
    """
    if callable(alpha):
        return alpha
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool):
        raise TypeError(f"`alpha` must be a number or a schedule (a callable); got {alpha!r}.")
    if not float(alpha) >= 0:
        raise ValueError(f"`alpha` must be >= 0; got alpha = {alpha}.")
    return optax.constant_schedule(float(alpha))
