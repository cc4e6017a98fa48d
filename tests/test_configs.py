"""Every config file: its docstring (run command, no placeholder) and its `smoke` variant, which
must build the backbone family the config names, at 32 px (SparK's at 64 px: a 2 x 2 grid of its
stride-32 mask cells). Built with `jax.eval_shape` only: nothing is compiled here; the slow
end-to-end runs of the same variants are in test_train.py."""

from __future__ import annotations

import ast
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import REPO

from selfsup import augment, backbones, objectives
from selfsup import config as config_lib
from selfsup.errors import UserError
from selfsup.train import state as state_lib
from selfsup.train import teacher

TRAIN_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py"))
ALL_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py"))
PLACEHOLDER = re.compile(r"RESULT_PLACEHOLDER|\bTODO\b|\bTBD\b|\bXXX\b")


def docstring(path: str) -> str:
    return ast.get_docstring(ast.parse((REPO / path).read_text())) or ""


@pytest.mark.parametrize("path", ALL_CONFIGS)
def test_docstring_names_its_run_command_and_has_no_placeholder(path):
    doc = docstring(path)
    command = "eval" if path.startswith("configs/eval/") else "train"
    assert re.search(rf"selfsup {command} [^\n]*--config {re.escape(path)}\b", doc), (
        f"{path}: the docstring must give its run command, `selfsup {command} ... --config {path}`"
    )
    assert not PLACEHOLDER.search(doc), f"{path}: placeholder {PLACEHOLDER.search(doc)[0]!r}"


def test_the_placeholder_check_catches_the_old_docstring():
    assert PLACEHOLDER.search("Train accuracy (logged as `accuracy`) RESULT_PLACEHOLDER.")
    assert PLACEHOLDER.search("top-1 TBD") and not PLACEHOLDER.search("TBDx, XXXL")


def family(name: str) -> str:
    """The backbone family the config names: its full (not smoke) variant's."""
    return config_lib.resolve(config_lib.load(str(REPO / "configs" / name))).backbone.name


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_smoke_variant_builds_its_own_backbone_family(name):
    config = config_lib.resolve(config_lib.load(str(REPO / "configs" / f"{name}:smoke")))
    expected = family(name)
    assert config.backbone.name == expected
    # configs/<objective>_<family>_<dataset>.py names the family in the file name too.
    if name.count("_") >= 2:
        assert f"_{expected}_" in name
    size = config.data.image_size
    assert size == (64 if config.objective.name == "spark" else 32)
    objective = teacher.with_teacher(config.objective.to_dict())
    model = objectives.build(objective, config.backbone.to_dict(), num_classes=10)
    assert type(model.backbone).__module__ == f"selfsup.backbones.{expected}"
    views = tuple(
        jnp.zeros(v.shape, v.dtype)
        for v in jax.eval_shape(
            augment.build(config.views),
            jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8),
            jax.random.key(0),
        )
    )
    state = jax.eval_shape(state_lib.init_fn(model, optax.identity(), views, config.seed))
    assert "backbone" in state.params and jax.tree.leaves(state.params["backbone"])


@pytest.mark.parametrize("name", [n for n in TRAIN_CONFIGS if family(n) == "resnet"])
def test_resnet_smoke_variants_are_tiny(name):
    """The ResNet configs' smoke variants compile in seconds: one block per stage, 8 base
    channels, the CIFAR stem at 32 px (not SparK's: its mask needs the stride-32 grid)."""
    config = config_lib.resolve(config_lib.load(str(REPO / "configs" / f"{name}:smoke")))
    if name == "supervised_resnet_builtin.py":
        pytest.skip("its smoke run is the ResNet-18 that the torchvision export tests load")
    backbone = config.backbone
    assert tuple(backbone.blocks) == (1, 1, 1, 1) and backbone.channels == 8
    assert backbone.get("cifar_stem", False) == (config.objective.name != "spark")


def test_distill_smoke_teacher_is_a_tiny_resnet():
    """The distillation smoke run trains its own teacher (cached), on the student's family."""
    config = config_lib.resolve(
        config_lib.load(str(REPO / "configs" / "simclr_distill_resnet_in1k.py:smoke"))
    )
    saved = config_lib.load(str(REPO / "configs" / "supervised_resnet_builtin.py:smoke"))
    from selfsup.io import checkpoint

    _, meta = checkpoint.restore_tree(config.objective.teacher, ("params",))
    teacher = meta["config"]["backbone"]
    assert teacher["name"] == saved.backbone.name == "resnet"
    assert teacher["cifar_stem"] is True and teacher["channels"] == 8


def test_switching_the_backbone_family_by_override_is_a_clear_error():
    """A ViT config with `--config.backbone.name=resnet` keeps its ViT keys: a one-line error
    says so, naming the family those keys belong to."""
    config = config_lib.resolve(
        config_lib.load(str(REPO / "configs" / "mae_vit_in1k.py:smoke")),
        {"backbone.name": "resnet"},
    )
    backbone = config.backbone.to_dict()
    with pytest.raises(UserError, match=r"unknown key '\w+', a setting of backbone 'vit'") as e:
        backbones.build(backbone.pop("name"), **backbone)
    assert "\n" not in str(e.value) and "config.backbone.name" in str(e.value)
