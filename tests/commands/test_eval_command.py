"""`selfsup eval` end to end on smoke checkpoints: JSON records kept per evaluator and step, the
random-init baseline, what each split held, a source without a test split evaluated on held-out
images only, step choice, collections, and clear errors for a backbone that does not match the
checkpoint."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from selfsup import cli, evaluators
from selfsup import config as config_lib
from selfsup.commands import eval as eval_command
from selfsup.errors import UserError
from selfsup.io import checkpoint
from selfsup.train import loop

# A failed restore leaves orbax reads in flight that later find its event loop closed.
pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)

TRAIN_CONFIGS = [
    name
    for name in ("quickstart.py", "supervised_vit_builtin.py", "supervised_resnet_builtin.py")
    if (REPO / "configs" / name).exists()
]


def eval_config(spec: str, **overrides) -> config_lib.mlc.ConfigDict:
    loaded = config_lib.load(str(REPO / "configs" / "eval" / spec))
    return evaluators.resolve(loaded, {k: str(v) for k, v in overrides.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """Workdir per training config, each with checkpoints at steps 1 and 2."""
    out = {}
    for name in TRAIN_CONFIGS:
        config = config_lib.resolve(
            config_lib.load(str(REPO / "configs" / f"{name}:smoke")),
            {"total_steps": "2", "checkpoint_every_steps": "1", "log_every_steps": "2"},
        )
        workdir = tmp_path_factory.mktemp(name.removesuffix(".py"))
        loop.train_and_evaluate(config, str(workdir))
        out[name] = workdir
    return out


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_eval_cli_writes_the_record(name, checkpoints, capsys):
    # The linear probe on the quickstart's ViT, the quicker k-NN on the other backbones.
    kind = "linear_probe" if name == "quickstart.py" else "knn"
    workdir = checkpoints[name]
    argv = ["eval", "--workdir", str(workdir), "--config", f"configs/eval/{kind}.py:smoke"]
    assert cli.main(argv) == 0
    line = capsys.readouterr().err
    assert f"{kind} at step 2: top-1 " in line and "%" in line
    record = json.loads((workdir / "eval" / f"{kind}_step2.json").read_text())
    assert f"-> {workdir / 'eval' / f'{kind}_step2.json'}" in line
    saved = json.loads((workdir / "config.json").read_text())
    assert record["step"] == 2 and record["evaluator"] == kind
    assert record["backbone"] == saved["backbone"] and "random_init" not in record
    for role, split, n in (("train", "train", 256), ("test", "test", 128)):
        data = record["data"][role]
        assert (data["split"], data["images"], data["classes"]) == (split, n, 10)
        assert data["split_images"] == {"train": 20000, "test": 2000}[split]
        assert data["classes_present"] == 10 and "subset of" in data["source"]
    protocol = record["protocol"]
    assert protocol["data"]["source"] == "builtin" and protocol["train_limit"] == 256
    assert protocol["view"].endswith("normalize('imagenet')")
    results = record["results"]
    assert 0.0 <= results["top1"] <= results["top5"] <= 1.0
    if kind == "linear_probe":
        assert protocol["learning_rates"] == [0.03, 0.3] and protocol["epochs"] == 10
        assert set(results) == {"top1", "top5", "val_top1", "lr", "weight_decay"}
    else:
        assert protocol["k"] == 20 and protocol["temperature"] == 0.07
        assert set(results) == {"top1", "top5"}


def test_knn_and_attentive_probe_on_an_earlier_step(checkpoints):
    workdir = checkpoints["quickstart.py"]
    knn = eval_command.evaluate_checkpoint(str(workdir), eval_config("knn.py:smoke"), step=1)
    assert knn["step"] == 1 and set(knn["results"]) == {"top1", "top5"}
    assert json.loads((workdir / "eval" / "knn_step1.json").read_text())["step"] == 1
    config = eval_config("attentive_probe.py:smoke,blocks=2", label="attn")
    attn = eval_command.evaluate_checkpoint(str(workdir), config)
    assert attn["protocol"]["features"] == "last_2_blocks" and attn["step"] == 2
    assert 0.0 <= attn["results"]["top1"] <= 1.0
    assert (workdir / "eval" / "attn_step2.json").exists()


def test_a_backbone_that_does_not_match_the_checkpoint_is_a_user_error(checkpoints, capsys):
    workdir = str(checkpoints["quickstart.py"])
    deeper = eval_config("knn.py:smoke", **{"backbone.depth": 3})
    with pytest.raises(UserError, match=r"backbone mismatch: .* has params/blocks_2/"):
        eval_command.evaluate_checkpoint(workdir, deeper)
    wider = eval_config("knn.py:smoke", **{"backbone.width": 32})
    with pytest.raises(UserError, match=r"backbone mismatch: params/.* in the checkpoint but"):
        eval_command.evaluate_checkpoint(workdir, wider)
    argv = ["eval", "--workdir", workdir, "--config", "configs/eval/knn.py:smoke"]
    assert cli.main([*argv, "--config.backbone.variant=Ti/4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfsup: error: backbone mismatch") and err.count("\n") == 1


def test_missing_checkpoint_and_bad_feature_are_user_errors(tmp_path, checkpoints):
    with pytest.raises(UserError, match="no checkpoint"):
        eval_command.evaluate_checkpoint(str(tmp_path), eval_config("knn.py:smoke"))
    workdir = str(checkpoints["quickstart.py"])
    with pytest.raises(UserError, match="no such block"):
        eval_command.evaluate_checkpoint(workdir, eval_config("knn.py:smoke", features="block_7"))


def test_model_state_collections_reach_the_backbone(tmp_path):
    """The backbone's subtree of every collection is kept, other modules' dropped."""
    # A checkpoint with BatchNorm statistics, as a ResNet run saves them.
    stats = {"bn": {"mean": jnp.arange(3.0), "var": jnp.ones(3)}}
    state = {
        "step": jnp.asarray(1, jnp.int32),
        "params": {"backbone": {"conv": {"kernel": jnp.ones((2, 3))}}},
        "opt_state": {},
        "model_state": {"batch_stats": {"backbone": stats, "head": {"m": jnp.zeros(2)}}},
    }
    manager = checkpoint.Manager(tmp_path)
    manager.save(1, state, {"config": {}}, wait=True)
    manager.close()
    trees, _ = checkpoint.restore_tree(tmp_path, ("params", "model_state"))
    variables = evaluators.backbone_variables(trees["params"], trees["model_state"])
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], [0.0, 1.0, 2.0])
    with pytest.raises(UserError, match="no saved config"):
        eval_command.evaluate_checkpoint(str(tmp_path), eval_config("knn.py:smoke"))


def test_results_are_kept_per_step_beside_the_random_init_baseline(checkpoints, capsys):
    workdir = checkpoints["quickstart.py"]
    argv = ["eval", "--workdir", str(workdir), "--config", "configs/eval/knn.py:smoke"]
    assert cli.main([*argv, "--step", "1"]) == 0
    first = json.loads((workdir / "eval" / "knn_step1.json").read_text())
    assert cli.main([*argv, "--random-init"]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    # The earlier step's record is still there, unchanged.
    assert json.loads((workdir / "eval" / "knn_step1.json").read_text()) == first
    record = json.loads((workdir / "eval" / "knn_step2.json").read_text())
    base = record["random_init"]
    assert base["seed"] == 0 and set(base["results"]) == {"top1", "top5"}
    trained, random = record["results"]["top1"], base["results"]["top1"]
    assert f"top-1 {100 * trained:.1f}% (random init {100 * random:.1f}%)" in line
    # The same protocol on the same backbone at random initialisation as the training loop's.
    config = eval_config("knn.py:smoke")
    saved = json.loads((workdir / "config.json").read_text())
    mesh = evaluators.sharding.make_mesh({"data": -1, "fsdp": 1})
    want = evaluators.at_random_init([config.to_dict()], saved, mesh=mesh)
    assert base["results"]["top1"] == want["knn/top1"]


def test_a_flat_folder_is_evaluated_on_held_out_images_only(tmp_path, checkpoints, capsys):
    """`<class>/<image>` has no test split: the record says which 10% was held out and how many
    images and classes each split had; no test image is a training image."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "flat" / f"class{c}").mkdir(parents=True)
        for i in range(20):
            pixels = rng.integers(0, 256, (8, 8, 3), np.uint8)
            Image.fromarray(pixels).save(tmp_path / "flat" / f"class{c}" / f"{i:02d}.png")
    workdir = checkpoints["quickstart.py"]
    argv = ["eval", "--workdir", str(workdir), "--config", "configs/eval/knn.py:smoke"]
    argv += ["--config.data.source=folder", f"--config.data.path={tmp_path / 'flat'}"]
    assert cli.main([*argv, "--config.label=flat"]) == 0
    assert "train 54 images of 3 classes (train); test 6 images of 3 classes (test)" in (
        capsys.readouterr().err
    )
    data = json.loads((workdir / "eval" / "flat_step2.json").read_text())["data"]
    assert (data["train"]["images"], data["test"]["images"]) == (54, 6)
    assert data["train"]["split_images"] + data["test"]["split_images"] == 60
    assert data["test"]["classes"] == data["test"]["classes_present"] == 3
    assert "held out from 'train'" in data["test"]["source"]
    assert str(tmp_path / "flat") in data["test"]["source"]
