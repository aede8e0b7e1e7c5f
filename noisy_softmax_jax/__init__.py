"""Noisy Softmax (Chen, Deng & Du, CVPR 2017) for JAX: the loss, a Flax head, diagnostics."""

from noisy_softmax_jax.amplitude import KERNEL_LAYOUTS, safe_norm, target_amplitude
from noisy_softmax_jax.diagnostics import saturation_metrics, top_class_fraction
from noisy_softmax_jax.head import (
    FusedHeadOutput,
    FusedNoisySoftmaxHead,
    HeadOutput,
    NoisySoftmaxHead,
    head_output,
)
from noisy_softmax_jax.large_class import (
    checked_fused_noisy_softmax_cross_entropy,
    fused_noisy_softmax_cross_entropy,
)
from noisy_softmax_jax.large_class_top_k import fused_top_k
from noisy_softmax_jax.loss import (
    NOISE_VARIANTS,
    checked_noisy_softmax_cross_entropy,
    noisy_logits,
    noisy_softmax_cross_entropy,
    noisy_target_logit,
)
from noisy_softmax_jax.schedules import alpha_schedule

__version__ = "0.1.0"

__all__ = [
    "KERNEL_LAYOUTS",
    "NOISE_VARIANTS",
    "FusedHeadOutput",
    "FusedNoisySoftmaxHead",
    "HeadOutput",
    "NoisySoftmaxHead",
    "alpha_schedule",
    "checked_fused_noisy_softmax_cross_entropy",
    "checked_noisy_softmax_cross_entropy",
    "fused_noisy_softmax_cross_entropy",
    "fused_top_k",
    "head_output",
    "noisy_logits",
    "noisy_softmax_cross_entropy",
    "noisy_target_logit",
    "safe_norm",
    "saturation_metrics",
    "target_amplitude",
    "top_class_fraction",
]
