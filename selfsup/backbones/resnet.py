"""ResNet v1.5 (He et al. 2016) with SimCLR's width multiplier and SimCLRv2's selective kernels.

Variants are '<depth>[x<width>][-sk]': depth 18/34 (basic blocks) or 50/101/152/200 (bottleneck,
stride on the 3x3 conv: "v1.5"), width multiplier 1-4 applied to every channel count, stem
included (SimCLR), and '-sk' for SimCLRv2's selective-kernel bottleneck with sk_ratio 0.0625,
which (as in SimCLRv2's official tf2 `resnet.py`) also turns on the ResNet-D projection shortcut
(2x2 average pool, then a stride-1 1x1 conv) and the 3-conv deep stem (3x3 convs with 32w, 32w
and 64w channels, the first of stride 2).

The selective-kernel unit follows that code, not the SKNet paper: ONE 3x3 conv with 2C outputs
(both branches 3x3, no dilation), BN-ReLU, split into two branches; their sum is averaged over
space, mapped by a 1x1 conv to max(C * sk_ratio, 32) channels, BN-ReLU, a 1x1 conv to 2C, and a
softmax over the two branches weights their sum. Basic blocks keep plain 3x3 convs under '-sk'
(the official code adds the selective kernel to bottlenecks only).

Padding is explicit and symmetric, equal to PyTorch's: every k x k conv pads (k - 1) / 2 (but
the CIFAR stem's), the stem max-pool is k=3, s=2, p=1 with -inf padding. Parameter names mirror
torchvision's (`conv1`, `bn1`, `layer{s}_{i}/conv1`, `downsample_conv`), so the export
(selfsup/export/resnet.py) is a key-by-key mapping; initialisation follows torchvision
(He-normal fan_out convs, BN scale 1 and bias 0).

`cifar_stem=True` is solo-learn's CIFAR setting (its `methods/base.py`, which lightly's CIFAR
benchmarks share): the stem is one 3x3 stride-1 conv with padding 2 (as theirs, so a 32-px image
gives 34 x 34 maps) + BN-ReLU, and no max-pool; the stages then sit at strides 1, 2, 4, 8
(SimCLR's TF CIFAR stem pads 1 instead). `blocks` and `channels` shrink a variant for tests and
CPU runs: blocks per stage (4 ints) and the stem's base channel count (64 in every paper, times
the variant's width; stage s has `channels x width x 2^s` planes).

Mask mode 'sparse' follows SparK (Tian et al. 2023): the image and every feature map are zeroed
at masked positions after every conv, norm and pooling, BatchNorm statistics are taken over kept
positions only, and global averages (the pooled output, the SK unit's mixing) over kept
positions only.

The ResNet-D shortcut pools as the official code does: stride 1 averages each 2x2 window's
in-bounds cells (TF 'SAME'); stride 2 zero-pads one row/column after, then takes 2x2 'VALID'
averages (a plain 2x2 pool on even sizes).

Deviations from SimCLR's official tf2 code, all to match torchvision (the export target): the
stem max-pool pads 1 on each side instead of TF's 'SAME' (0 before, 1 after on even sizes); a
projection shortcut exists only where the shape changes (the official code also adds one to
ResNet-18/34's first block); convs start He-normal over fan_out instead of TF's default
VarianceScaling (truncated normal over fan_in); the last BN of each block is zero-initialised
only with `zero_init_last_bn=True` (always in the official code). From PyTorch: the BatchNorm
(`selfsup.ops.BatchNorm`, as flax's) keeps the biased batch variance in its running average where
PyTorch keeps the unbiased one (a factor n/(n-1), n = positions per channel in the batch).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from selfsup.backbones import Features, Mask
from selfsup.errors import UserError
from selfsup.ops import BatchNorm, conv_general_dilated, max_pool

# depth -> (bottleneck?, blocks per stage)
DEPTHS = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
    200: (True, (3, 24, 36, 3)),
}
WIDTHS = (1, 2, 3, 4)
SK_RATIO = 0.0625
SK_MIN_DIM = 32
BN_EPS = 1e-5
_VARIANT = re.compile(r"(\d+)(?:x(\d+))?(-sk)?")

# He et al. 2015 normal init over fan_out, as torchvision's ResNet.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def parse_variant(variant: str) -> tuple[int, int, bool]:
    """'<depth>[x<width>][-sk]' (e.g. '50', '50x2', '152x3-sk') -> (depth, width, sk)."""
    m = _VARIANT.fullmatch(str(variant))
    depth = int(m[1]) if m else 0
    width = int(m[2] or 1) if m else 0
    if depth not in DEPTHS or width not in WIDTHS:
        raise UserError(
            f"resnet: bad variant '{variant}'; use '<depth>[x<width>][-sk]' with depth in "
            f"{', '.join(map(str, DEPTHS))} and width in {', '.join(map(str, WIDTHS))}, "
            "e.g. '50', '50x2', '152x3-sk'"
        )
    return depth, width, bool(m[3])


def sk_mid_dim(channels: int) -> int:
    """Channels of the selective-kernel unit's squeeze layer."""
    return max(int(channels * SK_RATIO), SK_MIN_DIM)


