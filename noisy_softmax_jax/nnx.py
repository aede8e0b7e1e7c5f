"""The noisy softmax's classifier heads for Flax NNX.

Import them as ``from noisy_softmax_jax.nnx import NoisySoftmaxHead`` (and
``NoisySoftmaxLinear``, which returns logits, noisy in training, and
``FusedNoisySoftmaxHead``, for very many classes), or reach them as
``noisy_softmax_jax.nnx``. The Flax Linen heads are
:class:`noisy_softmax_jax.NoisySoftmaxHead`, :class:`noisy_softmax_jax.NoisySoftmaxDense`
and :class:`noisy_softmax_jax.FusedNoisySoftmaxHead`.
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

from noisy_softmax_jax.dense import head_logits
from noisy_softmax_jax.head import FusedHeadOutput, HeadOutput, linear_head_output

__all__ = ["FusedHeadOutput", "FusedNoisySoftmaxHead", "HeadOutput", "NoisySoftmaxHead",
           "NoisySoftmaxLinear"]

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


class NNXLinearHead(nnx.Module):
    """The parameters and options of :class:`NoisySoftmaxHead` and :class:`NoisySoftmaxLinear`.

    ``nnx.Linear``'s arguments (see :class:`NoisySoftmaxHead`) and its parameters;
    :meth:`_head_output` computes the logits and norms.
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

class NoisySoftmaxHead(NNXLinearHead):
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

    def __call__(self, features: jax.Array) -> HeadOutput:
        return self._head_output(features)


