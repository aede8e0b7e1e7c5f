r"""The CosFace and ArcFace margins on a target logit: the math, for every path that uses them.

With cosine logits :math:`f_j = s\cos\theta_j` (features and class weights L2-normalised,
the scale :math:`s` is their amplitude), the margin lowers the target logit:

.. math::
  \text{CosFace:}\ f_y - s\,m = s(\cos\theta_y - m), \qquad
  \text{ArcFace:}\ s\cos(\theta_y + m),

applied after the noise (see :func:`noisy_softmax_jax.margin_logits`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def margin_target(target_logit: jax.Array, scale: jax.Array, margin_value: jax.Array, *,
                  margin: str) -> jax.Array:
    """The margin of `margin` on the target logit ``s cos(theta_y)``, shape ``[...]``.

    ArcFace's ``s cos(theta_y + m)`` is ``s (cos(theta) cos(m) - sin(theta) sin(m))`` where
    ``theta + m <= pi``; beyond, where ``cos(theta + m)`` would rise again as the angle grows,
    it is ``s (cos(theta) - m sin(m))`` instead, as in InsightFace (``easy_margin=False``),
    so that the target logit keeps falling with the angle. ``sin(theta)`` is taken as 0 where
    ``cos(theta)`` rounds to 1 or beyond (a target raised by ``negative`` noise), with a zero
    derivative there rather than the infinite one of ``sqrt`` at 0.
    """
    if margin == "cosface":
        return target_logit - scale * margin_value
    cosine = target_logit / scale
    sine_squared = 1 - cosine * cosine
    positive = sine_squared > 0
    sine = jnp.where(positive, jnp.sqrt(jnp.where(positive, sine_squared, 1)),
                     jnp.zeros_like(sine_squared))
    cos_m, sin_m = jnp.cos(margin_value), jnp.sin(margin_value)
    # theta + m > pi exactly where cos(theta) < cos(pi - m) = -cos(m).
    angle_fits = cosine > -cos_m
    return scale * jnp.where(angle_fits, cosine * cos_m - sine * sin_m,
                             cosine - margin_value * sin_m)
