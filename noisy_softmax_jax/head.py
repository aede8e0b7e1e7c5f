"""Classifier heads that own the class weights the noisy softmax needs.

:class:`NoisySoftmaxHead` is the Flax Linen module; the Flax NNX one is
:class:`noisy_softmax_jax.nnx.NoisySoftmaxHead`. Both return a
:class:`HeadOutput`, as does :func:`head_output` for weights held anywhere else
(Equinox, PyTorch-converted, plain JAX).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.typing import PrecisionLike
from jax.sharding import Mesh

from noisy_softmax_jax._validation import KernelLayout, check_kernel
from noisy_softmax_jax.amplitude import checked_labels, label_amplitude, safe_norm
from noisy_softmax_jax.large_class import fused_noisy_softmax_cross_entropy
from noisy_softmax_jax.large_class_top_k import fused_top_k

__all__ = [
    "FusedHeadOutput", "FusedNoisySoftmaxHead", "HeadOutput", "NoisySoftmaxHead", "head_output",
]


class HeadOutput(NamedTuple):
    """What the heads return: the logits and the norms behind them.

    Attributes:
      logits: Clean logits :math:`f_j = W_j^\\top x`, shape ``[..., num_classes]``;
        the prediction at evaluation. Float32 when the head computes in bfloat16 or
        float16 (the matmul's accumulator), else the compute dtype.
      feature_norm: :math:`\\|x\\|`, shape ``[...]``.
      class_norm: :math:`\\|W_j\\|` for every class, shape ``[num_classes]``.
    """

    logits: jax.Array
    feature_norm: jax.Array
    class_norm: jax.Array

    def amplitude(self, labels: jax.typing.ArrayLike,
                  where: jax.typing.ArrayLike | None = None) -> jax.Array:
        """Per-example :math:`\\|W_y\\|\\|x\\|`, the loss's ``amplitude``, shape ``[...]``.

        Labels that index no class follow the loss's rule, as in
        :func:`noisy_softmax_jax.target_amplitude`: masked out by ``where`` (the loss's
        per-example mask), anything goes (padding such as -1) and the amplitude is 0;
        unmasked, they raise eagerly and give NaN under ``jit``, never wrapping around.
        """
        num_classes = self.class_norm.shape[0]
        labels, where = checked_labels(labels, where, self.feature_norm.shape, num_classes)
        return label_amplitude(labels, num_classes, where,
                               lambda y: self.feature_norm * self.class_norm[y])


def _accumulation_dtype(dtype: Any) -> Any:
    """float32 for half-precision compute (bfloat16, float16); None (the dtype's own) otherwise."""
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else None


def linear_head_output(
    features: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None,
    class_axis: int,
    *,
    precision: PrecisionLike = None,
    dot_general: Callable[..., jax.Array] | None = None,
    preferred_element_type: Any = None,
) -> HeadOutput:
    """The logits and norms of already promoted arrays: the one computation of every head.

    The norms are taken of the arrays the logits multiply, and the half-precision matmul
    accumulates (and returns) float32, so the annealing factor ``a - f_y``, a small difference
    of two large numbers where a feature aligns with its class weight, keeps its digits.
    """
    if preferred_element_type is None:
        preferred_element_type = _accumulation_dtype(jnp.result_type(features, kernel))
    # Passed only when set, as nnx.Linear does: a custom dot_general may not take it.
    options = ({} if preferred_element_type is None
               else {"preferred_element_type": preferred_element_type})
    logits = (dot_general or jax.lax.dot_general)(
        features, kernel, (((features.ndim - 1,), (1 - class_axis,)), ((), ())),
        precision=precision, **options)
    if bias is not None:
        logits = logits + jnp.reshape(bias, (1,) * (logits.ndim - 1) + (-1,))
    return HeadOutput(
        logits=logits,
        feature_norm=safe_norm(features, axis=-1),
        class_norm=safe_norm(kernel, axis=1 - class_axis),
    )


def head_output(
    features: jax.typing.ArrayLike,
    kernel: jax.typing.ArrayLike,
    bias: jax.typing.ArrayLike | None = None,
    *,
    kernel_layout: KernelLayout = "features_classes",
    dtype: Any = None,
    precision: PrecisionLike = None,
) -> HeadOutput:
    r"""Applies a linear classifier and returns its logits with the norms the loss needs.

    .. math::
      f_j = W_j^\top x \; (+\, b_j), \qquad \|x\|, \qquad \|W_j\|

    For class weights held outside Flax: an ``eqx.nn.Linear``, weights
    converted from PyTorch, InsightFace-style class centres. ``features``,
    ``kernel`` and ``bias`` are promoted to ``dtype`` first (Flax's
    ``promote_dtype``; default: their common dtype), and the logits and both
    norms are computed from the promoted arrays: the norms in at least
    float32, the logits accumulated, and returned, in float32 for a
    half-precision ``dtype``. So the annealing factor :math:`\|W_y\|\|x\| - f_y`
    keeps its digits where a feature aligns with its class weight, which
    bfloat16 logits (about 3 significant digits) would lose.

    Args:
      features: The classifier's input, shape ``[..., num_features]``.
      kernel: Class weights, ``[num_features, num_classes]`` (default, Flax)
        or ``[num_classes, num_features]`` (Equinox, PyTorch), as
        ``kernel_layout`` says. A kernel in the other layout is reported,
        unless it is square; see :func:`noisy_softmax_jax.target_amplitude`.
      bias: Optional bias, shape ``[num_classes]`` (not in the paper).
      kernel_layout: ``"features_classes"`` (default) or ``"classes_features"``.
      dtype: Computation dtype of the matmul (default: the promoted dtype of
        the inputs).
      precision: The matmul's ``jax.lax.Precision``, as in ``nn.Dense``.

    Returns:
      A :class:`HeadOutput`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import head_output
      >>> weight = jax.random.normal(jax.random.key(0), (10, 32))  # PyTorch/Equinox: [out, in]
      >>> features = jnp.ones((4, 32))
      >>> out = head_output(features, weight, kernel_layout="classes_features")
      >>> out.logits.shape, out.amplitude(jnp.array([0, 1, 2, 3])).shape
      ((4, 10), (4,))
    """
    features, kernel, class_axis = check_kernel(features, kernel, kernel_layout)
    if bias is not None:
        bias = jnp.asarray(bias)
    x, kernel_c, bias_c = nn.dtypes.promote_dtype(features, kernel, bias, dtype=dtype)
    return linear_head_output(x, kernel_c, bias_c, class_axis, precision=precision)


class LinenLinearHead(nn.Module):
    """The parameters and options :class:`NoisySoftmaxHead` and ``NoisySoftmaxDense`` share.

    ``nn.Dense``'s attributes (see :class:`NoisySoftmaxHead`) and its parameters, made by
    :meth:`_head_output` from inside the subclass's compact ``__call__``.
    """

    num_classes: int
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
    bias_init: Callable[..., Any] = nn.initializers.zeros_init()
    precision: PrecisionLike = None
    promote_dtype: Callable[..., Any] = nn.dtypes.promote_dtype
    dot_general: Callable[..., jax.Array] | None = None
    dot_general_cls: Any = None
    preferred_element_type: Any = None

    def _head_output(self, features: jax.Array) -> HeadOutput:
        """``nn.Dense``'s parameters and promotion, then :func:`linear_head_output`."""
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(features)[-1], self.num_classes),
            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.num_classes,), self.param_dtype)
                if self.use_bias else None)
        features, kernel, bias = self.promote_dtype(features, kernel, bias, dtype=self.dtype)
        dot_general = (self.dot_general_cls() if self.dot_general_cls is not None
                       else self.dot_general)
        return linear_head_output(features, kernel, bias, 1, precision=self.precision,
                                  dot_general=dot_general,
                                  preferred_element_type=self.preferred_element_type)


