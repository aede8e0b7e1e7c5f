"""train/models.py's embedding nets: the embedding is the head's input, got without the head."""

import jax
import numpy as np
import pytest

from tests.train.tiny_resnet import IMAGE_SHAPE, init, tiny_resnet, tiny_variables
from train import config_checks, embeddings, errors, models, steps, verification
from train.configs import default


def jitted_apply(model):
    """`model.apply` compiled whole (op by op it takes seconds on a loaded CPU)."""
    return jax.jit(model.apply, static_argnames=("train", "method", "mutable"))


def images(shape=IMAGE_SHAPE, num=5, seed=1):
    return jax.random.normal(jax.random.key(seed), (num, *shape))


@pytest.mark.parametrize("head", models.HEADS)
def test_the_embedding_is_the_heads_input(head):
    model = tiny_resnet(head)
    variables, apply = tiny_variables(), jitted_apply(model)
    x = images()
    embedding = apply(variables, x, method="embed")
    assert embedding.shape == (5, 8)
    output = apply(variables, x)
    kernel = embeddings.head_kernel(variables["params"])
    if head == "fused":
        np.testing.assert_array_equal(output.features, embedding)
    else:
        np.testing.assert_allclose(output.logits, embedding @ kernel, rtol=1e-5, atol=1e-6)


def test_embed_never_reads_the_head():
    """Without the head's kernel the embedding still computes; the classifier does not."""
    model = tiny_resnet()
    variables, apply = tiny_variables(), jitted_apply(model)
    headless = {**variables, "params": {name: value for name, value in
                                        variables["params"].items()
                                        if name != embeddings.HEAD_NAME}}
    np.testing.assert_array_equal(apply(headless, images(), method="embed"),
                                  apply(variables, images(), method="embed"))
    with pytest.raises(Exception, match="kernel"):
        apply(headless, images())


def test_the_embedding_is_batch_normalised_without_a_relu():
    """Training-mode embeddings are standardised per dimension (then scaled by BN's initial
    scale 1 and shifted by 0): both signs occur, mean ~0 and variance ~1 over the batch."""
    model = tiny_resnet()
    embedding, _ = jitted_apply(model)(tiny_variables(), images(num=64), train=True,
                                       method="embed",
                                       mutable=("batch_stats",))
    np.testing.assert_allclose(np.mean(embedding, axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(np.var(embedding, axis=0), 1, atol=1e-2)


@pytest.mark.parametrize(("name", "dim"), [("resnet_glyph", 256), ("resnet_face", 512)])
def test_named_models_and_their_embedding_width(name, dim):
    for embedding_dim, expected in ((None, dim), (128, 128)):
        model = models.create_model(name, 7, head="fused", embedding_dim=embedding_dim)
        shapes = jax.eval_shape(lambda m=model: init(m, (32, 32, 1)))
        assert shapes["params"][embeddings.HEAD_NAME]["kernel"].shape == (expected, 7)
        assert models.has_batch_norm(model) and "batch_stats" in shapes


def test_resnet_glyph_downsamples_a_32x32_glyph_to_4x4_before_the_embedding():
    model = models.create_model("resnet_glyph", 10)
    shapes = jax.eval_shape(lambda: init(model, (32, 32, 1)))["params"]
    # The embedding layer reads a flattened 4 x 4 x 128 map.
    assert shapes["Dense_0"]["kernel"].shape == (4 * 4 * 128, 256)
    conv = lambda inputs, outputs, size=3: size * size * inputs * outputs
    block = lambda inputs, width: (conv(inputs, width) + conv(width, width) + conv(inputs, width, 1)
                                   + 3 * 2 * width)  # three batch norms: scale and bias
    expected = (conv(1, 32) + 2 * 32 + block(32, 32) + block(32, 64) + block(64, 128)
                + 2048 * 256 + 2 * 256 + 256 * 10)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == expected == 835_232


def test_resnet_face_downsamples_a_112x112_face_to_7x7():
    model = models.create_model("resnet_face", 10_575, head="fused")  # CASIA-WebFace's classes
    shapes = jax.eval_shape(lambda: init(model, (112, 112, 3)))["params"]
    assert shapes["Dense_0"]["kernel"].shape == (7 * 7 * 512, 512)
    assert shapes[embeddings.HEAD_NAME]["kernel"].shape == (512, 10_575)


def test_embedding_dim_is_for_embedding_models_only():
    with pytest.raises(ValueError, match="embedding_dim is set by the models"):
        models.create_model("small_cnn", 10, embedding_dim=128)
    # The default config's 0 reaches create_model as None: the default run's model as before.
    assert default.get_config().embedding_dim == 0
    assert models.create_model("small_cnn", 10, embedding_dim=None) == models.SmallCNN(10)


def test_the_default_models_parameter_tree_is_unchanged():
    """The default run's model (small_cnn): the paths and shapes it had before the ResNet."""
    shapes = jax.eval_shape(lambda: init(models.create_model("small_cnn", 10), (28, 28, 1)))
    assert set(shapes) == {"params"}
    assert jax.tree.map(lambda x: x.shape, shapes["params"]) == {
        "Conv_0": {"kernel": (3, 3, 1, 32), "bias": (32,)},
        "Conv_1": {"kernel": (3, 3, 32, 64), "bias": (64,)},
        "Dense_0": {"kernel": (7 * 7 * 64, 128), "bias": (128,)},
        "NoisySoftmaxHead_0": {"kernel": (128, 10)},
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"embedding_dim": 128}, r"config\.embedding_dim=128 is invalid: .*0 unless config\.model"),
        ({"model": "resnet_glyph", "embedding_dim": -1}, r"config\.embedding_dim=-1 is invalid"),
    ],
)
def test_bad_embedding_dim_is_named(overrides, message):
    config = default.get_config()
    config.update(overrides)
    with pytest.raises(errors.ConfigError, match=message):
        config_checks.validate_config(config, num_devices=8, num_processes=1)


