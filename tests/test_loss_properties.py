"""Property tests of the loss: valid input never gives NaN or inf, invalid input always raises.

Hypothesis draws the shapes, dtypes, values, hyperparameters, noise variants and masks. XLA
compiles once per shape, dtype and static argument, and a compile costs about a second on a
small CPU, so each test draws its shapes and dtypes from a short fixed list and everything else
(values, labels, masks, alpha, sigma, keys) freely: a few dozen compiles, then thousands of
cheap cases. The values are made by NumPy from a drawn seed and a drawn "regime" (ordinary,
extreme, constant, spiked, subnormal, ...) rather than element by element, which keeps the draws
fast; a failure prints the regime and seed that reproduce it.

The profile is deterministic (``derandomize=True``, no example database), so CI sees the same
cases every run. ``NOISY_SOFTMAX_HYPOTHESIS_PROFILE=thorough`` draws ten times as many, at random.
"""

import functools
import os

import hypothesis
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

import noisy_softmax_jax as nsj

hypothesis.settings.register_profile(
    "ci", deadline=None, derandomize=True, database=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "thorough", deadline=None, derandomize=False, database=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
_PROFILE_NAME = os.environ.get("NOISY_SOFTMAX_HYPOTHESIS_PROFILE", "ci")
_PROFILE = hypothesis.settings.get_profile(_PROFILE_NAME)
_SCALE = 10 if _PROFILE_NAME == "thorough" else 1


def examples(n):
    """Settings for a test with `n` examples in the default profile."""
    return hypothesis.settings(_PROFILE, max_examples=n * _SCALE)


VARIANTS = nsj.NOISE_VARIANTS
# The largest |logit| and amplitude tried per dtype. float32: the 1e4 for the ordinary
# tests and 1e30 in the dtype test (the float32 computation has room for alpha * sigma * |xi| up
# to ~1e5 on top); float16: its whole finite range; bfloat16: like float32, which it shares its
# exponent with.
LIMIT = {jnp.float32: 1e4, jnp.float16: 65504.0, jnp.bfloat16: 1e30}
VALUE_REGIMES = ("normal", "uniform", "extreme", "constant", "spike", "tiny", "zeros")
AMPLITUDE_REGIMES = ("bound", "aligned", "below_aligned", "uniform", "zeros")
alphas = st.one_of(st.sampled_from([0.0, 10.0]), st.floats(0.0, 10.0))
sigmas = st.one_of(st.sampled_from([0.0, 1.0, 10.0]), st.floats(0.0, 10.0))
seeds = st.integers(0, 2**32 - 1)


def magnitudes(limit):
    return st.one_of(st.sampled_from([0.0, 1.0, limit]), st.floats(0.0, limit))


def make_logits(gen, shape, regime, magnitude, dtype):
    """Logits of `shape` with |value| <= magnitude, in a shape of distribution named by regime."""
    if regime == "normal":
        x = gen.standard_normal(shape) * magnitude / 4
    elif regime == "uniform":
        x = gen.uniform(-magnitude, magnitude, shape)
    elif regime == "extreme":
        x = gen.choice([-magnitude, 0.0, magnitude], shape)
    elif regime == "constant":
        x = np.full(shape, gen.uniform(-magnitude, magnitude))
    elif regime == "spike":  # one large logit per example, the rest small
        x = gen.standard_normal(shape)
        index = gen.integers(0, shape[-1], shape[:-1])[..., None]
        np.put_along_axis(x, index, gen.choice([-magnitude, magnitude], shape[:-1] + (1,)), -1)
    elif regime == "tiny":  # down to the subnormals of the dtype
        x = gen.standard_normal(shape) * float(jnp.finfo(dtype).smallest_subnormal) * 4
    else:
        x = np.zeros(shape)
    return np.asarray(jnp.asarray(np.clip(x, -magnitude, magnitude), dtype))


def make_amplitude(gen, logits, labels, regime, dtype):
    """Per-example amplitudes; ``bound`` respects ||W_y|| ||x|| >= |f_y| as a real head does."""
    target = np.take_along_axis(logits.astype(np.float64), labels[..., None].astype(np.int64),
                                -1)[..., 0]
    limit = float(jnp.finfo(dtype).max)
    if regime == "bound":
        a = np.abs(target) * (1 + gen.uniform(0, 3, target.shape)) + gen.uniform(0, 1, target.shape)
    elif regime == "aligned":  # x parallel to W_y: amplitude == f_y, the annealing factor 0
        a = np.abs(target)
    elif regime == "below_aligned":  # rounding put the amplitude a hair below f_y
        a = np.abs(target) * (1 - 1e-3 * gen.uniform(0, 1, target.shape))
    elif regime == "uniform":
        a = gen.uniform(0, np.max(np.abs(logits.astype(np.float64)), initial=1.0), target.shape)
    else:
        a = np.zeros(target.shape)
    return np.asarray(jnp.asarray(np.minimum(a, limit), dtype))


@st.composite
def valid_inputs(draw, shape, classes, dtype=jnp.float32, label_dtype=np.int32, limit=None):
    limit = LIMIT[dtype] if limit is None else limit
    case = dict(
        seed=draw(seeds), regime=draw(st.sampled_from(VALUE_REGIMES)),
        magnitude=draw(magnitudes(limit)),
        amplitude_regime=draw(st.sampled_from(AMPLITUDE_REGIMES)),
        masked_fraction=draw(st.sampled_from([0.0, 0.5, 1.0])),
        alpha=draw(alphas), sigma=draw(sigmas))
    gen = np.random.default_rng(case["seed"])
    logits = make_logits(gen, shape + (classes,), case["regime"], case["magnitude"], dtype)
    labels = gen.integers(0, classes, shape).astype(label_dtype)
    case.update(
        logits=logits, labels=labels,
        amplitude=make_amplitude(gen, logits, labels, case["amplitude_regime"], dtype),
        where=gen.random(shape) >= case["masked_fraction"],
        rng=jax.random.key(case["seed"] % 2**31))
    return case


def describe(case):
    """What reproduces a case, for failure messages: everything except the arrays."""
    return {k: v for k, v in case.items() if not isinstance(v, np.ndarray | jax.Array)}


@functools.partial(jax.jit, static_argnames=("noise", "shared_noise", "negative"))
def loss_and_gradients(logits, labels, rng, alpha, sigma, amplitude, where, *, noise,
                       shared_noise, negative):
    """Per-example loss, its gradients in the logits and the amplitude, and Optax's loss."""
    def loss_fn(logits, amplitude):
        return nsj.noisy_softmax_cross_entropy(
            logits, labels, rng, alpha, amplitude=amplitude, noise=noise, sigma=sigma,
            where=where, shared_noise=shared_noise, negative=negative)

    loss, vjp = jax.vjp(loss_fn, logits, amplitude)
    grad_logits, grad_amplitude = vjp(jnp.ones_like(loss))
    softmax = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    # Half precision is computed in float32 and only the loss rounded to the logits' dtype:
    # the loss of the same values in float32, to compare with.
    wide = loss if logits.dtype == jnp.float32 else loss_fn(logits.astype(jnp.float32), amplitude)
    return loss, grad_logits, grad_amplitude, softmax, wide


@functools.partial(jax.jit, static_argnames=("where_given",))
def all_variants(logits, labels, rng, alpha, sigma, amplitude, where, *, where_given):
    """`loss_and_gradients` for every noise variant, shared or not, negative or not, in one jit.

    One compile for the twelve combinations costs about a third of twelve compiles.
    """
    return {
        (noise, shared, negative): loss_and_gradients(
            logits, labels, rng, alpha, sigma, amplitude, where if where_given else None,
            noise=noise, shared_noise=shared, negative=negative)
        for noise in VARIANTS for shared in (False, True) for negative in (False, True)}


def check_valid_output(case, outputs, *, noise, negative, masked):
    """The properties every valid input has; `outputs` as `loss_and_gradients` returns them."""
    loss, grad_logits, grad_amplitude, softmax, wide = (
        np.asarray(o, np.float64) for o in outputs)
    info = describe(case) | dict(noise=noise, negative=negative, masked=masked)
    labels = case["labels"]
    dtype = case["logits"].dtype
    assert outputs[0].dtype == dtype, info  # the logits' dtype, as in Optax
    assert loss.shape == labels.shape and grad_logits.shape == case["logits"].shape, info
    assert grad_amplitude.shape == labels.shape, info
    # A float16 loss above 65504 is inf (the float32 one is finite, and so are the gradients).
    overflow = np.abs(wide) > float(jnp.finfo(dtype).max)
    for name, value in [("loss", np.where(overflow, 0.0, loss)),
                        ("d loss / d logits", grad_logits),
                        ("d loss / d amplitude", grad_amplitude)]:
        bad = ~np.isfinite(value)
        assert not bad.any(), f"{name} is not finite at {np.argwhere(bad)[:3].tolist()}: {info}"
    # The float32 loss rounded once (to the nearest, so within half a step of the dtype).
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(np.where(overflow, 0.0, loss), np.where(overflow, 0.0, wide),
                               rtol=eps, atol=0, err_msg=str(info))
    loss = wide
    # lse(n) >= max(n) >= the noisy target logit, in floating point as in exact arithmetic.
    assert np.all(loss >= 0), info
    keep = case["where"] if masked else np.ones(labels.shape, bool)
    # A masked example has loss 0 and no gradient.
    assert np.all(loss[~keep] == 0) and np.all(grad_logits[~keep] == 0), info
    assert np.all(grad_amplitude[~keep] == 0), info
    if noise == "free":
        assert np.all(grad_amplitude == 0), info  # "free" noise ignores the amplitude
    # Rounding of the log-normalizer of logits as large as `scale`, a few ulps of float32.
    scale = np.max(np.abs(case["logits"].astype(np.float64)), axis=-1, initial=0.0)
    tolerance = 1e-6 * (1.0 + scale[keep])
    gap = loss[keep] - softmax[keep]
    if case["alpha"] == 0 or case["sigma"] == 0:
        assert np.all(np.abs(gap) <= tolerance + 1e-6), info  # Optax's loss, noise or not
    elif negative:
        assert np.all(gap <= tolerance + 1e-6), info  # raising the target lowers the loss
    else:
        assert np.all(gap >= -tolerance - 1e-6), info  # lowering the target raises the loss


def run_case(case, *, noise="annealed", shared_noise=False, negative=False, masked=True):
    outputs = loss_and_gradients(
        case["logits"], case["labels"], case["rng"], np.float32(case["alpha"]),
        np.float32(case["sigma"]), case["amplitude"], case["where"] if masked else None,
        noise=noise, shared_noise=shared_noise, negative=negative)
    check_valid_output(case, outputs, noise=noise, negative=negative, masked=masked)


# Batch shapes with 0 to 3 batch dimensions and 1 to 50 classes.
SHAPES = [((), 1), ((), 50), ((8,), 2), ((8,), 10), ((3, 5), 1), ((3, 5), 50), ((2, 3, 4), 10),
          ((1, 2, 1), 3)]


@st.composite
def inputs_of_any_shape(draw):
    shape, classes = draw(st.sampled_from(SHAPES))
    return draw(valid_inputs(shape, classes))


@examples(300)
@hypothesis.given(case=inputs_of_any_shape())
def test_valid_input_of_any_shape_gives_finite_loss_and_gradients(case):
    run_case(case)


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
LABEL_DTYPES = [np.int32, np.int64, np.uint8]


@st.composite
def inputs_of_any_dtype(draw):
    dtype = draw(st.sampled_from(DTYPES))
    label_dtype = draw(st.sampled_from(LABEL_DTYPES))
    limit = 1e30 if dtype == jnp.float32 else LIMIT[dtype]
    return draw(valid_inputs((4, 6), 10, dtype, label_dtype, limit=limit))


@examples(300)
@hypothesis.given(case=inputs_of_any_dtype())
def test_valid_input_of_any_dtype_gives_finite_loss_and_gradients_in_its_dtype(case):
    # The paper's variant and no mask here; the others are in the variant test.
    run_case(case, masked=False)


@examples(60)
@hypothesis.given(case=valid_inputs((5,), 7), where_given=st.booleans())
def test_every_variant_gives_finite_loss_and_gradients(case, where_given):
    outputs = all_variants(
        case["logits"], case["labels"], case["rng"], np.float32(case["alpha"]),
        np.float32(case["sigma"]), case["amplitude"], case["where"], where_given=where_given)
    for (noise, _, negative), output in outputs.items():
        check_valid_output(case, output, noise=noise, negative=negative, masked=where_given)


@examples(100)
@hypothesis.given(case=valid_inputs((6,), 4, label_dtype=np.int64),
                  as_python=st.booleans())
def test_eager_call_accepts_valid_input_and_agrees_with_jit(case, as_python):
    """Eagerly, the values are checked too: valid ones (NumPy, lists, floats) must pass."""
    convert = (lambda x: x.tolist()) if as_python else (lambda x: x)
    loss = nsj.noisy_softmax_cross_entropy(
        convert(case["logits"]), convert(case["labels"]), case["rng"], case["alpha"],
        amplitude=convert(case["amplitude"]), sigma=case["sigma"], where=convert(case["where"]))
    expected = loss_and_gradients(
        case["logits"], case["labels"].astype(np.int32), case["rng"], np.float32(case["alpha"]),
        np.float32(case["sigma"]), case["amplitude"], case["where"], noise="annealed",
        shared_noise=False, negative=False)[0]
    np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-6, err_msg=str(describe(case)))


