"""`selfsup eval` end to end on smoke checkpoints: JSON records, step choice, collections, and
clear errors for a backbone that does not match the checkpoint."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from selfsup import checkpoint, cli, evaluators, train
from selfsup import config as config_lib
from selfsup.commands import eval as eval_command
from selfsup.errors import UserError

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
        train.train_and_evaluate(config, str(workdir))
        out[name] = workdir
    return out


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_eval_cli_writes_the_record(name, checkpoints, capsys):
    # The linear probe on the quickstart's ViT, the quicker k-NN on the other backbones.
    kind = "linear_probe" if name == "quickstart.py" else "knn"
    workdir = checkpoints[name]
    argv = ["eval", "--workdir", str(workdir), "--config", f"configs/eval/{kind}.py:smoke"]
    assert cli.main(argv) == 0
    assert f"{kind} at step 2: " in capsys.readouterr().err
    record = json.loads((workdir / f"eval_{kind}.json").read_text())
    saved = json.loads((workdir / "config.json").read_text())
    assert record["step"] == 2 and record["evaluator"] == kind
    assert record["backbone"] == saved["backbone"]
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
    assert json.loads((workdir / "eval_knn.json").read_text())["step"] == 1
    config = eval_config("attentive_probe.py:smoke,blocks=2", label="attn")
    attn = eval_command.evaluate_checkpoint(str(workdir), config)
    assert attn["protocol"]["features"] == "last_2_blocks" and attn["step"] == 2
    assert 0.0 <= attn["results"]["top1"] <= 1.0
    assert (workdir / "eval_attn.json").exists()


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
