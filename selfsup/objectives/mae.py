"""MAE: He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners".

The encoder sees only a random subset of patches (backbone mask mode 'drop'); a light decoder
gets the encoded tokens plus a shared mask token at every removed position, in raster order
with fixed sin-cos position embeddings, and predicts the removed patches' pixels. The loss is
the MSE on removed patches only, against per-patch normalised pixels (`norm_pix_loss`).
The target is the images exactly as given to the objective (already normalised by the
augmentation), as in the official code (facebookresearch/mae, models_mae.py).

Deviations from the official implementation:
- mask_ratio 0 gives a loss of 0 where the official code divides 0 by 0 (NaN).
- Random resized crop and flip run on the device in JAX (selfsup.augment); the resampling
  matches torchvision's antialiased resize to ~2e-5, the sampled boxes follow the same rule.
- Mixed precision is optional bf16 compute (`compute_dtype`), not fp16 with loss scaling.
- Weight decay exclusions are regexes (biases, norms, position embeddings, tokens); the
  official code excludes every 1-D parameter plus pos_embed / cls_token / mask_token: the same
  set for this model.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.backbones import Mask, check_mask_mode, vit
from selfsup.errors import UserError
from selfsup.ops import Dense, LayerNorm

NORM_PIX_EPS = 1e-6
CHANNELS = 3


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, p*p*C]; N = (H/p)(W/p) in raster order, pixels ordered (p, q, c)."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, height: int, width: int) -> jax.Array:
    """Inverse of `patchify`: [B, N, p*p*C] -> [B, height, width, C]."""
    b, _, dim = patches.shape
    p = patch_size
    c = dim // (p * p)
    x = patches.reshape(b, height // p, width // p, p, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, height, width, c)


def random_masking(
    rng: jax.Array, batch: int, num_patches: int, mask_ratio: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-sample random masking by argsort of uniform noise.

    Returns ids_keep int32 [B, K] (K = int(N * (1 - mask_ratio)), the first K of each sample's
    shuffle, in shuffle order), mask float32 [B, N] (1 = removed, 0 = kept) and ids_restore
    int32 [B, N] = argsort(ids_shuffle), which puts shuffled tokens back in raster order.
    """
    keep = int(num_patches * (1 - mask_ratio))
    noise = jax.random.uniform(rng, (batch, num_patches))
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
    # A patch is removed iff its rank in the shuffle is >= K.
    mask = (ids_restore >= keep).astype(jnp.float32)
    return ids_shuffle[:, :keep], mask, ids_restore


def mae_loss(
    pred: jax.Array, target_patches: jax.Array, mask: jax.Array, norm_pix: bool = True
) -> jax.Array:
    """Mean over removed patches of the per-patch MSE; pred, target [B, N, P], mask [B, N] -> [].

    norm_pix: each target patch becomes (x - mean) / sqrt(var + 1e-6), var unbiased (N - 1).
    With no removed patch (mask_ratio 0) the loss is 0.
    """
    target = target_patches
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + NORM_PIX_EPS)
    per_patch = jnp.mean((pred - target) ** 2, axis=-1)
    total = mask.sum()
    return (per_patch * mask).sum() / jnp.where(total > 0, total, 1.0)


