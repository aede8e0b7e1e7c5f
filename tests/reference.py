"""An independent float64 NumPy reference of the noisy softmax loss (the paper, Eq. 5 and 6)."""

import numpy as np


def noisy_target(target, abs_xi, alpha, amplitude=None, noise="annealed", negative=False):
    target = np.asarray(target, np.float64)
    abs_xi = np.asarray(abs_xi, np.float64)
    if noise == "annealed":
        scale = np.maximum(np.asarray(amplitude, np.float64) - target, 0.0)
    elif noise == "amplitude":
        scale = np.maximum(np.asarray(amplitude, np.float64), 0.0)
    else:
        scale = np.ones_like(target)
    injected = alpha * abs_xi * scale
    return target + injected if negative else target - injected


def noisy_logits(logits, labels, abs_xi, alpha, amplitude=None, noise="annealed",
                 negative=False):
    """The logits in float64 with the target entry (last axis) replaced by its noisy value."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    target = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    noisy = noisy_target(target, abs_xi, alpha, amplitude, noise, negative)
    modified = logits.copy()
    np.put_along_axis(modified, labels[..., None], noisy[..., None], axis=-1)
    return modified


def log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - (np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)) + top)


def noisy_softmax_loss(logits, labels, abs_xi, alpha, amplitude=None, noise="annealed",
                       negative=False):
    """-log softmax of the logits with the target replaced by its noisy value."""
    modified = noisy_logits(logits, labels, abs_xi, alpha, amplitude, noise, negative)
    return -np.take_along_axis(log_softmax(modified), np.asarray(labels)[..., None],
                               axis=-1)[..., 0]


def noisy_softmax_target_gradient(logits, labels, abs_xi, alpha, amplitude=None,
                                  noise="annealed", negative=False):
    """d loss / d logits from the closed form: softmax of the noisy logits, target column
    scaled by d f~_y / d f_y (1 + alpha|xi| for annealed noise, 1 otherwise)."""
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    target = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    probs = np.exp(log_softmax(noisy_logits(logits, labels, abs_xi, alpha, amplitude, noise,
                                            negative)))
    slope = np.ones_like(target)
    if noise == "annealed":
        active = np.asarray(amplitude, np.float64) - target > 0
        sign = -1.0 if negative else 1.0
        slope = np.where(active, 1.0 + sign * alpha * np.asarray(abs_xi), 1.0)
    grad = probs.copy()
    target_prob = np.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]
    np.put_along_axis(grad, labels[..., None], ((target_prob - 1.0) * slope)[..., None], axis=-1)
    return grad


def masked_cross_entropy(logits, labels, where=None):
    """Integer-label cross-entropy in float64 with Optax's ``where``, class axis last.

    A mask of the labels' shape zeroes the masked examples; one of the logits' shape leaves
    the masked classes out of the normalizer (the target logit is subtracted whether or not
    its class is kept), and an example with no class kept gives 0.
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    target = np.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    if where is None or np.ndim(where) == labels.ndim:
        kept_classes = np.ones(logits.shape, bool)
    else:
        kept_classes = np.asarray(where, bool)
    top = np.max(np.where(kept_classes, logits, -np.inf), axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    total = np.sum(np.where(kept_classes, np.exp(logits - top), 0.0), axis=-1)
    with np.errstate(divide="ignore"):
        loss = np.log(total) + top[..., 0] - target
    kept = kept_classes.any(axis=-1)
    if where is not None and np.ndim(where) == labels.ndim:
        kept = kept & np.asarray(where, bool)
    return np.where(kept, loss, 0.0)
