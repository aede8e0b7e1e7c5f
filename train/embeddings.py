"""What a trained model's penultimate features are used for: pair embeddings and closed-set top-k.

  model_embeddings      a model's embeddings (its head's input) of a set of images, batched;
                        optionally plus the embedding of each horizontally flipped image.
  raw_pixel_embeddings  the baseline without a model: flattened pixels, each image's mean
                        subtracted (their cosine is the pixels' Pearson correlation).
  head_kernel           the class weights of a model's head, from its parameters.
  closed_set_accuracy   top-1 / top-5 accuracy of features against the head's kernel through
                        `noisy_softmax_jax.fused_top_k`: no [batch, classes] logits.

The embeddings go into `train.verification.evaluate_embeddings` (cosine scores, LFW's protocol).

Flipping: face verification commonly adds the embedding of the mirrored face to the embedding
of the face before normalising (faces are nearly symmetric; the sum is a little more robust).
For glyphs it is wrong: a mirrored character is another shape, often no character at all. So
`flip` is off by default; turn it on for faces only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import noisy_softmax_jax
from train import input_pipeline, steps

# The head of every model in train.models, named so by `models.classifier_head`.
HEAD_NAME = "NoisySoftmaxHead_0"


@functools.partial(jax.jit, static_argnames=("dataset", "flip"))
def _embed_batch(state: steps.TrainState, images: jax.Array, *, dataset: str, flip: bool):
    variables = steps.model_variables(state, state.params)
    inputs = input_pipeline.normalize(images, dataset)
    embeddings = state.apply_fn(variables, inputs, train=False, method="embed")
    if flip:
        embeddings = embeddings + state.apply_fn(variables, inputs[:, :, ::-1, :], train=False,
                                                 method="embed")
    return embeddings.astype(jnp.float32)


def _padded_batches(num: int, batch_size: int):
    """(start, stop, padded indices) covering range(num); the last batch repeats row 0."""
    for start in range(0, num, batch_size):
        stop = min(start + batch_size, num)
        indices = np.arange(start, start + batch_size)
        yield start, stop, np.where(indices < num, indices, 0)


def model_embeddings(
    state: steps.TrainState,
    images: np.ndarray,
    *,
    dataset: str,
    flip: bool = False,
    batch_size: int = 500,
) -> np.ndarray:
    """Embeddings ``e(x)``, or ``e(x) + e(flip(x))`` with ``flip``, of uint8 images, float32.

    The embedding is the model's ``embed`` method (the head's input; see
    ``train.models.ResNet``), in evaluation mode (batch-norm running statistics). Images are
    normalised as in training (``input_pipeline.normalize`` with ``dataset``'s statistics).
    Every batch is padded to ``batch_size``, so the function compiles once per size.

    Args:
      state: the trained state (its ``apply_fn``, ``params`` and ``batch_stats``).
      images: uint8 images ``[N, H, W, C]``.
      dataset: the name whose normalisation the model was trained with.
      flip: also embed each image mirrored left-right and add the two embeddings (LFW
        practice for faces; wrong for glyphs, whose mirror image is another shape).
      batch_size: images per compiled call.

    Returns:
      ``[N, embedding_dim]`` float32 embeddings, not normalised (cosine scores normalise).
    """
    model = getattr(state.apply_fn, "__self__", None)  # the module of `model.apply`
    if not hasattr(model, "embed"):
        raise ValueError(f"{type(model).__name__} has no `embed` method; use one of "
                         "train.models.EMBEDDING_MODELS")
    images = np.asarray(images)
    outputs = []
    for start, stop, indices in _padded_batches(len(images), batch_size):
        batch = _embed_batch(state, images[indices], dataset=dataset, flip=flip)
        outputs.append(np.asarray(batch)[: stop - start])
    return np.concatenate(outputs)


def raw_pixel_embeddings(images: np.ndarray) -> np.ndarray:
    """The raw-pixel baseline: each image flattened, minus its own mean, float64.

    The cosine of two such vectors is the Pearson correlation of their pixels, which ignores
    each image's brightness offset. Centring each image on its own mean (not the set's mean
    image) keeps an image's embedding independent of the other images evaluated with it.

    Args:
      images: ``[N, H, W, C]`` images (any numeric dtype).

    Returns:
      ``[N, H * W * C]`` float64.

    Example:
      >>> raw_pixel_embeddings(np.array([[[[0], [2]]], [[[5], [5]]]], np.uint8)).tolist()
      [[-1.0, 1.0], [0.0, 0.0]]
    """
    pixels = np.asarray(images, np.float64).reshape(len(images), -1)
    return pixels - pixels.mean(axis=1, keepdims=True)


def head_kernel(params) -> jax.Array:
    """The class weights ``[embedding_dim, num_classes]`` of a `train.models` model's head."""
    return params[HEAD_NAME]["kernel"]