# ------------------------------------------------------------------------------ invalid input


def _break_shape(gen, shape):
    """A shape that differs from `shape`: a dimension added, removed or resized."""
    choice = gen.integers(3) if shape else 0
    if choice == 0:
        return shape + (int(gen.integers(1, 4)),)
    if choice == 1:
        return shape[:-1]
    i = int(gen.integers(len(shape)))
    return shape[:i] + (shape[i] + int(gen.integers(1, 3)),) + shape[i + 1:]


def _break_where_shape(gen, shape, logits_shape):
    """A shape that is neither `shape` nor `logits_shape` (a mask per logit is valid too)."""
    broken = _break_shape(gen, shape)
    while broken == logits_shape:
        broken = _break_shape(gen, shape)
    return broken


def pick(gen, options):
    return options[int(gen.integers(len(options)))]


def _bad_label(gen, classes, dtype):
    low, high = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    candidates = [classes, classes + int(gen.integers(0, 1000)), high, -1,
                  -int(gen.integers(1, 1000)), low,
                  # would wrap into the valid range if JAX converted them to int32 first:
                  2**32, 2**32 + int(gen.integers(0, classes)), 2**40]
    return pick(gen, [c for c in candidates if low <= c <= high and not 0 <= c < classes])


# name -> (error type, message regex, function(gen, args) that breaks one argument)
CORRUPTIONS = {
    "integer logits": (TypeError, r"`logits` must be a floating", lambda g, a: a.update(
        logits=a["logits"].astype(pick(g, [np.int32, np.uint8, np.int64])))),
    "bool logits": (TypeError, r"`logits` must be a floating", lambda g, a: a.update(
        logits=a["logits"] > 0)),
    "complex logits": (TypeError, r"`logits` must be a floating", lambda g, a: a.update(
        logits=a["logits"].astype(np.complex64))),
    "string logits": (TypeError, r"`logits` must be", lambda g, a: a.update(
        logits=a["logits"].astype(str))),
    "scalar logits": (ValueError, r"class axis", lambda g, a: a.update(
        logits=np.float32(1.0), labels=np.int32(0))),
    "float labels": (TypeError, r"`labels` must be an integer", lambda g, a: a.update(
        labels=a["labels"].astype(pick(g, [np.float32, np.float16])))),
    "bool labels": (TypeError, r"`labels` must be an integer", lambda g, a: a.update(
        labels=a["labels"] > 0)),
    "labels shape": (ValueError, r"`labels` must have shape logits.shape\[:-1\]",
                     lambda g, a: a.update(labels=np.zeros(
                         _break_shape(g, a["labels"].shape), a["labels"].dtype))),
    "label out of range": (ValueError, r"`labels` must lie in \[0, ", lambda g, a: a.update(
        _with_bad_label(g, a["labels"], a["logits"].shape[-1], a["where"]))),
    "amplitude shape": (ValueError, r"`amplitude` must have one entry per example",
                        lambda g, a: a.update(amplitude=np.ones(
                            _break_shape(g, a["labels"].shape), np.float32))),
    "integer amplitude": (TypeError, r"`amplitude` must be a floating", lambda g, a: a.update(
        amplitude=a["amplitude"].astype(np.int32))),
    "where shape": (ValueError, r"`where` must have one entry per example", lambda g, a: a.update(
        where=np.ones(_break_where_shape(g, a["labels"].shape, a["logits"].shape), bool))),
    "negative alpha": (ValueError, r"`alpha` must be >= 0", lambda g, a: a.update(
        alpha=-pick(g, [1e-30, g.uniform(0, 10), 1e30, np.inf]))),
    "nan alpha": (ValueError, r"`alpha` must be >= 0", lambda g, a: a.update(alpha=np.nan)),
    "infinite alpha": (ValueError, r"`alpha` must be finite", lambda g, a: a.update(
        alpha=pick(g, [np.inf, 1e39]))),  # 1e39 overflows float32 to inf
    "negative sigma": (ValueError, r"`sigma` must be >= 0", lambda g, a: a.update(
        sigma=-pick(g, [1e-30, g.uniform(0, 10), np.inf]))),
    "infinite sigma": (ValueError, r"`sigma` must be finite", lambda g, a: a.update(
        sigma=np.inf)),
    "alpha not scalar": (ValueError, r"`alpha` must be a scalar", lambda g, a: a.update(
        alpha=np.full(_break_shape(g, ()), 0.1, np.float32))),
    "alpha not real": (TypeError, r"`alpha` must be a", lambda g, a: a.update(
        alpha=pick(g, [1j, True, "0.1", None]))),
    "unknown noise": (ValueError, r"`noise` must be one of", lambda g, a: a.update(
        noise=pick(g, ["gaussian", "Annealed", "", "annealed ", "none", "uniform", None]))),
    # Only where noise is drawn: a key and a non-zero alpha (issue 19).
    "missing amplitude": (ValueError, r"needs `amplitude`", lambda g, a: a.update(
        amplitude=None, noise=pick(g, ["annealed", "amplitude"]),
        alpha=pick(g, [1e-30, g.uniform(0.01, 10), 10.0]))),
    # None is no key: no noise (issue 19).
    "rng not a key": (TypeError, r"`rng` must be a JAX PRNG key", lambda g, a: a.update(
        rng=pick(g, [0, 1.5, np.zeros(2, np.float32), np.zeros(2, np.int32)]))),
    "rng wrong shape": (ValueError, r"`rng` must be a single key|legacy key must have shape",
                        lambda g, a: a.update(rng=pick(g, [
                            jax.random.split(jax.random.key(0), 2), np.zeros(3, np.uint32),
                            np.zeros((2, 2), np.uint32)]))),
}
# Shapes and dtypes are static, so these are caught under jit too; values are not (see the
# checked mode below).
STATIC_CORRUPTIONS = ["integer logits", "bool logits", "complex logits", "scalar logits",
                      "float labels", "bool labels", "labels shape", "amplitude shape",
                      "integer amplitude", "where shape", "unknown noise", "missing amplitude"]


