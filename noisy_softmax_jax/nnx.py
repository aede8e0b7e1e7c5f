"""The noisy softmax's classifier heads for Flax NNX.

Import them as ``from noisy_softmax_jax.nnx import NoisySoftmaxHead`` (and
``FusedNoisySoftmaxHead``, for very many classes); the Flax Linen heads of the
same names are :class:`noisy_softmax_jax.NoisySoftmaxHead` and
:class:`noisy_softmax_jax.FusedNoisySoftmaxHead`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import PrecisionLike
from jax.sharding import Mesh

from noisy_softmax_jax.head import FusedHeadOutput, HeadOutput, linear_head_output

__all__ = ["FusedHeadOutput", "FusedNoisySoftmaxHead", "HeadOutput", "NoisySoftmaxHead"]

# nnx.Linear's defaults.
_default_kernel_init = nnx.initializers.lecun_normal()
_default_bias_init = nnx.initializers.zeros_init()


def _check_in_features(head: nnx.Module, features: jax.Array) -> None:
    """The NNX form of a feature-size mismatch: the size is the constructor's ``in_features``."""
    in_features = head.in_features  # type: ignore[attr-defined]
    if jnp.ndim(features) < 1 or jnp.shape(features)[-1] != in_features:
        name = type(head).__name__
        raise ValueError(
            f"{name}(in_features={in_features}, ...) needs features of shape "
            f"[..., {in_features}]; got shape {jnp.shape(features)}. Build the head with "
            f"{name}({jnp.shape(features)[-1] if jnp.ndim(features) else '...'}, "
            "num_classes, rngs=...) for these features.")


class NoisySoftmaxHead(nnx.Module):
    """A Flax NNX linear classifier head for the noisy softmax, bias-free by default.

    Use it in place of the model's last ``nnx.Linear(in_features, num_classes)``;
    it takes ``nnx.Linear``'s arguments (``precision``, ``dot_general``,
    ``promote_dtype``, ``preferred_element_type``, ``kernel_metadata``, and
    ``kernel_init=nnx.with_partitioning(...)``) and has its parameters. It returns
    a :class:`~noisy_softmax_jax.HeadOutput` (clean logits, feature and
    class-weight norms) so the loss gets the amplitude it needs;
    :class:`NoisySoftmaxLinear` returns logits instead (noisy in training), for a
    training step that keeps Optax's loss. The parameter is ``kernel``, an
    ``nnx.Param`` in ``nnx.Linear``'s layout ``[in_features, num_classes]``; with
    the same kernel it returns what the Linen
    :class:`noisy_softmax_jax.NoisySoftmaxHead` returns, bit for bit.

    The paper drops the classifier bias (see the Linen head); keep
    ``use_bias=False`` unless you know why. With a half-precision ``dtype`` the
    matmul accumulates in float32 and the logits stay float32, and the norms are
    those of the promoted arrays (see :func:`noisy_softmax_jax.head_output`).

    Args:
      in_features: Size of the feature vector.
      num_classes: Number of classes.
      use_bias: Whether to add a bias to the logits (not in the paper).
      dtype: Computation dtype of the matmul (default: inferred from inputs).
      param_dtype: Dtype of the kernel.
      precision: The matmul's ``jax.lax.Precision``, as in ``nnx.Linear``.
      kernel_init: Initializer of the kernel (``nnx.with_partitioning`` works).
      bias_init: Initializer of the bias.
      dot_general: The matmul, as in ``nnx.Linear`` (default ``jax.lax.dot_general``).
      promote_dtype: ``nnx.Linear``'s ``promote_dtype``: called as
        ``promote_dtype((features, kernel, bias), dtype=dtype)``.
      preferred_element_type: Dtype the matmul accumulates in and returns
        (default: float32 for half-precision inputs, else their dtype).
      kernel_metadata: Metadata of the kernel's ``nnx.Param``, as in
        ``nnx.Linear`` (e.g. ``{"out_sharding": (None, "model")}``).
      bias_metadata: Metadata of the bias's ``nnx.Param``.
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
        precision: PrecisionLike = None,
        kernel_init: Callable[..., Any] = _default_kernel_init,
        bias_init: Callable[..., Any] = _default_bias_init,
        dot_general: Callable[..., jax.Array] = jax.lax.dot_general,
        promote_dtype: Callable[..., Any] = nnx.nn.dtypes.promote_dtype,
        preferred_element_type: Any = None,
        kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
        bias_metadata: Mapping[str, Any] = MappingProxyType({}),
        rngs: nnx.Rngs,
    ):
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, num_classes), param_dtype),
            **kernel_metadata)
        self.bias: nnx.Param[jax.Array] | None
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (num_classes,), param_dtype),
                                  **bias_metadata)
        else:
            self.bias = nnx.data(None)
        self.in_features = in_features
        self.num_classes = num_classes
        self.dtype = dtype
        self.precision = precision
        self.dot_general = dot_general
        self.promote_dtype = promote_dtype
        self.preferred_element_type = preferred_element_type

    def _head_output(self, features: jax.Array) -> HeadOutput:
        """``nnx.Linear``'s promotion, then :func:`~noisy_softmax_jax.head.linear_head_output`."""
        _check_in_features(self, features)
        bias = self.bias[...] if self.bias is not None else None
        features, kernel, bias = self.promote_dtype(
            (features, self.kernel[...], bias), dtype=self.dtype)
        return linear_head_output(features, kernel, bias, 1, precision=self.precision,
                                  dot_general=self.dot_general,
                                  preferred_element_type=self.preferred_element_type)

    def __call__(self, features: jax.Array) -> HeadOutput:
        return self._head_output(features)