class NoisySoftmaxHead(LinenLinearHead):
    """A Flax Linen linear classifier head for the noisy softmax, bias-free by default.

    Use it in place of the model's last ``nn.Dense(num_classes)``; it takes
    ``nn.Dense``'s arguments (``precision``, ``dot_general``, ``promote_dtype``,
    ``kernel_init=nn.with_partitioning(...)``) and has its parameters. It returns
    a :class:`HeadOutput` so the loss gets the amplitude it needs without the
    model exposing its features; :class:`noisy_softmax_jax.NoisySoftmaxDense`
    returns logits instead (noisy in training), for a training step that keeps
    Optax's loss. The parameter is named ``kernel`` with ``Dense``'s layout
    ``[num_features, num_classes]``. For Flax NNX use
    :class:`noisy_softmax_jax.nnx.NoisySoftmaxHead`.

    The paper drops the classifier bias: with one, :math:`f_y` is no longer
    :math:`\\|W_y\\|\\|x\\|\\cos\\theta_y` and the annealing factor loses its
    meaning (the loss still clamps it at zero). Keep ``use_bias=False`` unless
    you know why.

    With a half-precision ``dtype`` the matmul accumulates in float32 and the
    logits stay float32 (``nn.Dense`` rounds them to ``dtype``), and the norms
    are those of the promoted arrays: the annealing factor ``a - f_y`` is a
    small difference of large numbers where features align with their class
    weight, and bfloat16 logits would lose it (see :func:`head_output`).

    Attributes:
      num_classes: Number of classes.
      use_bias: Whether to add a bias to the logits (not in the paper).
      dtype: Computation dtype of the matmul (default: inferred from inputs).
      param_dtype: Dtype of the kernel.
      kernel_init: Initializer of the kernel; ``nn.with_partitioning(init, names)``
        shards it as it does ``nn.Dense``'s.
      bias_init: Initializer of the bias.
      precision: The matmul's ``jax.lax.Precision``, as in ``nn.Dense``.
      promote_dtype: ``nn.Dense``'s ``promote_dtype``: called as
        ``promote_dtype(features, kernel, bias, dtype=dtype)``.
      dot_general: The matmul, as in ``nn.Dense`` (default ``jax.lax.dot_general``).
      dot_general_cls: A class whose instance is the matmul, as in ``nn.Dense``.
      preferred_element_type: Dtype the matmul accumulates in and returns
        (default: float32 for half-precision inputs, else their dtype). Passed to
        ``dot_general`` only when set or when the inputs are half-precision.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import NoisySoftmaxHead, noisy_softmax_cross_entropy
      >>> head = NoisySoftmaxHead(num_classes=10)
      >>> features = jnp.ones((4, 32))
      >>> params = head.init(jax.random.key(0), features)
      >>> out = head.apply(params, features)
      >>> labels = jnp.array([0, 1, 2, 3])
      >>> loss = noisy_softmax_cross_entropy(
      ...     out.logits, labels, jax.random.key(1), 0.1, amplitude=out.amplitude(labels))
      >>> out.logits.shape, loss.shape
      ((4, 10), (4,))
    """

    @nn.compact
    def __call__(self, features: jax.Array) -> HeadOutput:
        return self._head_output(features)