def closed_set_accuracy(
    features: np.ndarray,
    kernel: jax.typing.ArrayLike,
    labels: np.ndarray,
    *,
    ks: Sequence[int] = (1, 5),
    batch_size: int = 1000,
    chunk_size: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    class_axis: str | None = None,
) -> dict[int, float]:
    """Top-k accuracy of the bias-free classifier ``features @ kernel``, without its logits.

    An example is correct at ``k`` when its label is among the ``k`` largest logits.
    ``noisy_softmax_jax.fused_top_k`` finds them block by block over the classes (blocks
    of ``chunk_size``), so memory stays ``[batch_size, k]`` beside the kernel at any class
    count. Ties between logits go to the lower class, as ``jax.lax.top_k`` breaks them.

    Args:
      features: the head's input for each example, ``[N, dims]`` (``model_embeddings``
        without ``flip``: the head was trained on unflipped images).
      kernel: the head's class weights, ``[dims, num_classes]`` (see ``head_kernel``).
      labels: the true class of each example, ``[N]``.
      ks: the ``k`` of each accuracy, each at most ``num_classes``.
      batch_size: examples per call (the last batch is padded).
      chunk_size: classes per block (None: the fused loss's default).
      mesh: optional mesh whose ``class_axis`` splits the classes (a class-sharded kernel):
        each device ranks its own classes and the shards exchange ``[batch, k]`` candidates.
      class_axis: the mesh axis that splits the classes.

    Returns:
      ``{k: accuracy}``.

    Example:
      >>> kernel = np.eye(3, dtype=np.float32)  # class j scores feature j
      >>> features = np.array([[3, 2, 1], [1, 2, 3], [2, 3, 1]], np.float32)
      >>> closed_set_accuracy(features, kernel, np.array([0, 1, 2]), ks=(1, 2))
      {1: 0.3333333333333333, 2: 0.6666666666666666}
    """
    features, labels = np.asarray(features), np.asarray(labels)
    num_classes = np.shape(kernel)[-1]
    if not ks or min(ks) < 1 or max(ks) > num_classes:
        raise ValueError(f"ks must be in [1, {num_classes}] (the classes); got {tuple(ks)}")
    if len(features) != len(labels) or len(labels) == 0:
        raise ValueError(f"features and labels need one row per example; got {features.shape} "
                         f"and {labels.shape}")
    top = max(ks)
    correct = dict.fromkeys(ks, 0)
    for start, stop, indices in _padded_batches(len(features), batch_size):
        _, classes = noisy_softmax_jax.fused_top_k(features[indices], kernel, top,
                                                   chunk_size=chunk_size, mesh=mesh,
                                                   class_axis=class_axis)
        classes = np.asarray(classes)[: stop - start]
        hit = classes == labels[start:stop, None]
        for k in ks:
            correct[k] += int(hit[:, :k].any(axis=1).sum())
    return {k: correct[k] / len(labels) for k in ks}
