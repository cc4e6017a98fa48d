"""Vision Transformer (Dosovitskiy et al. 2021) with MAE's fixed 2-D sin-cos position embeddings.

Parameter names and layouts follow timm's `VisionTransformer` (`patch_embed`, `cls_token`,
`blocks_{i}/{norm1,attn/{qkv,proj},norm2,mlp/{fc1,fc2}}`, `norm`), so export to PyTorch is a
key-by-key mapping (exported by selfsup/export/vit.py).
Initialisation follows MAE: xavier-uniform linears with zero bias, the patch embedding
initialised like a linear layer over its flattened [p*p*C, D] view, cls and mask tokens
normal(0.02).

For AIM (El-Nouby et al. 2024, apple/ml-aim): `use_bias=False` drops the biases of the blocks'
linear layers (qkv, proj, fc1, fc2) while the LayerNorms and the patch embedding keep theirs, as
in ml-aim's trunk; mask mode `causal_prefix` gives prefix-causal attention (`prefix_causal_mask`).
Deviation from ml-aim: no LayerNorm on the patch embeddings (ml-aim's `PatchEmbed` has one).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from selfsup.backbones import Features, Mask
from selfsup.errors import UserError
from selfsup.ops import Dense, LayerNorm, attention, gelu

# size -> (width, depth, heads); the MLP is 4x the width.
SIZES = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}
LN_EPS = 1e-6

dense_init = nn.initializers.xavier_uniform()
# The conv kernel [p, p, C, D] is initialised as the linear map [p*p*C, D] (fan_out = D).
patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2))
token_init = nn.initializers.normal(0.02)


def parse_variant(variant: str) -> tuple[int, int, int, int]:
    """'<size>/<patch>' (e.g. 'B/16', 'Ti/4') -> (width, depth, heads, patch)."""
    size, _, patch = variant.partition("/")
    if size not in SIZES or not patch.isdigit() or int(patch) < 1:
        raise UserError(
            f"vit: bad variant '{variant}'; use '<size>/<patch>' with size in "
            f"{', '.join(SIZES)} and a positive integer patch, e.g. 'B/16'"
        )
    return (*SIZES[size], int(patch))


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, float32 [grid_h * grid_w, dim], raster order.

    As in MAE: the first dim/2 channels encode the column (w) index, the last dim/2 the row
    (h) index; each half is [sin(pos * omega), cos(pos * omega)] with
    omega_k = 10000^(-k / (dim/4)), k = 0 .. dim/4 - 1.
    """
    if dim % 4:
        raise UserError(f"vit: sin-cos position embeddings need a width divisible by 4, got {dim}")
    omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")

    def encode(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1, 1).astype(np.float64) * omega
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1).astype(np.float32)


def prefix_causal_mask(num_tokens: int, prefix_len: Any) -> jax.Array:
    """Prefix-causal attention mask (AIM): bool [..., N, N], True = query i may attend to key j.

    Query i may attend to key j when j < prefix (the prefix is seen bidirectionally by every
    token) or j <= i (causal beyond the prefix). prefix_len: int, or int array [B] for one
    prefix per sample (-> [B, N, N]). A prefix of 0 is plain causal attention; N or more is
    full attention.
    """
    prefix = jnp.asarray(prefix_len, jnp.int32)[..., None, None]
    query = jnp.arange(num_tokens)[:, None]
    key = jnp.arange(num_tokens)[None, :]
    return (key < prefix) | (key <= query)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample (rng stream 'drop_path')."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        kept = jax.random.bernoulli(self.make_rng("drop_path"), keep, shape)
        return jnp.where(kept, x / keep, jnp.zeros_like(x))


