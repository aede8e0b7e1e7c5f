"""The noisy softmax's classifier head for Flax NNX.

Import it as ``from noisy_softmax_jax.nnx import NoisySoftmaxHead``; the Flax
Linen head of the same name is :class:`noisy_softmax_jax.NoisySoftmaxHead`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from noisy_softmax_jax.head import HeadOutput, head_output

__all__ = ["HeadOutput", "NoisySoftmaxHead"]

# nnx.Linear's defaults.
_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


class NoisySoftmaxHead(nnx.Module):
    """A Flax NNX linear classifier head for the noisy softmax, bias-free by default.

    Use it in place of the model's last ``nnx.Linear(in_features, num_classes)``.
    It returns a :class:`~noisy_softmax_jax.HeadOutput` (clean logits, feature
    and class-weight norms) so the loss gets the amplitude it needs. The
    parameter is ``kernel``, an ``nnx.Param`` in ``nnx.Linear``'s layout
    ``[in_features, num_classes]``; with the same kernel it returns what the
    Linen :class:`noisy_softmax_jax.NoisySoftmaxHead` returns, bit for bit.

    The paper drops the classifier bias (see the Linen head); keep
    ``use_bias=False`` unless you know why.

    Args:
      in_features: Size of the feature vector.
      num_classes: Number of classes.
      use_bias: Whether to add a bias to the logits (not in the paper).
      dtype: Computation dtype of the logits (default: inferred from inputs).
      param_dtype: Dtype of the kernel.
      kernel_init: Initializer of the kernel.
      bias_init: Initializer of the bias.
      rngs: The ``nnx.Rngs`` the kernel is drawn from (its ``params`` stream).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from noisy_softmax_jax import noisy_softmax_cross_entropy
      >>> from noisy_softmax_jax.nnx import NoisySoftmaxHead
      >>> head = NoisySoftmaxHead(32, 10, rngs=nnx.Rngs(0))
      >>> out = head(jnp.ones((4, 32)))
      >>> labels = jnp.array([0, 1, 2, 3])
      >>> loss = noisy_softmax_cross_entropy(
      ...     out.logits, labels, jax.random.key(1), 0.1, amplitude=out.amplitude(labels))
      >>> out.logits.shape, loss.shape
      ((4, 10), (4,))
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Callable[..., jax.Array] = _default_kernel_init,
        bias_init: Callable[..., jax.Array] = _default_bias_init,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.num_classes = num_classes
        self.dtype = dtype
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, num_classes), param_dtype))
        self.bias = (nnx.Param(bias_init(rngs.params(), (num_classes,), param_dtype))
                     if use_bias else None)

    def __call__(self, features: jax.Array) -> HeadOutput:
        bias = self.bias[...] if self.bias is not None else None
        return head_output(features, self.kernel[...], bias, dtype=self.dtype)
