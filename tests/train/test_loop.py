"""The training loop end to end: every config's smoke run, resume after a signal, divergence."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, run_python

from selfsup import augment, data, optim
from selfsup import config as config_lib
from selfsup.io import checkpoint
from selfsup.parallel import sharding
from selfsup.train import loop, monitors
from selfsup.train import state as state_lib
from selfsup.train import step as step_lib

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py"))
# The default tier resumes one config per kind of state (test_one_config_per_kind_of_state checks
# that each has it); the slow tier resumes every config.
RESUME_KINDS = {
    "quickstart.py": "plain",
    "simclr_resnet_in1k.py": "batch_stats",
    "swav_resnet_in1k.py": "queue",
    "simclr_distill_resnet_in1k.py": "teacher",
}


def smoke(name: str = "quickstart.py", **overrides) -> config_lib.mlc.ConfigDict:
    return config_lib.resolve(
        config_lib.load(str(REPO / "configs" / f"{name}:smoke")),
        {k: str(v) for k, v in overrides.items()},
    )


def losses(workdir) -> dict[int, float]:
    lines = Path(workdir, "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in RESUME_KINDS else pytest.mark.slow) for n in CONFIGS]
)
def test_every_config_smoke_trains_and_resumes_exactly(name, tmp_path):
    """Train the smoke run with a checkpoint every step, drop the last checkpoint as a crash
    would, and run the same command again: the last step is redone with the same loss, and the
    parameters and model state (BatchNorm statistics, queues) come out bit-identical."""
    config = smoke(name, checkpoint_every_steps=1, keep_checkpoints=2)
    out = loop.train_and_evaluate(config, str(tmp_path))
    assert np.isfinite(out["loss"])
    assert out["train_step_compilations"] == 1  # no retrace after the first step
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["objective"]["name"] and saved["batch_size"] > 0
    last = checkpoint.Manager(tmp_path).latest_step()
    assert last == saved["total_steps"]
    final, _ = checkpoint.restore_tree(tmp_path, ("params", "model_state"))

    shutil.rmtree(tmp_path / "checkpoints" / str(last))
    resumed = loop.train_and_evaluate(config, str(tmp_path))
    assert resumed["loss"] == out["loss"]
    again, _ = checkpoint.restore_tree(tmp_path, ("params", "model_state"))
    leaves = jax.tree_util.tree_leaves_with_path(final)
    assert len(leaves) == len(jax.tree_util.tree_leaves(again))
    for path, value in leaves:
        other = again
        for key in path:
            other = other[key.key]
        np.testing.assert_array_equal(value, other, err_msg=jax.tree_util.keystr(path))


def test_one_config_per_kind_of_state():
    """The default tier's resumed configs hold the state their kind names (built abstractly)."""
    assert set(RESUME_KINDS) <= set(CONFIGS)
    for name, kind in RESUME_KINDS.items():
        config = smoke(name)
        mesh = sharding.make_mesh(config.mesh)
        program = step_lib.build_program(config, mesh, num_classes=10, steps_per_epoch=100)
        collections = set(program.abstract_state.model_state)
        if kind == "plain":
            assert collections == set(), (name, collections)
        elif kind == "batch_stats":
            assert collections == {"batch_stats"}, (name, collections)
        else:  # SwAV's queue, distillation's frozen teacher (beside the ResNet's statistics)
            assert kind in collections, (name, collections)
        assert (config.objective.name == "distill") == (kind == "teacher"), name


@pytest.mark.slow  # end to end through the loop
def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    config = smoke(total_steps=8, checkpoint_every_steps=100, log_every_steps=1)
    full = loop.train_and_evaluate(config, str(tmp_path / "full"))

    # Deliver SIGTERM to ourselves while the loader hands out the 4th batch.
    iterate = data.Loader.iterate

    def iterate_then_signal(self, start_step=0):
        for i, batch in enumerate(iterate(self, start_step)):
            if start_step + i == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(data.Loader, "iterate", iterate_then_signal)
    with pytest.raises(loop.Interrupted) as info:
        loop.train_and_evaluate(config, str(tmp_path / "split"))
    assert info.value.signum == signal.SIGTERM
    assert checkpoint.Manager(tmp_path / "split").latest_step() == 4
    monkeypatch.setattr(data.Loader, "iterate", iterate)
    resumed = loop.train_and_evaluate(config, str(tmp_path / "split"))

    assert losses(tmp_path / "split") == losses(tmp_path / "full")
    assert sorted(losses(tmp_path / "full")) == list(range(1, 9))
    assert resumed["loss"] == full["loss"]
    a, _ = checkpoint.restore_params(tmp_path / "full")
    b, meta = checkpoint.restore_params(tmp_path / "split")
    assert meta["data_position"] == 8
    flat_a, flat_b = _flatten(a), _flatten(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)


