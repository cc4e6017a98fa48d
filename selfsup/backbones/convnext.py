"""ConvNeXt (Liu et al. 2022, "A ConvNet for the 2020s"), with SparK's sparse masking.

Variants: the paper's tiny/small/base/large and the smaller v1 sizes timm defines (atto, femto,
pico, nano); depths and widths are timm's. Stem: 4x4/4 conv + LayerNorm; stages 2-4 open with
LayerNorm + 2x2/2 conv; a block is depthwise 7x7 conv -> LayerNorm -> Linear (4x) -> exact GELU
-> Linear -> layer scale -> drop path, added to its input. Every LayerNorm normalises the channels
of one position (eps 1e-6). `pooled` is the global average of the last map followed by the
head LayerNorm (timm's `forward_head(pre_logits=True)`).

Parameter names mirror timm's `ConvNeXt` (`stem_0` -> `stem.0`, `stages_1/downsample_1` ->
`stages.1.downsample.1`, `stages_i/blocks_j/{conv_dw,norm,mlp/fc1,mlp/fc2,gamma}`,
`head_norm` -> `head.norm`), so the export (selfsup/export/convnext.py) is a key-by-key mapping.

Mask mode `sparse` follows SparK (Tian et al. 2023, keyu-tian/SparK `encoder.py`): the mask is
a bool grid on the stride-32 cells (True = masked), repeated up to each stage's resolution; the
masked pixels are zeroed, every conv and norm output is zeroed at masked positions, and so is a
block's residual branch, so kept positions never see masked content.

Deviations from the official implementation (facebookresearch/ConvNeXt, SparK):
- Initialisation draws conv and linear weights from normal(0.02): the official
  `trunc_normal_(std=.02)` truncates at +-2 in absolute value (100 std), so it is the same
  distribution.
- Sparse mode also zeroes the depthwise conv's input at masked positions; SparK relies on the
  block input being zero there already (it is, so the outputs agree).
- Under a sparse mask `pooled` averages the kept positions only; SparK's pretraining encoder
  returns the feature maps alone and never pools a masked image.
- timm builds atto..nano with 1x1 convs for the MLP (`conv_mlp`); the math is the same and
  the export reshapes the weights to [out, in, 1, 1].
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.backbones import Features, Mask
from selfsup.backbones.vit import DropPath
from selfsup.errors import UserError
from selfsup.ops import Dense, LayerNorm, gelu

# variant -> (blocks per stage, channels per stage), as in timm's convnext.py.
VARIANTS = {
    "atto": ((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": ((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": ((3, 3, 27, 3), (192, 384, 768, 1536)),
}
# timm builds these with 1x1 convs for the block MLP: the same math, [out, in, 1, 1] weights.
CONV_MLP = ("atto", "femto", "pico", "nano")
LN_EPS = 1e-6
MASK_STRIDE = 32  # the sparse mask's grid: one cell per position of the last stage
KERNEL = 7

weight_init = nn.initializers.normal(0.02)


def layer_norm(dtype: Any, name: str) -> LayerNorm:
    return LayerNorm(LN_EPS, dtype, name=name)


def keep(x: jax.Array, kept: jax.Array | None) -> jax.Array:
    """x [B, H, W, C] with the masked positions zeroed; kept: bool [B, h, w] with H, W
    multiples of h, w (each cell repeated over its H/h x W/w block), or None (nothing masked)."""
    if kept is None:
        return x
    b, h, w, _ = x.shape
    rows, cols = h // kept.shape[1], w // kept.shape[2]
    full = jnp.repeat(jnp.repeat(kept, rows, axis=1), cols, axis=2)
    return jnp.where(full[..., None], x, jnp.zeros((), x.dtype))


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2 over the channels; [..., C] -> [..., C]."""

    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = Dense(self.hidden, dtype=self.dtype, kernel_init=weight_init, name="fc1")(x)
        x = gelu(x)
        return Dense(c, dtype=self.dtype, kernel_init=weight_init, name="fc2")(x)


class Block(nn.Module):
    """ConvNeXt block; [B, H, W, C] -> [B, H, W, C]. `kept` as in `keep`."""

    drop_path: float = 0.0
    layer_scale_init: float | None = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, kept: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        c = x.shape[-1]
        y = nn.Conv(
            c,
            (KERNEL, KERNEL),
            padding=KERNEL // 2,
            feature_group_count=c,
            dtype=self.dtype,
            kernel_init=weight_init,
            name="conv_dw",
        )(keep(x, kept))
        y = layer_norm(self.dtype, "norm")(keep(y, kept))
        y = keep(y, kept)
        y = Mlp(4 * c, self.dtype, name="mlp")(y)
        if self.layer_scale_init is not None:
            init = nn.initializers.constant(self.layer_scale_init)
            y = y * self.param("gamma", init, (c,)).astype(y.dtype)
        y = keep(y, kept)  # the Linears' biases would otherwise fill the masked positions
        return x + DropPath(self.drop_path)(y, train=train)


class Stage(nn.Module):
    """[LayerNorm + 2x2/2 conv] then `len(drop_rates)` blocks; [B, H, W, C'] -> [B, H/2, W/2, C]
    (no downsampling in the first stage, which follows the stem)."""

    dim: int
    downsample: bool
    drop_rates: Sequence[float]
    layer_scale_init: float | None = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, kept: jax.Array | None = None, *, train: bool = False
    ) -> jax.Array:
        if self.downsample:
            x = keep(layer_norm(self.dtype, "downsample_0")(x), kept)
            x = nn.Conv(
                self.dim,
                (2, 2),
                (2, 2),
                "VALID",
                dtype=self.dtype,
                kernel_init=weight_init,
                name="downsample_1",
            )(x)
            x = keep(x, kept)
        for j, rate in enumerate(self.drop_rates):
            x = Block(rate, self.layer_scale_init, self.dtype, name=f"blocks_{j}")(
                x, kept, train=train
            )
        return x


