"""Supervised classification: softmax cross-entropy of a linear head on the pooled features.

The fine-tuning objective (a pretrained backbone plus a new head, `configs/finetune_vit_in1k.py`)
and the supervised baseline of the quality benchmark. Label smoothing as in Szegedy et al. 2016:
the target puts 1 - smoothing + smoothing / C on the label and smoothing / C on every other class.

Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) as MAE's fine-tuning runs them with timm's
`Mixup` in its default "batch" mode: with probability `mix_prob` a batch is mixed with its own
reverse (sample i with sample B-1-i); when both alphas are set, CutMix is chosen with probability
`switch_prob`. Mixup blends the images with lam ~ Beta(mixup_alpha, mixup_alpha); CutMix pastes a
box of the reversed batch, side sqrt(1 - lam) of the image's (lam ~ Beta(cutmix_alpha,
cutmix_alpha)), at a uniformly drawn centre, clipped to the image, and sets lam to the kept area
fraction. Targets are lam * smoothed(y) + (1 - lam) * smoothed(reversed y). The draws come from
the step's "mixup" rng stream, so a resumed run mixes exactly as the uninterrupted one.

`head_init_std` > 0 initialises the head's kernel from normal(std) (MAE: trunc_normal_ with std
2e-5, whose +-2 truncation bounds never act at that scale).

Deviations from MAE / timm: the pairs are taken over the global batch (timm: each GPU's local
batch); the draws use JAX's generator, not NumPy's.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from selfsup.errors import UserError


def smooth_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """labels [B] int -> float32 targets [B, C]: one-hot with label smoothing."""
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return targets * (1.0 - smoothing) + smoothing / num_classes


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Mean cross-entropy; logits [B, C] float, labels [B] int -> scalar."""
    targets = smooth_targets(labels, logits.shape[-1], label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()


def cutmix_box(lam: jax.Array, center: jax.Array, size: tuple[int, int]) -> jax.Array:
    """The CutMix box (top, bottom, left, right), int32 [4], rows top..bottom-1 and columns
    left..right-1: sides floor(size * sqrt(1 - lam)) around `center` (row, col), clipped to the
    image of `size` (H, W)."""
    bounds = []
    for axis in (0, 1):
        n = size[axis]
        cut = jnp.floor(n * jnp.sqrt(1.0 - lam)).astype(jnp.int32)
        low = jnp.clip(center[axis] - cut // 2, 0, n)
        high = jnp.clip(center[axis] + (cut + 1) // 2, 0, n)
        bounds += [low, high]
    return jnp.stack(bounds)


def mix(
    images: jax.Array, targets: jax.Array, lam: jax.Array, use_cutmix: jax.Array, center: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mix a batch with its reverse: images [B, H, W, C], targets [B, C] float ->
    (mixed images, mixed targets). Mixup with weight `lam` on the batch itself, or (`use_cutmix`)
    the reversed batch pasted into `cutmix_box(lam, center, (H, W))`, the targets then weighted by
    the kept area fraction instead of `lam`."""
    h, w = images.shape[1:3]
    top, bottom, left, right = cutmix_box(lam, center, (h, w))
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # [H, W]
    kept = 1.0 - inside.sum() / (h * w)
    flipped = images[::-1]
    cut = jnp.where(inside[None, :, :, None], flipped, images)
    blend = images * lam.astype(images.dtype) + flipped * (1.0 - lam).astype(images.dtype)
    images = jnp.where(use_cutmix, cut, blend)
    weight = jnp.where(use_cutmix, kept, lam).astype(targets.dtype)
    return images, targets * weight + targets[::-1] * (1.0 - weight)


def sample_mix(
    rng: jax.Array,
    size: tuple[int, int],
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    switch_prob: float = 0.5,
    prob: float = 1.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(lam, use_cutmix, center [2]) for one batch, as timm's per-batch draw; lam = 1 (no mixing)
    when the batch is not mixed (probability 1 - prob)."""
    apply, switch, beta_mix, beta_cut, cy, cx = jax.random.split(rng, 6)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(switch, switch_prob)
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mix = jax.random.beta(beta_mix, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
    lam_cut = jax.random.beta(beta_cut, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))
    lam = jnp.where(use_cutmix, lam_cut, lam_mix)
    lam = jnp.where(jax.random.bernoulli(apply, prob), lam, 1.0)
    center = jnp.stack(
        [jax.random.randint(cy, (), 0, size[0]), jax.random.randint(cx, (), 0, size[1])]
    )
    return lam, use_cutmix, center


class Objective(nn.Module):
    """Linear classifier `head` on `backbone(...).pooled`; one view [B, H, W, 3] plus labels [B]."""

    backbone: nn.Module
    num_classes: int = 0  # 0: the training loop fills in the dataset's number of classes
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0: off (MAE fine-tuning: 0.8)
    cutmix_alpha: float = 0.0  # 0: off (MAE fine-tuning: 1.0)
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    head_init_std: float = 0.0  # 0: Flax's default (LeCun normal); MAE fine-tuning: 2e-5
    dtype: Any = jnp.float32

    num_views = 1
    needs_labels = True
    rng_streams = ("dropout", "drop_path", "mixup")

    def __post_init__(self):
        if not 0.0 <= self.label_smoothing < 1.0:
            raise UserError(
                f"supervised: label_smoothing must be in [0, 1), got {self.label_smoothing}"
            )
        for key in ("mixup_alpha", "cutmix_alpha", "head_init_std"):
            if getattr(self, key) < 0:
                raise UserError(f"supervised: {key} must be >= 0, got {getattr(self, key)}")
        for key in ("mix_prob", "switch_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"supervised: {key} must be in [0, 1], got {getattr(self, key)}")
        super().__post_init__()

    @nn.compact
    def __call__(self, views, *, train: bool, labels: jax.Array) -> tuple[jax.Array, dict]:
        if self.num_classes < 1:
            raise UserError("supervised: set config.objective.num_classes (the dataset's classes)")
        images = views[0]
        targets = smooth_targets(labels, self.num_classes, self.label_smoothing)
        if train and (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            if images.shape[0] % 2:
                raise UserError("supervised: mixup/cutmix need an even batch size")
            lam, use_cutmix, center = sample_mix(
                self.make_rng("mixup"),
                images.shape[1:3],
                mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha,
                switch_prob=self.switch_prob,
                prob=self.mix_prob,
            )
            images, targets = mix(images, targets, lam, use_cutmix, center)
        features = self.backbone(images, train=train)
        init = (
            nn.initializers.normal(self.head_init_std)
            if self.head_init_std
            else nn.linear.default_kernel_init
        )
        head = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=init, name="head")
        logits = head(features.pooled)
        loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
        accuracy = (logits.argmax(-1) == labels).mean()
        return loss, {"accuracy": accuracy}