@pytest.mark.slow  # end to end through the loop
@pytest.mark.parametrize("every", [{}, {"log_every_steps": 100, "checkpoint_every_steps": 1}])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tmp_path, every):
    """The update of step 3 breaks the parameters: caught at step 3 by the parameter norm the
    loop takes at each log (smoke: every step) and before each save (the second case: a save
    due at step 3 and no log), so step 3 is never saved."""
    logged = loop.train_and_evaluate(smoke(total_steps=2, **every), str(tmp_path))
    params, _ = checkpoint.restore_params(tmp_path)
    want = np.sqrt(sum(np.sum(np.float64(v) ** 2) for v in _flatten(params).values()))
    np.testing.assert_allclose(logged["param_norm"], want, rtol=1e-5)
    with pytest.raises(monitors.Diverged, match=r"at step 3.*last good checkpoint \(step 2\)"):
        loop.train_and_evaluate(
            smoke(**{"total_steps": 4, "optim.base_lr": "1e999", **every}), str(tmp_path)
        )
    manager = checkpoint.Manager(tmp_path)
    assert manager.latest_step() == 2
    params, _ = checkpoint.restore_params(tmp_path)
    assert all(np.isfinite(v).all() for v in _flatten(params).values())


@pytest.mark.slow  # end to end through the loop
def test_cli_sigterm_saves_and_the_same_command_resumes(tmp_path):
    exe = shutil.which("selfsup")
    assert exe, "the `selfsup` console script is not installed"
    workdir = tmp_path / "run"
    cmd = [
        exe,
        "train",
        "--config",
        "configs/quickstart.py:smoke",
        "--workdir",
        str(workdir),
        "--config.total_steps=100000",
        "--config.checkpoint_every_steps=100000",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "run the same command to resume" in err.lower()
    saved = checkpoint.Manager(workdir).latest_step()
    assert saved is not None and saved >= 3

    # The same command (with a reachable end) continues from the saved step.
    done = subprocess.run(
        [*cmd[:-2], f"--config.total_steps={saved + 2}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    steps = sorted(losses(workdir))
    assert steps[-1] == saved + 2 and steps.count(saved + 1) == 1


@pytest.mark.slow  # end to end through the loop
def test_python_dash_m_train_is_the_cli(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "selfsup.train",
            "--config",
            "configs/quickstart.py:smoke",
            "--workdir",
            str(tmp_path),
            "--config.total_steps=2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(losses(tmp_path)) == [1, 2]
    assert list((tmp_path / "tensorboard").iterdir()), "no TensorBoard event file"


def test_the_step_updates_donated_parameters_without_copying_them_first():
    """On XLA:CPU, `jit_train_step` compiles with copy insertion by region analysis; the
    default copy insertion copies each donated parameter before the step reads it."""
    config = smoke()
    mesh = sharding.make_mesh(config.mesh)
    tx, schedule = optim.build(config.optim, batch_size=config.batch_size, total_steps=10)
    model = step_lib.build_model(config, num_classes=10)
    views_fn = augment.build(config.views)
    size = config.data.image_size
    image = jnp.zeros((config.batch_size, size, size, 3), jnp.uint8)
    views = jax.eval_shape(views_fn, image, jax.random.key(0))
    views = tuple(jnp.zeros(v.shape, v.dtype) for v in views)
    state, shardings = state_lib.create(model, tx, views, 0, mesh, config.param_sharding)
    batch = {"image": image, "label": jnp.zeros((config.batch_size,), jnp.int32)}

    def parameter_copies(**options) -> int:
        step = step_lib.jit_train_step(model, tx, views_fn, 0, schedule, mesh, shardings)
        if options:  # the default copy insertion, for contrast
            step = jax.jit(step.__wrapped__, donate_argnums=0, compiler_options=options)
        hlo = step.lower(state, batch).compile().as_text()
        return len(re.findall(r"copy\(%state_params_", hlo))

    assert parameter_copies() == 0
    assert parameter_copies(xla_cpu_copy_insertion_use_region_analysis=False) > 0


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_parameters(tmp_path):
    f32 = loop.train_and_evaluate(smoke(total_steps=2), str(tmp_path / "f32"))
    bf16 = loop.train_and_evaluate(
        smoke(total_steps=2, compute_dtype="bfloat16"), str(tmp_path / "bf16")
    )
    assert bf16["loss"] != f32["loss"]  # the activations really were bf16
    np.testing.assert_allclose(bf16["loss"], f32["loss"], rtol=5e-2)
    params, _ = checkpoint.restore_params(tmp_path / "bf16")
    assert {v.dtype for v in _flatten(params).values()} == {np.dtype(np.float32)}


@pytest.mark.slow
def test_resume_on_another_mesh_continues_the_same_run(tmp_path):
    reference = loop.train_and_evaluate(smoke(total_steps=4), str(tmp_path / "one"))
    loop.train_and_evaluate(smoke(total_steps=2), str(tmp_path / "moved"))
    run_python(
        "from selfsup import config as C\n"
        "from selfsup.train import loop\n"
        "cfg = C.resolve(C.load('configs/quickstart.py:smoke'),\n"
        "                {'total_steps': '4', 'mesh.data': '2', 'mesh.fsdp': '4'})\n"
        f"loop.train_and_evaluate(cfg, {str(tmp_path / 'moved')!r})\n",
        devices=8,
    )
    moved = losses(tmp_path / "moved")
    assert sorted(moved) == [1, 2, 3, 4]
    np.testing.assert_allclose(moved[4], reference["loss"], rtol=1e-4)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = np.asarray(v)
    return out