def _with_bad_label(gen, labels, classes, where):
    """Labels with one out of range, in an example that `where` keeps (a masked label may be
    anything: padding, issue 19)."""
    labels = labels.astype(pick(gen, [np.int32, np.int64, np.uint8, np.int8, np.uint64]))
    index = int(gen.integers(labels.size))
    labels.flat[index] = _bad_label(gen, classes, labels.dtype)
    if where is None:
        return dict(labels=labels)
    where = where.copy()
    where.flat[index] = True
    return dict(labels=labels, where=where)


@st.composite
def invalid_inputs(draw, corruptions=tuple(CORRUPTIONS)):
    """A valid input with one argument broken; returns (name of the corruption, arguments)."""
    shape, classes = draw(st.sampled_from([((4,), 3), ((2, 3), 5), ((1,), 1), ((2, 2, 2), 50)]))
    case = draw(valid_inputs(shape, classes))
    name = draw(st.sampled_from(corruptions))
    args = dict(logits=case["logits"], labels=case["labels"], rng=case["rng"],
                alpha=case["alpha"], amplitude=case["amplitude"], sigma=case["sigma"],
                where=case["where"] if draw(st.booleans()) else None, noise="annealed")
    CORRUPTIONS[name][2](np.random.default_rng(case["seed"]), args)
    return name, args