@struct.dataclass
class FusedHeadOutput:
    """What the fused heads return: the features and class weights, and how to split the classes.

    A pytree (``features`` and ``kernel`` are its leaves; the rest is static), so it
    passes through ``jax.jit`` and ``jax.grad`` like :class:`HeadOutput`. Nothing of
    shape ``[batch, classes]`` is computed until asked for, and :meth:`loss` and
    :meth:`top_k` never ask: they go through the classes block by block.

    Attributes:
      features: The head's input :math:`x`, shape ``[batch, num_features]``.
      kernel: The class weights :math:`W`, shape ``[num_features, num_classes]``, as
        stored (the parameter's dtype: it is cast to ``dtype`` block by block, never whole).
      chunk_size: Classes per block (``None``: the loss's default).
      mesh: Optional ``jax.sharding.Mesh`` whose ``class_axis`` splits the classes.
      class_axis: The mesh axis that splits the classes.
      dtype: The matmul's dtype (``None``: the promoted dtype of ``features`` and
        ``kernel``); see :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy`.
      margin: ``None`` (the linear logits :math:`x^\\top W_j`), ``"cosface"`` or
        ``"arcface"``: cosine logits :math:`s\\cos\\theta_j` with that margin on the
        target, in :meth:`loss`, and the ranking by :math:`\\cos\\theta_j` in :meth:`top_k`.
      scale: The cosine logits' scale :math:`s` (``None``: 64); with a margin only.
      margin_value: The margin :math:`m` (``None``: 0.35 for CosFace, 0.5 for ArcFace);
        with a margin only.
    """

    features: jax.Array
    kernel: jax.Array
    chunk_size: int | None = struct.field(pytree_node=False, default=None)
    mesh: Mesh | None = struct.field(pytree_node=False, default=None)
    class_axis: str | None = struct.field(pytree_node=False, default=None)
    dtype: Any = struct.field(pytree_node=False, default=None)
    margin: str | None = struct.field(pytree_node=False, default=None)
    scale: float | None = struct.field(pytree_node=False, default=None)
    margin_value: float | None = struct.field(pytree_node=False, default=None)

    def loss(
        self,
        labels: jax.typing.ArrayLike,
        rng: jax.Array,
        alpha: jax.typing.ArrayLike,
        *,
        noise: str = "annealed",
        sigma: jax.typing.ArrayLike = 1.0,
        where: jax.typing.ArrayLike | None = None,
        shared_noise: bool = False,
        negative: bool = False,
    ) -> jax.Array:
        """Per-example noisy softmax losses, ``[batch]``, without the logits.

        :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy` of ``features`` and
        ``kernel`` with this output's ``chunk_size``, ``mesh``, ``class_axis``, ``dtype``
        and margin: without a margin, the value and gradients of the materialised head's
        ``noisy_softmax_cross_entropy(out.logits, labels, rng, alpha,
        amplitude=out.amplitude(labels), ...)`` for the same key; with one, of
        :func:`noisy_softmax_jax.margin_logits` on the cosines. ``alpha = 0`` (or
        ``rng=None``) is the cross-entropy without noise. The arguments are the loss's.
        """
        return fused_noisy_softmax_cross_entropy(
            self.features, self.kernel, labels, rng, alpha, noise=noise, sigma=sigma,
            where=where, shared_noise=shared_noise, negative=negative, margin=self.margin,
            scale=self.scale, margin_value=self.margin_value, chunk_size=self.chunk_size,
            mesh=self.mesh, class_axis=self.class_axis, dtype=self.dtype)

    def top_k(self, k: int) -> tuple[jax.Array, jax.Array]:
        """The ``k`` largest clean logits and their classes, ``[batch, k]`` each, largest first.

        :func:`noisy_softmax_jax.fused_top_k`, for top-1 / top-k accuracy at evaluation;
        with a margin, of the cosines :math:`\\cos\\theta_j` (``cosine=True``), which rank
        the classes as the margin loss's logits :math:`s\\cos\\theta_j` do.
        """
        return fused_top_k(self.features, self.kernel, k, chunk_size=self.chunk_size,
                           mesh=self.mesh, class_axis=self.class_axis, dtype=self.dtype,
                           cosine=self.margin is not None)

    def amplitude(self, labels: jax.typing.ArrayLike,
                  where: jax.typing.ArrayLike | None = None) -> jax.Array:
        """Per-example :math:`\\|W_y\\|\\|x\\|`, shape ``[batch]``, from the labelled columns.

        The norms of the features and columns cast to ``dtype``, as the loss without a
        margin takes them (with a margin, the noise's amplitude is the scale instead).
        Padding labels follow the loss's rule, as in :meth:`HeadOutput.amplitude`.
        """
        features, kernel, _ = check_kernel(self.features, self.kernel, "features_classes")
        dtype = self.dtype if self.dtype is not None else jnp.result_type(features, kernel)
        num_classes = kernel.shape[1]
        labels, where = checked_labels(labels, where, features.shape[:1], num_classes)
        feature_norm = safe_norm(features.astype(dtype), axis=-1)

        def amplitude_of(labels):
            # The labelled columns only, then the cast: no cast copy of the whole kernel.
            return feature_norm * safe_norm(kernel[:, labels].astype(dtype), axis=0)

        return label_amplitude(labels, num_classes, where, amplitude_of)


