"""Padding labels: one behaviour on every path.

A label that ``where`` masks out may be anything (-1 is the usual padding): it is accepted
eagerly, and its example gives loss 0 and gradient 0. An unmasked label outside
``[0, num_classes)``, negative or too large, raises eagerly, is reported by the checked
variants and, under ``jit``, gives NaN: it is never wrapped around (-1 is not the last class).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import noisy_softmax_jax as nsj

BATCH, CLASSES, DIM = 6, 5, 4
KEY = jax.random.key(3)
FEATURES = jax.random.normal(jax.random.key(0), (BATCH, DIM))
KERNEL = jax.random.normal(jax.random.key(1), (DIM, CLASSES))
LOGITS = FEATURES @ KERNEL
LABELS = jnp.array([0, 4, 2, 1, 3, 2])
AMPLITUDE = nsj.target_amplitude(FEATURES, KERNEL, LABELS)
BAD = 2  # the example whose label is replaced
KEEP = np.arange(BATCH) != BAD
BAD_LABELS = [-1, -3, CLASSES, CLASSES + 7]


def dense(labels, where, x):
    return nsj.noisy_softmax_cross_entropy(x, labels, KEY, 0.2, amplitude=AMPLITUDE,
                                           where=where)


def dense_logit_mask(labels, where, x):
    # A mask of the logits' shape (the plain path): an example with no class kept is masked.
    mask = None if where is None else jnp.broadcast_to(where[:, None], x.shape)
    return nsj.noisy_softmax_cross_entropy(x, labels, KEY, 0.2, amplitude=AMPLITUDE, where=mask)


def checked(labels, where, x):
    return nsj.checked_noisy_softmax_cross_entropy(x, labels, KEY, 0.2, amplitude=AMPLITUDE,
                                                   where=where)


def through_noisy_logits(labels, where, x):
    noisy = nsj.noisy_logits(x, labels, KEY, 0.2, amplitude=AMPLITUDE, where=where)
    return optax.softmax_cross_entropy_with_integer_labels(noisy, labels, where=where)


def fused(labels, where, x):
    return nsj.fused_noisy_softmax_cross_entropy(x, KERNEL, labels, KEY, 0.2, where=where,
                                                 chunk_size=2)


def checked_fused(labels, where, x):
    return nsj.checked_fused_noisy_softmax_cross_entropy(x, KERNEL, labels, KEY, 0.2,
                                                         where=where, chunk_size=2)


COSINES = nsj.class_cosines(FEATURES, KERNEL)


def fused_margin(labels, where, x):
    return nsj.fused_noisy_softmax_cross_entropy(x, KERNEL, labels, KEY, 0.2, where=where,
                                                 margin="arcface", scale=8.0, chunk_size=2)


def through_margin_logits(labels, where, x):
    noisy = nsj.margin_logits(x, labels, KEY, 0.2, margin="cosface", scale=8.0, where=where)
    return optax.softmax_cross_entropy_with_integer_labels(noisy, labels, where=where)


# path -> (loss function, its differentiable input, whether it returns (error, loss))
PATHS = {
    "dense": (dense, LOGITS, False),
    "dense_logit_mask": (dense_logit_mask, LOGITS, False),
    "checked": (checked, LOGITS, True),
    "noisy_logits": (through_noisy_logits, LOGITS, False),
    "fused": (fused, FEATURES, False),
    "checked_fused": (checked_fused, FEATURES, True),
    "fused_margin": (fused_margin, FEATURES, False),
    "margin_logits": (through_margin_logits, COSINES, False),
}


def loss_of(path, labels, where, x):
    fn, _, has_error = PATHS[path]
    out = fn(labels, where, x)
    return out[1] if has_error else out


@pytest.mark.parametrize("label", BAD_LABELS)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_masked_padding_label_gives_zero_loss_and_gradient_eagerly(path, label):
    x = PATHS[path][1]
    labels, where = LABELS.at[BAD].set(label), jnp.asarray(KEEP)
    loss = loss_of(path, labels, where, x)
    grad = jax.grad(lambda x: loss_of(path, labels, where, x).sum())(x)
    unpadded = loss_of(path, LABELS, where, x)
    assert loss[BAD] == 0 and np.all(np.asarray(grad[BAD]) == 0)
    np.testing.assert_array_equal(loss, unpadded)  # the other examples are untouched
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("label", BAD_LABELS)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_an_unmasked_out_of_range_label_gives_nan_under_jit_and_is_never_wrapped(path, label):
    x = PATHS[path][1]
    loss = jax.jit(lambda labels: loss_of(path, labels, None, x))(LABELS.at[BAD].set(label))
    clean = loss_of(path, LABELS, None, x)
    assert np.isnan(loss[BAD])
    np.testing.assert_array_equal(loss[KEEP], clean[KEEP])


@pytest.mark.parametrize("label", BAD_LABELS)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_an_unmasked_out_of_range_label_raises_eagerly(path, label):
    x = PATHS[path][1]
    where = jnp.asarray(~KEEP | KEEP)  # everything kept
    with pytest.raises(ValueError, match=rf"`labels` must lie in \[0, {CLASSES}\)"):
        loss_of(path, LABELS.at[BAD].set(label), where, x)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("label", BAD_LABELS)
@pytest.mark.parametrize("path", ["checked", "checked_fused"])
def test_the_checked_variants_report_an_unmasked_bad_label_only(path, label, masked):
    fn, x, _ = PATHS[path]
    where = jnp.asarray(KEEP if masked else np.ones(BATCH, bool))
    error, loss = jax.jit(lambda labels: fn(labels, where, x))(LABELS.at[BAD].set(label))
    if masked:
        assert error.get() is None and loss[BAD] == 0
    else:
        with pytest.raises(Exception, match=rf"must lie in \[0, {CLASSES}\); found label {label}"):
            error.throw()


@pytest.mark.parametrize("label", [-1, CLASSES])
def test_noisy_logits_of_an_unmasked_bad_label_are_nan_and_of_a_masked_one_unperturbed(label):
    labels = LABELS.at[BAD].set(label)
    unmasked = jax.jit(lambda lb: nsj.noisy_logits(LOGITS, lb, KEY, 0.2,
                                                   amplitude=AMPLITUDE))(labels)
    assert np.all(np.isnan(unmasked[BAD])) and not np.any(np.isnan(unmasked[KEEP]))
    masked = nsj.noisy_logits(LOGITS, labels, KEY, 0.2, amplitude=AMPLITUDE,
                              where=jnp.asarray(KEEP))
    np.testing.assert_array_equal(masked[BAD], LOGITS[BAD])
    np.testing.assert_array_equal(masked[KEEP], unmasked[KEEP])


@pytest.mark.parametrize("label", [-1, CLASSES])
def test_saturation_metrics_skip_a_masked_padding_label(label):
    labels, where = LABELS.at[BAD].set(label), jnp.asarray(KEEP)
    metrics = nsj.saturation_metrics(LOGITS, labels, amplitude=AMPLITUDE, rng=KEY, alpha=0.2,
                                     where=where)
    expected = nsj.saturation_metrics(LOGITS[KEEP], LABELS[KEEP], amplitude=AMPLITUDE[KEEP],
                                      rng=KEY, alpha=0.2)
    for name in ("target_prob", "saturated_fraction", "accuracy", "logit_std", "amplitude"):
        np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-6, err_msg=name)
    assert all(np.isfinite(float(v)) for v in metrics.values())


# The amplitude follows the loss's rule: masked padding gives 0 (and no gradient), an unmasked
# label out of range raises eagerly and is NaN under jit, never the amplitude of another class.


def _linen_head_output():
    head = nsj.NoisySoftmaxHead(CLASSES)
    params = {"params": {"kernel": KERNEL}}
    return lambda x: head.apply(params, x)


def _fused_head_output():
    head = nsj.FusedNoisySoftmaxHead(CLASSES)
    params = {"params": {"kernel": KERNEL}}
    return lambda x: head.apply(params, x)


AMPLITUDES = {
    "target_amplitude": lambda labels, where, x: nsj.target_amplitude(x, KERNEL, labels,
                                                                      where=where),
    "head_output": lambda labels, where, x: _linen_head_output()(x).amplitude(labels, where),
    "fused_head_output": lambda labels, where, x: _fused_head_output()(x).amplitude(labels,
                                                                                    where),
}


@pytest.mark.parametrize("label", BAD_LABELS)
@pytest.mark.parametrize("path", sorted(AMPLITUDES))
def test_a_masked_padding_label_has_amplitude_zero_and_no_gradient(path, label):
    fn = AMPLITUDES[path]
    labels, where = LABELS.at[BAD].set(label), jnp.asarray(KEEP)
    amplitude = fn(labels, where, FEATURES)
    grad = jax.grad(lambda x: fn(labels, where, x).sum())(FEATURES)
    assert amplitude[BAD] == 0 and np.all(np.asarray(grad[BAD]) == 0)
    np.testing.assert_allclose(amplitude[KEEP], AMPLITUDE[KEEP], rtol=1e-6)
    # Under jit too, where the mask's values are not known.
    traced = jax.jit(lambda y, w: fn(y, w, FEATURES))(labels, where)
    assert traced[BAD] == 0
    np.testing.assert_allclose(traced, amplitude, rtol=1e-6)


@pytest.mark.parametrize("label", BAD_LABELS)
@pytest.mark.parametrize("path", sorted(AMPLITUDES))
def test_an_unmasked_bad_label_raises_eagerly_and_is_nan_under_jit(path, label):
    fn = AMPLITUDES[path]
    labels = LABELS.at[BAD].set(label)
    with pytest.raises(ValueError, match=rf"`labels` must lie in \[0, {CLASSES}\)"):
        fn(labels, None, FEATURES)
    traced = jax.jit(lambda y: fn(y, None, FEATURES))(labels)
    assert np.isnan(traced[BAD])  # not the last class's amplitude for -1
    np.testing.assert_allclose(traced[KEEP], AMPLITUDE[KEEP], rtol=1e-6)


def test_the_loss_with_masked_padding_amplitudes_has_no_nan_gradient():
    labels, where = LABELS.at[BAD].set(-1), jnp.asarray(KEEP)

    def loss(x):
        out = _linen_head_output()(x)
        return nsj.noisy_softmax_cross_entropy(out.logits, labels, KEY, 0.2,
                                               amplitude=out.amplitude(labels, where),
                                               where=where).sum()

    grad = jax.grad(loss)(FEATURES)
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad[BAD]) == 0)
