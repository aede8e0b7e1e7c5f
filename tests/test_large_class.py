"""fused_noisy_softmax_cross_entropy against the materialised loss on `features @ kernel`.

The reference is the main loss on materialised logits with the amplitude from
`target_amplitude`: the same noise for the same key, so values and gradients must agree
to rounding. Sharded runs use the 8 emulated CPU devices of tests/conftest.py.
"""

import importlib.util
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, Mesh

import noisy_softmax_jax as nsj
from noisy_softmax_jax import _blocks, _validation

VARIANTS = ["annealed", "amplitude", "free"]
LAYOUTS = ["features_classes", "classes_features"]


def make_problem(seed, batch=12, dim=8, num_classes=37, dtype=jnp.float32, scale=1.0):
    """Features [batch, dim], a kernel [dim, classes] (Flax's layout) and labels."""
    k_x, k_w, k_y = jax.random.split(jax.random.key(seed), 3)
    features = scale * jax.random.normal(k_x, (batch, dim), jnp.float32)
    kernel = 2.0 * jax.random.normal(k_w, (dim, num_classes), jnp.float32) / np.sqrt(dim)
    labels = jax.random.randint(k_y, (batch,), 0, num_classes)
    return features.astype(dtype), kernel.astype(dtype), labels


def materialised(features, kernel, labels, rng, alpha, **kwargs):
    return nsj.noisy_softmax_cross_entropy(
        features @ kernel, labels, rng, alpha,
        amplitude=nsj.target_amplitude(features, kernel, labels), **kwargs)


def value_and_grads(loss_fn, features, kernel, alpha=0.3, weights=None):
    """Per-example losses, and the gradients of a weighted sum (every row counts differently)."""
    if weights is None:
        weights = jnp.linspace(0.5, 1.5, features.shape[0], dtype=jnp.float32)

    def total(features, kernel, alpha):
        loss = loss_fn(features, kernel, alpha)
        return jnp.sum(loss * weights.astype(loss.dtype)), loss

    alpha = jnp.asarray(alpha, jnp.promote_types(features.dtype, jnp.float32))
    grads, loss = jax.jit(jax.grad(total, argnums=(0, 1, 2), has_aux=True))(
        features, kernel, alpha)
    return loss, grads


