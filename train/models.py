"""CNN classifiers ending in the bias-free noisy softmax head.

Each model maps images [N, H, W, C] (float, normalized) to a `noisy_softmax_jax.HeadOutput`:
the clean logits plus the norms the noisy loss needs for its amplitude ||W_y|| ||x||. With
`head="fused"` it ends in `FusedNoisySoftmaxHead` instead and returns a `FusedHeadOutput`
(features and kernel; loss and top-k computed block by block, never the logits), with the
same parameters.

* `SmallCNN`: a fast MNIST net for CPU (two conv blocks, a feature layer).
* `VGG`: the paper's VGG-like nets (3x3 conv stacks with max-pooling, batch norm, a feature
  layer); `vgg_mnist` and `vgg_cifar` are its two settings.
* `ResNet`: an embedding network for open-set verification (residual stages with batch norm,
  a batch-normalised embedding layer); `resnet_glyph` (32x32 glyphs, fast on CPU) and
  `resnet_face` (ResNet-18-sized, for 112x112 faces) are its two settings. Its
  `embed` method returns the embedding, the head's input, without the head.
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


class ResidualBlock(nn.Module):
    """Two 3x3 convs with batch norm and a shortcut (a 1x1 conv where the shape changes).

    The last batch norm's scale starts at zero, so each block starts as the identity
    (Goyal et al., 2017): deep and shallow stacks train alike from the first step.
    """

    width: int
    strides: int = 1
    train: bool = False

    @nn.compact
    def __call__(self, x):
        norm = functools.partial(nn.BatchNorm, use_running_average=not self.train, momentum=0.9)
        shortcut = x
        y = nn.Conv(self.width, (3, 3), strides=self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros)(y)
        if shortcut.shape != y.shape:
            shortcut = nn.Conv(self.width, (1, 1), strides=self.strides, use_bias=False)(x)
            shortcut = norm()(shortcut)
        return nn.relu(y + shortcut)


class ResNet(nn.Module):
    """Residual stages, a batch-normalised embedding, the noisy softmax head.

    images -> conv 3x3 + BN + ReLU -> stages (the first block of each halves the resolution)
    -> flatten -> dense (no bias) -> BN = the embedding -> head. As in face recognition
    nets (InsightFace's IResNet), the embedding is the output of a batch norm without a ReLU,
    so embeddings spread over all directions, not the positive orthant, before their cosines
    are compared. Flattening (not average pooling) keeps where in the image a feature is.

    The embedding is the head's input: ``model.apply(variables, images, method="embed")``
    returns it without the head (no logits, no kernel read).

    Attributes:
      num_classes: number of classes.
      stem_width: width of the conv before the first stage (at full resolution).
      stage_widths: width of each stage.
      blocks_per_stage: residual blocks in each stage.
      embedding_dim: width of the embedding (the head's input).
      head: "dense" (`NoisySoftmaxHead`) or "fused" (`FusedNoisySoftmaxHead`).
      fused_chunk_size: classes per block of the fused head (None: the loss's default).
    """

    num_classes: int
    stem_width: int = 32
    stage_widths: Sequence[int] = (32, 64, 128)
    blocks_per_stage: Sequence[int] = (1, 1, 1)
    embedding_dim: int = 256
    head: str = "dense"
    fused_chunk_size: int | None = None

    @nn.compact
    def __call__(self, images, *, train: bool = False, embed_only: bool = False):
        if len(self.stage_widths) != len(self.blocks_per_stage):
            raise ValueError(f"stage_widths {self.stage_widths} and blocks_per_stage "
                             f"{self.blocks_per_stage} must have one entry per stage")
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        x = nn.relu(norm()(nn.Conv(self.stem_width, (3, 3), use_bias=False)(images)))
        for width, blocks in zip(self.stage_widths, self.blocks_per_stage):
            for block in range(blocks):
                x = ResidualBlock(width, strides=2 if block == 0 else 1, train=train)(x)
        # No batch norm before the embedding layer: the one after it would cancel its shift
        # (no gradient reaches that bias) and its scale is the dense kernel's to learn.
        x = x.reshape(x.shape[0], -1)
        embedding = norm()(nn.Dense(self.embedding_dim, use_bias=False)(x))
        if embed_only:
            return embedding
        return classifier_head(self.head, self.num_classes, self.fused_chunk_size)(embedding)

    def embed(self, images, *, train: bool = False):
        """The embedding (the head's input), ``[N, embedding_dim]``, without the head."""
        return self(images, train=train, embed_only=True)


MODELS = ("small_cnn", "vgg_mnist", "vgg_cifar", "resnet_glyph", "resnet_face")
# The models with an `embed` method (their embedding is the head's input).
EMBEDDING_MODELS = ("resnet_glyph", "resnet_face")


def create_model(name: str, num_classes: int, *, head: str = "dense",
                 fused_chunk_size: int | None = None, embedding_dim: int | None = None
                 ) -> nn.Module:
    """Returns the model called `name` (one of `MODELS`), ending in the head `head` (`HEADS`).

    `embedding_dim` sets the embedding width of the `EMBEDDING_MODELS` (None: their default,
    256 for `resnet_glyph` and 512 for `resnet_face`); the other models have none to set.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if embedding_dim is not None and name not in EMBEDDING_MODELS:
        raise ValueError(f"embedding_dim is set by the models {EMBEDDING_MODELS} only, not "
                         f"{name!r}")
    heads = dict(head=head, fused_chunk_size=fused_chunk_size)
    if name == "resnet_glyph":
        # 32x32 glyphs: 32 -> 16 -> 8 -> 4, one block per stage; sized for CPU training.
        return ResNet(num_classes=num_classes, stem_width=32, stage_widths=(32, 64, 128),
                      blocks_per_stage=(1, 1, 1), embedding_dim=embedding_dim or 256, **heads)
    if name == "resnet_face":
        # ResNet-18's stages as face nets use them (InsightFace's IResNet-18 widths and depths):
        # 112x112 faces, 112 -> 56 -> 28 -> 14 -> 7, a 512-wide embedding.
        return ResNet(num_classes=num_classes, stem_width=64, stage_widths=(64, 128, 256, 512),
                      blocks_per_stage=(2, 2, 2, 2), embedding_dim=embedding_dim or 512,
                      **heads)
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
    return isinstance(model, VGG | ResNet)
