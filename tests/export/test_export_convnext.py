"""ConvNeXt export (selfsup/export/convnext.py) to timm: the same last feature map and pooled
features at random weights, without layer scales, and from a smoke-trained checkpoint through
`selfsup export`; mismatched parameters are user errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, rel_err
from convnext_params import SMALL, images, random_params

from selfsup import backbones
from selfsup import config as config_lib
from selfsup.backbones import convnext
from selfsup.errors import UserError
from selfsup.export import convnext as convnext_export
from selfsup.io import checkpoint
from selfsup.train import loop


def forward(model, params, x):
    return jax.jit(model.apply)({"params": params}, jnp.asarray(x))


@pytest.fixture(scope="module")
def params():
    return random_params(convnext.Model(**SMALL))


def timm_features(state_dict, spec, x):
    """(last feature map NHWC, pooled) of the timm model named by `spec` with these weights."""
    from torch_compat import timm, torch

    assert spec["library"] == "timm" and spec["pooling"] == "avg"
    json.dumps(spec)  # written to config.json as is
    model = timm.create_model(spec["architecture"], **spec["kwargs"]).eval()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=True)
    assert all(v.dtype == np.float32 for v in state_dict.values())
    return torch_features(model, x)


def torch_features(model, x):
    """timm's `forward_features` (NCHW -> NHWC) and `forward_head(pre_logits=True)`."""
    from torch_compat import torch

    with torch.no_grad():
        fmap = model.forward_features(
            torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        )
        pooled = model.forward_head(fmap, pre_logits=True)
    return fmap.numpy().transpose(0, 2, 3, 1), pooled.numpy()


def check_export(model, params, x):
    state_dict, spec = convnext_export.export_torch(model, {"params": jax.device_get(params)})
    fmap, pooled = timm_features(state_dict, spec, x)
    out = forward(model, params, x)
    assert rel_err(out.feature_maps[-1], fmap) < 1e-4
    assert rel_err(out.pooled, pooled) < 1e-4
    return spec


@pytest.mark.parametrize(
    "kwargs,spec_kwargs",
    [
        (dict(variant="atto"), {"num_classes": 0}),  # timm builds atto's MLP from 1x1 convs
        (SMALL, {"num_classes": 0, "depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}),
    ],
)
def test_export_random_weights_match_timm(kwargs, spec_kwargs):
    model = convnext.Model(**kwargs)
    spec = check_export(model, random_params(model, seed=1), images(2))
    assert spec["architecture"] == f"convnext_{kwargs['variant']}"
    assert spec["kwargs"] == spec_kwargs


def test_export_without_layer_scale_and_mismatched_params(params):
    model = convnext.Model(**SMALL, layer_scale_init=None)
    no_gamma = jax.tree.map(lambda a: a, params)  # new dicts, same arrays
    for i in range(4):
        no_gamma[f"stages_{i}"]["blocks_0"].pop("gamma")
    state_dict, spec = convnext_export.export_torch(model, {"params": no_gamma})
    # timm always builds a layer scale (create_model drops ls_init_value=None): ones.
    np.testing.assert_array_equal(state_dict["stages.3.blocks.0.gamma"], np.ones(128))
    fmap, pooled = timm_features(state_dict, spec, images(2))
    out = forward(model, no_gamma, images(2))
    assert rel_err(out.feature_maps[-1], fmap) < 1e-4 and rel_err(out.pooled, pooled) < 1e-4
    with pytest.raises(UserError, match="has no timm counterpart"):
        convnext_export.export_torch(model, {"params": params})  # gammas left over
    with pytest.raises(UserError, match="timm expects"):
        convnext_export.export_torch(
            convnext.Model(variant="tiny", depths=(1, 1, 1, 1)), {"params": params}
        )


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("convnext_smoke")
    spec = str(REPO / "configs" / "supervised_convnext_builtin.py:smoke")
    # A large learning rate moves the layer scales far from 1e-6 in 3 steps, so the blocks
    # weigh in the comparison below (at the config's rate they would stay ~1e-4).
    config = config_lib.resolve(config_lib.load(spec), {"optim.base_lr": "0.5"})
    loop.train_and_evaluate(config, str(workdir))
    return workdir


def test_export_trained_checkpoint_matches_timm(smoke_workdir, tmp_path):
    from selfsup import export

    params, meta = checkpoint.restore_params(smoke_workdir)
    backbone_config = dict(meta["config"]["backbone"])
    model = backbones.build(backbone_config.pop("name"), **backbone_config)
    trained = params["backbone"]
    # Training moved the layer scales off their 1e-6 init, so the blocks count in the check.
    assert np.abs(trained["stages_3"]["blocks_0"]["gamma"]).max() > 1e-2
    # The user's path: `selfsup export` writes safetensors + config.json, load_torch reads them.
    record = export.export(smoke_workdir, tmp_path)
    assert record["architecture"] == "convnext_tiny"
    assert record["kwargs"] == {"num_classes": 0, "depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}
    fmap, pooled = torch_features(export.load_torch(tmp_path), images(3))
    out = forward(model, trained, images(3))
    assert rel_err(out.feature_maps[-1], fmap) < 1e-4
    assert rel_err(out.pooled, pooled) < 1e-4
