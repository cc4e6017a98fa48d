"""AIM: El-Nouby et al. 2024, "Scalable Pre-training of Large Autoregressive Image Models".

Next-patch prediction in raster order: a ViT without a cls token encodes all patches under
prefix-causal attention (backbone mask mode 'causal_prefix'): the first `prefix_len` patches,
drawn per image uniformly in [1, N-1], attend to each other bidirectionally, every later patch
attends causally. An MLP-only head maps each token independently to pixels; output i predicts
patch i+1, and the loss is the MSE against per-patch normalised pixels (eps 1e-6, unbiased
variance), averaged over the targets that are not in the prefix. Downstream use (probes,
fine-tuning) calls the backbone without a mask: full bidirectional attention.

The training code is apple/ml-l3m (configs/aimv1/001_aim_v1_600M.yaml: `RandomRasterMasking`,
`FlexAttnPrefixAttentionMaskBuilder`, `SimpleDecoder`, `RasterPixelLoss`); the released models
are apple/ml-aim. Head details follow l3m: a biased linear projection to the head width, a fixed
2-D sin-cos position embedding added, `head_depth` blocks, a final LayerNorm and a biased
linear layer to p*p*3 pixels; LayerNorm eps 1e-5; linears xavier-uniform (l3m's depth-scaled
init of the output layer is overwritten by its later xavier pass, so xavier is what trains).
Each head block is l3m's transformer block with its attention replaced by an identity and
bias-free MLP linears: x + norm1(x), then x + mlp(norm2(x)). The first residual adds the
normalised stream itself; we keep it, as it is what the official head computes.

Deviations from the official implementation:
- The trunk is selfsup's ViT (`use_bias=False`, no cls token): it has no LayerNorm on the patch
  embeddings (l3m's `PatchEmbed` has one) and its LayerNorms use eps 1e-6, not 1e-5.
- The prefix length is drawn on the device from the "mask" rng stream, not by NumPy in the
  data loader; the distribution is the same.
- Augmentations run on the device (selfsup.augment) after the host stores images at a fixed
  size; configs/aim_vit_in1k.py's warmup starts at 0, not 1e-6.
- Mixed precision is optional bf16 compute with float32 LayerNorm statistics (l3m: bf16 autocast
  with float32 LayerNorms).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.backbones import Mask, check_mask_mode, vit
from selfsup.backbones.vit import prefix_causal_mask
from selfsup.errors import UserError
from selfsup.objectives.mae import patchify, unpatchify
from selfsup.ops import Dense, LayerNorm

__all__ = ["Head", "Objective", "aim_loss", "prefix_causal_mask", "sample_prefix_len"]

NORM_PIX_EPS = 1e-6
HEAD_LN_EPS = 1e-5
CHANNELS = 3


def sample_prefix_len(rng: jax.Array, batch: int, num_patches: int) -> jax.Array:
    """Prefix lengths int32 [B], each uniform in [1, num_patches - 1]."""
    if num_patches < 2:
        raise UserError(f"aim: next-patch prediction needs at least 2 patches, got {num_patches}")
    return jax.random.randint(rng, (batch,), 1, num_patches, jnp.int32)


def normalize_patches(patches: jax.Array) -> jax.Array:
    """Per-patch (x - mean) / sqrt(var + 1e-6) over the last axis, var unbiased (as torch.var)."""
    mean = patches.mean(axis=-1, keepdims=True)
    var = patches.var(axis=-1, keepdims=True, ddof=1)
    return (patches - mean) / jnp.sqrt(var + NORM_PIX_EPS)


def aim_loss(
    pred: jax.Array, target_patches: jax.Array, prefix_len: jax.Array, norm_pix: bool = True
) -> jax.Array:
    """Next-patch MSE; pred, target_patches [B, N, P], prefix_len int [B] -> scalar.

    pred[:, i] predicts target patch i+1 (pred[:, N-1] has no target). Target j counts iff
    j >= prefix_len: the per-patch mean squared error is averaged over those (image, j) pairs
    of the whole batch. With norm_pix, targets are normalised per patch first. No counted
    target (every prefix >= N) gives 0.
    """
    target = target_patches.astype(jnp.float32)
    if norm_pix:
        target = normalize_patches(target)
    per_patch = jnp.mean((pred[:, :-1].astype(jnp.float32) - target[:, 1:]) ** 2, axis=-1)
    j = jnp.arange(1, target.shape[1])
    counted = (j[None, :] >= prefix_len[:, None]).astype(jnp.float32)  # [B, N-1]
    total = counted.sum()
    return (per_patch * counted).sum() / jnp.where(total > 0, total, 1.0)


class HeadBlock(nn.Module):
    """l3m's block with an identity for attention; [B, N, D] -> [B, N, D]."""

    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # l3m keeps the attention residual with GenericIdentity as attention: x + norm1(x).
        x = x + LayerNorm(HEAD_LN_EPS, self.dtype, name="norm1")(x)
        y = LayerNorm(HEAD_LN_EPS, self.dtype, name="norm2")(x)
        return x + vit.Mlp(self.mlp_dim, self.dtype, use_bias=False, name="mlp")(y)


