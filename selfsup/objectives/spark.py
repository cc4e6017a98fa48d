"""SparK: Tian et al. 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical
Masked Modeling".

A random 60% of the cells of the stride-32 grid is masked; the convnet encodes the image as a
sparse set of kept cells (backbone mask mode 'sparse': masked positions zeroed after every conv,
norm and pool, BatchNorm statistics over kept positions), so no masked pixel reaches a kept
feature. The four stage outputs (strides 32, 16, 8, 4, smallest first) are "densified": each is
normalised over its kept positions (a sparse BatchNorm for ResNet, a per-position LayerNorm for
ConvNeXt), filled at masked positions with a per-level learned mask token, and projected to the
decoder's width at that level (1x1 conv for the smallest map, 3x3 otherwise; the width halves
per level). A light UNet decoder adds each level to its running map, upsamples x2 with a
4x4/2 transposed conv and refines with two 3x3 conv-BN layers, five times (stride 32 -> 1),
then a 1x1 conv gives 3 channels. The loss is the MSE to per-patch normalised pixels (32-px
patches, mean and unbiased variance of each patch, eps 1e-6), averaged over masked patches only.
The target is the image as given to the objective (already normalised by the augmentation).

The official code is keyu-tian/SparK (pretrain/spark.py, decoder.py, encoder.py); details
followed from it: the mask keeps round(cells x (1 - ratio)) cells (Python's round), the first
cells of an argsort of uniform noise per image; the densify norm is 'bn' for ResNets and 'ln'
for ConvNeXts (`densify_norm="auto"`); the smallest level's projection is the identity when the
encoder and decoder widths agree; mask tokens start as normal(0.02) truncated at +-0.02, the
densify projections with PyTorch's default Conv2d init, the decoder's convs normal(0.02) with
zero bias, its transposed convs He-normal over fan_out; the decoder's BatchNorms are ordinary
(dense, synchronised over the global batch: flax under `jit`).

The transposed conv is PyTorch's ConvTranspose2d(kernel 4, stride 2, padding 1), its kernel
[kh, kw, out, in] the PyTorch weight [in, out, kh, kw] transposed (no flip), as flax's
`ConvTranspose` with `transpose_kernel=True` holds it; on CPU it runs as four phase dots
(`selfsup.ops.conv_transpose_4x4_s2`), elsewhere as XLA's transposed conv. The decoder's and
densify projections' convs go through `selfsup.ops.conv_general_dilated`, as the ResNets' do.

Deviations from the official implementation:
- Masks are drawn on the device from the "mask" rng stream (argsort of uniform noise in JAX);
  the distribution (a uniformly random subset of exactly that many cells per image) is the same.
  Non-square images are allowed (the official code assumes square inputs).
- The sparse BatchNorms (the encoder's and the ResNet densify norm) keep flax's biased batch
  variance in their running average; PyTorch keeps the unbiased one.
- Our ResNet has no stochastic depth; the official ResNet-50 pretraining uses timm's
  drop_path_rate 0.05 (0.08-0.15 for deeper ResNets).
- A grid that would keep no cell, or mask none, is a UserError (the official code would divide
  BatchNorm statistics by zero, or train on a zero loss).
- SparK reads only the feature maps, so a backbone's pooled-output parameters (ConvNeXt's
  `head_norm`) get no gradient and stay at their init (scale 1, bias 0); the official
  pretraining ConvNeXt (num_classes=0) has no such norm, and timm's fresh one is the same.
- Reconstructions are made with running BatchNorm statistics (`train=False`); the official
  visualisation runs the model in whatever mode it is in.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.backbones import Mask, check_mask_mode, family
from selfsup.errors import UserError
from selfsup.objectives.mae import patchify, unpatchify
from selfsup.ops import (
    LayerNorm,
    conv_general_dilated,
    conv_transpose_4x4_s2,
    torch_default_init,
)

STRIDE = 32  # the encoder's downsampling = the mask cell = the loss patch
LEVELS = 4  # feature maps at strides 32, 16, 8, 4
NORM_PIX_EPS = 1e-6
LOSS_EPS = 1e-8
BN_EPS = 1e-5
LN_EPS = 1e-6
CHANNELS = 3
DENSIFY_NORMS = ("auto", "bn", "ln", "none")

decoder_init = nn.initializers.normal(0.02)  # timm's trunc_normal_(std=.02) cuts at +-2: ~normal
# PyTorch's kaiming_normal_(mode="fan_out") of a ConvTranspose2d weight [in, out, k, k] uses
# fan_out = in * k * k; flax's kernel is [k, k, out, in], whose last axis is that `in`.
upsample_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def mask_token_init(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
    """normal(0, 0.02) truncated at +-0.02 (= +-1 std), as the official mask tokens."""
    return 0.02 * jax.random.truncated_normal(key, -1.0, 1.0, shape, dtype)


def num_kept(cells: int, mask_ratio: float) -> int:
    """Kept cells per image, counted as the official code: round(cells * (1 - ratio))."""
    return round(cells * (1 - mask_ratio))


def spark_mask(rng: jax.Array, batch: int, rows: int, cols: int, mask_ratio: float) -> jax.Array:
    """Random masks on the stride-32 grid: bool [B, rows, cols], True = masked.

    Each image keeps exactly `num_kept(rows * cols, mask_ratio)` cells: the first ones of an
    argsort of uniform noise, so a uniformly random subset per image.
    """
    cells = rows * cols
    keep = num_kept(cells, mask_ratio)
    if not 0 < keep < cells:
        raise UserError(
            f"spark: mask_ratio {mask_ratio} on a {rows}x{cols} grid of 32-px cells keeps {keep} "
            f"of {cells} cells; use larger images or a mask_ratio that keeps some cells and "
            "masks others"
        )
    noise = jax.random.uniform(rng, (batch, cells))
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # each cell's place in the shuffle
    return (rank >= keep).reshape(batch, rows, cols)


def _norm_patches(images: jax.Array, patch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """images [B, H, W, C] -> (normalised patches, mean, std), patches [B, N, p*p*C]."""
    x = patchify(images.astype(jnp.float32), patch)
    mean = x.mean(axis=-1, keepdims=True)
    std = jnp.sqrt(x.var(axis=-1, keepdims=True, ddof=1) + NORM_PIX_EPS)  # unbiased, as torch
    return (x - mean) / std, mean, std


def spark_loss(pred: jax.Array, images: jax.Array, mask: jax.Array) -> jax.Array:
    """MSE to per-patch normalised pixels, averaged over masked patches; -> scalar float32.

    pred, images: [B, H, W, C] (pred in the normalised-patch space); mask: bool [B, h, w], True =
    masked, one cell per (H/h) x (W/w) patch. Each target patch becomes (x - mean) /
    sqrt(var + 1e-6), var unbiased; the per-patch mean squared error is summed over masked
    patches and divided by their number + 1e-8.
    """
    b, h, w = mask.shape
    patch = images.shape[1] // h
    target, _, _ = _norm_patches(images, patch)
    per_patch = ((patchify(pred.astype(jnp.float32), patch) - target) ** 2).mean(axis=-1)
    masked = mask.reshape(b, h * w).astype(jnp.float32)
    return (per_patch * masked).sum() / (masked.sum() + LOSS_EPS)


def _repeat(cells: jax.Array, rows: int) -> jax.Array:
    """bool [B, h, w] -> [B, rows, rows * w / h, 1]: each cell repeated over its block."""
    f = rows // cells.shape[1]
    return jnp.repeat(jnp.repeat(cells, f, axis=1), f, axis=2)[..., None]


class Densify(nn.Module):
    """One level: norm over kept positions, mask token at masked ones, projection.

    [B, h, w, C] -> [B, h, w, width] (C when `width` is None: identity projection).
    """

    norm: str
    width: int | None
    kernel: int
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kept: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        if self.norm == "bn":  # the official SparseBatchNorm2d: a BN1d over kept positions
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=BN_EPS,
                dtype=self.dtype,
                use_fast_variance=False,
                name="norm",
            )(x, mask=kept)
        elif self.norm == "ln":  # per position over channels: kept positions unaffected by others
            x = LayerNorm(LN_EPS, self.dtype, name="norm")(x)
        token = self.param("mask_token", mask_token_init, (c,)).astype(x.dtype)
        x = jnp.where(kept, x, token)
        if self.width is None:
            return x
        k = self.kernel
        init = torch_default_init(c * k * k)
        return nn.Conv(
            self.width,
            (k, k),
            padding=((k // 2, k // 2),) * 2,
            dtype=self.dtype,
            kernel_init=init,
            bias_init=init,
            conv_general_dilated=conv_general_dilated,
            name="proj",
        )(x)


class Upsample(nn.Module):
    """PyTorch's ConvTranspose2d(k=4, s=2, p=1) with bias: [B, H, W, C] -> [B, 2H, 2W, features].

    The kernel [4, 4, features, C] is PyTorch's weight [C, features, 4, 4] transposed:
    kernel[ky, kx, o, i] = weight[i, o, ky, kx] (`nn.ConvTranspose`'s with `transpose_kernel`);
    computed by `selfsup.ops.conv_transpose_4x4_s2`.
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", upsample_init, (4, 4, self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return conv_transpose_4x4_s2(x, kernel) + bias


class UNetBlock(nn.Module):
    """x2 upsampling then conv3x3-BN-ReLU6-conv3x3-BN: [B, H, W, C] -> [B, 2H, 2W, features]."""

    features: int
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = x.shape[-1]
        x = Upsample(c, self.dtype, name="up")(x)
        for i, out in enumerate((c, self.features), start=1):
            x = nn.Conv(
                out,
                (3, 3),
                padding=((1, 1), (1, 1)),
                use_bias=False,
                dtype=self.dtype,
                kernel_init=decoder_init,
                conv_general_dilated=conv_general_dilated,
                name=f"conv{i}",
            )(x)
            x = nn.BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=BN_EPS,
                dtype=self.dtype,
                use_fast_variance=False,
                name=f"bn{i}",
            )(x)
            if i == 1:
                x = nn.relu6(x)
        return x


