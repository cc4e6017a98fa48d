"""ResNet export (selfsup/export/resnet.py) to torchvision, timm and selfsup's PyTorch module: the
same stage maps and pooled features at random parameters and from a smoke-trained checkpoint."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest
from conftest import REPO, rel_err
from resnet_params import abstract_variables, count, images, randomize

from selfsup.backbones import Features, resnet
from selfsup.errors import UserError
from selfsup.export import resnet as resnet_export


@functools.cache
def random_variables(variant: str) -> dict:
    return randomize(abstract_variables(variant))


@functools.cache
def jitted(variant: str):
    """One compiled (eval-mode) forward per variant, shared by the tests."""
    return jax.jit(resnet.Model(variant=variant).apply)


def torch_features(tc, spec, module, x_nhwc):
    """(4 stage maps NHWC, pooled) of the exported PyTorch model on the same images."""
    torch = tc.torch
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        if spec["library"] == "selfsup":
            maps, pooled = module.forward_intermediates(x), module(x)
        else:  # torchvision's ResNet: the layers up to the average pool
            y = module.maxpool(module.relu(module.bn1(module.conv1(x))))
            maps = []
            for layer in (module.layer1, module.layer2, module.layer3, module.layer4):
                y = layer(y)
                maps.append(y)
            pooled = torch.flatten(module.avgpool(y), 1)
    return [m.numpy().transpose(0, 2, 3, 1) for m in maps], pooled.numpy()


def build_torch(tc, spec, state_dict):
    """The module `spec` names with the exported weights (strict: every name and shape must
    match), built on the meta device so that nothing is initialised only to be overwritten."""
    torch = tc.torch
    with torch.device("meta"):
        if spec["library"] == "torchvision":
            module = getattr(tc.torchvision.models, spec["architecture"])(**spec["kwargs"])
        elif spec["library"] == "timm":
            module = tc.timm.create_model(spec["architecture"], **spec["kwargs"])
        else:
            from selfsup.export import resnet_torch

            module = getattr(resnet_torch, spec["architecture"])(**spec["kwargs"])
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval()


def assert_same_features(out, maps, pooled, cifar_stem=False):
    """Features equal to the PyTorch model's stage maps (at PyTorch's output sizes) and pooled
    output, to a relative error < 1e-4."""
    assert isinstance(out, Features) and out.tokens is None and out.cls is None
    assert sorted(out.intermediates) == ["stage_1", "stage_2", "stage_3", "stage_4", "stem"]
    stem = out.intermediates["stem"]  # before the stem's max-pool: ceil(S / 2) after it
    assert out.feature_maps[0].shape[1] == (stem.shape[1] if cifar_stem else -(-stem.shape[1] // 2))
    for k, m in enumerate(out.feature_maps):
        np.testing.assert_array_equal(out.intermediates[f"stage_{k + 1}"], m)
    assert len(out.feature_maps) == len(maps) == 4
    for a, b in zip(out.feature_maps, maps, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-4
    assert rel_err(out.pooled, pooled) < 1e-4


@pytest.mark.parametrize(
    "variant,size,library",
    [
        ("18", 36, "torchvision"),  # 36 px: odd map sizes (9, 5, 3) check the padding
        ("50", 32, "torchvision"),
        ("18x2", 32, "selfsup"),  # SimCLR's width multiplier
        ("50-sk", 40, "selfsup"),  # SK, deep stem, ResNet-D pools (stride 2 on 5 -> 3)
    ],
)
def test_export_matches_pytorch_at_random_parameters(tc, variant, size, library):
    model = resnet.Model(variant=variant)
    variables = random_variables(variant)
    x = images(size)
    out = jitted(variant)(variables, x)
    state_dict, spec = resnet_export.export_torch(model, variables)
    assert spec["library"] == library and spec["pooling"] == "avg" and json.dumps(spec)
    depth, width, sk = resnet.parse_variant(variant)
    if library == "torchvision":
        width = 512 if depth < 50 else 2048  # the identity fc keeps the pooled width
        assert (spec["architecture"], spec["kwargs"]) == (f"resnet{depth}", {"num_classes": width})
    else:
        kwargs = {"depth": depth, "width": width, "sk_ratio": 0.0625 if sk else 0.0}
        assert (spec["module"], spec["architecture"]) == ("resnet_torch", "ResNet")
        assert spec["kwargs"] == kwargs
    module = build_torch(tc, spec, state_dict)  # strict: every name and shape must match
    assert_same_features(out, *torch_features(tc, spec, module, x))


@pytest.mark.parametrize(
    "variant,overrides",
    [
        ("18", {"cifar_stem": True}),
        ("50x2-sk", {"cifar_stem": True, "blocks": [1, 1, 1, 1], "channels": 8}),
        ("50", {"blocks": [1, 2, 1, 1], "channels": 16}),  # a tiny ResNet, ImageNet stem
    ],
)
def test_export_of_cifar_stem_and_tiny_resnets_matches_pytorch(tc, variant, overrides):
    """Exports onto selfsup's PyTorch ResNet with the overrides in its kwargs; a plain CIFAR-stem
    ResNet-18 also loads strictly into torchvision's resnet18 with solo-learn's replacements."""
    model = resnet.Model(variant=variant, **overrides)
    x = images(32)
    variables = randomize(jax.eval_shape(model.init, jax.random.key(0), x))
    out = jax.jit(model.apply)(variables, x)
    state_dict, spec = resnet_export.export_torch(model, variables)
    depth, width, sk = resnet.parse_variant(variant)
    kwargs = {"depth": depth, "width": width, "sk_ratio": 0.0625 if sk else 0.0, **overrides}
    assert (spec["library"], spec["module"], spec["architecture"]) == (
        "selfsup",
        "resnet_torch",
        "ResNet",
    )
    assert spec["kwargs"] == kwargs and json.dumps(spec)
    module = build_torch(tc, spec, state_dict)
    cifar = overrides.get("cifar_stem", False)
    assert_same_features(out, *torch_features(tc, spec, module, x), cifar_stem=cifar)
    if overrides == {"cifar_stem": True}:
        torch = tc.torch
        tv = tc.torchvision.models.resnet18()
        tv.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 2, bias=False)
        tv.maxpool, tv.fc = torch.nn.Identity(), torch.nn.Identity()
        tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}
        tv.load_state_dict(tensors, strict=True)
        with torch.no_grad():
            pooled = tv.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        assert rel_err(out.pooled, pooled.numpy()) < 1e-4


def test_export_resnet200_maps_onto_timm(tc):
    model = resnet.Model(variant="200")
    variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), abstract_variables("200"))
    state_dict, spec = resnet_export.export_torch(model, variables)
    assert (spec["library"], spec["architecture"]) == ("timm", "resnet200")
    assert spec["kwargs"] == {"num_classes": 0} and spec["pooling"] == "avg"
    module = build_torch(tc, spec, state_dict)  # strict names and shapes
    assert isinstance(module.fc, tc.torch.nn.Identity)  # model(images): the pooled embedding
    assert sum(p.numel() for p in module.parameters()) == count("200")


def test_export_needs_batch_stats():
    model = resnet.Model(variant="18")
    variables = random_variables("18")
    with pytest.raises(UserError, match="batch_stats"):
        resnet_export.export_torch(model, {"params": variables["params"]})


@pytest.mark.slow  # end to end through the loop
def test_export_from_a_smoke_training_checkpoint(tc, tmp_path):
    from selfsup import config as config_lib
    from selfsup import export
    from selfsup.io import checkpoint
    from selfsup.train import loop

    config = config_lib.resolve(
        config_lib.load(str(REPO / "configs" / "supervised_resnet_builtin.py:smoke")), {}
    )
    assert config.backbone.name == "resnet"
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    record = export.export(tmp_path / "run", tmp_path / "out")
    assert record["library"] == "torchvision" and record["architecture"] == "resnet18"
    module = export.load_torch(tmp_path / "out")

    trees, _ = checkpoint.restore_tree(tmp_path / "run", ("params", "model_state"))
    variables = {
        "params": trees["params"]["backbone"],
        "batch_stats": trees["model_state"]["batch_stats"]["backbone"],
    }
    # Training moved the running statistics away from their init (mean 0, var 1).
    assert np.abs(variables["batch_stats"]["bn1"]["mean"]).max() > 1e-3
    x = images(36)
    out = jitted(config.backbone.variant)(variables, x)
    assert_same_features(out, *torch_features(tc, record, module, x))