class Objective(nn.Module):
    """MAE around a backbone with mask mode 'drop'; one view [B, H, W, 3]."""

    backbone: nn.Module
    mask_ratio: float = 0.75
    decoder_width: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    dtype: Any = jnp.float32

    num_views = 1
    mutable = ()
    # drop_path is only drawn when the backbone sets drop_path > 0.
    rng_streams = ("mask", "drop_path")

    def __post_init__(self):
        check_mask_mode(self.backbone, "drop", "mae")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"mae: mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.decoder_width % self.decoder_heads:
            raise UserError(
                f"mae: decoder_width {self.decoder_width} is not divisible by "
                f"decoder_heads {self.decoder_heads}"
            )
        super().__post_init__()

    def setup(self):
        p = self.backbone.patch_size
        d = self.decoder_width
        self.decoder_embed = Dense(d, dtype=self.dtype, kernel_init=vit.dense_init)
        self.mask_token = self.param("mask_token", vit.token_init, (1, 1, d))
        self.decoder_blocks = [
            vit.Block(self.decoder_heads, 4 * d, True, self.dtype)
            for _ in range(self.decoder_depth)
        ]
        self.decoder_norm = LayerNorm(vit.LN_EPS, self.dtype)
        self.decoder_pred = Dense(p * p * CHANNELS, dtype=self.dtype, kernel_init=vit.dense_init)

    def sample_mask(self, images: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`random_masking` for images [B, H, W, 3] with the "mask" rng stream."""
        b, h, w, c = images.shape
        p = self.backbone.patch_size
        if c != CHANNELS:
            raise UserError(f"mae: expects {CHANNELS}-channel images, got {c} channels")
        return random_masking(self.make_rng("mask"), b, (h // p) * (w // p), self.mask_ratio)

    def predict(
        self, images: jax.Array, ids_keep: jax.Array, ids_restore: jax.Array, train: bool
    ) -> jax.Array:
        """Encode the kept patches (ids_keep [B, K]) and decode all: -> float32 [B, N, p*p*3]."""
        b, h, w, _ = images.shape
        p = self.backbone.patch_size
        feats = self.backbone(images, mask=Mask(ids_keep, "drop"), train=train)
        x = feats.tokens
        prefix = 0 if feats.cls is None else 1
        if prefix:
            x = jnp.concatenate([feats.cls[:, None], x], axis=1)
        x = self.decoder_embed(x)  # [B, prefix + K, d]
        front, x = x[:, :prefix], x[:, prefix:]
        n, d = ids_restore.shape[1], self.decoder_width
        masks = jnp.broadcast_to(self.mask_token.astype(x.dtype), (b, n - x.shape[1], d))
        x = jnp.concatenate([x, masks], axis=1)  # [B, N, d] in shuffle order
        x = jnp.take_along_axis(x, ids_restore[..., None], axis=1)  # [B, N, d] raster order
        # The cls token's decoder position embedding is zero.
        x = x + jnp.asarray(vit.sincos_pos_embed(h // p, w // p, d), x.dtype)
        x = jnp.concatenate([front, x], axis=1)
        for block in self.decoder_blocks:
            x = block(x, train=train)
        x = self.decoder_pred(self.decoder_norm(x))[:, prefix:]
        return x.astype(jnp.float32)

    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views[0] float [B, H, W, 3] -> (scalar loss, {"loss", "mask_ratio_actual"})."""
        images = views[0]
        ids_keep, mask, ids_restore = self.sample_mask(images)
        pred = self.predict(images, ids_keep, ids_restore, train)
        target = patchify(images.astype(jnp.float32), self.backbone.patch_size)
        loss = mae_loss(pred, target, mask, self.norm_pix_loss)
        return loss, {"loss": loss, "mask_ratio_actual": mask.mean()}

    def reconstruct(self, views: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        """Images for logging, each [B, H, W, 3] in the input's (normalised) space.

        masked: removed patches set to 0; reconstruction: visible patches from the original,
        predictions elsewhere, de-normalised with each target patch's mean and variance when
        `norm_pix_loss`.
        """
        images = views[0].astype(jnp.float32)
        _, h, w, _ = images.shape
        p = self.backbone.patch_size
        ids_keep, mask, ids_restore = self.sample_mask(images)
        pred = self.predict(images, ids_keep, ids_restore, train=False)
        target = patchify(images, p)
        if self.norm_pix_loss:
            mean = target.mean(axis=-1, keepdims=True)
            var = target.var(axis=-1, keepdims=True, ddof=1)
            pred = pred * jnp.sqrt(var + NORM_PIX_EPS) + mean
        removed = mask[..., None] > 0
        return {
            "original": images,
            "masked": unpatchify(jnp.where(removed, 0.0, target), p, h, w),
            "reconstruction": unpatchify(jnp.where(removed, pred, target), p, h, w),
        }