# ---------------------------------------------------------------- sparse (SparK) helpers
# `keep` is the stride-32 keep mask, bool [B, h, w] (True = kept), or None without a mask.


def _keep_at(keep: jax.Array, x: jax.Array) -> jax.Array:
    """The keep mask repeated to x's resolution: [B, h, w] -> [B, H, W, 1]."""
    fh, fw = x.shape[1] // keep.shape[1], x.shape[2] // keep.shape[2]
    return jnp.repeat(jnp.repeat(keep, fh, axis=1), fw, axis=2)[..., None]


def _masked(x: jax.Array, keep: jax.Array | None) -> jax.Array:
    """x with masked positions set to zero."""
    return x if keep is None else jnp.where(_keep_at(keep, x), x, jnp.zeros((), x.dtype))


def _spatial_mean(x: jax.Array, keep: jax.Array | None) -> jax.Array:
    """Mean over kept positions, accumulated in float32: [B, H, W, C] -> [B, C] (0 for a fully
    masked sample)."""
    x32 = x.astype(jnp.float32)
    if keep is None:
        return x32.mean(axis=(1, 2)).astype(x.dtype)
    k = _keep_at(keep, x).astype(jnp.float32)
    return ((x32 * k).sum(axis=(1, 2)) / jnp.maximum(k.sum(axis=(1, 2)), 1)).astype(x.dtype)


# ---------------------------------------------------------------- layers


class _Layers(nn.Module):
    """Shared fields and the conv / norm helpers of the modules below."""

    bn_momentum: float = 0.9
    dtype: Any = jnp.float32

    def conv(
        self, x, features: int, k: int, stride: int, name: str, keep=None, pad: int | None = None
    ) -> jax.Array:
        """k x k conv, symmetric padding `pad` (default PyTorch's (k - 1) / 2), no bias; masked
        after."""
        p = (k - 1) // 2 if pad is None else pad
        conv = nn.Conv(
            features,
            (k, k),
            (stride, stride),
            padding=((p, p), (p, p)),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=conv_init,
            conv_general_dilated=conv_general_dilated,
            name=name,
        )
        return _masked(conv(x), keep)

    def norm(
        self, x, name: str, train: bool, keep=None, zero_init: bool = False, relu: bool = False
    ) -> jax.Array:
        """BatchNorm (then ReLU if `relu`); statistics over kept positions only (training),
        masked after."""
        bn = BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=BN_EPS,
            dtype=self.dtype,
            relu=relu,
            scale_init=nn.initializers.zeros if zero_init else nn.initializers.ones,
            name=name,
        )
        return _masked(bn(x, mask=None if keep is None else _keep_at(keep, x)), keep)

    def conv_bn_relu(self, x, features, k, stride, conv, bn, train, keep=None) -> jax.Array:
        x = self.conv(x, features, k, stride, conv, keep)
        return self.norm(x, bn, train, keep, relu=True)


class SelectiveKernel(_Layers):
    """SimCLRv2's selective-kernel 3x3 unit (conv + BN-ReLU included): [B, H, W, Cin] ->
    [B, H / stride, W / stride, channels]."""

    channels: int = 64
    stride: int = 1

    @nn.compact
    def __call__(self, x, *, train: bool, keep=None) -> jax.Array:
        c = self.channels
        y = self.conv_bn_relu(x, 2 * c, 3, self.stride, "conv", "bn", train, keep)
        branches = jnp.stack([y[..., :c], y[..., c:]])  # [2, B, H, W, C]
        pooled = _spatial_mean(branches.sum(0), keep)[:, None, None]  # [B, 1, 1, C]
        z = self.conv_bn_relu(pooled, sk_mid_dim(c), 1, 1, "fc1", "fc_bn", train)
        logits = self.conv(z, 2 * c, 1, 1, "fc2")  # [B, 1, 1, 2C]
        weights = jax.nn.softmax(jnp.stack([logits[..., :c], logits[..., c:]]), axis=0)
        return (branches * weights).sum(0)


