"""The PyTorch references the benchmarks time beside selfsup: what a user would otherwise run.

- MAE (He et al. 2021) written the way facebookresearch/mae's `models_mae.py` builds it: timm's
  `PatchEmbed` and `Block` (exact GELU, LayerNorm eps 1e-6, qkv bias), fixed sin-cos position
  embeddings, per-sample random masking by argsort of noise, a timm-block decoder, MSE on
  removed patches against normalised pixels; AdamW (0.9, 0.95), weight decay 0.05 off for 1-D
  parameters and tokens; the gradient norm every step, as the official training loop takes it
  (its loss scaler's `get_grad_norm_`: each parameter's gradient norm, then the norm of those).
- SimCLR (Chen et al. 2020): torchvision's ResNet-50 (fc removed), SimCLRv2's 3-layer projection
  head (Linear without bias + BatchNorm1d, ReLU on the first two), NT-Xent at temperature 0.1 on
  the 2N views of one batch; SGD with momentum 0.9 and weight decay 1e-4.

Deviations (each makes the reference cheaper than selfsup's step, so ratios are conservative):
- The reference's inputs are already augmented float tensors (the official code augments on the
  CPU in data-loader workers); selfsup's step includes its on-device augmentation
  (`throughput.py` also times it without, `views given`).
- SimCLR's reference takes no gradient norm; selfsup's step logs one every step.
- SimCLR's reference uses SGD with momentum, not LARS (PyTorch has no LARS; the official SimCLR
  code is TensorFlow): LARS' per-layer norms cost selfsup a little extra.
"""

from __future__ import annotations

import functools
import time

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

# torchvision 0.28 from pip is a CUDA build; on the CPU torch its import needs these two operator
# schemas defined first (../shared/ENVIRONMENT.md). Kept referenced for the process' lifetime.
_LIB = torch.library.Library("torchvision", "FRAGMENT")
for _schema in (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
):
    try:
        _LIB.define(_schema)
    except RuntimeError:  # already defined
        pass

import torchvision  # noqa: E402
from timm.layers import PatchEmbed  # noqa: E402
from timm.models.vision_transformer import Block  # noqa: E402

from selfsup.backbones.vit import sincos_pos_embed  # noqa: E402  (NumPy, no JAX compute)

VIT_SIZES = {"Ti": (192, 12, 3), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}


def _pos_with_cls(grid: int, dim: int) -> torch.Tensor:
    """[1, 1 + grid^2, dim]: a zero row for the cls token, then the sin-cos table."""
    table = np.concatenate([np.zeros((1, dim), np.float32), sincos_pos_embed(grid, grid, dim)])
    return torch.from_numpy(table)[None]


