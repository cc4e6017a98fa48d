"""ViT -> timm's `VisionTransformer`: `export_torch` (safetensors state dict and spec) and
`export_npz` (the big_vision `.npz` layout timm's `load_pretrained` reads), key by key from
`selfsup.backbones.vit`'s timm-like parameter names.
"""

from __future__ import annotations

import numpy as np

from selfsup import pytree
from selfsup.backbones.vit import SIZES, Model, sincos_pos_embed
from selfsup.errors import UserError

# size -> (timm's size name, patch sizes timm registers at 224 px).
TIMM_NAMES = {
    "Ti": ("tiny", (16,)),
    "S": ("small", (16, 8, 32)),
    "B": ("base", (16, 8, 32)),
    "L": ("large", (16, 14, 32)),
    "H": ("huge", (14,)),
}


def timm_name(model: Model, input_size: tuple[int, int]) -> str:
    """The name of `model` at `input_size` (H, W) in timm: a registered model name where one
    describes it (B/16 at 224 px with ViT-B's width, depth, heads and MLP ->
    'vit_base_patch16_224'), else timm's class 'VisionTransformer' (a Ti/4 of depth 4 at 32 px has
    no registered name). Either is built from the export's kwargs, which set every dimension."""
    size = model.variant.partition("/")[0]
    width, depth, heads, mlp_dim, patch = model.dims()
    name, patches = TIMM_NAMES[size]
    registered = (
        tuple(input_size) == (224, 224)
        and patch in patches
        and (width, depth, heads) == SIZES[size]
        and mlp_dim == 4 * width
    )
    return f"vit_{name}_patch{patch}_224" if registered else "VisionTransformer"


