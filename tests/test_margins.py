"""CosFace and ArcFace margins with the noise: the dense `margin_logits`, the fused loss, top-k.

The reference is the formula written out in plain JAX: features and class weights divided by
their norms, cosines, the noise on s cos(theta_y) (amplitude s), then the margin, then
logsumexp; ArcFace through arccos and cos. Values and its autodiff gradients (features,
kernel, alpha, scale, margin) must agree with the fused loss, which never forms the logits and
normalises the kernel block by block, and with the materialised path (`class_cosines`,
`margin_logits`, Optax's cross-entropy).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType

import noisy_softmax_jax as nsj
from noisy_softmax_jax import nnx as nsj_nnx
from tests.test_large_class import (
    _batch_by_class_shapes,
    _compiled_text,
    assert_close,
    class_mesh,
    make_problem,
)

MARGINS = ["cosface", "arcface"]
LAYOUTS = ["features_classes", "classes_features"]
SCALE, MARGIN_VALUE = 30.0, {"cosface": 0.35, "arcface": 0.5}


def abs_xi(rng, batch, shared_noise=False):
    """|xi| as the loss draws it (free noise with alpha = 1 on a zero logit is -|xi|)."""
    return -nsj.noisy_target_logit(jnp.zeros((batch,)), rng, 1.0, noise="free",
                                   shared_noise=shared_noise)


def reference_logits(cosines, labels, xi, alpha, scale, margin_value, *, margin,
                     noise="annealed", negative=False):
    """The logits written out: noise on s cos(theta_y) first (amplitude s), then the margin."""
    target_cosine = jnp.take_along_axis(cosines, labels[:, None], axis=1)[:, 0]
    target = scale * target_cosine
    factor = {"annealed": jnp.maximum(scale - target, 0.0), "amplitude": scale,
              "free": 1.0}[noise]
    injected = alpha * xi * factor
    noisy = target + injected if negative else target - injected
    noisy_cosine = noisy / scale
    if margin == "cosface":
        final = noisy - scale * margin_value
    else:  # cos(arccos(c) + m) where the angle plus the margin stays within pi
        fits = noisy_cosine > jnp.cos(jnp.pi - margin_value)
        # arccos only where it is taken (a noisy cosine can fall below -1 on the other side).
        angle = jnp.arccos(jnp.where(fits, jnp.minimum(noisy_cosine, 1.0), 0.0))
        final = scale * jnp.where(fits, jnp.cos(angle + margin_value),
                                  noisy_cosine - margin_value * jnp.sin(margin_value))
    is_target = labels[:, None] == jnp.arange(cosines.shape[1])
    return jnp.where(is_target, final[:, None], scale * cosines)


def reference_loss(features, kernel, labels, xi, alpha, scale, margin_value, *, margin,
                   kernel_layout="features_classes", **kwargs):
    weights = kernel if kernel_layout == "features_classes" else kernel.T
    unit_features = features / jnp.linalg.norm(features, axis=1, keepdims=True)
    unit_weights = weights / jnp.linalg.norm(weights, axis=0, keepdims=True)
    logits = reference_logits(unit_features @ unit_weights, labels, xi, alpha, scale,
                              margin_value, margin=margin, **kwargs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def gradients(loss_fn, *args, argnums=(0, 1, 2, 3, 4)):
    """Per-example losses and the gradients of a weighted sum (each row counts differently)."""
    weights = jnp.linspace(0.5, 1.5, args[0].shape[0])

    def total(*args):
        loss = loss_fn(*args)
        return jnp.sum(loss * weights.astype(loss.dtype)), loss

    grads, loss = jax.jit(jax.grad(total, argnums=argnums, has_aux=True))(*args)
    return loss, grads


def fused(labels, rng, margin, **kwargs):
    return lambda f, k, a, s, m: nsj.fused_noisy_softmax_cross_entropy(
        f, k, labels, rng, a, margin=margin, scale=s, margin_value=m, **kwargs)


def reference(labels, rng, margin, shared_noise=False, **kwargs):
    def loss(f, k, a, s, m):
        xi = 0.0 if rng is None else abs_xi(rng, f.shape[0], shared_noise)
        return reference_loss(f, k, labels, xi, a, s, m, margin=margin, **kwargs)
    return loss


def inputs(dtype=jnp.float32, seed=0, **kwargs):
    features, kernel, labels = make_problem(seed, dtype=dtype, **kwargs)
    return features, kernel, labels


def scalars(margin, dtype=jnp.float32, alpha=0.3):
    return tuple(jnp.asarray(v, dtype) for v in (alpha, SCALE, MARGIN_VALUE[margin]))


# -- the materialised path ------------------------------------------------------------------


def test_class_cosines_against_numpy():
    features, kernel, _ = inputs()
    expected = (np.asarray(features, np.float64)
                / np.linalg.norm(np.asarray(features, np.float64), axis=1, keepdims=True)) @ (
        np.asarray(kernel, np.float64)
        / np.linalg.norm(np.asarray(kernel, np.float64), axis=0, keepdims=True))
    np.testing.assert_allclose(nsj.class_cosines(features, kernel), expected, rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(
        nsj.class_cosines(features, kernel.T, kernel_layout="classes_features"), expected,
        rtol=1e-6, atol=1e-6)
    # A zero feature or class weight: cosine 0 and a zero gradient, not NaN.
    grads = jax.grad(lambda f, k: nsj.class_cosines(f, k).sum(), (0, 1))(
        features.at[0].set(0.0), kernel.at[:, 3].set(0.0))
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(grads[0][0], 0.0)


@pytest.mark.parametrize("margin, noise, shared_noise, negative", [
    ("cosface", "annealed", False, False), ("arcface", "annealed", False, False),
    ("cosface", "amplitude", False, True), ("arcface", "free", True, False)])
def test_margin_logits_equal_the_formula_float64(margin, noise, shared_noise, negative):
    with jax.enable_x64(True):
        features, kernel, labels = inputs(jnp.float64)
        cosines = nsj.class_cosines(features, kernel)
        rng = jax.random.key(3)
        options = dict(margin=margin, noise=noise, negative=negative)

        def ours(c, a, s, m):
            return nsj.margin_logits(c, labels, rng, a, scale=s, margin_value=m,
                                     shared_noise=shared_noise, **options)

        def formula(c, a, s, m):
            return reference_logits(c, labels, abs_xi(rng, 12, shared_noise), a, s, m,
                                    **options)

        args = (cosines, *scalars(margin, jnp.float64))
        np.testing.assert_allclose(ours(*args), formula(*args), rtol=1e-12)
        weights = jnp.linspace(-1.0, 1.0, 37)
        grads = jax.grad(lambda *a: jnp.sum(ours(*a) * weights), (0, 1, 2, 3))(*args)
        expected = jax.grad(lambda *a: jnp.sum(formula(*a) * weights), (0, 1, 2, 3))(*args)
        assert_close(grads, expected, 1e-12)


def test_noise_first_fades_where_the_feature_aligns_with_its_class():
    # cos(theta_y) = 1: the annealed noise's factor s (1 - cos theta_y) is 0, so the target is
    # the margin's alone, whatever the key: s (1 - m) for CosFace, s cos(m) for ArcFace.
    cosines = jnp.array([[1.0, 0.2, -0.5], [0.1, 1.0, 0.3]])
    labels = jnp.array([0, 1])
    for key in range(3):
        cos = nsj.margin_logits(cosines, labels, jax.random.key(key), 0.5, scale=10.0,
                                margin_value=0.3)
        arc = nsj.margin_logits(cosines, labels, jax.random.key(key), 0.5, margin="arcface",
                                scale=10.0, margin_value=0.3)
        np.testing.assert_allclose(cos[[0, 1], labels], 10.0 * (1 - 0.3), rtol=1e-6)
        np.testing.assert_allclose(arc[[0, 1], labels], 10.0 * np.cos(0.3), rtol=1e-6)


def test_arcface_beyond_pi_and_at_cosine_one():
    # cos(theta) < cos(pi - m): ArcFace's fallback cos(theta) - m sin(m); a noisy cosine below
    # -1 lands there too. At cos(theta) = 1 the derivative is finite.
    m = 0.5
    cosines = jnp.array([[-0.95, 0.0], [1.0, 0.0], [-0.2, 0.0]])
    labels = jnp.array([0, 0, 0])
    logits = nsj.margin_logits(cosines, labels, None, 0.0, margin="arcface", scale=1.0,
                               margin_value=m)
    np.testing.assert_allclose(logits[:, 0], [-0.95 - m * np.sin(m), np.cos(m),
                                              np.cos(np.arccos(-0.2) + m)], rtol=1e-6)
    grad = jax.grad(lambda c: nsj.margin_logits(c, labels, None, 0.0, margin="arcface",
                                                scale=1.0, margin_value=m)[:, 0].sum())(cosines)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[0, 0], 1.0)  # the fallback is cos(theta) - m sin(m)
    # A large noise pushes the noisy cosine below -1: still finite, on the fallback.
    noisy = nsj.margin_logits(cosines, labels, jax.random.key(0), 50.0, margin="arcface",
                              scale=1.0, margin_value=m, noise="free")
    assert np.all(np.isfinite(noisy))


def test_margin_logits_masks_and_padding():
    features, kernel, labels = inputs()
    cosines = nsj.class_cosines(features, kernel)
    where = jnp.arange(12) % 3 != 0
    labels = jnp.where(where, labels, -1)
    logits = nsj.margin_logits(cosines, labels, jax.random.key(0), 0.2, scale=SCALE,
                               where=where)
    np.testing.assert_allclose(logits[~where], SCALE * cosines[~where], rtol=1e-6)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)
    assert np.all(np.isfinite(loss))
    # Unmasked, a padding label raises eagerly and gives NaN under jit.
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 37\)"):
        nsj.margin_logits(cosines, labels, jax.random.key(0), 0.2)
    traced = jax.jit(lambda y: nsj.margin_logits(cosines, y, jax.random.key(0), 0.2))(labels)
    assert np.all(np.isnan(traced[~where])) and np.all(np.isfinite(traced[where]))


# -- the fused loss against the formula ------------------------------------------------------


@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("kernel_layout, rng, kwargs", [
    ("features_classes", None, {}),  # no noise: plain CosFace / ArcFace
    ("classes_features", None, {}),
    ("features_classes", jax.random.key(7), dict(noise="annealed")),
    ("classes_features", jax.random.key(7), dict(noise="annealed")),
    ("features_classes", jax.random.key(8), dict(noise="amplitude", shared_noise=True)),
    ("classes_features", jax.random.key(9), dict(noise="free", negative=True)),
], ids=["no_noise", "no_noise_rows", "annealed", "annealed_rows", "amplitude_shared",
        "free_negative_rows"])
def test_fused_equals_the_formula_float32(margin, kernel_layout, rng, kwargs):
    features, kernel, labels = inputs()
    labels = labels.at[:2].set(jnp.array([36, 0]))  # the last (partial) block and the first
    stored = kernel if kernel_layout == "features_classes" else jnp.asarray(kernel.T)
    args = (features, stored, *scalars(margin))
    loss, grads = gradients(fused(labels, rng, margin, chunk_size=5,
                                  kernel_layout=kernel_layout, **kwargs), *args)
    expected_loss, expected_grads = gradients(
        reference(labels, rng, margin, kernel_layout=kernel_layout, **kwargs), *args)
    assert loss.dtype == jnp.float32 and loss.shape == (12,)
    assert_close(loss, expected_loss, 1e-5)
    assert_close(grads, expected_grads, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("kernel_layout", LAYOUTS)
@pytest.mark.parametrize("noisy", [False, True], ids=["no_noise", "annealed"])
def test_fused_equals_the_formula_float64(margin, kernel_layout, noisy):
    with jax.enable_x64(True):
        features, kernel, labels = inputs(jnp.float64, seed=1)
        stored = kernel if kernel_layout == "features_classes" else jnp.asarray(kernel.T)
        rng = jax.random.key(5) if noisy else None
        args = (features, stored, *scalars(margin, jnp.float64))
        loss, grads = gradients(fused(labels, rng, margin, chunk_size=6,
                                      kernel_layout=kernel_layout), *args)
        expected_loss, expected_grads = gradients(
            reference(labels, rng, margin, kernel_layout=kernel_layout), *args)
        assert loss.dtype == jnp.float64 and grads[1].dtype == jnp.float64
        assert_close(loss, expected_loss, 1e-12)
        assert_close(grads, expected_grads, 1e-12)


@pytest.mark.parametrize("margin", MARGINS)
def test_fused_equals_the_materialised_path(margin):
    # class_cosines -> margin_logits -> Optax: the dense path a user would write.
    features, kernel, labels = inputs(seed=2)
    rng = jax.random.key(4)

    def materialised(f, k, a, s, m):
        logits = nsj.margin_logits(nsj.class_cosines(f, k), labels, rng, a, margin=margin,
                                   scale=s, margin_value=m)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    args = (features, kernel, *scalars(margin))
    loss, grads = gradients(fused(labels, rng, margin, chunk_size=8), *args)
    expected_loss, expected_grads = gradients(materialised, *args)
    assert_close(loss, expected_loss, 1e-5)
    assert_close(grads, expected_grads, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shape, names, axis_type, kernel_layout", [
    ((4,), ("classes",), AxisType.Auto, "features_classes"),
    ((2, 4), ("data", "classes"), AxisType.Auto, "features_classes"),
    ((4,), ("classes",), AxisType.Auto, "classes_features"),
    ((2, 4), ("data", "classes"), AxisType.Explicit, "classes_features"),
])
@pytest.mark.parametrize("margin", MARGINS)
def test_sharded_fused_equals_the_formula(margin, shape, names, axis_type, kernel_layout):
    # 96 classes: 24 per shard, chunks of 5 leave a partial block on every shard.
    features, kernel, labels = inputs(seed=10, batch=16, num_classes=96)
    labels = labels.at[:3].set(jnp.array([95, 0, 47]))
    stored = kernel if kernel_layout == "features_classes" else jnp.asarray(kernel.T)
    rng = jax.random.key(16)
    mesh = class_mesh(shape, names, axis_type)
    args = (features, stored, *scalars(margin))
    loss, grads = gradients(fused(labels, rng, margin, chunk_size=5, mesh=mesh,
                                  class_axis="classes", kernel_layout=kernel_layout), *args)
    expected_loss, expected_grads = gradients(
        reference(labels, rng, margin, kernel_layout=kernel_layout), *args)
    assert_close(loss, expected_loss, 1e-5)
    assert_close(grads, expected_grads, 1e-5)


def test_fused_margin_where_padding_and_zero_vectors():
    features, kernel, labels = inputs(seed=3)
    where = jnp.arange(12) % 4 != 0
    padded = jnp.where(where, labels, -1)
    features = features.at[1].set(0.0)  # cosines 0 for every class
    kernel = kernel.at[:, labels[2]].set(0.0)  # a zero class weight
    loss_fn = lambda f, k: nsj.fused_noisy_softmax_cross_entropy(
        f, k, padded, jax.random.key(0), 0.2, where=where, margin="arcface", scale=SCALE,
        chunk_size=8).sum()
    loss, grads = jax.value_and_grad(loss_fn, (0, 1))(features, kernel)
    assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(grads[0][~where], 0.0)
    per_example = nsj.fused_noisy_softmax_cross_entropy(
        features, kernel, padded, jax.random.key(0), 0.2, where=where, margin="arcface",
        scale=SCALE, chunk_size=8)
    np.testing.assert_array_equal(per_example[~where], 0.0)


def test_scale_and_margin_are_traced():
    features, kernel, labels = inputs()

    @jax.jit
    def step(scale, margin_value):
        return nsj.fused_noisy_softmax_cross_entropy(
            features, kernel, labels, jax.random.key(0), 0.1, margin="cosface", scale=scale,
            margin_value=margin_value, chunk_size=8)

    for s, m in [(30.0, 0.35), (16.0, 0.2)]:
        expected = reference(labels, jax.random.key(0), "cosface")(
            features, kernel, 0.1, s, m)
        assert_close(step(s, m), expected, 1e-5)
    assert step._cache_size() == 1


# -- the compiled program: no [batch, classes] array, bounded memory ---------------------------


@pytest.mark.parametrize("margin, mesh_shape, kernel_layout", [
    ("cosface", None, "features_classes"), ("arcface", None, "classes_features"),
    pytest.param("cosface", (2, 4), "features_classes", marks=pytest.mark.slow),
    pytest.param("arcface", (2, 4), "classes_features", marks=pytest.mark.slow)])
def test_hlo_has_no_batch_by_classes_array(margin, mesh_shape, kernel_layout):
    batch, dim, num_classes = 24, 40, 2000
    mesh = None if mesh_shape is None else class_mesh(mesh_shape, ("data", "classes"))
    loss_fn = lambda f, k, y, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, y, jax.random.key(0), a, chunk_size=64, mesh=mesh, margin=margin,
        class_axis=None if mesh is None else "classes", kernel_layout=kernel_layout)
    text = _compiled_text(loss_fn, batch, dim, num_classes,
                          kernel_layout=kernel_layout).as_text()
    rows = batch if mesh_shape is None else batch // 2
    classes = (num_classes,) if mesh_shape is None else (num_classes, num_classes // 4)
    assert not _batch_by_class_shapes(text, (batch, rows), classes)


@pytest.mark.parametrize("margin, kernel_layout", [
    ("cosface", "features_classes"), ("arcface", "classes_features")])
def test_temporary_memory_at_a_million_classes(margin, kernel_layout):
    # Compile only. A normalised copy of the kernel (2 GB here), or the logits, would show.
    loss_fn = lambda f, k, y, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, y, jax.random.key(0), a, margin=margin, kernel_layout=kernel_layout)
    memory = _compiled_text(loss_fn, 512, 512, 1_000_000,
                            kernel_layout=kernel_layout).memory_analysis()
    assert memory.temp_size_in_bytes <= 64 * 2**20


# -- evaluation: top-k by cosine ------------------------------------------------------------


@pytest.mark.parametrize("k, chunk_size, mesh_shape, kernel_layout", [
    (5, 6, None, "features_classes"), (1, 37, None, "classes_features"),
    (5, 4, (2, 4), "features_classes"), (5, 4, (2, 4), "classes_features")])
def test_fused_top_k_by_cosine(k, chunk_size, mesh_shape, kernel_layout):
    features, kernel, _ = inputs(seed=13, batch=16, num_classes=37 if mesh_shape is None
                                 else 96)
    mesh = None if mesh_shape is None else class_mesh(mesh_shape, ("data", "classes"))
    stored = kernel if kernel_layout == "features_classes" else jnp.asarray(kernel.T)
    values, classes = nsj.fused_top_k(features, stored, k, chunk_size=chunk_size, mesh=mesh,
                                      class_axis=None if mesh is None else "classes",
                                      kernel_layout=kernel_layout, cosine=True)
    expected_values, expected_classes = jax.lax.top_k(nsj.class_cosines(features, kernel), k)
    np.testing.assert_array_equal(classes, expected_classes)
    assert_close(values, expected_values, 1e-6)
    # The ranking differs from the plain logits' (the class weights' norms differ).
    assert not np.array_equal(classes, nsj.fused_top_k(features, stored, k,
                                                       kernel_layout=kernel_layout)[1])


# -- the fused heads ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("margin", MARGINS)
def test_linen_and_nnx_fused_heads_take_the_margin(margin):
    features, _, labels = inputs(seed=4, num_classes=50)
    options = dict(margin=margin, scale=SCALE, margin_value=MARGIN_VALUE[margin])
    head = nsj.FusedNoisySoftmaxHead(50, chunk_size=16, **options)
    params = head.init(jax.random.key(0), features)
    kernel = params["params"]["kernel"]
    loss = head.apply(params, features, labels, jax.random.key(1), 0.1, method="loss")
    expected = nsj.fused_noisy_softmax_cross_entropy(
        features, kernel, labels, jax.random.key(1), 0.1, chunk_size=16, **options)
    np.testing.assert_array_equal(loss, expected)
    values, classes = head.apply(params, features, 3, method="top_k")
    np.testing.assert_array_equal(classes, jax.lax.top_k(nsj.class_cosines(features, kernel),
                                                         3)[1])
    nnx_head = nsj_nnx.FusedNoisySoftmaxHead(8, 50, chunk_size=16, rngs=nnx.Rngs(0), **options)
    nnx_head.kernel[...] = kernel
    np.testing.assert_array_equal(nnx_head.loss(features, labels, jax.random.key(1), 0.1),
                                  expected)
    np.testing.assert_array_equal(nnx_head.top_k(features, 3)[1], classes)
    # The margin changes the loss, not the parameters.
    plain = nsj.FusedNoisySoftmaxHead(50, chunk_size=16)
    assert jax.tree.structure(plain.init(jax.random.key(0), features)) == jax.tree.structure(
        params)
    assert nn.get_partition_spec(params) == nn.get_partition_spec(
        plain.init(jax.random.key(0), features))


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(margin="sphereface"), ValueError,
     r"`margin` must be one of 'cosface', 'arcface' or None; got 'sphereface'"),
    (dict(scale=30.0), ValueError, r"`scale` and `margin_value` go with a margin"),
    (dict(margin_value=0.2), ValueError, r"`scale` and `margin_value` go with a margin"),
    (dict(margin="cosface", scale=0.0), ValueError, r"`scale` must be > 0; got scale = 0.0"),
    (dict(margin="arcface", margin_value=-0.1), ValueError, r"`margin_value` must be >= 0"),
    (dict(margin="cosface", scale=np.ones(2)), ValueError, r"`scale` must be a scalar"),
])
def test_bad_margin_arguments(kwargs, error, match):
    features, kernel, labels = inputs()
    with pytest.raises(error, match=match):
        nsj.fused_noisy_softmax_cross_entropy(features, kernel, labels, jax.random.key(0), 0.1,
                                              **kwargs)


def test_margin_logits_bad_margin():
    with pytest.raises(ValueError, match=r"`margin` must be one of 'cosface', 'arcface'; got"):
        nsj.margin_logits(jnp.zeros((2, 3)), jnp.array([0, 1]), None, 0.0, margin=None)


def test_checked_fused_reports_a_traced_scale():
    features, kernel, labels = inputs()
    step = jax.jit(lambda s: nsj.checked_fused_noisy_softmax_cross_entropy(
        features, kernel, labels, jax.random.key(0), 0.1, margin="cosface", scale=s,
        chunk_size=8))
    error, loss = step(30.0)
    assert error.get() is None
    assert_close(loss, reference(labels, jax.random.key(0), "cosface")(
        features, kernel, 0.1, 30.0, 0.35), 1e-5)
    error, _ = step(-1.0)
    assert "`scale` must be > 0" in error.get()
