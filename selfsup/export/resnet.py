"""ResNet -> torchvision's `resnet{18..152}`, timm's `resnet200`, or selfsup's own PyTorch
`ResNet` (`resnet_torch.py`, for width multipliers, SK, the CIFAR stem and shrunk variants):
`export_torch`, key by key from `selfsup.backbones.resnet`'s torchvision-like parameter names.
"""

from __future__ import annotations

import numpy as np

from selfsup import pytree
from selfsup.backbones.resnet import DEPTHS, SK_RATIO, Model, parse_variant, sk_mid_dim
from selfsup.errors import UserError


def export_torch(model: Model, variables: dict) -> tuple[dict[str, np.ndarray], dict]:
    """variables {"params", "batch_stats"} of a `Model` (host NumPy) -> (state_dict, spec).

    Width 1 without SK, with the ImageNet stem and the variant's blocks and channels maps onto
    torchvision's `resnet{18,34,50,101,152}`, built with num_classes = D and an identity `fc`
    (so that the model's output is the pooled embedding [N, D]), and timm's `resnet200` (the
    same names; num_classes=0, no fc); anything else onto `ResNet(depth, width, sk_ratio, ...)`
    of `selfsup/export/resnet_torch.py` (spec "module"), which also takes `cifar_stem`, `blocks`
    and `channels` (a CIFAR-stem ResNet's weights keep torchvision's names: see that module for
    loading them into torchvision's model). Conv kernels go from [kh, kw, in, out] to OIHW; BN
    scale/bias/mean/var to weight/bias/running_mean/running_var, with num_batches_tracked 0
    (int64, PyTorch's dtype).
    """
    depth, width, sk = parse_variant(model.variant)
    bottleneck, blocks, c, _ = model.arch()
    params = variables["params"]
    stats = variables.get("batch_stats")
    if not stats:
        raise UserError("resnet export needs the backbone's batch_stats beside its params")
    state: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def leaf(tree: dict, path: str, key: str, shape: tuple) -> np.ndarray:
        node = tree
        for part in path.split("/"):
            node = node[part]
        value = np.asarray(node[key], np.float32)
        if value.shape != shape:
            raise ValueError(f"resnet export: {path}/{key} has shape {value.shape}, not {shape}")
        used.add(f"{path}/{key}")
        return value

    def conv(torch_name: str, path: str, cin: int, cout: int, k: int) -> None:
        kernel = leaf(params, path, "kernel", (k, k, cin, cout))
        state[f"{torch_name}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))

    def bn(torch_name: str, path: str, c: int) -> None:
        state[f"{torch_name}.weight"] = leaf(params, path, "scale", (c,))
        state[f"{torch_name}.bias"] = leaf(params, path, "bias", (c,))
        state[f"{torch_name}.running_mean"] = leaf(stats, path, "mean", (c,))
        state[f"{torch_name}.running_var"] = leaf(stats, path, "var", (c,))
        state[f"{torch_name}.num_batches_tracked"] = np.array(0, np.int64)

    if model.cifar_stem:
        conv("conv1", "conv1", 3, c, 3)
    elif sk:
        conv("stem_conv1", "stem_conv1", 3, c // 2, 3)
        bn("stem_bn1", "stem_bn1", c // 2)
        conv("stem_conv2", "stem_conv2", c // 2, c // 2, 3)
        bn("stem_bn2", "stem_bn2", c // 2)
        conv("conv1", "conv1", c // 2, c, 3)
    else:
        conv("conv1", "conv1", 3, c, 7)
    bn("bn1", "bn1", c)

    cin = c
    for stage, n in enumerate(blocks):
        p = c * 2**stage
        cout = 4 * p if bottleneck else p
        for i in range(n):
            t, f = f"layer{stage + 1}.{i}", f"layer{stage + 1}_{i}"
            if bottleneck:
                conv(f"{t}.conv1", f"{f}/conv1", cin, p, 1)
                bn(f"{t}.bn1", f"{f}/bn1", p)
                if sk:
                    conv(f"{t}.conv2.conv", f"{f}/conv2/conv", p, 2 * p, 3)
                    bn(f"{t}.conv2.bn", f"{f}/conv2/bn", 2 * p)
                    conv(f"{t}.conv2.fc1", f"{f}/conv2/fc1", p, sk_mid_dim(p), 1)
                    bn(f"{t}.conv2.fc_bn", f"{f}/conv2/fc_bn", sk_mid_dim(p))
                    conv(f"{t}.conv2.fc2", f"{f}/conv2/fc2", sk_mid_dim(p), 2 * p, 1)
                else:
                    conv(f"{t}.conv2", f"{f}/conv2", p, p, 3)
                    bn(f"{t}.bn2", f"{f}/bn2", p)
                conv(f"{t}.conv3", f"{f}/conv3", p, cout, 1)
                bn(f"{t}.bn3", f"{f}/bn3", cout)
            else:
                conv(f"{t}.conv1", f"{f}/conv1", cin, p, 3)
                bn(f"{t}.bn1", f"{f}/bn1", p)
                conv(f"{t}.conv2", f"{f}/conv2", p, p, 3)
                bn(f"{t}.bn2", f"{f}/bn2", p)
            if (stage > 0 and i == 0) or cin != cout:
                j = 1 if sk else 0  # ResNet-D: downsample.0 is the (parameter-free) pool
                conv(f"{t}.downsample.{j}", f"{f}/downsample_conv", cin, cout, 1)
                bn(f"{t}.downsample.{j + 1}", f"{f}/downsample_bn", cout)
            cin = cout

    flat = {*pytree.leaf_paths(params), *pytree.leaf_paths(stats)}
    if flat != used:
        raise ValueError(f"resnet export: unmapped variables {sorted(flat - used)[:5]}")

    overrides = {
        k: v
        for k, v in (
            ("cifar_stem", model.cifar_stem),
            ("blocks", list(blocks) if blocks != DEPTHS[depth][1] else None),
            ("channels", model.channels if c != 64 * width else None),
        )
        if v
    }
    if width == 1 and not sk and not overrides:
        if depth == 200:  # torchvision has no resnet200; timm's uses the same names
            spec = {"library": "timm", "architecture": "resnet200"}
        else:
            # torchvision's ResNet always ends in `fc` (num_classes=0 makes an empty Linear and
            # [N, 0] outputs): an identity fc makes model(images) the pooled embedding [N, D].
            spec = {"library": "torchvision", "architecture": f"resnet{depth}"}
            state["fc.weight"] = np.eye(cin, dtype=np.float32)
            state["fc.bias"] = np.zeros((cin,), np.float32)
        spec["kwargs"] = {"num_classes": cin if spec["library"] == "torchvision" else 0}
    else:
        spec = {
            "library": "selfsup",
            "module": "resnet_torch",
            "architecture": "ResNet",
            "kwargs": {
                "depth": depth,
                "width": width,
                "sk_ratio": SK_RATIO if sk else 0.0,
                **overrides,
            },
        }
    spec["pooling"] = "avg"
    return state, spec