def call_loss(args):
    args = dict(args)
    return nsj.noisy_softmax_cross_entropy(
        args.pop("logits"), args.pop("labels"), args.pop("rng"), args.pop("alpha"), **args)


@examples(400)
@hypothesis.given(broken=invalid_inputs(), checked=st.booleans())
def test_invalid_input_always_raises_the_documented_error(broken, checked):
    name, args = broken
    error, match = CORRUPTIONS[name][:2]
    loss = nsj.checked_noisy_softmax_cross_entropy if checked else nsj.noisy_softmax_cross_entropy
    args = dict(args)
    with pytest.raises(error, match=match):
        loss(args.pop("logits"), args.pop("labels"), args.pop("rng"), args.pop("alpha"), **args)


@examples(100)
@hypothesis.given(broken=invalid_inputs(tuple(STATIC_CORRUPTIONS)))
def test_invalid_shapes_and_dtypes_raise_under_jit(broken):
    name, args = broken
    error, match = CORRUPTIONS[name][:2]
    arrays = {k: v for k, v in args.items() if k in ("logits", "labels", "amplitude", "where")}
    static = {k: v for k, v in args.items() if k not in arrays}
    with pytest.raises(error, match=match):
        jax.jit(lambda arrays: call_loss(arrays | static))(arrays)