def test_config_selects_the_embedding_model():
    config = default.get_config()
    config.update(model="resnet_glyph", head="fused", embedding_dim=128)
    config_checks.validate_config(config, num_devices=8, num_processes=1)


@pytest.mark.slow
def test_resnet_glyph_trains_with_the_fused_head_and_its_embeddings_verify():
    """Through the trainer's own jitted functions (config.model, config.head = "fused"):
    steps on one random batch lower its loss and move every parameter and batch statistic;
    the trained model's embeddings then go through LFW's protocol."""
    config = default.get_config()
    config.update(model="resnet_glyph", head="fused", embedding_dim=128, loss="noisy",
                  batch_size=32, num_steps=6, learning_rate=0.02, fused_chunk_size=4)
    config_checks.validate_config(config, num_devices=1, num_processes=1)
    functions = steps.jitted_functions(config, config.num_steps, jax.devices()[:1])
    state = functions.init()
    initial = jax.device_get((state.params, state.batch_stats))  # the step donates the state
    rng = np.random.default_rng(0)
    batch = (rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8),
             rng.integers(0, 10, 32).astype(np.int32))
    losses = []
    for _ in range(config.num_steps):
        state, metrics = functions.train_step(state, *functions.global_batch(*batch))
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["amplitude"])
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    # Exactly unequal, not far apart: the zero-initialised last scale of each residual branch
    # lets only ~1e-6 of a gradient reach the branch's first batch norm in six steps.
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial,
                         (state.params, state.batch_stats))
    assert all(jax.tree.leaves(moved))
    assert embeddings.head_kernel(state.params).shape == (128, 10)

    held_out = rng.integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
    features = embeddings.model_embeddings(state, held_out, dataset="mnist", batch_size=16)
    assert features.shape == (40, 128) and np.isfinite(features).all()
    left, right = np.arange(0, 40, 2), np.arange(1, 40, 2)
    result = verification.evaluate_embeddings(
        features, left, right, np.arange(20) % 2 == 0, np.arange(20) // 4, fars=(0.1,))
    assert 0 <= result.accuracy <= 1 and 0 <= result.auc <= 1
    top = embeddings.closed_set_accuracy(features, embeddings.head_kernel(state.params),
                                         rng.integers(0, 10, 40), ks=(1, 5))
    assert set(top) == {1, 5} and top[1] <= top[5]