def assert_close(actual, expected, rtol):
    """Relative agreement, elementwise, with an absolute floor at rtol times the largest value."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        e = np.asarray(e, np.float64)
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol,
                                   atol=rtol * max(np.max(np.abs(e)), 1e-30))


def both(features, kernel, labels, rng, chunk_size=5, **kwargs):
    fused = lambda f, k, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, labels, rng, a, chunk_size=chunk_size, **kwargs)
    reference = lambda f, k, a: materialised(f, k, labels, rng, a, **kwargs)
    return fused, reference


def compare(features, kernel, labels, rng, *, rtol=1e-5, alpha=0.3, **kwargs):
    """Fused against materialised: losses and gradients (features, kernel, alpha) to rtol."""
    fused, reference = both(features, kernel, labels, rng, **kwargs)
    loss, grads = value_and_grads(fused, features, kernel, alpha)
    expected_loss, expected_grads = value_and_grads(reference, features, kernel, alpha)
    assert_close(loss, expected_loss, rtol)
    assert_close(grads, expected_grads, rtol)
    return loss, grads


@pytest.mark.parametrize("noise", VARIANTS)
@pytest.mark.parametrize("shared_noise, negative", [(False, False), (True, False), (False, True)])
def test_matches_materialised_float32(noise, shared_noise, negative):
    features, kernel, labels = make_problem(0)
    loss, _ = compare(features, kernel, labels, jax.random.key(7), noise=noise,
                      shared_noise=shared_noise, negative=negative, sigma=1.5)
    assert loss.dtype == jnp.float32 and loss.shape == (12,)


@pytest.mark.parametrize("noise", VARIANTS)
def test_matches_materialised_float64(noise):
    with jax.enable_x64(True):
        features, kernel, labels = make_problem(1, dtype=jnp.float64)
        loss, grads = compare(features, kernel, labels, jax.random.key(8), rtol=1e-12,
                              noise=noise)
        assert loss.dtype == jnp.float64 and grads[1].dtype == jnp.float64


def test_alpha_zero_is_optax():
    features, kernel, labels = make_problem(2)
    fused = lambda f, k, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, labels, jax.random.key(0), a, chunk_size=8)
    optax_loss = lambda f, k, a: optax.softmax_cross_entropy_with_integer_labels(f @ k, labels)
    loss, grads = value_and_grads(fused, features, kernel, alpha=0.0)
    expected_loss, expected_grads = value_and_grads(optax_loss, features, kernel, alpha=0.0)
    assert_close(loss, expected_loss, 1e-5)
    assert_close(grads[:2], expected_grads[:2], 1e-5)


@pytest.mark.parametrize("chunk_size", [1, 6, 16, 36, 37, 64, None])
def test_chunk_sizes_and_targets_in_the_last_partial_chunk(chunk_size):
    features, kernel, labels = make_problem(3)
    # The last class (in the partial last chunk for most sizes) and the first.
    labels = labels.at[:4].set(jnp.array([36, 36, 0, 35]))
    compare(features, kernel, labels, jax.random.key(9), chunk_size=chunk_size)


def test_duplicate_labels():
    features, kernel, _ = make_problem(4)
    compare(features, kernel, jnp.array([3] * 8 + [30] * 4), jax.random.key(10), chunk_size=4)


def test_zero_feature_vector_and_zero_class_weight_have_finite_gradients():
    features, kernel, labels = make_problem(5)
    features = features.at[2].set(0.0)
    kernel = kernel.at[:, labels[5]].set(0.0)
    loss, grads = compare(features, kernel, labels, jax.random.key(11))
    assert all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_allclose(loss[2], np.log(37.0), rtol=1e-6)  # every logit 0


@pytest.mark.parametrize("scale", [1e3, 1e5])
def test_huge_logits(scale):
    # Logits in the thousands (and, at 1e5, beyond exp's range by far): a shift that
    # missed any block's maximum would overflow.
    features, kernel, labels = make_problem(6, scale=scale)
    loss, grads = compare(features, kernel, labels, jax.random.key(12), alpha=0.1)
    assert np.all(np.isfinite(loss)) and all(np.all(np.isfinite(g)) for g in grads)


def test_where_masks_examples():
    features, kernel, labels = make_problem(7)
    where = jnp.arange(12) % 3 != 0
    loss, grads = compare(features, kernel, labels, jax.random.key(13), where=where)
    np.testing.assert_array_equal(loss[~where], 0.0)
    np.testing.assert_array_equal(grads[0][~where], 0.0)


def test_bfloat16_inputs_are_computed_in_float32():
    features, kernel, labels = make_problem(8)
    rng = jax.random.key(14)
    half = lambda f, k, a: nsj.fused_noisy_softmax_cross_entropy(f, k, labels, rng, a,
                                                                 chunk_size=8)
    loss, grads = value_and_grads(half, features.astype(jnp.bfloat16),
                                  kernel.astype(jnp.bfloat16))
    assert loss.dtype == jnp.float32
    assert grads[0].dtype == grads[1].dtype == jnp.bfloat16
    # Against float32 on the same (rounded) inputs: only the bfloat16 matmul operands of
    # the backward pass and the rounding of the gradients themselves differ.
    rounded = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (features, kernel)]
    expected_loss, expected_grads = value_and_grads(half, *rounded)
    assert_close(loss, expected_loss, 1e-5)
    assert_close(grads[:2], expected_grads[:2], 2e-2)


@pytest.mark.parametrize("kernel_layout", LAYOUTS)
def test_dtype_casts_float32_inputs_block_by_block(kernel_layout):
    # dtype=bfloat16 on float32 inputs: the loss of the inputs rounded to bfloat16 (the cast
    # is elementwise, so casting block by block changes no value), gradients in float32.
    features, kernel, labels = make_problem(8)
    if kernel_layout == "classes_features":
        kernel = kernel.T
    rng = jax.random.key(14)
    options = dict(chunk_size=8, kernel_layout=kernel_layout)
    cast = lambda f, k, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, labels, rng, a, dtype=jnp.bfloat16, **options)
    rounded = lambda f, k, a: nsj.fused_noisy_softmax_cross_entropy(
        f.astype(jnp.bfloat16), k.astype(jnp.bfloat16), labels, rng, a, **options)
    loss, grads = value_and_grads(cast, features, kernel)
    expected_loss, expected_grads = value_and_grads(rounded, features, kernel)
    np.testing.assert_array_equal(loss, expected_loss)
    assert loss.dtype == jnp.float32
    assert grads[0].dtype == grads[1].dtype == jnp.float32
    # The same gradients, except that the rounded inputs' are rounded to bfloat16 on the way
    # back while these stay float32 (the features' is no longer rounded twice).
    assert_close(grads, expected_grads, 1e-2)
    values, classes = nsj.fused_top_k(features, kernel, 3, dtype=jnp.bfloat16, **options)
    expected_values, expected_classes = nsj.fused_top_k(
        features.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), 3, **options)
    np.testing.assert_array_equal(values, expected_values)
    np.testing.assert_array_equal(classes, expected_classes)
    # A dtype that is not floating is reported, naming the argument.
    with pytest.raises(TypeError, match=r"`dtype` must be a floating dtype, the matmul's"):
        nsj.fused_noisy_softmax_cross_entropy(features, kernel, labels, rng, 0.1,
                                              dtype=jnp.int32, **options)


def test_traced_labels_alpha_and_sigma_under_jit():
    features, kernel, labels = make_problem(9)
    rng = jax.random.key(15)

    @jax.jit
    def step(features, kernel, labels, alpha, sigma):
        return nsj.fused_noisy_softmax_cross_entropy(features, kernel, labels, rng, alpha,
                                                     sigma=sigma, chunk_size=8)

    for alpha, sigma in [(0.1, 1.0), (0.3, 0.5)]:
        assert_close(step(features, kernel, labels, alpha, sigma),
                     materialised(features, kernel, labels, rng, alpha, sigma=sigma), 1e-5)
    assert step._cache_size() == 1
    # Out-of-range labels cannot be checked under jit; they give NaN, as in Optax.
    loss = step(features, kernel, labels.at[0].set(37), 0.1, 1.0)
    assert np.isnan(loss[0]) and np.all(np.isfinite(loss[1:]))


# -- a [classes, dim] kernel (Equinox, PyTorch) ---------------------------------------------


def transposed_layout(loss_fn):
    """``loss_fn`` of a [classes, dim] kernel as a function of the [dim, classes] one.

    Its gradient with respect to the kernel comes back transposed by the autodiff of the
    ``.T`` here, so it compares directly with the default layout's.
    """
    return lambda f, k, a: loss_fn(f, jnp.asarray(k.T), a)


@pytest.mark.parametrize("chunk_size, kwargs", [
    (5, dict()),
    (1, dict(noise="amplitude")),
    (37, dict(noise="free", shared_noise=True)),
    (None, dict(negative=True)),
    (6, dict(where=jnp.arange(12) % 4 != 0, sigma=0.5)),
])
def test_classes_features_layout_equals_the_default_on_the_transpose(chunk_size, kwargs):
    features, kernel, labels = make_problem(20)
    labels = labels.at[:2].set(jnp.array([36, 0]))  # the last (partial) block and the first
    rng = jax.random.key(21)
    default = lambda f, k, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, labels, rng, a, chunk_size=chunk_size, **kwargs)
    layout = transposed_layout(lambda f, w, a: nsj.fused_noisy_softmax_cross_entropy(
        f, w, labels, rng, a, chunk_size=chunk_size, kernel_layout="classes_features", **kwargs))
    loss, grads = value_and_grads(layout, features, kernel)
    expected_loss, expected_grads = value_and_grads(default, features, kernel)
    assert_close(loss, expected_loss, 1e-6)
    assert_close(grads, expected_grads, 1e-6)  # the default layout is pinned to materialised above


def test_classes_features_kernel_gradient_has_the_kernel_shape_and_dtype():
    features, kernel, labels = make_problem(22, dtype=jnp.bfloat16)
    weight = jnp.asarray(kernel.T)
    d_weight = jax.grad(lambda w: nsj.fused_noisy_softmax_cross_entropy(
        features, w, labels, jax.random.key(0), 0.1, chunk_size=8,
        kernel_layout="classes_features").sum())(weight)
    assert d_weight.shape == (37, 8) and d_weight.dtype == jnp.bfloat16


def test_classes_features_layout_in_the_checked_variant():
    features, kernel, labels = make_problem(12)
    weight = jnp.asarray(kernel.T)
    step = jax.jit(lambda w, y: nsj.checked_fused_noisy_softmax_cross_entropy(
        features, w, y, jax.random.key(0), 0.1, chunk_size=8, kernel_layout="classes_features"))
    error, loss = step(weight, labels)
    assert error.get() is None
    assert_close(loss, materialised(features, kernel, labels, jax.random.key(0), 0.1), 1e-5)
    error, _ = step(weight, labels.at[3].set(37))
    assert "`labels` must lie in [0, 37); found label 37" in error.get()


# -- sharded over the 8 emulated devices ---------------------------------------------------


def class_mesh(shape, names, axis_type=AxisType.Auto):
    return Mesh(np.array(jax.devices()[:int(np.prod(shape))]).reshape(shape), names,
                axis_types=(axis_type,) * len(shape))


@pytest.mark.parametrize("shape, names, axis_type, kernel_layout", [
    ((4,), ("classes",), AxisType.Auto, "features_classes"),
    ((8,), ("classes",), AxisType.Auto, "features_classes"),
    ((2, 4), ("data", "classes"), AxisType.Auto, "features_classes"),
    ((4, 2), ("classes", "data"), AxisType.Auto, "features_classes"),
    ((2, 4), ("data", "classes"), AxisType.Explicit, "features_classes"),  # make_mesh's default
    # A [classes, dim] kernel split along its rows: each shard's label offset counts rows.
    ((4,), ("classes",), AxisType.Auto, "classes_features"),
    ((4, 2), ("classes", "data"), AxisType.Auto, "classes_features"),
    ((2, 4), ("data", "classes"), AxisType.Explicit, "classes_features"),
])
def test_sharded_equals_unsharded(shape, names, axis_type, kernel_layout):
    # 96 classes: 12 or 24 per shard, chunks of 5 leave a partial block on every shard.
    features, kernel, labels = make_problem(10, batch=16, num_classes=96)
    labels = labels.at[:3].set(jnp.array([95, 0, 47]))
    rng = jax.random.key(16)
    mesh = class_mesh(shape, names, axis_type)
    sharded = lambda f, k, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, labels, rng, a, chunk_size=5, mesh=mesh, class_axis="classes",
        kernel_layout=kernel_layout)
    if kernel_layout == "classes_features":
        sharded = transposed_layout(sharded)
    # Against the default layout on one device.
    unsharded = lambda f, k, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, labels, rng, a, chunk_size=5)
    loss, grads = value_and_grads(sharded, features, kernel)
    expected_loss, expected_grads = value_and_grads(unsharded, features, kernel)
    assert_close(loss, expected_loss, 1e-6)
    assert_close(grads, expected_grads, 1e-6)
    _, reference_grads = value_and_grads(both(features, kernel, labels, rng)[1], features, kernel)
    assert_close(grads, reference_grads, 1e-5)


def test_sharded_classes_features_kernel_is_split_along_its_rows():
    mesh = class_mesh((2, 4), ("data", "classes"), AxisType.Explicit)
    config = _blocks.checked_config(
        jnp.ones((8, 8)), jnp.ones((96, 8)), kernel_layout="classes_features", chunk_size=None,
        mesh=mesh, class_axis="classes", dtype=None)[2]
    assert _blocks.kernel_spec(config) == jax.sharding.PartitionSpec("classes", None)


def _compiled_text(loss_fn, batch, dim, num_classes, dtype=jnp.float32,
                   kernel_layout="features_classes"):
    kernel_shape = (dim, num_classes) if kernel_layout == "features_classes" else (
        num_classes, dim)
    args = (jax.ShapeDtypeStruct((batch, dim), dtype),
            jax.ShapeDtypeStruct(kernel_shape, dtype),
            jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.float32))
    step = jax.jit(jax.value_and_grad(lambda f, k, y, a: loss_fn(f, k, y, a).mean(), (0, 1)))
    return step.lower(*args).compile()


def _batch_by_class_shapes(text, batch_sizes, class_sizes):
    """Two-dimensional shapes in `text` with a batch and a class dimension, in either order."""
    shapes = {tuple(int(n) for n in s.split(",")) for s in re.findall(r"\[(\d+(?:,\d+)*)\]", text)}
    return [s for s in shapes if len(s) == 2 and (
        (s[0] in batch_sizes and s[1] in class_sizes)
        or (s[1] in batch_sizes and s[0] in class_sizes))]


def test_hlo_check_finds_the_materialised_logits():
    # The inspection below would see [batch, classes] arrays if there were any.
    loss_fn = lambda f, k, y, a: materialised(f, k, y, jax.random.key(0), a)
    text = _compiled_text(loss_fn, 24, 40, 2000).as_text()
    assert _batch_by_class_shapes(text, (24,), (2000,))


@pytest.mark.parametrize("mesh_shape, kernel_layout", [
    (None, "features_classes"), ((8,), "features_classes"), ((2, 4), "features_classes"),
    (None, "classes_features"), ((2, 4), "classes_features"),
])
def test_hlo_has_no_batch_by_classes_array_nor_kernel_all_gather(mesh_shape, kernel_layout):
    batch, dim, num_classes = 24, 40, 2000
    mesh = None if mesh_shape is None else class_mesh(
        mesh_shape, ("classes",) if len(mesh_shape) == 1 else ("data", "classes"))
    loss_fn = lambda f, k, y, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, y, jax.random.key(0), a, chunk_size=64, mesh=mesh,
        class_axis=None if mesh is None else "classes", kernel_layout=kernel_layout)
    text = _compiled_text(loss_fn, batch, dim, num_classes,
                          kernel_layout=kernel_layout).as_text()
    data = 1 if mesh_shape is None or len(mesh_shape) == 1 else mesh_shape[0]
    shards = 1 if mesh_shape is None else mesh_shape[-1]
    rows = batch // data
    classes_per_shard = num_classes // shards
    # No logits beyond a block: nothing with a batch dimension and more than one block of classes.
    assert not _batch_by_class_shapes(text, (batch, rows), (num_classes, classes_per_shard))
    for line in text.splitlines():
        if "all-gather(" in line or "all-gather-start(" in line:
            raise AssertionError(f"an all-gather: {line}")
        if mesh_shape is not None and ("all-reduce(" in line or "all-reduce-start(" in line):
            result = line.split("=", 1)[1].split("all-reduce")[0]
            sizes = [int(np.prod([int(n) for n in s.split(",")]))
                     for s in re.findall(r"\[(\d+(?:,\d+)*)\]", result)]
            # [batch]-sized combinations, the one [batch, dim] reduction of dx, and with a data
            # axis the kernel-gradient shard's reduction over it (data parallelism).
            allowed = rows * dim if data == 1 else max(rows * dim, dim * classes_per_shard)
            assert max(sizes) <= allowed, line
    if mesh_shape is not None:
        assert "all-reduce" in text


@pytest.mark.parametrize("num_classes, kernel_layout", [
    (1_000_000, "features_classes"), (4_000_000, "features_classes"),
    # A [classes, dim] kernel is read block by block as stored: a transposed copy of it
    # (2 GB here) or of its gradient would show as temporary memory.
    (1_000_000, "classes_features"),
])
def test_temporary_memory_at_a_million_classes(num_classes, kernel_layout):
    # Compile only. The materialised loss needs ~3.9 GB of temporaries here (logits and their
    # gradient in float32); the fused one a few blocks of batch x chunk.
    loss_fn = lambda f, k, y, a: nsj.fused_noisy_softmax_cross_entropy(
        f, k, y, jax.random.key(0), a, kernel_layout=kernel_layout)
    memory = _compiled_text(loss_fn, 512, 512, num_classes,
                            kernel_layout=kernel_layout).memory_analysis()
    assert memory.temp_size_in_bytes <= 64 * 2**20


@jax.jit
def _checked_step(features, kernel, labels, alpha):
    return nsj.checked_fused_noisy_softmax_cross_entropy(features, kernel, labels,
                                                         jax.random.key(0), alpha, chunk_size=8)


@pytest.mark.parametrize("corrupt, message", [
    (lambda f, k, y, a: (f, k, y, a), None),
    (lambda f, k, y, a: (f, k, y.at[3].set(40), a), "`labels` must lie in [0, 37); found label 40"),
    (lambda f, k, y, a: (f, k, y.at[3].set(-1), a), "`labels` must lie in [0, 37); found label -1"),
    (lambda f, k, y, a: (f, k, y, -0.5), "`alpha` must be >= 0"),
    (lambda f, k, y, a: (f, k.at[0, 0].set(jnp.inf), y, a), "`kernel` contains NaN or infinity"),
    (lambda f, k, y, a: (f.at[1, 1].set(jnp.nan), k, y, a), "`features` contains NaN or infinity"),
])
def test_checked_mode_reports_values_under_jit(corrupt, message):
    features, kernel, labels = make_problem(12)
    error, loss = _checked_step(*corrupt(features, kernel, labels, 0.1))
    if message is None:
        assert error.get() is None
        assert_close(loss, materialised(features, kernel, labels, jax.random.key(0), 0.1), 1e-5)
    else:
        assert message in error.get()


def test_checked_mode_checks_eagerly_too():
    features, kernel, labels = make_problem(12)
    with pytest.raises(ValueError, match="`labels` must lie in"):
        nsj.checked_fused_noisy_softmax_cross_entropy(features, kernel, labels.at[0].set(-2),
                                                      jax.random.key(0), 0.1)


# -- bad input -----------------------------------------------------------------------------


def _call(**changes):
    features, kernel, labels = make_problem(11)
    args = dict(features=features, kernel=kernel, labels=labels, rng=jax.random.key(0),
                alpha=0.1)
    args.update(changes)
    positional = [args.pop(name) for name in ("features", "kernel", "labels", "rng", "alpha")]
    return nsj.fused_noisy_softmax_cross_entropy(*positional, **args)


@pytest.mark.parametrize("changes, error, match", [
    (dict(features=np.zeros((12, 8), np.int32)), TypeError, "`features` must be a floating"),
    (dict(features=np.zeros((12,), np.float32)), ValueError,
     r"`features` must have shape \[batch, dim\]"),
    (dict(kernel=np.zeros((8, 37), np.int32)), TypeError, "`kernel` must be a floating"),
    (dict(kernel=np.zeros((9, 37), np.float32)), ValueError,
     r"`kernel` must have shape \[num_features, num_classes\] with num_features = "
     r"features.shape\[-1\] \(kernel_layout='features_classes'"),
    (dict(kernel=np.zeros((8, 0), np.float32)), ValueError,
     r"at least one class \(kernel.shape\[1\] >= 1\)"),
    (dict(kernel=np.zeros((0, 8), np.float32), kernel_layout="classes_features"), ValueError,
     r"at least one class \(kernel.shape\[0\] >= 1\)"),
    (dict(kernel=np.zeros((37, 8), np.float32), kernel_layout="torch"), ValueError,
     r"`kernel_layout` must be one of 'features_classes', 'classes_features'; got 'torch'"),
    (dict(kernel=np.zeros((37, 8), np.float32), kernel_layout="classes_features",
          labels=np.full((12,), 37)), ValueError, r"`labels` must lie in \[0, 37\)"),
    (dict(labels=np.zeros((12,), np.float32)), TypeError, "`labels` must be an integer"),
    (dict(labels=np.zeros((11,), np.int32)), ValueError, r"`labels` must have shape \[batch\]"),
    (dict(labels=np.full((12,), 37)), ValueError, r"`labels` must lie in \[0, 37\)"),
    (dict(labels=np.full((12,), -1)), ValueError, r"`labels` must lie in \[0, 37\)"),
    (dict(labels=np.full((12,), 2**32, np.int64)), ValueError, r"`labels` must lie in"),
    (dict(rng=0), TypeError, "`rng` must be a JAX PRNG key"),
    (dict(alpha=-0.1), ValueError, "`alpha` must be >= 0"),
    (dict(alpha=np.ones(2)), ValueError, "`alpha` must be a scalar"),
    (dict(sigma=-1.0), ValueError, "`sigma` must be >= 0"),
    (dict(noise="gaussian"), ValueError, "`noise` must be one of"),
    (dict(where=np.ones((3,), bool)), ValueError, "`where` must have one entry per example"),
    (dict(chunk_size=0), ValueError, "`chunk_size` must be a positive integer"),
    (dict(chunk_size=2.5), ValueError, "`chunk_size` must be a positive integer"),
    (dict(mesh=Mesh(np.array(jax.devices()[:1]), ("classes",))), ValueError,
     "`mesh` and `class_axis` go together"),
    (dict(class_axis="classes"), ValueError, "`mesh` and `class_axis` go together"),
    (dict(mesh="mesh", class_axis="classes"), TypeError, "`mesh` must be a jax.sharding.Mesh"),
    (dict(mesh=Mesh(np.array(jax.devices()[:4]), ("classes",)), class_axis="model"),
     ValueError, "`class_axis` must name an axis of `mesh`"),
    (dict(mesh=Mesh(np.array(jax.devices()[:4]), ("classes",)), class_axis="classes"),
     ValueError, r"classes \(kernel.shape\[1\] = 37\) must be divisible by the size of mesh axis"),
    (dict(kernel=np.zeros((37, 8), np.float32), kernel_layout="classes_features",
          mesh=Mesh(np.array(jax.devices()[:4]), ("classes",)), class_axis="classes"),
     ValueError, r"classes \(kernel.shape\[0\] = 37\) must be divisible by the size of mesh axis"),
    (dict(kernel=np.zeros((8, 40), np.float32),
          mesh=Mesh(np.array(jax.devices()[:8]).reshape(8, 1), ("data", "classes")),
          class_axis="classes"),
     ValueError, r"the batch \(features.shape\[0\] = 12\) must be divisible by 8"),
])
def test_bad_input_raises_naming_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_default_chunk_size():
    # About 2**21 logits per block, a multiple of 128, never more than the classes.
    assert _validation.check_chunk_size(None, 512, 10**6) == 4096
    assert _validation.check_chunk_size(None, 10**6, 10**6) == 128
    assert _validation.check_chunk_size(None, 512, 100) == 100
    assert _validation.check_chunk_size(1000, 512, 300) == 300


# -- top-k at evaluation -------------------------------------------------------------------


@pytest.mark.parametrize("kernel_layout", LAYOUTS)
@pytest.mark.parametrize("k, chunk_size, mesh_shape", [
    (1, 6, None), (5, 6, None), (5, 3, None), (5, None, None), (37, 16, None),
    (5, 5, (8,)), (5, 4, (2, 4)),
])
def test_fused_top_k_equals_top_k_of_the_logits(k, chunk_size, mesh_shape, kernel_layout):
    features, kernel, labels = make_problem(13, batch=16, num_classes=37 if mesh_shape is None
                                            else 96)
    mesh = None if mesh_shape is None else class_mesh(
        mesh_shape, ("classes",) if len(mesh_shape) == 1 else ("data", "classes"))
    stored = kernel if kernel_layout == "features_classes" else jnp.asarray(kernel.T)
    values, classes = nsj.fused_top_k(features, stored, k, chunk_size=chunk_size, mesh=mesh,
                                      class_axis=None if mesh is None else "classes",
                                      kernel_layout=kernel_layout)
    expected_values, expected_classes = jax.lax.top_k(features @ kernel, k)
    np.testing.assert_array_equal(classes, expected_classes)
    assert_close(values, expected_values, 1e-6)  # up to the matmul's rounding
    # Top-1 and top-k accuracy as the docstring computes them.
    hits = np.any(np.asarray(classes) == np.asarray(labels)[:, None], axis=-1)
    expected_hits = np.any(np.asarray(expected_classes) == np.asarray(labels)[:, None], axis=-1)
    np.testing.assert_array_equal(hits, expected_hits)


@pytest.mark.parametrize("kernel_layout, kernel_shape", [
    ("features_classes", (512, 1_000_000)), ("classes_features", (1_000_000, 512))])
def test_fused_top_k_temporary_memory_at_a_million_classes(kernel_layout, kernel_shape):
    step = jax.jit(lambda f, k: nsj.fused_top_k(f, k, 5, kernel_layout=kernel_layout))
    memory = step.lower(jax.ShapeDtypeStruct((512, 512), jnp.float32),
                        jax.ShapeDtypeStruct(kernel_shape, jnp.float32)
                        ).compile().memory_analysis()
    assert memory.temp_size_in_bytes <= 64 * 2**20


@pytest.mark.parametrize("k", [0, 38, 2.0, True])
def test_fused_top_k_bad_k(k):
    features, kernel, _ = make_problem(14)
    with pytest.raises(ValueError, match="`k` must be an integer in"):
        nsj.fused_top_k(features, kernel, k)


@pytest.mark.slow
def test_large_class_example_loss_falls():
    # Shrunk from the example's defaults (1M classes, 300 steps: about 3.5 minutes on 2 CPU
    # cores, bound by memory traffic over the kernel) to 100k classes and 200 steps.
    spec = importlib.util.spec_from_file_location(
        "large_class_example", pathlib.Path(__file__).parents[1] / "examples" / "large_class.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    losses = example.main(["--num-classes", "100000", "--steps", "200", "--log-every", "20"])
    assert losses[0] > 0.95 * np.log(100_000)  # starts at chance
    assert np.all(np.isfinite(losses))
    assert max(losses[-3:]) < 0.6 * losses[0]