class FusedNoisySoftmaxHead(nnx.Module):
    """A Flax NNX noisy softmax head for very many classes: its loss never forms the logits.

    The NNX twin of the Linen :class:`noisy_softmax_jax.FusedNoisySoftmaxHead`. Its
    parameter is :class:`NoisySoftmaxHead`'s, ``kernel`` ``[in_features, num_classes]``
    drawn by the same initializer from the same stream, so the two heads built from the
    same ``nnx.Rngs`` hold the same kernel. Calling it returns a
    :class:`~noisy_softmax_jax.FusedHeadOutput`; :meth:`loss` is
    :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy` and :meth:`top_k` is
    :func:`noisy_softmax_jax.fused_top_k`, with the head's ``chunk_size``, ``mesh``,
    ``class_axis`` and ``dtype``.

    With ``mesh`` and ``class_axis`` the kernel's ``nnx.Param`` carries the sharding
    metadata ``out_sharding=(None, class_axis)`` and the ``mesh``, so Flax shards it as it
    is created (eagerly: the whole kernel exists once, then is split; under ``nnx.jit``
    each device creates only its part), ``nnx.get_partition_spec`` gives its sharding, and
    ``nnx.Optimizer``'s state is split alike. A ``kernel_init`` wrapped in
    ``nnx.with_partitioning`` keeps its own metadata. With ``dtype=jnp.bfloat16`` the
    kernel stays in ``param_dtype`` and is cast block by block inside the loss and top-k.

    Args:
      in_features: Size of the feature vector.
      num_classes: Number of classes.
      chunk_size: Classes per block (default: about 2**21 / batch, a multiple of 128).
      mesh: Optional ``jax.sharding.Mesh`` to split the classes over; needs ``class_axis``.
      class_axis: The mesh axis that splits the classes.
      dtype: The matmul's dtype (default: inferred from inputs).
      param_dtype: Dtype of the kernel.
      kernel_init: Initializer of the kernel.
      rngs: The ``nnx.Rngs`` the kernel is drawn from (its ``params`` stream).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from noisy_softmax_jax.nnx import FusedNoisySoftmaxHead
      >>> head = FusedNoisySoftmaxHead(32, 1000, chunk_size=256, rngs=nnx.Rngs(0))
      >>> features, labels = jnp.ones((4, 32)), jnp.array([0, 1, 2, 999])
      >>> loss, grads = nnx.value_and_grad(
      ...     lambda head: head.loss(features, labels, jax.random.key(1), 0.1).mean())(head)
      >>> values, classes = head.top_k(features, 5)
      >>> loss.shape, grads["kernel"].shape, classes.shape
      ((), (32, 1000), (4, 5))

      Split over the classes of a mesh, the kernel and the optimizer state alike:

      >>> mesh = jax.make_mesh((1,), ("classes",))  # (8,) on eight devices
      >>> head = FusedNoisySoftmaxHead(32, 1000, mesh=mesh, class_axis="classes",
      ...                              rngs=nnx.Rngs(0))
      >>> head.kernel[...].sharding.spec
      P(None, 'classes')
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        chunk_size: int | None = None,
        mesh: Mesh | None = None,
        class_axis: str | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        kernel_init: Callable[..., jax.Array] = _default_kernel_init,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.num_classes = num_classes
        self.chunk_size = chunk_size
        self.mesh = mesh
        self.class_axis = class_axis
        self.dtype = dtype
        # The metadata of a kernel_init made by nnx.with_partitioning takes precedence.
        sharding: dict[str, Any] = ({} if mesh is None or class_axis is None
                                    else {"out_sharding": (None, class_axis), "mesh": mesh})
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (in_features, num_classes), param_dtype), **sharding)

    def __call__(self, features: jax.Array) -> FusedHeadOutput:
        _check_in_features(self, features)
        # Only the features are promoted: the kernel is cast block by block inside the loss.
        (features,) = nnx.nn.dtypes.promote_dtype((features,), dtype=self.dtype)
        return FusedHeadOutput(features, self.kernel[...], chunk_size=self.chunk_size,
                               mesh=self.mesh, class_axis=self.class_axis, dtype=self.dtype)

    def loss(self, features: jax.Array, labels: jax.typing.ArrayLike, rng: jax.Array,
             alpha: jax.typing.ArrayLike, **kwargs: Any) -> jax.Array:
        """``self(features).loss(labels, rng, alpha, **kwargs)``: per-example losses ``[batch]``."""
        return self(features).loss(labels, rng, alpha, **kwargs)

    def top_k(self, features: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        """``self(features).top_k(k)``: the ``k`` largest logits and their classes."""
        return self(features).top_k(k)
