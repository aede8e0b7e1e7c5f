"""Saturation diagnostics: what the noisy softmax is about, cheap enough to log every step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from noisy_softmax_jax import _labels, _plain, _validation

__all__ = ["saturation_metrics", "top_class_fraction"]


def _masked_mean(x: jax.Array, where: jax.Array | None) -> jax.Array:
    if where is None:
        return jnp.mean(x)
    # A select, not a product with the mask: a masked example's NaN must not reach the sum.
    total = jnp.sum(jnp.where(where, x, jnp.zeros_like(x)))
    return total / jnp.maximum(jnp.sum(where.astype(x.dtype)), 1.0)


def saturation_metrics(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    amplitude: jax.typing.ArrayLike | None = None,
    rng: jax.Array | None = None,
    alpha: jax.typing.ArrayLike = 0.0,
    noise: str = "annealed",
    sigma: jax.typing.ArrayLike = 1.0,
    shared_noise: bool = False,
    negative: bool = False,
    where: jax.typing.ArrayLike | None = None,
    threshold: float = 0.99,
) -> dict[str, jax.Array]:
    r"""Summarizes how saturated a batch is, and how much noise it received.

    Softmax saturates when the clean target probability :math:`p_y` nears 1:
    the gradient on the target logit, :math:`p_y - 1`, vanishes. Pass the
    loss's own ``rng``, ``alpha`` and noise arguments to see the noise the loss
    injected in the same step (the same key draws the same noise) and the
    gradient it actually produced; leave ``rng`` out for plain softmax.

    The amplitude :math:`\|W_y\|\|x\|` matters: the noise grows with it, so a
    network can escape a too-large ``alpha`` by shrinking its features to zero.
    Such a collapse shows as ``amplitude`` and ``logit_std`` falling toward 0
    and ``accuracy`` at chance.

    All values are means over the (unmasked) examples, as float32 scalars:

    - ``target_prob``: clean :math:`p_y`.
    - ``saturated_fraction``: fraction of examples with :math:`p_y >` ``threshold``.
    - ``target_grad``: :math:`|\partial\ell/\partial f_y|` of the loss in use,
      :math:`(1 - \tilde p_y)\,\partial\tilde f_y/\partial f_y`; equal to
      :math:`1 - p_y` without noise.
    - ``noise``: the injected :math:`f_y - \tilde f_y` (negative for ``negative`` noise).
    - ``accuracy``: fraction whose clean argmax is the label.
    - ``logit_std``: standard deviation of an example's logits across classes.
    - ``amplitude`` and ``cos_target`` (:math:`\cos\theta_y = f_y / a`), only
      when ``amplitude`` is given.

    Args:
      logits: Clean logits, shape ``[..., num_classes]``.
      labels: Integer class indices, shape ``[...]``; an unmasked out-of-range
        one (possible under ``jit``) makes the metrics NaN.
      amplitude: Optional per-example :math:`\|W_y\|\|x\|`, shape ``[...]``;
        needed, as by the loss, when noise is drawn that scales with it.
      rng: The loss's key; None means no noise (then, as with ``alpha = 0``, no
        amplitude is needed).
      alpha, noise, sigma, shared_noise, negative: as given to the loss.
      where: Optional boolean mask of the examples to include, shape ``[...]``;
        the labels of the others may be anything (padding such as -1).
      threshold: :math:`p_y` above which an example counts as saturated.

    Returns:
      A dict of float32 scalars, keys as listed above.

    Examples:
      >>> import jax.numpy as jnp
      >>> from noisy_softmax_jax import saturation_metrics
      >>> m = saturation_metrics(jnp.array([[9.0, 0.0], [0.0, 0.0]]), jnp.array([0, 1]))
      >>> round(float(m["saturated_fraction"]), 2), round(float(m["target_grad"]), 3)
      (0.5, 0.25)
    """
    logits = _validation.check_floating("logits", logits, "of shape [..., num_classes]")
    labels, where = _validation.check_masked_labels(labels, where, logits, per_logit=False)
    if amplitude is not None:  # reported whatever the noise reads
        amplitude = _validation.check_per_example("amplitude", amplitude, labels, floating=True)
    rng, alpha, sigma, drawn, noise_amplitude = _validation.check_noise_arguments(
        rng, alpha, sigma, noise, amplitude, examples=labels.shape)
    return _saturation_metrics(
        logits, labels, amplitude, noise_amplitude, rng, alpha, sigma, where, threshold,
        noise=drawn, shared_noise=bool(shared_noise), negative=bool(negative))


@functools.partial(jax.jit, static_argnames=("noise", "shared_noise", "negative"))
def _saturation_metrics(logits, labels, amplitude, noise_amplitude, rng, alpha, sigma, where,
                        threshold, *, noise, shared_noise, negative):
    logits = logits.astype(_plain.compute_dtype(logits.dtype))
    num_classes = logits.shape[-1]
    # A masked example's label may be padding: replaced by a safe one, its values left out
    # by the mask; an unmasked out-of-range one makes the metrics NaN, as it makes the loss.
    valid = _labels.in_range(labels, num_classes)
    labels = _labels.safe(labels, valid)
    target = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    target = jnp.where(valid, target, jnp.nan)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_prob = jnp.exp(target - log_normalizer)

    def perturb(t):
        return _plain.noisy_target_logit(t, rng, alpha, sigma, noise_amplitude, noise=noise,
                                         shared_noise=shared_noise, negative=negative)

    # The perturbation is elementwise in f_y, so a JVP with ones gives its derivative.
    noisy_target, dnoisy_dtarget = jax.jvp(perturb, (target,), (jnp.ones_like(target),))
    is_target = _labels.is_target(labels, num_classes)
    noisy_normalizer = jax.nn.logsumexp(
        jnp.where(is_target, noisy_target[..., None], logits), axis=-1)
    noisy_target_prob = jnp.exp(noisy_target - noisy_normalizer)

    metrics = {
        "target_prob": target_prob,
        "saturated_fraction": jnp.where(valid, target_prob > threshold, jnp.nan),
        "target_grad": jnp.abs((1.0 - noisy_target_prob) * dnoisy_dtarget),
        "noise": target - noisy_target,
        "accuracy": jnp.where(valid, jnp.argmax(logits, axis=-1) == labels, jnp.nan),
        "logit_std": jnp.std(logits, axis=-1),
    }
    if amplitude is not None:
        amplitude = amplitude.astype(logits.dtype)
        metrics["amplitude"] = amplitude
        metrics["cos_target"] = jnp.where(
            amplitude > 0, target / jnp.where(amplitude > 0, amplitude, 1.0), 0.0)
    return {name: _masked_mean(value.astype(logits.dtype), where).astype(jnp.float32)
            for name, value in metrics.items()}


def top_class_fraction(logits: jax.typing.ArrayLike) -> jax.Array:
    r"""Fraction of the batch predicted as its most frequent predicted class.

    .. math::
        \max_c \frac{1}{N} \sum_{i=1}^{N} [\arg\max_k z_{ik} = c]

    1.0 means every example is predicted as one class: with chance accuracy, the sign of the
    collapse too large an alpha causes (the network shrinks its features until every logit is
    equal). `1 / num_classes` is its least value.

    Args:
      logits: unnormalized scores, shape ``[..., num_classes]``; every leading axis counts as
        a batch axis.

    Returns:
      A scalar in ``[1 / num_classes, 1]`` (0.0 for an empty batch).

    Example:
      >>> import jax.numpy as jnp
      >>> from noisy_softmax_jax import top_class_fraction
      >>> float(top_class_fraction(jnp.array([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 1.0]])))
      0.75
    """
    logits = jnp.asarray(logits)
    predictions = jnp.argmax(logits, axis=-1).reshape(-1)
    counts = jnp.zeros((logits.shape[-1],), jnp.int32).at[predictions].add(1)
    return jnp.max(counts) / jnp.maximum(predictions.size, 1)
