"""ConvNeXt -> timm's `convnext_<variant>`: `export_torch`, key by key from
`selfsup.backbones.convnext`'s timm-like parameter names.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from selfsup import pytree
from selfsup.backbones.convnext import CONV_MLP, KERNEL, VARIANTS, Model
from selfsup.errors import UserError


def export_torch(model: Model, variables: dict) -> tuple[dict[str, np.ndarray], dict]:
    """(state_dict, spec) for timm's `convnext_<variant>(num_classes=0)`.

    variables: {"params": backbone params} as host arrays (ConvNeXt has no batch statistics).
    state_dict: timm's names -> float32 arrays (conv OIHW, linear [out, in]; [out, in, 1, 1]
    for atto..nano, which timm builds with 1x1 convs). Every parameter must be consumed.
    """
    depths, dims = model.arch()
    params = variables["params"]
    conv_mlp = model.variant in CONV_MLP
    state: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def get(path: str) -> np.ndarray:
        node = params
        for part in path.split("/"):
            if part not in node:
                raise UserError(f"convnext export: the parameters have no '{path}'")
            node = node[part]
        used.add(path)
        return np.asarray(node, np.float32)

    def put(name: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
        if value.shape != shape:
            raise UserError(
                f"convnext export: {name} has shape {value.shape}, timm expects {shape}; the "
                "parameters do not match the backbone config"
            )
        state[name] = np.ascontiguousarray(value)

    def conv(src: str, dst: str, out: int, inp: int, k: int) -> None:
        # HWIO -> OIHW (a depthwise kernel [k, k, 1, C] becomes [C, 1, k, k]).
        put(f"{dst}.weight", get(f"{src}/kernel").transpose(3, 2, 0, 1), (out, inp, k, k))
        put(f"{dst}.bias", get(f"{src}/bias"), (out,))

    def norm(src: str, dst: str, c: int) -> None:
        put(f"{dst}.weight", get(f"{src}/scale"), (c,))
        put(f"{dst}.bias", get(f"{src}/bias"), (c,))

    def linear(src: str, dst: str, out: int, inp: int) -> None:
        weight = get(f"{src}/kernel").T  # [in, out] -> [out, in]
        shape = (out, inp)
        if conv_mlp:
            weight, shape = weight[:, :, None, None], (out, inp, 1, 1)
        put(f"{dst}.weight", weight, shape)
        put(f"{dst}.bias", get(f"{src}/bias"), (out,))

    conv("stem_0", "stem.0", dims[0], 3, 4)
    norm("stem_1", "stem.1", dims[0])
    for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
        if i > 0:
            norm(f"stages_{i}/downsample_0", f"stages.{i}.downsample.0", dims[i - 1])
            conv(f"stages_{i}/downsample_1", f"stages.{i}.downsample.1", dim, dims[i - 1], 2)
        for j in range(depth):
            src, dst = f"stages_{i}/blocks_{j}", f"stages.{i}.blocks.{j}"
            conv(f"{src}/conv_dw", f"{dst}.conv_dw", dim, 1, KERNEL)
            norm(f"{src}/norm", f"{dst}.norm", dim)
            linear(f"{src}/mlp/fc1", f"{dst}.mlp.fc1", 4 * dim, dim)
            linear(f"{src}/mlp/fc2", f"{dst}.mlp.fc2", dim, 4 * dim)
            if model.layer_scale_init is None:
                # timm's create_model drops None kwargs, so its blocks always have a layer
                # scale: ones leave the branch unscaled.
                put(f"{dst}.gamma", np.ones(dim, np.float32), (dim,))
            else:
                put(f"{dst}.gamma", get(f"{src}/gamma"), (dim,))
    norm("head_norm", "head.norm", dims[-1])

    names = set(pytree.leaf_paths(params))
    if names - used:
        raise UserError(
            f"convnext export: parameter '{sorted(names - used)[0]}' has no timm counterpart; "
            "the parameters do not match the backbone config"
        )

    kwargs: dict[str, Any] = {"num_classes": 0}
    if (depths, dims) != VARIANTS[model.variant]:
        kwargs.update(depths=list(depths), dims=list(dims))
    spec = {
        "library": "timm",
        "architecture": f"convnext_{model.variant}",
        "kwargs": kwargs,
        "pooling": "avg",
    }
    return state, spec