class Attention(nn.Module):
    """Multi-head self-attention; [B, T, D] -> [B, T, D].

    `qkv` output features are ordered (3, heads, head_dim) as in timm.
    """

    num_heads: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    use_bias: bool = True  # proj bias (qkv has one iff qkv_bias and use_bias)

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, t, d = x.shape
        if d % self.num_heads:
            raise UserError(f"vit: width {d} is not divisible by {self.num_heads} heads")
        qkv_bias = self.qkv_bias and self.use_bias
        qkv = Dense(3 * d, qkv_bias, self.dtype, kernel_init=dense_init, name="qkv")(x)
        # mask: bool broadcastable to [B, heads, T, T], True = may attend.
        out = attention(qkv.reshape(b, t, 3, self.num_heads, d // self.num_heads), mask)
        return Dense(d, self.use_bias, self.dtype, kernel_init=dense_init, name="proj")(
            out.reshape(b, t, d)
        )


class Mlp(nn.Module):
    """fc1 -> exact (erf) GELU -> fc2; [B, T, D] -> [B, T, D]."""

    hidden: int
    dtype: Any = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = Dense(self.hidden, self.use_bias, self.dtype, kernel_init=dense_init, name="fc1")(x)
        x = gelu(x)
        return Dense(d, self.use_bias, self.dtype, kernel_init=dense_init, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block; [B, T, D] -> [B, T, D]."""

    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    drop_path: float = 0.0
    use_bias: bool = True  # biases of the linear layers; the LayerNorms always keep theirs

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        drop = DropPath(self.drop_path)
        y = LayerNorm(LN_EPS, self.dtype, name="norm1")(x)
        attn = Attention(self.num_heads, self.qkv_bias, self.dtype, self.use_bias, name="attn")
        y = attn(y, mask)
        x = x + drop(y, train=train)
        y = LayerNorm(LN_EPS, self.dtype, name="norm2")(x)
        y = Mlp(self.mlp_dim, self.dtype, self.use_bias, name="mlp")(y)
        return x + drop(y, train=train)


class Model(nn.Module):
    """ViT encoder: images [B, H, W, C] -> Features (see `__call__`).

    `variant` is '<size>/<patch>'; `width`, `depth`, `num_heads`, `mlp_dim` override it.
    `drop_path` is the last block's stochastic-depth rate, rising linearly from 0 (timm).
    `use_bias=False` removes the biases of every block's linear layers (AIM's trunk).
    """

    variant: str = "B/16"
    width: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_dim: int | None = None
    cls_token: bool = True
    pool: str = "cls"
    qkv_bias: bool = True
    dtype: Any = jnp.float32
    drop_path: float = 0.0
    use_bias: bool = True

    mask_modes = ("drop", "replace", "causal_prefix")
    mutable = ()  # Flax collections written in training
    rng_streams = ("drop_path",)  # random streams drawn in training

    def __post_init__(self):
        self.dims()  # validates the variant and overrides when the module is built
        if self.pool not in ("cls", "gap"):
            raise UserError(f"vit: pool must be 'cls' or 'gap', got '{self.pool}'")
        if self.pool == "cls" and not self.cls_token:
            raise UserError("vit: pool='cls' needs cls_token=True; set pool='gap' or cls_token")
        if not 0.0 <= self.drop_path < 1.0:
            raise UserError(f"vit: drop_path must be in [0, 1), got {self.drop_path}")
        super().__post_init__()

    def dims(self) -> tuple[int, int, int, int, int]:
        """(width, depth, heads, mlp_dim, patch) after applying the overrides."""
        width, depth, heads, patch = parse_variant(self.variant)
        width = self.width or width
        heads = self.num_heads or heads
        if width % heads:
            raise UserError(f"vit: width {width} is not divisible by num_heads {heads}")
        return width, self.depth or depth, heads, self.mlp_dim or 4 * width, patch

    @property
    def patch_size(self) -> int:
        return self.dims()[4]

    @property
    def embed_dim(self) -> int:
        return self.dims()[0]

    @property
    def num_layers(self) -> int:
        """Layers for layer-wise LR decay (see `layer_id`): depth + 1."""
        return self.dims()[1] + 1

    def layer_id(self, path: str) -> int:
        """Layer of the parameter at `path` (inside the backbone) for layer-wise LR decay, as
        MAE's `lr_decay.py`: patch embedding, cls and mask tokens 0, block i i + 1, the final
        norm `num_layers`."""
        if re.match(r"(patch_embed|cls_token|mask_token|pos_embed)", path):
            return 0
        block = re.match(r"blocks_(\d+)/", path)
        return int(block[1]) + 1 if block else self.num_layers

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False, mask: Mask | None = None
    ) -> Features:
        """images float [B, H, W, C] -> Features.

        tokens: [B, N, D] patch tokens after the final norm, N = (H/p)(W/p), or [B, K, D]
          under mask mode 'drop' (value int32 [B, K], kept indices in raster order).
        mask mode 'replace' (value bool [B, N], True = masked): those patch embeddings become a
          learned mask token before position embeddings are added.
        mask mode 'causal_prefix' (value int [B], the number of prefix patches): attention is
          `prefix_causal_mask` over the sequence; a cls token, if any, is part of the prefix.
          Without a mask attention is full.
        cls: [B, D] or None; pooled: [B, D] (cls, or mean of `tokens` for pool='gap').
        intermediates: {"block_i": [B, T, D]} full sequence (cls first) after block i.
        """
        width, depth, heads, mlp_dim, p = self.dims()
        b, h, w, _ = images.shape
        if h % p or w % p:
            raise UserError(f"vit: image size {h}x{w} is not a multiple of the patch size {p}")
        if mask is not None and mask.mode not in self.mask_modes:
            raise UserError(
                f"vit: mask mode '{mask.mode}' is not supported (supported: "
                f"{', '.join(self.mask_modes)}); use an objective with a supported mode"
            )

        x = nn.Conv(
            width,
            (p, p),
            (p, p),
            "VALID",
            dtype=self.dtype,
            kernel_init=patch_init,
            name="patch_embed",
        )(images.astype(self.dtype))
        x = x.reshape(b, -1, width)  # [B, N, D] raster order
        if mask is not None and mask.mode == "replace":
            mask_token = self.param("mask_token", token_init, (1, 1, width))
            x = jnp.where(mask.value[..., None], mask_token.astype(x.dtype), x)
        x = x + jnp.asarray(sincos_pos_embed(h // p, w // p, width), x.dtype)
        if mask is not None and mask.mode == "drop":
            x = jnp.take_along_axis(x, mask.value[..., None].astype(jnp.int32), axis=1)
        if self.cls_token:
            # The cls position embedding is zero, so the token is prepended as is.
            cls = self.param("cls_token", token_init, (1, 1, width)).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, width)), x], axis=1)

        n_prefix = 1 if self.cls_token else 0
        attn_mask = None
        if mask is not None and mask.mode == "causal_prefix":
            # [B, 1, T, T]: one mask per sample, shared by the heads.
            attn_mask = prefix_causal_mask(x.shape[1], mask.value + n_prefix)[:, None]

        intermediates = {}
        for i in range(depth):
            rate = self.drop_path * i / max(depth - 1, 1)
            block = Block(
                heads, mlp_dim, self.qkv_bias, self.dtype, rate, self.use_bias, name=f"blocks_{i}"
            )
            x = block(x, train=train, mask=attn_mask)
            intermediates[f"block_{i}"] = x
        x = LayerNorm(LN_EPS, self.dtype, name="norm")(x)

        tokens = x[:, n_prefix:]
        cls = x[:, 0] if self.cls_token else None
        pooled = cls if self.pool == "cls" else tokens.mean(axis=1)
        return Features(pooled=pooled, tokens=tokens, cls=cls, intermediates=intermediates)