@jax.jit
def checked_loss(logits, labels, amplitude, alpha, sigma):
    return nsj.checked_noisy_softmax_cross_entropy(
        logits, labels, jax.random.key(0), alpha, amplitude=amplitude, sigma=sigma)


CHECKED_VALUE_ERRORS = {
    "label out of range": r"`labels` must lie in \[0, 5\); found label",
    "negative alpha": r"`alpha` must be >= 0",
    "negative sigma": r"`sigma` must be >= 0",
    "infinite alpha": r"`alpha` must be finite",
    "infinite sigma": r"`sigma` must be finite",
    "non-finite logits": r"`logits` contains NaN or infinity",
    "non-finite amplitude": r"`amplitude` contains NaN or infinity",
}


@examples(100)
@hypothesis.given(case=valid_inputs((3, 4), 5), name=st.sampled_from(sorted(CHECKED_VALUE_ERRORS)))
def test_checked_mode_reports_every_bad_value_under_jit(case, name):
    gen = np.random.default_rng(case["seed"])
    logits, labels = case["logits"].copy(), case["labels"].copy()
    amplitude = case["amplitude"].copy()
    alpha, sigma = np.float32(case["alpha"]), np.float32(case["sigma"])
    index = tuple(int(gen.integers(n)) for n in labels.shape)
    if name == "label out of range":
        labels[index] = gen.choice([-1, 5, 6, 2**31 - 1, -(2**31)])
    elif name == "negative alpha":
        alpha = np.float32(-gen.uniform(1e-6, 10))
    elif name == "negative sigma":
        sigma = np.float32(-gen.uniform(1e-6, 10))
    elif name == "infinite alpha":
        alpha = np.float32(np.inf)
    elif name == "infinite sigma":
        sigma = np.float32(np.inf)
    elif name == "non-finite logits":
        logits[index + (int(gen.integers(5)),)] = gen.choice([np.nan, np.inf, -np.inf])
    else:
        amplitude[index] = gen.choice([np.nan, np.inf, -np.inf])
    error, _ = checked_loss(logits, labels, amplitude, alpha, sigma)
    assert error.get() is not None, describe(case) | dict(name=name)
    with pytest.raises(Exception, match=CHECKED_VALUE_ERRORS[name]):
        error.throw()