class NoisySoftmaxLinear(NNXLinearHead):
    r"""A Flax NNX classifier head returning logits, noisy in training: a drop-in ``nnx.Linear``.

    The NNX twin of the Linen :class:`noisy_softmax_jax.NoisySoftmaxDense`. Replace the
    model's last ``nnx.Linear(in_features, num_classes, rngs=rngs)`` with
    ``NoisySoftmaxLinear(in_features, num_classes, alpha=0.1, rngs=rngs)`` and pass the
    labels through the model to it: ``optax.softmax_cross_entropy_with_integer_labels``
    of its output is then the noisy softmax loss (the value and gradients of
    :func:`noisy_softmax_jax.noisy_softmax_cross_entropy` with the head's amplitude, for
    the same key), and the metrics and ``argmax`` stay as they are. It returns the clean
    logits when ``labels`` is None or the head is deterministic (``model.eval()``, which
    sets ``deterministic=True`` as for ``nnx.Dropout``; ``model.train()`` clears it), with
    no key drawn; otherwise the logits with the target entry lowered by the noise
    (:func:`noisy_softmax_jax.noisy_logits`), float32 for half-precision inputs.

    The noise comes, as ``nnx.Dropout``'s does, from a fork of the constructor's
    ``rngs[rng_collection]`` stream (``rngs.noise``, or ``rngs.default`` when the ``Rngs``
    has no ``noise`` stream), or from the call's ``rngs`` (an ``nnx.Rngs``, an
    ``nnx.RngStream`` or a key), which takes precedence. Its parameters are
    :class:`NoisySoftmaxHead`'s and ``nnx.Linear``'s: the same ``kernel`` (and ``bias``)
    from the same ``rngs``, drawn before the fork.

    Args:
      in_features: Size of the feature vector.
      num_classes: Number of classes.
      alpha: Noise scale (about 0.1 in the paper); a call's ``alpha`` overrides it, for a
        schedule. ``alpha = 0`` as a Python number gives the clean logits, no key drawn.
      noise: ``"annealed"`` (the paper's method), ``"amplitude"`` or ``"free"``.
      sigma: Standard deviation of :math:`\xi`.
      shared_noise: One :math:`\xi` for the whole batch (the first author's Caffe code).
      negative: Raise the target logit instead (the paper's ablation).
      deterministic: If True, the clean logits; ``model.eval()`` / ``model.train()`` set
        it, and a call's ``deterministic`` overrides it.
      rng_collection: The stream of ``rngs`` the noise is drawn from (default ``"noise"``).
      rngs: The ``nnx.Rngs`` the parameters are drawn from (``params``) and the noise
        stream is forked from.
      **options: :class:`NoisySoftmaxHead`'s other arguments (``nnx.Linear``'s:
        ``use_bias``, ``dtype``, ``param_dtype``, ``precision``, ``kernel_init``,
        ``bias_init``, ``dot_general``, ``promote_dtype``, ``preferred_element_type``,
        ``kernel_metadata``, ``bias_metadata``).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> from noisy_softmax_jax.nnx import NoisySoftmaxLinear
      >>> head = NoisySoftmaxLinear(32, 10, alpha=0.1, rngs=nnx.Rngs(0))  # was: nnx.Linear
      >>> features, labels = jnp.ones((4, 32)), jnp.array([0, 1, 2, 3])
      >>> logits = head(features, labels)  # training: the noisy logits
      >>> loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      >>> head.eval()  # evaluation: the clean logits, labels or not
      >>> clean = head(features, labels)
      >>> bool(jnp.all((logits == clean) == (jnp.arange(10) != labels[:, None])))
      True
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        alpha: Any = None,
        noise: str = "annealed",
        sigma: Any = 1.0,
        shared_noise: bool = False,
        negative: bool = False,
        deterministic: bool = False,
        rng_collection: str = "noise",
        rngs: nnx.Rngs,
        **options: Any,
    ):
        super().__init__(in_features, num_classes, rngs=rngs, **options)
        self.alpha = alpha
        self.noise = noise
        self.sigma = sigma
        self.shared_noise = shared_noise
        self.negative = negative
        self.deterministic = deterministic
        self.rng_collection = rng_collection
        try:
            self.rngs = rngs[rng_collection].fork()
        except KeyError:  # an Rngs with neither this stream nor a default one
            self.rngs = nnx.data(None)

    def __call__(
        self,
        features: jax.Array,
        labels: jax.typing.ArrayLike | None = None,
        *,
        alpha: jax.typing.ArrayLike | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None,
    ) -> jax.Array:
        """The logits of ``features``, noisy when given ``labels`` and not deterministic.

        Args:
          features: The head's input, shape ``[..., in_features]``.
          labels: Integer labels, shape ``[...]``; None for the clean logits.
          alpha: Overrides the constructor's ``alpha`` (a traced schedule value works).
          deterministic: Overrides the attribute ``deterministic``.
          rngs: An ``nnx.Rngs``, ``nnx.RngStream`` or key to draw the noise from instead of
            the head's own stream, as in ``nnx.Dropout``.

        Returns:
          Logits, shape ``[..., num_classes]``.
        """
        name = type(self).__name__

        def draw_key() -> jax.Array:
            source = rngs if rngs is not None else self.rngs
            if isinstance(source, nnx.Rngs):
                return source[self.rng_collection]()
            if isinstance(source, nnx.RngStream):
                return source()
            if isinstance(source, jax.Array):
                return source
            raise ValueError(
                f"{name} has no {self.rng_collection!r} stream to draw its noise from: build "
                f"it with `rngs=nnx.Rngs(0)` (or `nnx.Rngs(params=0, "
                f"{self.rng_collection}=1)`), or pass `rngs=` (an nnx.Rngs, RngStream or "
                "key) to the call. For the clean logits pass no `labels`, or call "
                "`model.eval()`.")

        return head_logits(
            self._head_output(features), labels, alpha if alpha is not None else self.alpha,
            deterministic=deterministic if deterministic is not None else self.deterministic,
            draw_key=draw_key,
            missing_alpha=(
                f"{name} needs `alpha` to add the noise to the logits: "
                f"`{name}(in_features, num_classes, alpha=0.1, rngs=rngs)`, or "
                "`head(features, labels, alpha=alpha)` at each call. Without `labels`, or "
                "after `model.eval()`, it returns the clean logits."),
            noise=self.noise, sigma=self.sigma, shared_noise=self.shared_noise,
            negative=self.negative)


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
    metadata ``nnx.with_partitioning`` gives it for ``(None, class_axis)`` and the ``mesh``,
    so Flax shards it as it is created (eagerly: the whole kernel exists once, then is
    split; under ``nnx.jit`` each device creates only its part), ``nnx.get_partition_spec``
    gives its sharding, and ``nnx.Optimizer``'s state is split alike. A ``kernel_init`` wrapped in
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
      margin: ``None`` (default), ``"cosface"`` or ``"arcface"``: the loss on cosine logits
        with that margin, and ``top_k`` by cosine, as in the Linen head.
      scale: The cosine logits' scale :math:`s` (default 64); with a margin only.
      margin_value: The margin :math:`m` (default 0.35 for CosFace, 0.5 for ArcFace);
        with a margin only.
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

      >>> mesh = jax.make_mesh((1,), ("classes",),  # (8,) on eight devices
      ...                      axis_types=(jax.sharding.AxisType.Explicit,))
      >>> head = FusedNoisySoftmaxHead(32, 1000, mesh=mesh, class_axis="classes",
      ...                              rngs=nnx.Rngs(0))
      >>> head.kernel[...].sharding.spec == jax.P(None, "classes")
      True
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
        margin: str | None = None,
        scale: float | None = None,
        margin_value: float | None = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.num_classes = num_classes
        self.chunk_size = chunk_size
        self.mesh = mesh
        self.class_axis = class_axis
        self.dtype = dtype
        self.margin = margin
        self.scale = scale
        self.margin_value = margin_value
        kernel = kernel_init(rngs.params(), (in_features, num_classes), param_dtype)
        # A kernel_init made by nnx.with_partitioning keeps its own metadata. Ours comes from
        # nnx.with_partitioning too, which names it as the installed Flax does
        # (`sharding_names` before 0.12.3 or so, `out_sharding` after).
        if mesh is not None and class_axis is not None and not isinstance(
                kernel, nnx.VariableMetadata):
            kernel = nnx.with_partitioning(lambda: kernel, (None, class_axis), mesh=mesh)()
        self.kernel = nnx.Param(kernel)

    def __call__(self, features: jax.Array) -> FusedHeadOutput:
        _check_in_features(self, features)
        # Only the features are promoted: the kernel is cast block by block inside the loss.
        (features,) = nnx.nn.dtypes.promote_dtype((features,), dtype=self.dtype)
        return FusedHeadOutput(features, self.kernel[...], chunk_size=self.chunk_size,
                               mesh=self.mesh, class_axis=self.class_axis, dtype=self.dtype,
                               margin=self.margin, scale=self.scale,
                               margin_value=self.margin_value)

    def loss(self, features: jax.Array, labels: jax.typing.ArrayLike, rng: jax.Array,
             alpha: jax.typing.ArrayLike, **kwargs: Any) -> jax.Array:
        """``self(features).loss(labels, rng, alpha, **kwargs)``: per-example losses ``[batch]``."""
        return self(features).loss(labels, rng, alpha, **kwargs)

    def top_k(self, features: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        """``self(features).top_k(k)``: the ``k`` largest logits and their classes."""
        return self(features).top_k(k)
