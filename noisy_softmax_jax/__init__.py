"""Noisy Softmax (Chen, Deng & Du, CVPR 2017) for JAX: the loss, a Flax head, diagnostics."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from noisy_softmax_jax.amplitude import KERNEL_LAYOUTS, safe_norm, target_amplitude
from noisy_softmax_jax.dense import NoisySoftmaxDense
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
from noisy_softmax_jax.margins import MARGINS, class_cosines, margin_logits
from noisy_softmax_jax.schedules import alpha_schedule

if TYPE_CHECKING:
    from noisy_softmax_jax import nnx as nnx  # loaded on first use, by __getattr__

__version__ = "0.1.0"

__all__ = [
    "KERNEL_LAYOUTS",
    "MARGINS",
    "NOISE_VARIANTS",
    "FusedHeadOutput",
    "FusedNoisySoftmaxHead",
    "HeadOutput",
    "NoisySoftmaxDense",
    "NoisySoftmaxHead",
    "alpha_schedule",
    "checked_fused_noisy_softmax_cross_entropy",
    "checked_noisy_softmax_cross_entropy",
    "class_cosines",
    "fused_noisy_softmax_cross_entropy",
    "fused_top_k",
    "head_output",
    "margin_logits",
    "noisy_logits",
    "noisy_softmax_cross_entropy",
    "noisy_target_logit",
    "safe_norm",
    "saturation_metrics",
    "target_amplitude",
    "top_class_fraction",
]


def __getattr__(name: str) -> ModuleType:
    # The Flax NNX heads, `noisy_softmax_jax.nnx`, load on first use: flax.nnx adds about a
    # fifth to the package's import time (python -X importtime), which Linen and plain-JAX
    # users would pay for nothing.
    if name == "nnx":
        return importlib.import_module("noisy_softmax_jax.nnx")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "nnx"])
