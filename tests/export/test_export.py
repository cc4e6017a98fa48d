"""`selfsup export` for ViT: the exported weights loaded by timm (safetensors through `load_torch`,
strict, and the big_vision `.npz` through timm's own loader) give the same pooled features and
tokens as selfsup, at random init and from a trained checkpoint; user mistakes are one-line
errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, rel_err
from torch_compat import timm, torch

from selfsup import backbones, cli, export
from selfsup import config as config_lib
from selfsup.backbones import Mask, vit
from selfsup.errors import UserError
from selfsup.export import vit as vit_export
from selfsup.io import checkpoint
from selfsup.train import loop

IMG = 32
SMOKE = str(REPO / "configs" / "quickstart.py") + ":smoke"


def images(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(3, IMG, IMG, 3)).astype(np.float32)


def torch_features(module, x: np.ndarray):
    """(pooled, tokens) of a timm ViT for NHWC images, patch tokens without the cls token."""
    with torch.no_grad():
        feats = module.forward_features(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        pooled = module.forward_head(feats, pre_logits=True)
    return pooled.numpy(), feats[:, module.num_prefix_tokens :].numpy()


def assert_same_features(model, variables, module, x):
    ours = jax.jit(model.apply)(variables, x)
    pooled, tokens = torch_features(module, x)
    assert rel_err(ours.pooled, pooled) < 1e-4
    assert rel_err(ours.tokens, tokens) < 1e-4


def run_cli(capsys, *args) -> tuple[int, str]:
    code = cli.main(["export", *map(str, args)])
    return code, capsys.readouterr().err


def write_checkpoint(workdir, backbone: dict, params: dict, step: int = 1) -> None:
    """A checkpoint as the training loop writes it, holding only a backbone."""
    overrides = {f"backbone.{k}": str(v) for k, v in backbone.items()}
    config = config_lib.resolve(config_lib.load(SMOKE), overrides)
    state = {
        "step": jnp.asarray(step, jnp.int32),
        "params": {"backbone": params},
        "opt_state": {},
        "model_state": {},
    }
    mngr = checkpoint.Manager(workdir)
    mngr.save(step, state, {"config": config.to_dict(), "data_position": step}, wait=True)
    mngr.close()


def random_params(model, seed: int, **kw) -> dict:
    """Host parameters of `model` drawn at random (no init compile): LayerNorm scales around 1,
    kernels around their init scale, biases and tokens clearly non-zero, so a misplaced leaf
    shows in the outputs."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, IMG, IMG, 3)), **kw)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path[-1:], simple=True)
        x = rng.normal(size=leaf.shape).astype(np.float32)
        if name == "scale":
            return 1.0 + 0.2 * x
        if name == "kernel":
            return x / np.sqrt(np.prod(leaf.shape[:-1]))
        return 0.2 * x

    return jax.tree_util.tree_map_with_path(draw, shapes["params"])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The workdir of `configs/quickstart.py:smoke` (MAE, ViT with cls token; steps 2 and 4)."""
    workdir = tmp_path_factory.mktemp("smoke")
    loop.train_and_evaluate(config_lib.resolve(config_lib.load(SMOKE)), str(workdir))
    return workdir


VARIANTS = {
    # SimMIM-style: the mask token in the backbone is dropped from the export.
    "cls": (dict(cls_token=True, pool="cls"), {"mask": Mask(jnp.zeros((1, 16), bool), "replace")}),
    "gap_no_cls": (dict(cls_token=False, pool="gap"), {}),
    "aim_no_bias": (dict(cls_token=False, pool="gap", use_bias=False), {}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_random_init_export_matches_timm(tmp_path, capsys, variant):
    options, init_kw = VARIANTS[variant]
    backbone = dict(variant="Ti/8", width=64, depth=2, num_heads=2, **options)
    model = vit.Model(**backbone)
    params = random_params(model, seed=len(variant), **init_kw)
    write_checkpoint(tmp_path / "run", backbone, params)
    out = tmp_path / "export"
    code, err = run_cli(capsys, "--workdir", tmp_path / "run", "--out", out)
    assert code == 0, err

    module = export.load_torch(out)
    x = images()
    assert_same_features(model, {"params": params}, module, x)
    record = json.loads((out / "config.json").read_text())
    assert record["library"] == "timm" and record["input_size"] == [3, IMG, IMG]
    assert record["kwargs"]["class_token"] == options["cls_token"]
    assert record["kwargs"]["proj_bias"] == options.get("use_bias", True)


def test_smoke_checkpoint_export_through_cli_and_npz(tmp_path, capsys, smoke_run):
    out = tmp_path / "export"
    code, err = run_cli(capsys, "--workdir", smoke_run, "--out", out, "--npz")
    assert code == 0, err
    assert "exported step 4" in err
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.npz",
        "model.safetensors",
    ]

    params, meta = checkpoint.restore_params(smoke_run)
    config = dict(meta["config"]["backbone"])
    model = backbones.build(config.pop("name"), **config)
    variables = {"params": params["backbone"]}
    x = images(1)

    # safetensors + config.json through load_torch: strict, so MAE's decoder and mask token,
    # which live outside params["backbone"], cannot have leaked in.
    assert_same_features(model, variables, export.load_torch(out), x)

    # The big_vision .npz through timm's own loader, into a freshly created model.
    record = json.loads((out / "config.json").read_text())
    assert record["architecture"] == "VisionTransformer"  # timm registers no Ti/8 at 32 px
    module = getattr(timm.models, record["architecture"])(**record["kwargs"])
    module.load_pretrained(str(out / "model.npz"))
    assert_same_features(model, variables, module.eval(), x)

    assert record["input_size"] == [3, IMG, IMG]
    np.testing.assert_allclose(record["mean"], [0.485, 0.456, 0.406])
    np.testing.assert_allclose(record["std"], [0.229, 0.224, 0.225])
    assert record["source"]["step"] == 4 and record["source"]["backbone"]["variant"] == "Ti/8"


def test_export_of_an_earlier_step(tmp_path, capsys, smoke_run):
    code, err = run_cli(capsys, "--workdir", smoke_run, "--out", tmp_path, "--step", 2)
    assert code == 0, err
    assert json.loads((tmp_path / "config.json").read_text())["source"]["step"] == 2
    params, _ = checkpoint.restore_params(smoke_run, step=2)
    latest, _ = checkpoint.restore_params(smoke_run)
    from safetensors.numpy import load_file

    exported = load_file(tmp_path / "model.safetensors")["norm.weight"]
    np.testing.assert_array_equal(exported, params["backbone"]["norm"]["scale"])
    assert not np.array_equal(exported, latest["backbone"]["norm"]["scale"])

    code, err = run_cli(capsys, "--workdir", smoke_run, "--out", tmp_path, "--step", 3)
    assert code == 2 and "no checkpoint for step 3" in err and "[2, 4]" in err


def test_backbone_without_mapping_is_a_clear_error(tmp_path, capsys, smoke_run, monkeypatch):
    monkeypatch.delattr(vit_export, "export_torch")
    code, err = run_cli(capsys, "--workdir", smoke_run, "--out", tmp_path)
    assert code == 2
    assert "backbone 'vit' has no PyTorch export" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_npz_needs_biases(tmp_path, capsys):
    backbone = dict(variant="Ti/8", width=64, depth=2, num_heads=2, use_bias=False)
    write_checkpoint(tmp_path / "run", backbone, random_params(vit.Model(**backbone), seed=0))
    code, err = run_cli(capsys, "--workdir", tmp_path / "run", "--out", tmp_path / "x", "--npz")
    assert code == 2 and "export without --npz" in err
    assert not (tmp_path / "x").exists()  # nothing written, not even the safetensors


def test_missing_checkpoint_and_missing_export(tmp_path, capsys):
    code, err = run_cli(capsys, "--workdir", tmp_path / "nothing", "--out", tmp_path / "x")
    assert code == 2 and "no checkpoint in" in err
    with pytest.raises(UserError, match="run `selfsup export`"):
        export.load_torch(tmp_path)


def test_restore_tree_returns_backbone_collections(tmp_path):
    stats = {"backbone": {"bn": {"mean": np.arange(3.0)}}, "head": {"bn": {"mean": np.ones(2)}}}
    state = {
        "step": jnp.asarray(1, jnp.int32),
        "params": {"backbone": {"w": jnp.ones(2)}},
        "opt_state": {},
        "model_state": {"batch_stats": jax.tree.map(jnp.asarray, stats)},
    }
    mngr = checkpoint.Manager(tmp_path)
    mngr.save(1, state, {}, wait=True)
    mngr.close()
    trees, _ = checkpoint.restore_tree(tmp_path, ("params", "model_state"))
    variables = export._backbone_variables(trees, tmp_path)
    assert sorted(variables) == ["batch_stats", "params"]
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], np.arange(3.0))
    with pytest.raises(UserError, match="holds no ema"):
        checkpoint.restore_tree(tmp_path, ("params", "ema"))


# One process: an export that must not import torch, then a damaged checkpoint, whose error
# must be one line with exit code 2 from the command-line entry point.
_CLI_SCRIPT = """
import sys
from selfsup import cli
assert cli.main(["export", "--workdir", sys.argv[1], "--out", sys.argv[3]]) == 0
assert not {"torch", "timm", "torchvision"} & set(sys.modules), "export imported torch"
sys.exit(cli.main(["export", "--workdir", sys.argv[2], "--out", sys.argv[3] + "_bad"]))
"""


def test_export_imports_no_torch_and_corrupt_checkpoint_exits_2(tmp_path, smoke_run):
    workdir = tmp_path / "run"
    shutil.copytree(smoke_run, workdir)
    chunks = [
        p for p in (workdir / "checkpoints" / "4" / "state").rglob("*") if p.parent.name == "d"
    ]
    assert chunks, "no array files found: the orbax layout changed"
    for path in chunks:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_SCRIPT, smoke_run, workdir, tmp_path / "out"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "damaged or unreadable" in proc.stderr and "intact steps: [2]" in proc.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------- the README's loading snippet


def readme_snippet() -> str:
    """The README's PyTorch loading code block, as written."""
    text = (REPO / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    (snippet,) = [b for b in blocks if "safetensors.torch.load_file" in b]
    return snippet


def random_variables(model, size: int, seed: int) -> dict:
    """Host variables of `model` (params and, for BatchNorm, batch_stats) drawn at random, far
    from their init so that a dropped or swapped leaf shows; residual branches' last scales kept
    small so that activations stay O(1) through the depth."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        names = [str(getattr(p, "key", "")) for p in path]
        if names[-1] == "kernel":
            return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(
                np.prod(leaf.shape[:-1])
            )
        if names[-1] in ("scale", "var"):
            small = names[-2] in ("bn2", "bn3") and names[-3].startswith("layer")
            return rng.uniform(*((0.1, 0.3) if small else (0.5, 1.5)), leaf.shape).astype(
                np.float32
            )
        if names[-1] == "gamma":  # ConvNeXt's layer scale
            return rng.uniform(0.1, 0.3, leaf.shape).astype(np.float32)
        return (0.2 * rng.normal(size=leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, dict(shapes))


def save_backbone(workdir, backbone: dict, variables: dict) -> None:
    """A checkpoint as the training loop writes it, holding only this backbone."""
    config = config_lib.resolve(config_lib.load(SMOKE)).to_dict()
    config["backbone"] = backbone
    state = {
        "step": jnp.asarray(1, jnp.int32),
        "params": {"backbone": variables["params"]},
        "opt_state": {},
        "model_state": {k: {"backbone": v} for k, v in variables.items() if k != "params"},
    }
    mngr = checkpoint.Manager(workdir)
    mngr.save(1, state, {"config": config, "data_position": 1}, wait=True)
    mngr.close()


FAMILIES = {
    # The quickstart's shape: a Ti/4 at 32 px, which timm registers under no name.
    "vit": (dict(name="vit", variant="Ti/4", depth=2, width=64, num_heads=2), "timm"),
    "resnet18": (dict(name="resnet", variant="18"), "torchvision"),
    "resnet18x2": (dict(name="resnet", variant="18x2"), "selfsup"),
    "convnext": (
        dict(name="convnext", variant="tiny", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
        "timm",
    ),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_readme_snippet_and_load_torch_give_the_jax_features(tmp_path, capsys, family):
    """The README's loading code, run as written (only the export folder changed; resnet_torch.py
    copied beside it, as the README says), and `load_torch`, return [N, D] features equal to the
    JAX backbone's pooled output on the same normalised images."""
    backbone, library = FAMILIES[family]
    kwargs = {k: v for k, v in backbone.items() if k != "name"}
    model = backbones.build(backbone["name"], **kwargs)
    variables = random_variables(model, IMG, seed=len(family))
    save_backbone(tmp_path / "run", backbone, variables)
    out = tmp_path / "export"
    code, err = run_cli(capsys, "--workdir", tmp_path / "run", "--out", out)
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())
    assert record["library"] == library

    user_dir = tmp_path / "user"
    user_dir.mkdir()
    shutil.copy(REPO / "selfsup" / "export" / "resnet_torch.py", user_dir)
    snippet = readme_snippet()
    assert snippet.count('"/tmp/qs_export"') == 1
    sys.path.insert(0, str(user_dir))
    try:
        namespace: dict = {}
        exec(snippet.replace('"/tmp/qs_export"', repr(str(out))), namespace)
    finally:
        sys.path.remove(str(user_dir))
        sys.modules.pop("resnet_torch", None)
    features, pixels = namespace["features"].numpy(), namespace["images"].numpy()

    mean, std = np.asarray(record["mean"]), np.asarray(record["std"])
    x = ((pixels.transpose(0, 2, 3, 1) - mean) / std).astype(np.float32)
    want = np.asarray(jax.jit(model.apply)(variables, x).pooled)
    assert features.shape == want.shape and want.shape[1] > 0
    assert rel_err(features, want) < 1e-4

    with torch.no_grad():
        loaded = export.load_torch(out)(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    assert rel_err(loaded.numpy(), want) < 1e-4


def test_vit_export_names_the_architecture_timm_has():
    assert vit_export.timm_name(vit.Model(variant="B/16"), (224, 224)) == "vit_base_patch16_224"
    assert vit_export.timm_name(vit.Model(variant="S/8"), (224, 224)) == "vit_small_patch8_224"
    assert timm.is_model("vit_base_patch16_224") and timm.is_model("vit_small_patch8_224")
    # Not a registered geometry: timm's class, built from the kwargs.
    for model, size in (
        (vit.Model(variant="Ti/4", depth=4), (32, 32)),  # the quickstart's
        (vit.Model(variant="Ti/16"), (32, 32)),
        (vit.Model(variant="B/16", depth=6), (224, 224)),
    ):
        assert vit_export.timm_name(model, size) == "VisionTransformer"


def test_each_family_has_its_mapping_and_load_torch_takes_only_torch_modules():
    assert export.exportable() == ["convnext", "resnet", "vit"]
    module = export.torch_library({"library": "selfsup", "module": "resnet_torch"})
    assert module.__name__ == "selfsup.export.resnet_torch" and hasattr(module, "ResNet")
    # The mappings beside it are no PyTorch modules: a config.json naming one is refused.
    with pytest.raises(UserError, match="one of selfsup's PyTorch modules"):
        export.torch_library({"library": "selfsup", "module": "vit"})
