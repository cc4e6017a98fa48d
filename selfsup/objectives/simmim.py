"""SimMIM: Xie et al. 2021, "SimMIM: A Simple Framework for Masked Image Modeling".

A random 60% of the cells of a 32-px grid is masked; the encoder sees every patch, the masked
ones replaced by a learned mask token before the position embeddings (backbone mask mode
'replace'). A linear decoder -- a 1x1 convolution to stride^2 x 3 channels followed by a pixel
shuffle (stride = the ViT's patch size) -- regresses the pixels, and the loss is the L1 distance
to the input (as normalised by the augmentation) on masked pixels only, divided by the number
of masked pixels (+1e-5) and by the number of channels. The official code is
microsoft/SimMIM (models/simmim.py, data/data_simmim.py); the mask is drawn as its
`MaskGenerator` does (ceil(ratio x cells) cells, upsampled to the model's patch grid).

The encoder's final LayerNorm: the official ViT pre-training config sets USE_MEAN_POOLING False,
so `VisionTransformer.norm` is a LayerNorm (eps 1e-6) and `VisionTransformerForSimMIM.forward`
applies it to every token before the decoder. We do the same: the decoder reads
`Features.tokens`, which our ViT returns after its final `norm`. (The fine-tuning config
switches to mean pooling, where that norm becomes an identity and a fresh `fc_norm` follows the
pooled features; the paper's linear probe reads block 8 with average pooling, SimMIM#14. Linear
probes on this objective should therefore read an intermediate block, e.g. `block_7`.)

Deviations from the official implementation:
- The backbone is selfsup's ViT: fixed 2-D sin-cos absolute position embeddings, no layer
  scale, xavier-uniform init (MAE's). The official ViT-B config uses a shared relative position
  bias and no absolute embedding, layer scale initialised to 0.1, truncated-normal(0.02) init
  with per-layer rescaling of proj/fc2, and q/v biases without a k bias (a k bias adds the same
  logit to every key of a query, so softmax attention is unchanged: the function class is the
  same).
- The mask token is normal(0.02); the official one is normal(0.02) truncated at +-0.02.
- Masks are drawn on the device from the "mask" rng stream (argsort of uniform noise) instead of
  NumPy in the data loader; the distribution (a uniformly random subset of exactly
  ceil(ratio x cells) cells per image) is the same.
- Random resized crop and flip run on the device (selfsup.augment), after the host stores
  images at a fixed size; mixed precision is optional bf16 compute, not apex O1 fp16.
- The ViT-B recipe's multi-step schedule (x0.1 at epoch 700 of 800) and its warmup from 5e-7
  are not available in selfsup.optim: see configs/simmim_vit_in1k.py.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.backbones import Mask, check_mask_mode
from selfsup.errors import UserError
from selfsup.ops import torch_default_init

LOSS_EPS = 1e-5
CHANNELS = 3


def simmim_mask(
    rng: jax.Array,
    batch: int,
    image_size: int | tuple[int, int],
    mask_patch: int,
    model_patch: int,
    ratio: float,
) -> jax.Array:
    """Random masks on the `mask_patch` grid, upsampled to the model's patch grid.

    Each image gets exactly ceil(ratio x cells) masked cells (cells = (H/mask_patch)(W/mask_patch)),
    a uniformly random subset per image. Returns bool [B, H/model_patch, W/model_patch], True =
    masked; each masked cell covers a (mask_patch/model_patch)^2 block of model patches.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if h % mask_patch or w % mask_patch:
        raise UserError(
            f"simmim: image size {h}x{w} is not a multiple of mask_patch_size {mask_patch}; "
            "change the view size or config.objective.mask_patch_size"
        )
    if mask_patch % model_patch:
        raise UserError(
            f"simmim: mask_patch_size {mask_patch} is not a multiple of the backbone's patch "
            f"size {model_patch}; pick a mask patch that is"
        )
    rows, cols = h // mask_patch, w // mask_patch
    cells = rows * cols
    # The official MaskGenerator's count, float expression included: int(np.ceil(cells * ratio)).
    count = int(math.ceil(cells * ratio))
    noise = jax.random.uniform(rng, (batch, cells))
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # a random permutation per image
    masked = (rank < count).reshape(batch, rows, cols)
    scale = mask_patch // model_patch
    return masked.repeat(scale, axis=1).repeat(scale, axis=2)


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
    """[B, h, w, C*r*r] -> [B, h*r, w*r, C] with r = factor, channels ordered as PyTorch's
    `PixelShuffle`: out[b, y*r + i, x*r + j, c] = in[b, y, x, c*r*r + i*r + j]."""
    b, h, w, d = x.shape
    r = factor
    c = d // (r * r)
    x = x.reshape(b, h, w, c, r, r)
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(b, h * r, w * r, c)


