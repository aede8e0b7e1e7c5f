"""train/embeddings.py and train/roc_figure.py: embeddings with and without flip, the raw-pixel
baseline, closed-set top-k through fused_top_k, and the ROC figure."""

import doctest

import jax
import numpy as np
import optax
import pytest

from tests.train.tiny_resnet import tiny_resnet, tiny_variables
from train import embeddings, input_pipeline, models, roc_figure, steps, verification


@pytest.fixture(scope="module")
def tiny_state():
    """A train state of the tiny ResNet with NumPy-drawn variables."""
    variables = tiny_variables()
    return steps.TrainState.create(apply_fn=tiny_resnet().apply, params=variables["params"],
                                   tx=optax.sgd(0.1), batch_stats=variables["batch_stats"],
                                   key_data=jax.random.key_data(jax.random.key(0)))


def uint8_images(num, shape=(8, 8, 1), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num, *shape), dtype=np.uint8)


def test_the_docstring_examples_hold():
    failures, tried = doctest.testmod(embeddings, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried >= 2 and failures == 0


def direct_embeddings(state, images):
    return np.asarray(jax.jit(lambda x: state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, x, method="embed"))(
            input_pipeline.normalize(images, "mnist")))


def test_model_embeddings_equal_the_model_applied_at_once(tiny_state):
    images = uint8_images(23)
    # 23 images in batches of 10: two full batches and a padded one.
    got = embeddings.model_embeddings(tiny_state, images, dataset="mnist", batch_size=10)
    np.testing.assert_allclose(got, direct_embeddings(tiny_state, images), rtol=1e-5, atol=1e-5)


def test_flip_adds_the_embedding_of_the_mirrored_image(tiny_state):
    images = uint8_images(6)
    got = embeddings.model_embeddings(tiny_state, images, dataset="mnist", flip=True,
                                      batch_size=8)
    expected = (direct_embeddings(tiny_state, images)
                + direct_embeddings(tiny_state, images[:, :, ::-1, :]))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # A left-right symmetric image: its flipped embedding is its own, the sum twice it.
    symmetric = np.concatenate([images[:, :, :4], images[:, :, :4][:, :, ::-1]], axis=2)
    np.testing.assert_allclose(
        embeddings.model_embeddings(tiny_state, symmetric, dataset="mnist", flip=True),
        2 * embeddings.model_embeddings(tiny_state, symmetric, dataset="mnist"),
        rtol=1e-5, atol=1e-5)


def test_a_model_without_embed_is_refused():
    model = models.create_model("small_cnn", 10)
    state = steps.TrainState.create(apply_fn=model.apply, params={}, tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match="SmallCNN has no `embed` method"):
        embeddings.model_embeddings(state, uint8_images(2, (28, 28, 1)), dataset="mnist")


def test_raw_pixel_cosine_is_the_pearson_correlation():
    images = uint8_images(8, (32, 32, 1))
    features = embeddings.raw_pixel_embeddings(images)
    scores = verification.cosine_scores(features[:4], features[4:])
    flat = images.reshape(8, -1).astype(np.float64)
    expected = [np.corrcoef(flat[i], flat[i + 4])[0, 1] for i in range(4)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    # Brightness offsets do not change it.
    brighter = embeddings.raw_pixel_embeddings(images.astype(np.float64) + 17)
    np.testing.assert_allclose(brighter, features, atol=1e-9)


def test_raw_pixel_baseline_separates_noisy_copies_of_patterns():
    """Pairs of noisy copies of one random pattern against copies of two: through the same
    evaluation as a model's embeddings, the baseline is clearly above chance."""
    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (400, 32, 32, 1))
    noisy = lambda x: np.clip(x + rng.normal(0, 150, x.shape), 0, 255)
    images = np.concatenate([noisy(patterns), noisy(patterns)])  # row i and i + 400: same
    left = np.arange(400)
    right = np.where(left % 2 == 0, left + 400, (left + 1) % 400 + 400)
    result = verification.evaluate_embeddings(
        embeddings.raw_pixel_embeddings(images), left, right, left % 2 == 0, left // 40,
        fars=(0.01,))
    assert result.accuracy > 0.9 and result.auc > 0.95


@pytest.mark.parametrize(("num_classes", "chunk_size"), [(37, 8), (37, None), (5, 2)])
def test_closed_set_accuracy_equals_top_k_of_the_materialised_logits(num_classes, chunk_size):
    rng = np.random.default_rng(num_classes)
    features = rng.normal(size=(53, 16)).astype(np.float32)
    kernel = rng.normal(size=(16, num_classes)).astype(np.float32)
    labels = rng.integers(0, num_classes, 53)
    # Some examples correct at top-1 for sure: their feature is their class's weight, scaled.
    features[:10] = 10 * kernel[:, labels[:10]].T
    ks = (1, 2, 5)
    got = embeddings.closed_set_accuracy(features, kernel, labels, ks=ks, batch_size=20,
                                         chunk_size=chunk_size)
    ranking = np.argsort(-(features.astype(np.float64) @ kernel), axis=1)
    expected = {k: np.mean(np.any(ranking[:, :k] == labels[:, None], axis=1)) for k in ks}
    assert got == pytest.approx(expected)
    assert got[1] >= 10 / 53 and got[1] <= got[2] <= got[5]


def test_closed_set_accuracy_over_a_class_sharded_kernel():
    """The kernel's 64 classes split over the 8 emulated devices: the same accuracies."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(30, 16)).astype(np.float32)
    kernel = rng.normal(size=(16, 64)).astype(np.float32)
    labels = rng.integers(0, 64, 30)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]), ("classes",))
    sharded = jax.device_put(kernel, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "classes")))
    got = embeddings.closed_set_accuracy(features, sharded, labels, ks=(1, 5), batch_size=16,
                                         chunk_size=4, mesh=mesh, class_axis="classes")
    assert got == embeddings.closed_set_accuracy(features, kernel, labels, ks=(1, 5))


def test_closed_set_accuracy_names_bad_ks():
    with pytest.raises(ValueError, match=r"ks must be in \[1, 3\]"):
        embeddings.closed_set_accuracy(np.ones((2, 4)), np.ones((4, 3)), np.zeros(2), ks=(1, 5))


def test_roc_figure_draws_each_result_on_a_log_far_axis(tmp_path):
    rng = np.random.default_rng(0)
    is_same = np.arange(6000) % 2 == 0
    folds = np.arange(6000) // 600
    results = {name: verification.evaluate_pairs(rng.normal(size=6000) + shift * is_same,
                                                 is_same, folds)
               for name, shift in (("weak", 0.5), ("strong", 3.0))}
    path = tmp_path / "roc.png"
    figure = roc_figure.roc_figure(results, path, title="two models")
    assert path.stat().st_size > 10_000
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    assert axes.get_xlim()[0] == pytest.approx(1 / 3000)
    lines = [line for line in axes.get_lines() if line.get_label().startswith(("weak", "strong"))]
    assert [line.get_label().split(":")[0] for line in lines] == ["weak", "strong"]
    for line, result in zip(lines, results.values()):
        far = line.get_xdata()
        assert far.min() > 0  # FAR = 0 cannot be drawn on a log axis
        np.testing.assert_array_equal(far, result.far[result.far > 0])
    # The 1e-3 target is marked, 1e-4 (below one false accept of 3000) is not.
    marks = [line.get_xdata()[0] for line in axes.get_lines() if line.get_linestyle() == ":"]
    assert marks == [1e-3]