class Model(nn.Module):
    """ConvNeXt encoder: images [B, H, W, C] -> Features (see `__call__`).

    `variant` is one of VARIANTS; `depths` and `dims` (4 ints each) override its blocks and
    channels per stage. `drop_path` is the last block's stochastic-depth rate, rising linearly
    from 0 over all blocks (timm). `layer_scale_init` is the layer scale's initial value; None
    removes it.
    """

    variant: str = "tiny"
    depths: Sequence[int] | None = None
    dims: Sequence[int] | None = None
    drop_path: float = 0.0
    layer_scale_init: float | None = 1e-6
    dtype: Any = jnp.float32

    mask_modes = ("sparse",)
    mutable = ()  # Flax collections written in training
    rng_streams = ("drop_path",)  # random streams drawn in training
    num_layers = 5  # layer-wise LR decay: stem 0, stages 1-4, head norm 5 (see `layer_id`)

    def __post_init__(self):
        self.arch()  # validates the variant and overrides when the module is built
        if not 0.0 <= self.drop_path < 1.0:
            raise UserError(f"convnext: drop_path must be in [0, 1), got {self.drop_path}")
        super().__post_init__()

    def arch(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(depths, dims): blocks and channels of the 4 stages after applying the overrides."""
        if self.variant not in VARIANTS:
            raise UserError(
                f"convnext: unknown variant '{self.variant}'; choose one of {', '.join(VARIANTS)}"
            )
        depths, dims = VARIANTS[self.variant]
        out = []
        for key, given, default in (("depths", self.depths, depths), ("dims", self.dims, dims)):
            value = default if given is None else tuple(given)
            if len(value) != 4 or not all(isinstance(v, int) and v > 0 for v in value):
                raise UserError(f"convnext: {key} must be 4 positive integers, got {given}")
            out.append(value)
        return out[0], out[1]

    @property
    def embed_dim(self) -> int:
        """Channels of `pooled` and of the last feature map."""
        return self.arch()[1][-1]

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of the 4 feature maps (strides 4, 8, 16, 32)."""
        return self.arch()[1]

    def layer_id(self, path: str) -> int:
        """Layer of the parameter at `path` (inside the backbone) for layer-wise LR decay, stage
        by stage: the stem 0, stage s (`stages_{s-1}`) s, the head norm `num_layers`. (The
        official scheme also splits stage 3 into groups of 3 blocks.)"""
        if path.startswith("stem_"):
            return 0
        stage = re.match(r"stages_(\d+)/", path)
        return int(stage[1]) + 1 if stage else self.num_layers

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False, mask: Mask | None = None
    ) -> Features:
        """images float [B, H, W, C] -> Features.

        feature_maps: 4 maps [B, H/s, W/s, dims[i]] at strides s = 4, 8, 16, 32 (sizes floored
          as in timm), also in intermediates as "stage_1".."stage_4".
        pooled: [B, dims[-1]], head LayerNorm of the last map's mean over positions.
        mask mode 'sparse' (value bool [B, H/32, W/32], True = masked; H, W multiples of 32):
          masked positions of every map are zero and `pooled` averages the kept positions.
        """
        depths, dims = self.arch()
        b, h, w, _ = images.shape
        if h < MASK_STRIDE or w < MASK_STRIDE:
            raise UserError(f"convnext: images of {h}x{w} are too small; use at least 32x32")
        kept = None
        if mask is not None:
            if mask.mode not in self.mask_modes:
                raise UserError(
                    f"convnext: mask mode '{mask.mode}' is not supported (supported: "
                    f"{', '.join(self.mask_modes)}); use an objective with a supported mode"
                )
            grid = (b, h // MASK_STRIDE, w // MASK_STRIDE)
            if h % MASK_STRIDE or w % MASK_STRIDE or mask.value.shape != grid:
                raise UserError(
                    f"convnext: a sparse mask needs images with sides a multiple of 32 and a "
                    f"mask of shape {list(grid)}; got images {h}x{w} and mask "
                    f"{list(mask.value.shape)}"
                )
            kept = jnp.logical_not(mask.value.astype(bool))

        x = keep(images.astype(self.dtype), kept)
        x = nn.Conv(
            dims[0],
            (4, 4),
            (4, 4),
            "VALID",
            dtype=self.dtype,
            kernel_init=weight_init,
            name="stem_0",
        )(x)
        x = keep(layer_norm(self.dtype, "stem_1")(keep(x, kept)), kept)

        total, first = sum(depths), 0
        feature_maps, intermediates = [], {}
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            rates = tuple(self.drop_path * (first + j) / max(total - 1, 1) for j in range(depth))
            first += depth
            x = Stage(dim, i > 0, rates, self.layer_scale_init, self.dtype, name=f"stages_{i}")(
                x, kept, train=train
            )
            feature_maps.append(x)
            intermediates[f"stage_{i + 1}"] = x

        if kept is None:
            pooled = x.mean(axis=(1, 2))
        else:
            # The last map is on the mask's grid. Sums in float32: bf16 counts only to 256.
            weights = kept[..., None].astype(jnp.float32)
            count = jnp.maximum(weights.sum(axis=(1, 2)), 1.0)
            pooled = ((x * weights).sum(axis=(1, 2)) / count).astype(x.dtype)
        pooled = layer_norm(self.dtype, "head_norm")(pooled)
        return Features(
            pooled=pooled, feature_maps=tuple(feature_maps), intermediates=intermediates
        )