def export_torch(
    model: Model, variables: dict, *, input_size: tuple[int, int] = (224, 224)
) -> tuple[dict[str, np.ndarray], dict]:
    """(state_dict, spec) for timm's `VisionTransformer` at `input_size` (H, W) pixels.

    Every backbone parameter maps to one timm key (a leftover one is an error) except the
    SimMIM mask token, a training-time input. The fixed sin-cos embedding becomes timm's
    `pos_embed` [1, (1 +) N, D], its cls row zero (no_embed_class=False); in timm it is a
    learnable parameter (as in MAE's fine-tuning code) for `input_size` only (other sizes:
    timm's `dynamic_img_size=True` interpolates it). timm applies `norm` before pooling
    (fc_norm=False), as this model does.
    """
    width, depth, heads, mlp_dim, p = model.dims()
    h, w = input_size
    if h % p or w % p:
        raise UserError(f"vit export: input size {h}x{w} is not a multiple of the patch size {p}")
    flat = {
        name: np.asarray(leaf, np.float32)
        for name, leaf in pytree.by_path(variables["params"]).items()
    }
    flat.pop("mask_token", None)
    channels = flat["patch_embed/kernel"].shape[2] if "patch_embed/kernel" in flat else 3
    sd: dict[str, np.ndarray] = {}

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in flat:
            raise UserError(f"vit export: the checkpoint has no {key}, which the config builds")
        value = flat.pop(key)
        if value.shape != shape:
            raise UserError(
                f"vit export: {key} has shape {value.shape}, the config builds {shape}; export "
                "with the config the checkpoint was trained with"
            )
        return value

    def linear(src: str, dst: str, n_in: int, n_out: int, bias: bool) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/kernel", (n_in, n_out)).T  # [out, in]
        if bias:
            sd[f"{dst}.bias"] = take(f"{src}/bias", (n_out,))

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"] = take(f"{src}/scale", (width,))
        sd[f"{dst}.bias"] = take(f"{src}/bias", (width,))

    kernel = take("patch_embed/kernel", (p, p, channels, width))
    sd["patch_embed.proj.weight"] = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    sd["patch_embed.proj.bias"] = take("patch_embed/bias", (width,))
    pos = sincos_pos_embed(h // p, w // p, width)
    if model.cls_token:
        sd["cls_token"] = take("cls_token", (1, 1, width))
        pos = np.concatenate([np.zeros((1, width), np.float32), pos])
    sd["pos_embed"] = pos[None]
    qkv_bias = model.qkv_bias and model.use_bias
    for i in range(depth):
        src, dst = f"blocks_{i}", f"blocks.{i}"
        norm(f"{src}/norm1", f"{dst}.norm1")
        linear(f"{src}/attn/qkv", f"{dst}.attn.qkv", width, 3 * width, qkv_bias)
        linear(f"{src}/attn/proj", f"{dst}.attn.proj", width, width, model.use_bias)
        norm(f"{src}/norm2", f"{dst}.norm2")
        linear(f"{src}/mlp/fc1", f"{dst}.mlp.fc1", width, mlp_dim, model.use_bias)
        linear(f"{src}/mlp/fc2", f"{dst}.mlp.fc2", mlp_dim, width, model.use_bias)
    norm("norm", "norm")
    if flat:
        raise UserError(f"vit export: no timm mapping for the parameter {sorted(flat)[0]}")

    mlp_ratio = mlp_dim / width
    if int(width * mlp_ratio) != mlp_dim:
        raise UserError(f"vit export: timm cannot express mlp_dim {mlp_dim} at width {width}")
    kwargs = dict(
        img_size=h if h == w else [h, w],
        patch_size=p,
        in_chans=channels,
        embed_dim=width,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        proj_bias=model.use_bias,  # timm's proj_bias covers attn.proj, mlp.fc1 and mlp.fc2
        class_token=model.cls_token,
        no_embed_class=False,
        global_pool="token" if model.pool == "cls" else "avg",
        fc_norm=False,
        num_classes=0,
    )
    spec = {
        "library": "timm",
        "architecture": timm_name(model, input_size),
        "kwargs": kwargs,
        "pooling": "cls" if model.pool == "cls" else "avg",
    }
    return sd, spec


def export_npz(
    model: Model, variables: dict, *, input_size: tuple[int, int] = (224, 224)
) -> dict[str, np.ndarray]:
    """The same weights in the big_vision `.npz` layout that timm's
    `VisionTransformer.load_pretrained("x.npz")` reads (top-level `pos_embedding`, blocks
    `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
    MlpBlock_0}`; attention kernels split per head: query/key/value [D, H, D/H], out [H, D/H, D]).
    """
    if not (model.use_bias and model.qkv_bias):
        raise UserError(
            "vit export: timm's .npz loader needs every linear bias, and this model has "
            "use_bias=False or qkv_bias=False; export without --npz (safetensors)"
        )
    sd, _ = export_torch(model, variables, input_size=input_size)
    width, depth, heads, _, _ = model.dims()
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
        "pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
    }
    if model.cls_token:
        out["cls"] = sd["cls_token"]
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        mha = f"{dst}MultiHeadDotProductAttention_0/"
        for ln, name in (("LayerNorm_0", "norm1"), ("LayerNorm_1", "norm2")):
            out[f"{dst}{ln}/scale"] = sd[f"{src}{name}.weight"]
            out[f"{dst}{ln}/bias"] = sd[f"{src}{name}.bias"]
        qkv_w, qkv_b = sd[f"{src}attn.qkv.weight"], sd[f"{src}attn.qkv.bias"]  # rows (3, H, dh)
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * width, (j + 1) * width)
            out[f"{mha}{name}/kernel"] = qkv_w[rows].T.reshape(width, heads, -1)
            out[f"{mha}{name}/bias"] = qkv_b[rows].reshape(heads, -1)
        out[f"{mha}out/kernel"] = sd[f"{src}attn.proj.weight"].T.reshape(heads, -1, width)
        out[f"{mha}out/bias"] = sd[f"{src}attn.proj.bias"]
        for k, fc in enumerate(("fc1", "fc2")):
            out[f"{dst}MlpBlock_0/Dense_{k}/kernel"] = sd[f"{src}mlp.{fc}.weight"].T
            out[f"{dst}MlpBlock_0/Dense_{k}/bias"] = sd[f"{src}mlp.{fc}.bias"]
    return out