def simmim_loss(pred: jax.Array, images: jax.Array, pixel_mask: jax.Array) -> jax.Array:
    """L1 on masked pixels; pred, images float [B, H, W, C], pixel_mask [B, H, W] (1 = masked).

    sum(|pred - images| * mask) / (sum(mask) + 1e-5) / C, as the official loss: the mask sum
    counts pixels, not pixel-channels, hence the division by C.
    """
    mask = pixel_mask.astype(jnp.float32)
    l1 = jnp.abs(pred.astype(jnp.float32) - images.astype(jnp.float32))
    return (l1 * mask[..., None]).sum() / (mask.sum() + LOSS_EPS) / images.shape[-1]


class Objective(nn.Module):
    """SimMIM around a backbone with mask mode 'replace'; one view [B, H, W, 3]."""

    backbone: nn.Module
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    dtype: Any = jnp.float32

    num_views = 1
    mutable = ()
    rng_streams = ("mask", "drop_path")

    def __post_init__(self):
        check_mask_mode(self.backbone, "replace", "simmim")
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"simmim: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        patch = self.backbone.patch_size
        if self.mask_patch_size < 1 or self.mask_patch_size % patch:
            raise UserError(
                f"simmim: mask_patch_size {self.mask_patch_size} must be a positive multiple of "
                f"the backbone's patch size {patch}"
            )
        super().__post_init__()

    def setup(self):
        stride = self.backbone.patch_size
        # The official decoder has no init of its own: PyTorch's Conv2d default (fan_in = width).
        init = torch_default_init(self.backbone.embed_dim)
        self.decoder = nn.Conv(
            stride * stride * CHANNELS,
            (1, 1),
            dtype=self.dtype,
            kernel_init=init,
            bias_init=init,
        )

    def sample_mask(self, images: jax.Array) -> jax.Array:
        """`simmim_mask` for images [B, H, W, 3] with the "mask" rng stream -> bool [B, h, w]."""
        b, h, w, c = images.shape
        if c != CHANNELS:
            raise UserError(f"simmim: expects {CHANNELS}-channel images, got {c} channels")
        return simmim_mask(
            self.make_rng("mask"),
            b,
            (h, w),
            self.mask_patch_size,
            self.backbone.patch_size,
            self.mask_ratio,
        )

    def predict(self, images: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        """Encode every patch (mask bool [B, h, w] -> mask token) and decode pixels:
        -> float32 [B, H, W, 3]."""
        b, gh, gw = mask.shape
        feats = self.backbone(images, mask=Mask(mask.reshape(b, gh * gw), "replace"), train=train)
        x = feats.tokens.reshape(b, gh, gw, -1)  # [B, h, w, D] after the final LayerNorm
        x = self.decoder(x)  # [B, h, w, p*p*3]
        return pixel_shuffle(x, self.backbone.patch_size).astype(jnp.float32)

    def pixel_mask(self, mask: jax.Array) -> jax.Array:
        """Patch mask bool [B, h, w] -> pixel mask bool [B, h*p, w*p]."""
        p = self.backbone.patch_size
        return mask.repeat(p, axis=1).repeat(p, axis=2)

    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views[0] float [B, H, W, 3] -> (scalar loss, {"loss", "mask_ratio_actual"})."""
        images = views[0]
        mask = self.sample_mask(images)
        pred = self.predict(images, mask, train)
        pixels = self.pixel_mask(mask)
        loss = simmim_loss(pred, images, pixels)
        return loss, {"loss": loss, "mask_ratio_actual": pixels.mean()}

    def reconstruct(self, views: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        """Images for logging, each [B, H, W, 3] in the input's (normalised) space.

        masked: masked pixels set to 0; reconstruction: the prediction on masked pixels, the
        original elsewhere.
        """
        images = views[0].astype(jnp.float32)
        mask = self.sample_mask(images)
        pred = self.predict(images, mask, train=False)
        masked = self.pixel_mask(mask)[..., None]
        return {
            "original": images,
            "masked": jnp.where(masked, 0.0, images),
            "reconstruction": jnp.where(masked, pred, images),
        }
