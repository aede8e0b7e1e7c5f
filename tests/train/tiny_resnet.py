"""A ResNet of train/models.py at a size that compiles in a moment, with NumPy-drawn variables."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from train import models

IMAGE_SHAPE = (8, 8, 1)


def tiny_resnet(head: str = "dense", num_classes: int = 6) -> models.ResNet:
    """Two stages of one block, an 8-wide embedding."""
    return models.ResNet(num_classes=num_classes, stem_width=4, stage_widths=(4, 8),
                         blocks_per_stage=(1, 1), embedding_dim=8, head=head)


def init(model, shape=IMAGE_SHAPE):
    # Compiled whole: op by op, the initializers alone take seconds on a loaded CPU.
    return jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))()


@functools.cache
def tiny_variables():
    """Variables of `tiny_resnet()` drawn with NumPy: compiling its initializers takes longer
    than the tests that use them. Kernels ~ N(0, 1 / fan_in); batch norm at its initial state
    (scale 1, bias 0, mean 0, variance 1). The dense and the fused head have the same ones."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(
                np.prod(leaf.shape[:-1]))
        return np.full(leaf.shape, 1.0 if ("scale" in name or "var" in name) else 0.0,
                       np.float32)

    return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(lambda: init(tiny_resnet())))