class LightDecoder(nn.Module):
    """The UNet decoder: levels (smallest first, level i of width `width` / 2^i) -> [B, H, W, 3].

    Five blocks take stride 32 to stride 1; level i is added before block i.
    """

    width: int
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, levels: list[jax.Array], *, train: bool) -> jax.Array:
        blocks = int(math.log2(STRIDE))
        x = 0.0
        for i in range(blocks):
            if i < len(levels):
                x = x + levels[i]
            x = UNetBlock(
                self.width // 2 ** (i + 1), self.bn_momentum, self.dtype, name=f"blocks_{i}"
            )(x, train=train)
        return nn.Conv(
            CHANNELS,
            (1, 1),
            dtype=self.dtype,
            kernel_init=decoder_init,
            conv_general_dilated=conv_general_dilated,
            name="proj",
        )(x)


class Objective(nn.Module):
    """SparK around a convnet with mask mode 'sparse'; one view [B, H, W, 3], H and W multiples
    of 32.

    `densify_norm`: "bn", "ln", "none", or "auto" ("bn" for ResNets, "ln" for ConvNeXts, as the
    official code). `decoder_width`: the decoder's width at stride 32 (768 in the paper).
    """

    backbone: nn.Module
    mask_ratio: float = 0.6
    decoder_width: int = 768
    densify_norm: str = "auto"
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    num_views = 1
    mutable = ("batch_stats",)
    rng_streams = ("mask", "drop_path")

    def __post_init__(self):
        check_mask_mode(self.backbone, "sparse", "spark")
        if not 0.0 < self.mask_ratio < 1.0:
            raise UserError(f"spark: mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.decoder_width < STRIDE:
            raise UserError(
                f"spark: decoder_width must be at least {STRIDE} (it halves over 5 blocks), "
                f"got {self.decoder_width}"
            )
        if self.densify_norm not in DENSIFY_NORMS:
            raise UserError(
                f"spark: densify_norm must be one of {', '.join(DENSIFY_NORMS)}, got "
                f"'{self.densify_norm}'"
            )
        super().__post_init__()

    def setup(self):
        norm = self.densify_norm
        if norm == "auto":
            norm = {"resnet": "bn", "convnext": "ln"}.get(family(self.backbone), "none")
        self.densify = [
            Densify(
                norm,
                # The official code skips the smallest level's projection when widths agree.
                None
                if i == 0 and self.backbone.embed_dim == self.decoder_width
                else (self.decoder_width // 2**i),
                1 if i == 0 else 3,
                self.bn_momentum,
                self.dtype,
            )
            for i in range(LEVELS)
        ]
        self.decoder = LightDecoder(self.decoder_width, self.bn_momentum, self.dtype)

    def sample_mask(self, images: jax.Array) -> jax.Array:
        """`spark_mask` for images [B, H, W, 3] with the "mask" rng stream -> bool [B, h, w]."""
        b, h, w, c = images.shape
        if c != CHANNELS:
            raise UserError(f"spark: expects {CHANNELS}-channel images, got {c} channels")
        if h % STRIDE or w % STRIDE:
            raise UserError(
                f"spark: image size {h}x{w} is not a multiple of {STRIDE}; change the view size"
            )
        return spark_mask(self.make_rng("mask"), b, h // STRIDE, w // STRIDE, self.mask_ratio)

    def encode(self, images: jax.Array, mask: jax.Array, train: bool) -> tuple[jax.Array, ...]:
        """The sparse encoder: images [B, H, W, 3] zeroed outside the kept cells (mask bool
        [B, h, w], True = masked) -> the backbone's 4 maps, strides 4, 8, 16, 32."""
        kept = _repeat(jnp.logical_not(mask), images.shape[1])
        images = jnp.where(kept, images, jnp.zeros((), images.dtype))
        feats = self.backbone(images, mask=Mask(mask, "sparse"), train=train)
        if len(feats.feature_maps) != LEVELS:
            raise UserError(
                f"spark: the backbone returns {len(feats.feature_maps)} feature maps, needs "
                f"{LEVELS} (strides 4, 8, 16, 32)"
            )
        return feats.feature_maps

    def predict(self, images: jax.Array, mask: jax.Array, train: bool) -> jax.Array:
        """Encode sparsely, densify, decode: -> float32 [B, H, W, 3] (normalised-patch space)."""
        kept = jnp.logical_not(mask)
        levels = []
        for densify, x in zip(
            self.densify, reversed(self.encode(images, mask, train)), strict=True
        ):
            levels.append(densify(x, _repeat(kept, x.shape[1]), train=train))
        return self.decoder(levels, train=train).astype(jnp.float32)

    def __call__(self, views: tuple[jax.Array, ...], *, train: bool) -> tuple[jax.Array, dict]:
        """views[0] float [B, H, W, 3] -> (scalar loss, {"loss", "mask_ratio_actual"})."""
        images = views[0]
        mask = self.sample_mask(images)
        loss = spark_loss(self.predict(images, mask, train), images, mask)
        return loss, {"loss": loss, "mask_ratio_actual": mask.mean()}

    def reconstruct(self, views: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        """Images for logging, each [B, H, W, 3] in the input's (normalised) space.

        masked: the encoder's input (masked cells 0); reconstruction: on masked cells the
        prediction de-normalised with each patch's own mean and std (as the official
        visualisation), the original elsewhere.
        """
        images = views[0].astype(jnp.float32)
        b, h, w, _ = images.shape
        mask = self.sample_mask(images)
        pred = self.predict(images, mask, train=False)
        _, mean, std = _norm_patches(images, STRIDE)
        pred = unpatchify(patchify(pred, STRIDE) * std + mean, STRIDE, h, w)
        masked = _repeat(mask, h)
        return {
            "original": images,
            "masked": jnp.where(masked, 0.0, images),
            "reconstruction": jnp.where(masked, pred, images),
        }