class Block(_Layers):
    """Residual block (basic or v1.5 bottleneck): [B, H, W, Cin] -> [B, H/s, W/s, Cout],
    Cout = planes (basic) or 4 planes (bottleneck)."""

    planes: int = 64
    stride: int = 1
    bottleneck: bool = True
    sk: bool = False
    zero_init_last_bn: bool = False

    @nn.compact
    def __call__(self, x, *, train: bool, keep=None) -> jax.Array:
        p, s = self.planes, self.stride
        out_channels = 4 * p if self.bottleneck else p
        if self.bottleneck:
            y = self.conv_bn_relu(x, p, 1, 1, "conv1", "bn1", train, keep)
            if self.sk:
                y = SelectiveKernel(self.bn_momentum, self.dtype, p, s, name="conv2")(
                    y, train=train, keep=keep
                )
            else:
                y = self.conv_bn_relu(y, p, 3, s, "conv2", "bn2", train, keep)
            y = self.conv(y, out_channels, 1, 1, "conv3", keep)
            y = self.norm(y, "bn3", train, keep, self.zero_init_last_bn)
        else:
            y = self.conv_bn_relu(x, p, 3, s, "conv1", "bn1", train, keep)
            y = self.conv(y, p, 3, 1, "conv2", keep)
            y = self.norm(y, "bn2", train, keep, self.zero_init_last_bn)

        shortcut = x
        if s != 1 or x.shape[-1] != out_channels:
            if self.sk:  # ResNet-D: average-pool, then a stride-1 projection
                shortcut = _masked(resnet_d_pool(x, s), keep)
                s = 1
            shortcut = self.conv(shortcut, out_channels, 1, s, "downsample_conv", keep)
            shortcut = self.norm(shortcut, "downsample_bn", train, keep)
        return nn.relu(y + shortcut)


def resnet_d_pool(x: jax.Array, stride: int) -> jax.Array:
    """The ResNet-D shortcut's 2x2 average pool as in SimCLRv2's TF code: stride 1 averages the
    in-bounds cells of each window (TF 'SAME'); stride 2 zero-pads one row/column after and
    divides by 4 (equal to a plain 2x2 pool on even sizes)."""
    return nn.avg_pool(
        x, (2, 2), (stride, stride), padding=((0, 1), (0, 1)), count_include_pad=stride != 1
    )


