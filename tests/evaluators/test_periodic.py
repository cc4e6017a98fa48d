"""Evaluators inside the training loop: when they run, where their results go, and that they
read the live parameters (the same numbers as `selfsup eval` on the checkpoint of that step)."""

from __future__ import annotations

import json
import struct

import pytest
from conftest import REPO, run_python
from tensorboardX.proto import event_pb2

from selfsup import config as config_lib
from selfsup.commands.eval import evaluate_checkpoint
from selfsup.errors import UserError
from selfsup.evaluators import periodic, resolve
from selfsup.parallel import sharding
from selfsup.train import loop

KNN = dict(name="knn", k=5, train_limit=64, test_limit=32, batch_size=16)
# One (lr, wd) pair: no selection step, one compile of the probe.
PROBE = dict(
    name="linear_probe",
    train_limit=64,
    test_limit=32,
    batch_size=16,
    epochs=3,
    warmup_epochs=1,
    learning_rates=(0.1,),
    weight_decays=(0.0,),
)


def quickstart(**overrides) -> config_lib.mlc.ConfigDict:
    config = config_lib.load(str(REPO / "configs" / "quickstart.py:smoke"))
    config.total_steps = 4
    config.checkpoint_every_steps = 2
    config.update(overrides)
    return config_lib.resolve(config)


def tensorboard_scalars(directory) -> dict[tuple[str, int], float]:
    """{(tag, step): value} from the TFRecord-framed event files (no TensorBoard install)."""
    out = {}
    for path in directory.iterdir():
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            for value in event.summary.value:
                out[(value.tag, event.step)] = value.simple_value
            i += 12 + n + 4  # length, its crc, the record, its crc
    return out


@pytest.mark.slow  # end to end through the loop
def test_evaluators_run_every_n_steps_and_log_to_jsonl_and_tensorboard(tmp_path, capsys):
    knn_every_3 = {**KNN, "every_steps": 3, "label": "knn3"}
    config = quickstart(
        evaluators=dict(every_steps=2, at_end=True, random_init=True, run=(KNN, PROBE, knn_every_3))
    )
    out = loop.train_and_evaluate(config, str(tmp_path))

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in records if "eval/knn/top1" in r}
    assert sorted(evals) == [2, 4]
    for record in evals.values():
        for key in ("eval/knn/top1", "eval/knn/top5", "eval/linear_probe/top1"):
            assert 0.0 <= record[key] <= 1.0, key
    # The random-init baseline runs once, beside the first evaluation.
    baseline = [r["step"] for r in records if "random_init/knn/top1" in r]
    assert baseline == [2]
    assert out["eval/knn/top1"] == evals[4]["eval/knn/top1"]
    # An evaluator's own every_steps thins it during training; at the end every evaluator runs.
    assert [r["step"] for r in records if "eval/knn3/top1" in r] == [4]

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert scalars[("eval/knn/top1", 2)] == pytest.approx(evals[2]["eval/knn/top1"])
    assert scalars[("eval/linear_probe/top1", 4)] == pytest.approx(
        evals[4]["eval/linear_probe/top1"]
    )
    assert ("random_init/linear_probe/top1", 2) in scalars

    err = capsys.readouterr().err
    assert "step 2 evaluation: knn top-1" in err and "(random init " in err
    assert "step 4 evaluation: knn top-1" in err

    # The loop evaluated the live parameters: `selfsup eval` on the saved checkpoints agrees.
    for step in (2, 4):
        record = evaluate_checkpoint(str(tmp_path), resolve(KNN), step=step)
        assert record["results"]["top1"] == evals[step]["eval/knn/top1"]
        assert record["results"]["top5"] == evals[step]["eval/knn/top5"]


@pytest.mark.parametrize(
    "settings, due",
    [
        (dict(every_steps=0, at_end=True), [8]),
        (dict(every_steps=3, at_end=True), [3, 6, 8]),
        (dict(every_steps=4, at_end=False), [4, 8]),
        (dict(every_steps=0, at_end=False), []),
    ],
)
def test_when_evaluators_are_due(settings, due):
    config = quickstart(evaluators=dict(run=(KNN,), **settings))
    evals = periodic.DuringTraining(config, sharding.make_mesh(config.mesh))
    assert [s for s in range(1, 9) if evals.due(s, at_end=s == 8)] == due
    config = quickstart(evaluators=dict(run=(), **settings))
    assert not any(periodic.DuringTraining(config, None).due(s, True) for s in range(1, 9))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({**KNN, "kk": 3}, "unknown evaluator key 'kk'"),
        ({**PROBE, "warmup_epochs": 5}, "need epochs >= 1 and 0 <= warmup_epochs < epochs"),
    ],
)
def test_a_bad_evaluator_config_fails_before_training(tmp_path, bad, message):
    config = quickstart(evaluators=dict(every_steps=2, run=(bad,)))
    with pytest.raises(UserError, match=message):
        loop.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    with pytest.raises(UserError, match="evaluators.run: give a tuple of evaluator configs"):
        quickstart(evaluators=dict(run=("knn",)))


@pytest.mark.slow
def test_evaluators_on_an_fsdp_sharded_state_match_one_device(tmp_path):
    # Parameters sharded over 4 of 8 emulated devices, the batch over the other axis.
    out = run_python(
        "import json\n"
        "from selfsup import config as C\n"
        "from selfsup.train import loop\n"
        "cfg = C.load('configs/quickstart.py:smoke')\n"
        f"cfg.evaluators = dict(at_end=True, run=({KNN!r},))\n"
        "cfg = C.resolve(cfg, {'total_steps': '2', 'mesh.data': '2', 'mesh.fsdp': '4'})\n"
        f"out = loop.train_and_evaluate(cfg, {str(tmp_path)!r})\n"
        "print(json.dumps(out['eval/knn/top1']))\n",
        devices=8,
    )
    record = evaluate_checkpoint(str(tmp_path), resolve(KNN))
    assert record["step"] == 2
    # The same parameters; the features differ only by float rounding: at most one of the 32
    # test images may change its vote.
    assert abs(record["results"]["top1"] - json.loads(out.strip().splitlines()[-1])) <= 1 / 32
