"""The fixed training subset and the whole-training-set saturation (the small-data grid)."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from noisy_softmax_jax import NoisySoftmaxHead
from train import config_checks, errors, input_pipeline, saturation
from train.configs import default


@pytest.mark.parametrize("size", [10, 100, 1000])
def test_balanced_subset_is_balanced_fixed_and_unique(size):
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    first = input_pipeline.balanced_subset(labels, size, 10)
    again = input_pipeline.balanced_subset(labels.copy(), size, 10)
    np.testing.assert_array_equal(first, again)
    assert len(np.unique(first)) == size
    np.testing.assert_array_equal(np.bincount(labels[first], minlength=10), size // 10)


@pytest.mark.parametrize("size", [0, 15, 20000])
def test_balanced_subset_rejects_impossible_sizes(size):
    labels = np.repeat(np.arange(10), 100)
    with pytest.raises(ValueError):
        input_pipeline.balanced_subset(labels, size, 10)


def test_train_subset_must_be_a_multiple_of_the_classes():
    config = default.get_config()
    config.train_subset = 15
    with pytest.raises(errors.ConfigError, match="train_subset"):
        config_checks.validate_config(config, num_devices=1, num_processes=1)


class _Flat(nn.Module):
    @nn.compact
    def __call__(self, images, *, train=False):
        del train
        return NoisySoftmaxHead(num_classes=3)(images.reshape((images.shape[0], -1)))


def test_full_saturation_matches_numpy():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (7, 28, 28, 1)).astype(np.uint8)
    labels = rng.integers(0, 3, 7).astype(np.int32)
    model = _Flat()
    variables = model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))
    variables = jax.tree.map(lambda w: w * 20.0, variables)  # some examples saturate
    got = saturation.full_saturation(model.apply, variables, images, labels, dataset="mnist",
                                     batch_size=4)  # two batches, the last one padded
    info = input_pipeline.DATASETS["mnist"]
    x = ((images.astype(np.float64) - info.mean[0]) / info.std[0]).reshape(7, -1)
    kernel = np.asarray(variables["params"]["NoisySoftmaxHead_0"]["kernel"], np.float64)
    logits = x @ kernel
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p_y = p[np.arange(7), labels]
    amplitude = np.linalg.norm(x, axis=-1) * np.linalg.norm(kernel, axis=0)[labels]
    want = {
        "train_full_saturated_fraction": np.mean(p_y > 0.99),
        "train_full_target_grad": np.mean(1 - p_y),
        "train_full_amplitude": np.mean(amplitude),
        "train_full_error": np.mean(logits.argmax(-1) != labels),
    }
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
