"""The path GPUs and TPUs take, proven on a CPU: every config's train step lowers for `tpu` and
`cuda` with none of the CPU forms in it; so do an evaluator's feature extraction and the step
sharded over 8 devices; `selfsup train --lower-only`; one bf16 step per backbone family in the
reference form."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from selfsup import backbones, evaluators, ops
from selfsup import config as config_lib
from selfsup.evaluators import features
from selfsup.parallel import sharding
from selfsup.train import lower
from selfsup.train import state as state_lib
from selfsup.train import step as step_lib

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py"))
ACCELERATORS = ("tpu", "cuda")
# One config per backbone family for the checks that run (not only lower) a step.
FAMILY_CONFIGS = {
    "vit": "quickstart.py",
    "resnet": "supervised_resnet_builtin.py",
    "convnext": "supervised_convnext_builtin.py",
}


def smoke(name: str, **overrides) -> config_lib.mlc.ConfigDict:
    return config_lib.resolve(
        config_lib.load(f"{REPO / 'configs' / name}:smoke"),
        {k: str(v) for k, v in overrides.items()},
    )


def one_device():
    return sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])


def assert_no_cpu_forms(text: str, where: str) -> None:
    assert "optimization_barrier" not in text, where
    assert ops.CPU_FORM_SCOPE not in text, where


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_lowers_for_tpu_and_cuda_without_cpu_forms(name):
    config = smoke(name)
    result = lower.lower_train_step(config, (*ACCELERATORS, "cpu"), one_device())
    for platform in ACCELERATORS:
        assert_no_cpu_forms(result.text(platform), f"{name} on {platform}")
        assert result.flops(platform) > 0
    if FAMILY_CONFIGS.get(config.backbone.name) == name:
        # The same step lowered for CPU does hold them: the check above can fail.
        assert ops.CPU_FORM_SCOPE in result.text("cpu"), name


def test_families_are_all_covered():
    families = {m.name for m in pkgutil.iter_modules(backbones.__path__)}
    assert families == set(FAMILY_CONFIGS)
    for family, name in FAMILY_CONFIGS.items():
        assert smoke(name).backbone.name == family


def test_feature_extraction_lowers_for_tpu_and_cuda():
    config = smoke("supervised_resnet_builtin.py")
    view = evaluators.default_view(config)
    backbone, encode_fn, example = evaluators.build_backbone(config.backbone, view, 32)
    variables = jax.eval_shape(backbone.init, jax.random.key(0), example)
    mesh = one_device()
    batch = 8
    images = jax.ShapeDtypeStruct((batch, 32, 32, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    valid = jax.ShapeDtypeStruct((batch,), jnp.bool_)
    traced = features._extract_batch.trace(
        variables,
        images,
        labels,
        valid,
        encode_fn=encode_fn,
        view=view,
        feature="pooled",
        mesh=mesh,
    )
    for platform in ACCELERATORS:
        text = traced.lower(lowering_platforms=(platform,)).as_text(debug_info=True)
        assert_no_cpu_forms(text, platform)
        assert "stablehlo.convolution" in text  # the ResNet really is in it
    assert ops.CPU_FORM_SCOPE in traced.lower(lowering_platforms=("cpu",)).as_text(debug_info=True)


EIGHT_DEVICE_LOWERING = """
import json
from selfsup import config as C, ops
from selfsup.train import lower
from selfsup.parallel import sharding
cfg = C.resolve(C.load('configs/quickstart.py:smoke'), {'mesh.data': '4', 'mesh.fsdp': '2'})
result = lower.lower_train_step(cfg, ('tpu', 'cuda'))
texts = {p: result.text(p) for p in ('tpu', 'cuda')}
print(json.dumps({
    "mesh": dict(result.program.abstract_state.step.sharding.mesh.shape),
    "cpu_forms": any(ops.CPU_FORM_SCOPE in t or 'optimization_barrier' in t
                     for t in texts.values()),
    # Shardy's mesh and the batch split over both axes, the parameters over fsdp.
    "sharded": all('sdy.mesh @mesh = <["data"=4, "fsdp"=2]>' in t
                   and '[{"data", "fsdp"}, {}, {}, {}]' in t and '{"fsdp"}' in t
                   for t in texts.values()),
}))
"""

EIGHT_DEVICE_CHECKS = {"lower_sharded_step": EIGHT_DEVICE_LOWERING}


def test_the_eight_device_sharded_step_lowers_for_tpu_and_cuda(eight_devices):
    out = json.loads(eight_devices("lower_sharded_step"))
    assert out == {"mesh": {"data": 4, "fsdp": 2}, "cpu_forms": False, "sharded": True}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selfsup.cli", "train", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


def test_lower_only_command_prints_parameters_and_cost():
    proc = run_cli("--config", "configs/quickstart.py:smoke", "--lower-only", "tpu,cuda")
    assert proc.returncode == 0, proc.stderr
    config = smoke("quickstart.py")
    model = step_lib.build_model(config, 10)
    views = (jnp.zeros((2, 32, 32, 3)),)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), views, train=False))["params"]
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    assert f"{count:,} parameters" in proc.stderr
    for platform in ("tpu", "cuda"):
        assert f"selfsup: {platform}: lowered (" in proc.stderr
        assert "GFLOP per step" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lower_only_names_a_bad_platform_in_one_line():
    proc = run_cli("--config", "configs/quickstart.py:smoke", "--lower-only", "tpu,quantum")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "--lower-only 'tpu,quantum'" in proc.stderr and "Traceback" not in proc.stderr


def one_step_loss(config) -> tuple[float, object]:
    """(loss, new state) of one train step of `config` from its initial state, one device."""
    mesh = one_device()
    program = step_lib.build_program(config, mesh, 10, 10)
    init = state_lib.init_fn(program.model, program.tx, program.example_views, config.seed)
    state = jax.jit(init, out_shardings=program.state_shardings)()
    rng = np.random.default_rng(0)
    size = config.data.image_size
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (config.batch_size, size, size, 3), np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, config.batch_size), jnp.int32),
    }
    state, metrics = program.train_step(state, batch)
    return float(metrics["loss"]), state


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_bfloat16_step_in_the_reference_form_keeps_float32_state(family):
    name = FAMILY_CONFIGS[family]
    with ops.forms("reference"):
        loss32, _ = one_step_loss(smoke(name))
        loss16, state = one_step_loss(smoke(name, compute_dtype="bfloat16"))
    dtypes = {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtypes
    assert loss16 != loss32  # the activations really were bf16
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per op); through a few layers and
    # a loss averaged over the batch that stays within a few percent of the float32 loss.
    np.testing.assert_allclose(loss16, loss32, rtol=5e-2)