class Model(_Layers):
    """ResNet encoder: images [B, H, W, C] -> Features (see `__call__`).

    `variant` is '<depth>[x<width>][-sk]'. `cifar_stem` swaps the stem for solo-learn's CIFAR
    one (3x3/1 conv, padding 2, no max-pool). `blocks` (4 ints) and `channels` override the
    variant's blocks per stage and base channels (64). `zero_init_last_bn` zero-initialises each
    block's last BN scale (Goyal et al. 2017). `bn_momentum` is flax's (0.9 = PyTorch's 0.1).
    """

    variant: str = "50"
    zero_init_last_bn: bool = False
    cifar_stem: bool = False
    blocks: Sequence[int] | None = None
    channels: int | None = None

    mutable = ("batch_stats",)  # Flax collections written in training
    rng_streams = ()  # random streams drawn in training
    num_layers = 5  # layer-wise LR decay: stem 0, stages 1-4, a head 5 (see `layer_id`)

    def __post_init__(self):
        self.arch()
        if not 0.0 <= self.bn_momentum < 1.0:
            raise UserError(f"resnet: bn_momentum must be in [0, 1), got {self.bn_momentum}")
        super().__post_init__()

    def arch(self) -> tuple[bool, tuple[int, ...], int, bool]:
        """(bottleneck, blocks per stage, stem channels = first stage's planes, sk) after the
        overrides; UserErrors for a bad variant or override."""
        depth, width, sk = parse_variant(self.variant)
        bottleneck, blocks = DEPTHS[depth]
        if self.blocks is not None:
            blocks = tuple(self.blocks)
            if len(blocks) != 4 or not all(isinstance(n, int) and n > 0 for n in blocks):
                raise UserError(
                    f"resnet: blocks must be 4 positive integers (blocks per stage), "
                    f"got {self.blocks}"
                )
        channels = 64 if self.channels is None else self.channels
        if not isinstance(channels, int) or channels < 2 or channels % 2:
            raise UserError(f"resnet: channels must be an even integer >= 2, got {self.channels}")
        return bottleneck, blocks, channels * width, sk

    @property
    def mask_modes(self) -> tuple[str, ...]:
        """'sparse' on the stride-32 grid; none with the CIFAR stem (stride 8, odd map sizes)."""
        return () if self.cifar_stem else ("sparse",)

    @property
    def embed_dim(self) -> int:
        """Channels of the pooled output."""
        bottleneck, _, c, _ = self.arch()
        return 8 * c * (4 if bottleneck else 1)

    def layer_id(self, path: str) -> int:
        """Layer of the parameter at `path` (inside the backbone) for layer-wise LR decay, stage
        by stage: the stem (`conv1`, `bn1`, `stem_*`) 0, stage s (`layer{s}_*`) s."""
        if re.match(r"(conv1|bn1|stem_)", path):
            return 0
        stage = re.match(r"layer(\d+)_\d+/", path)
        return int(stage[1]) if stage else self.num_layers

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool = False, mask: Mask | None = None
    ) -> Features:
        """images float [B, H, W, C] -> Features.

        feature_maps: the 4 stage outputs [B, H/s, W/s, C_s] at strides s = 4, 8, 16, 32 (PyTorch
          output sizes, ceil(H / s) for sizes that do not divide); with the CIFAR stem at
          strides 1, 2, 4, 8 of the stem's (H + 2) x (W + 2) map.
        pooled: [B, C_4] mean of the last map (over kept positions under a mask).
        intermediates: "stem" (the map after the stem's last BN-ReLU, before the max-pool:
          stride 2, or the CIFAR stem's stride 1) and "stage_1".."stage_4" (= feature_maps).
        mask mode 'sparse': value bool [B, H/32, W/32], True = masked; needs H, W divisible by 32.
        """
        bottleneck, blocks, c, sk = self.arch()
        keep = self._keep(images, mask)
        x = _masked(images.astype(self.dtype), keep)
        if self.cifar_stem:
            x = self.conv(x, c, 3, 1, "conv1", pad=2)
            x = self.norm(x, "bn1", train, relu=True)
        elif sk:  # SimCLRv2's deep stem
            x = self.conv_bn_relu(x, c // 2, 3, 2, "stem_conv1", "stem_bn1", train, keep)
            x = self.conv_bn_relu(x, c // 2, 3, 1, "stem_conv2", "stem_bn2", train, keep)
            x = self.conv_bn_relu(x, c, 3, 1, "conv1", "bn1", train, keep)
        else:
            x = self.conv_bn_relu(x, c, 7, 2, "conv1", "bn1", train, keep)
        intermediates = {"stem": x}
        if not self.cifar_stem:
            x = _masked(max_pool(x, 3, 2, 1), keep)

        maps = []
        for stage, n in enumerate(blocks):
            for i in range(n):
                x = Block(
                    self.bn_momentum,
                    self.dtype,
                    planes=c * 2**stage,
                    stride=2 if stage > 0 and i == 0 else 1,
                    bottleneck=bottleneck,
                    sk=sk,
                    zero_init_last_bn=self.zero_init_last_bn,
                    name=f"layer{stage + 1}_{i}",
                )(x, train=train, keep=keep)
            maps.append(x)
            intermediates[f"stage_{stage + 1}"] = x
        return Features(
            pooled=_spatial_mean(x, keep), feature_maps=tuple(maps), intermediates=intermediates
        )

    def _keep(self, images: jax.Array, mask: Mask | None) -> jax.Array | None:
        """The stride-32 keep mask [B, h, w] (True = kept), checked, or None."""
        if mask is None:
            return None
        if mask.mode not in self.mask_modes:
            raise UserError(
                f"resnet: mask mode '{mask.mode}' is not supported (supported: "
                f"{', '.join(self.mask_modes) or 'none with cifar_stem=True'}); use an "
                "objective with a supported mode"
            )
        b, h, w, _ = images.shape
        if h % 32 or w % 32 or mask.value.shape != (b, h // 32, w // 32):
            raise UserError(
                f"resnet: a sparse mask needs images with sides divisible by 32 and a mask of "
                f"shape [B, H/32, W/32] = {(b, h // 32, w // 32)}; got images {h}x{w} and mask "
                f"{tuple(mask.value.shape)}"
            )
        return jnp.logical_not(mask.value)