class FusedNoisySoftmaxHead(nn.Module):
    r"""A Flax Linen noisy softmax head for very many classes: its loss never forms the logits.

    .. math::
      \ell = \log\Big(e^{\tilde f_y} + \sum_{j \ne y} e^{x^\top W_j}\Big) - \tilde f_y

    The parameter is :class:`NoisySoftmaxHead`'s: ``kernel``, ``[num_features,
    num_classes]``, with the same initializer, so with the same key and module name the
    two heads have the same parameters and a checkpoint of one loads into the other.
    Calling the head returns a :class:`FusedHeadOutput`; its ``loss`` is
    :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy` (values and gradients of
    the materialised head with :func:`noisy_softmax_jax.noisy_softmax_cross_entropy`),
    its ``top_k`` is :func:`noisy_softmax_jax.fused_top_k`. Bias-free, as in the paper.
    For Flax NNX use :class:`noisy_softmax_jax.nnx.FusedNoisySoftmaxHead`.

    With ``mesh`` and ``class_axis`` the kernel can be created split over the classes: its
    initializer returns an ``nn.Partitioned`` box with names ``(None, class_axis)``, as
    ``nn.with_partitioning`` makes, so ``nn.get_partition_spec`` and
    ``nn.get_sharding(abstract_variables, mesh)`` give its sharding and
    ``jax.jit(model.init, out_shardings=...)`` creates each device's part only (and the
    optimizer state alike, from ``nn.get_sharding`` of ``jax.eval_shape(tx.init, ...)``).
    A ``kernel_init`` that already returns a box keeps its own partitioning. The box is
    the only difference from the unsharded head's parameters (``nn.unbox`` removes it). With
    ``dtype=jnp.bfloat16`` the kernel stays in ``param_dtype`` and is cast block by
    block inside the loss and top-k, so temporaries do not grow with the classes.

    Attributes:
      num_classes: Number of classes.
      chunk_size: Classes per block (default: about 2**21 / batch, a multiple of 128).
      mesh: Optional ``jax.sharding.Mesh`` to split the classes over; needs ``class_axis``.
      class_axis: The mesh axis that splits the classes.
      dtype: The matmul's dtype (default: inferred from inputs); bfloat16 is multiplied
        with float32 accumulation, the logits' dtype, and so the loss is float32.
      param_dtype: Dtype of the kernel.
      kernel_init: Initializer of the kernel.
      margin: ``None`` (default: the paper's linear logits), ``"cosface"`` or
        ``"arcface"``: the loss on cosine logits :math:`s\cos\theta_j` with that margin
        on the noisy target (see
        :func:`noisy_softmax_jax.fused_noisy_softmax_cross_entropy`), and ``top_k`` by
        cosine. The kernel and its initializer are the same either way.
      scale: The cosine logits' scale :math:`s` (default 64); with a margin only.
      margin_value: The margin :math:`m` (default 0.35 for CosFace, 0.5 for ArcFace);
        with a margin only.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from noisy_softmax_jax import FusedNoisySoftmaxHead
      >>> head = FusedNoisySoftmaxHead(num_classes=1000, chunk_size=256)
      >>> features = jnp.ones((4, 32))
      >>> params = head.init(jax.random.key(0), features)
      >>> labels = jnp.array([0, 1, 2, 999])
      >>> loss = head.apply(params, features, labels, jax.random.key(1), 0.1, method="loss")
      >>> values, classes = head.apply(params, features, 5, method="top_k")
      >>> loss.shape, classes.shape
      ((4,), (4, 5))
      >>> out = head.apply(params, features)  # inside a model: the output, then its loss
      >>> bool(jnp.allclose(out.loss(labels, jax.random.key(1), 0.1), loss))
      True

      Split over the classes of a mesh, and created split (Flax's recipe):

      >>> import flax.linen as nn
      >>> mesh = jax.make_mesh((1,), ("classes",),  # (8,) on eight devices
      ...                      axis_types=(jax.sharding.AxisType.Explicit,))
      >>> head = FusedNoisySoftmaxHead(1000, mesh=mesh, class_axis="classes")
      >>> abstract = jax.eval_shape(head.init, jax.random.key(0), features)
      >>> nn.get_partition_spec(abstract)["params"]["kernel"] == jax.P(None, "classes")
      True
      >>> init = jax.jit(head.init, out_shardings=nn.get_sharding(abstract, mesh))
      >>> kernel = init(jax.random.key(0), features)["params"]["kernel"].value
      >>> kernel.sharding.spec == jax.P(None, "classes")
      True

      CosFace with the noise (noise first, then the margin), evaluated by cosine:

      >>> head = FusedNoisySoftmaxHead(1000, margin="cosface", scale=30.0, margin_value=0.35)
      >>> params = head.init(jax.random.key(0), features)
      >>> loss = head.apply(params, features, labels, jax.random.key(1), 0.1, method="loss")
      >>> cosines, classes = head.apply(params, features, 5, method="top_k")
      >>> bool(jnp.all(jnp.abs(cosines) <= 1.0 + 1e-6))
      True
    """

    num_classes: int
    chunk_size: int | None = None
    mesh: Mesh | None = None
    class_axis: str | None = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable[..., jax.Array] = nn.initializers.lecun_normal()
    margin: str | None = None
    scale: float | None = None
    margin_value: float | None = None

    def _partitioned_init(self, *args: Any) -> Any:
        """``kernel_init``'s kernel in an ``nn.Partitioned`` box split along the classes."""
        kernel = self.kernel_init(*args)
        if isinstance(kernel, nn.meta.AxisMetadata):
            return kernel  # partitioned by the user already
        # Names only, no mesh: a box with a mesh constrains the kernel as it is unboxed, which
        # Explicit mesh axes refuse, and the loss reshards its kernel to the split it needs.
        return nn.Partitioned(kernel, names=(None, self.class_axis))

    @nn.compact
    def __call__(self, features: jax.Array) -> FusedHeadOutput:
        init = self.kernel_init if self.mesh is None else self._partitioned_init
        kernel = self.param(
            "kernel", init, (jnp.shape(features)[-1], self.num_classes), self.param_dtype)
        # Only the features are promoted: the kernel is cast block by block inside the loss.
        (features,) = nn.dtypes.promote_dtype(features, dtype=self.dtype)
        return FusedHeadOutput(features, kernel, chunk_size=self.chunk_size, mesh=self.mesh,
                               class_axis=self.class_axis, dtype=self.dtype,
                               margin=self.margin, scale=self.scale,
                               margin_value=self.margin_value)

    def loss(self, features: jax.Array, labels: jax.typing.ArrayLike, rng: jax.Array,
             alpha: jax.typing.ArrayLike, **kwargs: Any) -> jax.Array:
        """``self(features).loss(labels, rng, alpha, **kwargs)``: :meth:`FusedHeadOutput.loss`."""
        return self(features).loss(labels, rng, alpha, **kwargs)

    def top_k(self, features: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        """``self(features).top_k(k)``; see :meth:`FusedHeadOutput.top_k`."""
        return self(features).top_k(k)
