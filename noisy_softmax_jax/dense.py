"""A Flax Linen head that returns logits, noisy in training: ``nn.Dense`` with the noisy softmax.

:class:`NoisySoftmaxDense` replaces the model's last ``nn.Dense(num_classes)`` and
keeps the rest of a training step as it is: Optax's cross-entropy of its output is the
noisy softmax loss when it is given the labels, and its output without them (or with
``deterministic=True``) is the clean logits, for metrics and ``argmax``. It draws its
noise from Flax's ``"noise"`` RNG stream, as ``nn.Dropout`` draws from ``"dropout"``.
The Flax NNX twin is :class:`noisy_softmax_jax.nnx.NoisySoftmaxLinear`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax

from noisy_softmax_jax.head import HeadOutput, LinenLinearHead
from noisy_softmax_jax.loss import noisy_logits

__all__ = ["NoisySoftmaxDense", "head_logits"]


def head_logits(
    out: HeadOutput,
    labels: jax.typing.ArrayLike | None,
    alpha: jax.typing.ArrayLike | None,
    *,
    deterministic: bool,
    draw_key: Callable[[], jax.Array],
    missing_alpha: str,
    noise: str,
    sigma: jax.typing.ArrayLike,
    shared_noise: bool,
    negative: bool,
) -> jax.Array:
    """What the logits-returning heads of both APIs return: clean, or noisy in training.

    The clean logits without ``labels``, when ``deterministic``, or at ``alpha = 0`` as a
    Python number, with no key drawn; otherwise :func:`noisy_softmax_jax.noisy_logits` with
    the head's own amplitude and the key ``draw_key()`` gives, so that Optax's
    cross-entropy of the result is ``noisy_softmax_cross_entropy(out.logits, labels, key,
    alpha, amplitude=out.amplitude(labels), ...)``. ``missing_alpha`` is the error, in the
    caller's API's form, for a noise without ``alpha``.
    """
    if labels is None or deterministic:
        return out.logits
    if alpha is None:
        raise ValueError(missing_alpha)
    if isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha == 0:
        return out.logits
    amplitude = None if noise == "free" else out.amplitude(labels)
    return noisy_logits(out.logits, labels, draw_key(), alpha, amplitude=amplitude,
                        noise=noise, sigma=sigma, shared_noise=shared_noise, negative=negative)


class NoisySoftmaxDense(LinenLinearHead):
    r"""A Flax Linen classifier head returning logits, noisy in training: a drop-in ``nn.Dense``.

    .. math::
      \text{training (given labels):}\quad n_j = f_j \ (j \ne y), \quad
      n_y = f_y - \alpha |\xi| (\|W_y\|\|x\| - f_y); \qquad
      \text{otherwise:}\quad n_j = f_j = W_j^\top x

    Replace the model's last ``nn.Dense(num_classes)`` with
    ``NoisySoftmaxDense(num_classes, alpha=0.1)`` and pass the labels through the
    model to it: ``optax.softmax_cross_entropy_with_integer_labels`` of its output is
    then the noisy softmax loss (the value and gradients of
    :func:`noisy_softmax_jax.noisy_softmax_cross_entropy` with the head's amplitude,
    for the same key), and the metrics and ``argmax`` of the training step stay as
    they are. The output is an array of shape ``[..., num_classes]``: the clean logits
    when ``labels`` is None or ``deterministic`` is True (evaluation, prediction), and
    then no key is needed; otherwise the logits with only the target entry lowered by
    the noise (:func:`noisy_softmax_jax.noisy_logits`), float32 for half-precision
    inputs. Accuracy computed from the noisy logits of a training step is at most the
    clean one (only the target is lowered), as with dropout.

    The noise is drawn from the ``"noise"`` RNG stream (``rng_collection``): pass
    ``rngs={"noise": key}`` to ``apply``, a new key each step (``jax.random.fold_in(key,
    step)``), or ``rng=`` to the call. The parameters are ``nn.Dense``'s and
    :class:`noisy_softmax_jax.NoisySoftmaxHead`'s (``kernel``, and ``bias`` with
    ``use_bias=True``), so a checkpoint of either loads into the other; the
    attributes they share mean the same (see :class:`noisy_softmax_jax.NoisySoftmaxHead`,
    half-precision accumulation included). Bias-free by default, as in the paper.

    Attributes:
      num_classes, use_bias, dtype, param_dtype, kernel_init, bias_init, precision,
        promote_dtype, dot_general, dot_general_cls, preferred_element_type: As in
        :class:`noisy_softmax_jax.NoisySoftmaxHead` (``nn.Dense``'s).
      alpha: Noise scale (about 0.1 in the paper); a call's ``alpha`` overrides it, for
        a schedule. ``alpha = 0`` as a Python number gives the clean logits, no key drawn.
      noise: ``"annealed"`` (the paper's method), ``"amplitude"`` or ``"free"``.
      sigma: Standard deviation of :math:`\xi`.
      shared_noise: One :math:`\xi` for the whole batch (the first author's Caffe code).
      negative: Raise the target logit instead (the paper's ablation).
      deterministic: If True, the clean logits whatever the call is given; a call's
        ``deterministic`` overrides it, as in ``nn.Dropout``.
      rng_collection: The RNG stream the noise is drawn from (default ``"noise"``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from noisy_softmax_jax import NoisySoftmaxDense
      >>> head = NoisySoftmaxDense(num_classes=10, alpha=0.1)  # was: nn.Dense(10)
      >>> features, labels = jnp.ones((4, 32)), jnp.array([0, 1, 2, 3])
      >>> params = head.init(jax.random.key(0), features)  # no labels: no noise, no key
      >>> logits = head.apply(params, features, labels, rngs={"noise": jax.random.key(1)})
      >>> loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> clean = head.apply(params, features)  # evaluation: the clean logits
      >>> logits.shape, loss.shape, clean.shape
      ((4, 10), (4,), (4, 10))
      >>> bool(jnp.all((logits == clean) == (jnp.arange(10) != labels[:, None])))
      True
    """

    alpha: Any = None
    noise: str = "annealed"
    sigma: Any = 1.0
    shared_noise: bool = False
    negative: bool = False
    deterministic: bool | None = None
    rng_collection: str = "noise"

    @nn.compact
    def __call__(
        self,
        features: jax.Array,
        labels: jax.typing.ArrayLike | None = None,
        *,
        alpha: jax.typing.ArrayLike | None = None,
        deterministic: bool | None = None,
        rng: jax.Array | None = None,
    ) -> jax.Array:
        """The logits of ``features``, noisy when given ``labels`` and not deterministic.

        Args:
          features: The head's input, shape ``[..., num_features]``.
          labels: Integer labels, shape ``[...]``; None for the clean logits.
          alpha: Overrides the attribute ``alpha`` (a traced schedule value works).
          deterministic: Overrides the attribute ``deterministic``.
          rng: A key to draw the noise from instead of the ``rng_collection`` stream.

        Returns:
          Logits, shape ``[..., num_classes]``.
        """
        name = type(self).__name__

        def draw_key() -> jax.Array:
            if rng is not None:
                return rng
            if not self.has_rng(self.rng_collection):
                raise ValueError(
                    f"{name} draws its noise from the {self.rng_collection!r} RNG stream: pass "
                    f"`rngs={{{self.rng_collection!r}: key}}` to `model.apply` (a new key "
                    "each step, e.g. `jax.random.fold_in(key, step)`), or `rng=key` to the "
                    "call. For the clean logits pass no `labels`, or `deterministic=True`.")
            return self.make_rng(self.rng_collection)

        return head_logits(
            self._head_output(features), labels, alpha if alpha is not None else self.alpha,
            deterministic=next(
                (d for d in (deterministic, self.deterministic) if d is not None), False),
            draw_key=draw_key,
            missing_alpha=(
                f"{name} needs `alpha` to add the noise to the logits: "
                f"`{name}(num_classes, alpha=0.1)`, or `head(features, labels, alpha=alpha)` "
                "at each call. Without `labels`, or with `deterministic=True`, it returns the "
                "clean logits."),
            noise=self.noise, sigma=self.sigma, shared_noise=self.shared_noise,
            negative=self.negative)