class MAE(nn.Module):
    """MAE with a ViT encoder; forward(images [B, 3, H, W]) -> scalar loss."""

    def __init__(
        self,
        image_size: int,
        variant: str = "B/16",
        mask_ratio: float = 0.75,
        decoder_width: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
    ):
        super().__init__()
        size, patch = variant.split("/")
        width, depth, heads = VIT_SIZES[size]
        self.patch, self.mask_ratio = int(patch), mask_ratio
        grid = image_size // self.patch
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(image_size, self.patch, 3, width)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.register_buffer("pos_embed", _pos_with_cls(grid, width))
        self.blocks = nn.ModuleList(
            [Block(width, heads, 4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(width)
        self.decoder_embed = nn.Linear(width, decoder_width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_width) * 0.02)
        self.register_buffer("decoder_pos_embed", _pos_with_cls(grid, decoder_width))
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_width, decoder_heads, 4.0, qkv_bias=True, norm_layer=norm)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm(decoder_width)
        self.decoder_pred = nn.Linear(decoder_width, self.patch**2 * 3)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, p*p*3], pixels ordered (p, q, c)."""
        b, c, h, w = images.shape
        p = self.patch
        x = images.reshape(b, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images) + self.pos_embed[:, 1:]  # [B, N, D]
        b, n, d = x.shape
        keep = int(n * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(b, n, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :keep]
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, d))  # [B, K, D]
        mask = (ids_restore >= keep).float()  # [B, N], 1 = removed
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))  # [B, 1 + K, d]
        dd = x.shape[-1]
        masks = self.mask_token.expand(b, n - keep, -1)
        y = torch.cat([x[:, 1:], masks], dim=1)
        y = torch.gather(y, 1, ids_restore[..., None].expand(-1, -1, dd))  # raster order
        x = torch.cat([x[:, :1], y], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
        target = self.patchify(images)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum().clamp(min=1.0)

    grad_norm_each_step = True  # as facebookresearch/mae's loop does (module docstring)

    def optimizer(self, lr: float = 1.5e-4) -> torch.optim.Optimizer:
        decay = [p for n, p in self.named_parameters() if p.ndim > 1 and "token" not in n]
        rest = [p for n, p in self.named_parameters() if p.ndim <= 1 or "token" in n]
        groups = [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


class SimCLR(nn.Module):
    """SimCLR on torchvision's ResNet-50 (or `arch`); forward(x1, x2 [B, 3, H, W]) -> scalar
    NT-Xent loss."""

    def __init__(self, temperature: float = 0.1, proj_dim: int = 128, arch: str = "resnet50"):
        super().__init__()
        self.backbone = torchvision.models.get_model(arch)
        width = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        layers = []
        for i in range(3):
            last = i == 2
            layers.append(nn.Linear(width, proj_dim if last else width, bias=False))
            layers.append(nn.BatchNorm1d(proj_dim if last else width, affine=not last))
            if not last:
                layers.append(nn.ReLU())
        self.head = nn.Sequential(*layers)
        self.temperature = temperature

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        z = self.head(self.backbone(torch.cat([x1, x2])))  # both views in one batch
        z = F.normalize(z, dim=1)
        logits = z @ z.T / self.temperature
        n2 = z.shape[0]
        logits = logits.masked_fill(torch.eye(n2, dtype=torch.bool, device=z.device), float("-inf"))
        positives = (torch.arange(n2, device=z.device) + n2 // 2) % n2
        return F.cross_entropy(logits, positives)

    def optimizer(self, lr: float = 0.3) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


class Trainer:
    """One training step of `model` on fixed inputs, eager or under `torch.compile`, on the
    inputs' device; `autocast`: a dtype such as torch.bfloat16 for the forward (mixed precision,
    parameters and optimizer state stay float32)."""

    def __init__(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        compiled: bool,
        autocast: torch.dtype | None = None,
    ):
        self.device = inputs[0].device
        self.model, self.inputs = model.to(self.device).train(), inputs
        self.opt = model.optimizer()
        self.autocast = autocast
        self.loss_fn = torch.compile(model) if compiled else model
        self.compile_s, self.grad_norm = 0.0, float("nan")
        if compiled:  # the first call compiles forward and backward
            self.compile_s = self.step()

    def step(self) -> float:
        """Seconds for one step: forward, backward, gradient norm (MAE), optimizer update."""
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, self.autocast, enabled=self.autocast is not None):
            loss = self.loss_fn(*self.inputs)
        loss.backward()
        if getattr(self.model, "grad_norm_each_step", False):
            norms = [p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]
            self.grad_norm = float(torch.stack(norms).norm())
        self.opt.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def mae_inputs(batch: int, size: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, size, size, device=device),)


def simclr_inputs(batch: int, size: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, 3, size, size, device=device) for _ in range(2))


def compile_works() -> str:
    """'' when torch.compile (inductor) builds and runs a small function here, else why not."""
    try:
        fn = torch.compile(lambda x: torch.relu(x) * 2 + 1)
        fn(torch.randn(8))
        return ""
    except Exception as e:  # noqa: BLE001  (inductor fails in many ways without a compiler)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
