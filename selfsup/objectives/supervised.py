"""Supervised classification: softmax cross-entropy of a linear head on the pooled features.

The fine-tuning objective (a pretrained backbone plus a new head) and the supervised baseline
of the quality benchmark. Label smoothing as in Szegedy et al. 2016: the target puts
1 - smoothing on the label and smoothing / num_classes on every class.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfsup.errors import UserError


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy; logits [B, C] float, labels [B] int -> scalar."""
    num_classes = logits.shape[-1]
    targets = jax.nn.one_hot(labels, num_classes)
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


class Objective(nn.Module):
    """Linear classifier `head` on `backbone(...).pooled`; one view [B, H, W, 3] plus labels [B]."""

    backbone: nn.Module
    num_classes: int = 0  # 0: the training loop fills in the dataset's number of classes
    label_smoothing: float = 0.0
    dtype: Any = jnp.float32

    num_views = 1
    needs_labels = True
    rng_streams = ("dropout", "drop_path")

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(
                f"supervised: label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, views, *, train: bool, labels: jax.Array) -> tuple[jax.Array, dict]:
        if self.num_classes < 1:
            raise UserError("supervised: set config.objective.num_classes (the dataset's classes)")
        features = self.backbone(views[0], train=train)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(features.pooled)
        loss = cross_entropy(logits, labels, self.label_smoothing)
        accuracy = (logits.argmax(-1) == labels).mean()
        return loss, {"accuracy": accuracy}