@examples(50)
@hypothesis.given(case=valid_inputs((3, 4), 5))
def test_checked_mode_is_silent_on_valid_input_under_jit(case):
    error, loss = checked_loss(case["logits"], case["labels"], case["amplitude"],
                               np.float32(case["alpha"]), np.float32(case["sigma"]))
    assert error.get() is None, describe(case)
    assert np.all(np.isfinite(loss)), describe(case)


def test_narrow_integer_labels_with_many_classes_match_int32_labels():
    # uint8 labels with 300 classes: a comparison with jnp.arange(300, dtype=uint8) would wrap
    # and mark class 261 as the target of label 5 too (the bug this test found, now fixed).
    gen = np.random.default_rng(0)
    logits = gen.standard_normal((4, 300)).astype(np.float32)
    amplitude = np.full((4,), 30.0, np.float32)
    labels = np.array([5, 44, 255, 0], np.uint8)

    def loss_and_grad(labels):
        return jax.value_and_grad(lambda lg: nsj.noisy_softmax_cross_entropy(
            lg, labels, jax.random.key(0), 0.5, amplitude=amplitude).sum())(logits)

    narrow, wide = loss_and_grad(labels), loss_and_grad(labels.astype(np.int32))
    np.testing.assert_allclose(narrow[0], wide[0], rtol=1e-6)
    np.testing.assert_allclose(narrow[1], wide[1], rtol=1e-6, atol=1e-7)