class Head(nn.Module):
    """AIM's pixel head: tokens [B, h*w, D] -> predictions [B, h*w, out_dim], per token."""

    width: int
    depth: int
    out_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, grid: tuple[int, int]) -> jax.Array:
        x = Dense(self.width, dtype=self.dtype, kernel_init=vit.dense_init, name="proj")(x)
        x = x + jnp.asarray(vit.sincos_pos_embed(*grid, self.width), x.dtype)
        for i in range(self.depth):
            x = HeadBlock(4 * self.width, self.dtype, name=f"blocks_{i}")(x)
        x = LayerNorm(HEAD_LN_EPS, self.dtype, name="norm")(x)
        return Dense(self.out_dim, dtype=self.dtype, kernel_init=vit.dense_init, name="pred")(x)


class Objective(nn.Module):
    """AIM around a backbone with mask mode 'causal_prefix'; one view [B, H, W, 3]."""

    backbone: nn.Module
    head_width: int = 2048
    head_depth: int = 12
    norm_pix_loss: bool = True
    dtype: Any = jnp.float32

    num_views = 1
    mutable = ()
    rng_streams = ("mask", "drop_path")

    def __post_init__(self):
        check_mask_mode(self.backbone, "causal_prefix", "aim")
        if self.head_width < 4 or self.head_width % 4:
            raise UserError(
                f"aim: head_width must be a positive multiple of 4 (sin-cos position "
                f"embeddings), got {self.head_width}"
            )
        if self.head_depth < 0:
            raise UserError(f"aim: head_depth must be >= 0, got {self.head_depth}")
        super().__post_init__()

    def setup(self):
        p = self.backbone.patch_size
        self.head = Head(self.head_width, self.head_depth, p * p * CHANNELS, self.dtype)

    def sample_prefix(self, images: jax.Array) -> jax.Array:
        """`sample_prefix_len` for images [B, H, W, 3] with the "mask" rng stream -> int32 [B]."""
        b, h, w, c = images.shape
        if c != CHANNELS:
            raise UserError(f"aim: expects {CHANNELS}-channel images, got {c} channels")
        p = self.backbone.patch_size
        return sample_prefix_len(self.make_rng("mask"), b, (h // p) * (w // p))

    def predict(self, images: jax.Array, prefix_len: jax.Array, train: bool) -> jax.Array:
        """Prefix-causal encoding and the head: -> float32 [B, N, p*p*3]; row i predicts
        patch i+1."""
        _, h, w, _ = images.shape
        p = self.backbone.patch_size
        feats = self.backbone(images, mask=Mask(prefix_len, "causal_prefix"), train=train)
        return self.head(feats.tokens, (h // p, w // p)).astype(jnp.float32)

    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views[0] float [B, H, W, 3] -> (scalar loss, {"loss", "prefix_len"})."""
        images = views[0]
        prefix_len = self.sample_prefix(images)
        pred = self.predict(images, prefix_len, train)
        target = patchify(images.astype(jnp.float32), self.backbone.patch_size)
        loss = aim_loss(pred, target, prefix_len, self.norm_pix_loss)
        return loss, {"loss": loss, "prefix_len": prefix_len.mean()}

    def reconstruct(self, views: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        """Images for logging, each [B, H, W, 3] in the input's (normalised) space.

        masked: the prefix, patches after it set to 0; reconstruction: the prefix from the
        original, then every later patch j as predicted from the patches before it (teacher
        forcing, the training task), de-normalised with patch j's mean and variance when
        `norm_pix_loss`.
        """
        images = views[0].astype(jnp.float32)
        _, h, w, _ = images.shape
        p = self.backbone.patch_size
        prefix_len = self.sample_prefix(images)
        pred = self.predict(images, prefix_len, train=False)
        target = patchify(images, p)
        # Row j of `shifted` is the prediction for patch j (made at position j-1).
        shifted = jnp.concatenate([jnp.zeros_like(pred[:, :1]), pred[:, :-1]], axis=1)
        if self.norm_pix_loss:
            mean = target.mean(axis=-1, keepdims=True)
            var = target.var(axis=-1, keepdims=True, ddof=1)
            shifted = shifted * jnp.sqrt(var + NORM_PIX_EPS) + mean
        after = (jnp.arange(target.shape[1])[None, :] >= prefix_len[:, None])[..., None]
        return {
            "original": images,
            "masked": unpatchify(jnp.where(after, 0.0, target), p, h, w),
            "reconstruction": unpatchify(jnp.where(after, shifted, target), p, h, w),
        }
