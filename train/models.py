"""CNN classifiers ending in the bias-free noisy softmax head.

Each model maps images [N, H, W, C] (float, normalized) to a `noisy_softmax_jax.HeadOutput`:
the clean logits plus the norms the noisy loss needs for its amplitude ||W_y|| ||x||. With
`head="fused"` it ends in `FusedNoisySoftmaxHead` instead and returns a `FusedHeadOutput`
(features and kernel; loss and top-k computed block by block, never the logits), with the
same parameters.

* `SmallCNN`: a fast MNIST net for CPU (two conv blocks, a feature layer).
* `VGG`: the paper's VGG-like nets (3x3 conv stacks with max-pooling, batch norm, a feature
  layer); `vgg_mnist` and `vgg_cifar` are its two settings.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn

from noisy_softmax_jax import FusedNoisySoftmaxHead, NoisySoftmaxHead

HEADS = ("dense", "fused")


def classifier_head(head: str, num_classes: int, fused_chunk_size: int | None) -> nn.Module:
    """The model's last layer: the dense noisy softmax head, or the fused one."""
    if head == "fused":
        # Named as the dense head is auto-named, so the two give the same parameter tree (and
        # the same initial kernel): checkpoints of either load into the other.
        return FusedNoisySoftmaxHead(num_classes=num_classes, chunk_size=fused_chunk_size,
                                     name="NoisySoftmaxHead_0")
    return NoisySoftmaxHead(num_classes=num_classes)


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (max-pooled) and a feature layer; ~99% on MNIST in minutes on CPU."""

    num_classes: int
    widths: Sequence[int] = (32, 64)
    feature_dim: int = 128
    head: str = "dense"  # one of HEADS
    fused_chunk_size: int | None = None

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        del train  # no batch norm or dropout: the same function at train and eval time
        x = images
        for width in self.widths:
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(nn.Dense(self.feature_dim)(x))
        return classifier_head(self.head, self.num_classes, self.fused_chunk_size)(features)


class VGG(nn.Module):
    """VGG-like net: conv 3x3 stages with max-pooling, a feature layer, the noisy softmax head.

    Attributes:
      num_classes: number of classes.
      stem_width: width of the single conv before the first stage.
      stages: (width, depth) of each stage: `depth` conv 3x3 layers, then a 2x2 max-pool.
      feature_dim: width of the feature layer feeding the head.
      head: "dense" (`NoisySoftmaxHead`) or "fused" (`FusedNoisySoftmaxHead`).
      fused_chunk_size: classes per block of the fused head (None: the loss's default).
    """

    num_classes: int
    stem_width: int = 64
    stages: Sequence[tuple[int, int]] = ((64, 3), (64, 3), (64, 3))
    feature_dim: int = 256
    head: str = "dense"
    fused_chunk_size: int | None = None

    @nn.compact
    def __call__(self, images, *, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)

        def conv_block(x, width):
            # The conv bias is redundant before batch norm.
            x = nn.Conv(width, (3, 3), use_bias=False)(x)
            return nn.relu(norm()(x))

        x = conv_block(images, self.stem_width)
        for width, depth in self.stages:
            for _ in range(depth):
                x = conv_block(x, width)
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[0], -1)
        features = nn.relu(norm()(nn.Dense(self.feature_dim, use_bias=False)(x)))
        return classifier_head(self.head, self.num_classes, self.fused_chunk_size)(features)


MODELS = ("small_cnn", "vgg_mnist", "vgg_cifar")


def create_model(name: str, num_classes: int, *, head: str = "dense",
                 fused_chunk_size: int | None = None) -> nn.Module:
    """Returns the model called `name` (one of `MODELS`), ending in the head `head` (`HEADS`)."""
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    heads = dict(head=head, fused_chunk_size=fused_chunk_size)
    if name == "small_cnn":
        return SmallCNN(num_classes=num_classes, **heads)
    if name == "vgg_mnist":
        # Four conv stages of 64 channels on 28x28 inputs (28 -> 14 -> 7 -> 4).
        return VGG(
            num_classes=num_classes,
            stem_width=64,
            stages=((64, 3), (64, 3), (64, 3)),
            feature_dim=256,
            **heads,
        )
    if name == "vgg_cifar":
        # Widening stages on 32x32 inputs (32 -> 16 -> 8 -> 4).
        return VGG(
            num_classes=num_classes,
            stem_width=64,
            stages=((64, 4), (96, 4), (128, 4)),
            feature_dim=256,
            **heads,
        )
    raise ValueError(f"model must be one of {MODELS}, got {name!r}")


def has_batch_norm(model: nn.Module) -> bool:
    return isinstance(model, VGG)
