"""Shared tests for every objective x every backbone family that can serve it.

Objectives and families are discovered from the packages; each objective's small settings come
from the `smoke` variant of its first config in configs/, each family's from the smoke variant
of the objective's own config on that family, else of the first config on it (or
`configs/supervised_<family>_builtin.py`). A pair the backbone cannot serve must fail at build
time with a UserError naming the problem.
"""

from __future__ import annotations

import ast
import functools
import json
import pkgutil
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import REPO, run_python

from selfsup import augment, backbones, objectives, ops, pytree
from selfsup import config as config_lib
from selfsup.errors import UserError
from selfsup.parallel import sharding
from selfsup.train import state as state_lib
from selfsup.train import step as step_lib
from selfsup.train import teacher

OBJECTIVES = sorted(m.name for m in pkgutil.iter_modules(objectives.__path__))
FAMILIES = sorted(m.name for m in pkgutil.iter_modules(backbones.__path__))
BATCH = 8


@functools.cache
def smoke_configs() -> dict[str, config_lib.mlc.ConfigDict]:
    """objective name -> the resolved smoke config of its first config file."""
    out = {}
    for path in sorted((REPO / "configs").glob("*.py")):
        config = config_lib.resolve(config_lib.load(f"{path}:smoke"))
        out.setdefault(config.objective.name, config)
    return out


def family_backbone(family: str, objective: str) -> dict | None:
    """The smoke backbone of `objective`'s own config on `family` if it has one (SparK's ResNet
    keeps the ImageNet stem that its mask grid needs), else of the first config on `family`."""
    own = sorted((REPO / "configs").glob(f"{objective}_{family}_*.py"))
    if own:
        return config_lib.resolve(config_lib.load(f"{own[0]}:smoke")).backbone.to_dict()
    for config in smoke_configs().values():
        if config.backbone.name == family:
            return config.backbone.to_dict()
    path = REPO / "configs" / f"supervised_{family}_builtin.py"
    if path.exists():
        return config_lib.resolve(config_lib.load(f"{path}:smoke")).backbone.to_dict()
    return None


@functools.cache
def config_pairs() -> tuple[tuple[str, str], ...]:
    """(objective, family) of every config's full variant, in file order (read, nothing built)."""
    out = []
    for path in sorted((REPO / "configs").glob("*.py")):
        config = config_lib.resolve(config_lib.load(str(path)))
        out.append((config.objective.name, config.backbone.name))
    return tuple(out)


def pairs():
    for objective in OBJECTIVES:
        for family in FAMILIES:
            yield pytest.param(objective, family, id=f"{objective}-{family}")


def setup(objective: str, family: str, abstract: bool = False):
    """(model, views_fn, state, batch) for a tiny run, or skip when there is nothing to pair;
    `abstract`: state and batch as shapes only (nothing is compiled)."""
    config = smoke_configs().get(objective)
    if config is None:
        pytest.skip(f"objective '{objective}' has no config in configs/ to take settings from")
    backbone = family_backbone(family, objective)
    if backbone is None:
        pytest.skip(f"backbone family '{family}' has no smoke config to take settings from")
    try:
        objective = teacher.with_teacher(config.objective.to_dict())
        model = objectives.build(objective, backbone, num_classes=10)
    except UserError as e:
        assert family in str(e) or "mask mode" in str(e), e
        pytest.skip(f"{family} cannot serve {objective}: {e}")
    views_fn = augment.build(config.views)
    size = config.data.image_size
    example = tuple(
        jnp.zeros(v.shape, v.dtype)
        for v in jax.eval_shape(
            views_fn, jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8), jax.random.key(0)
        )
    )
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
    tx = optax.adam(1e-3)
    try:
        if abstract:
            state = jax.eval_shape(state_lib.init_fn(model, tx, example, config.seed))
        else:
            state, _ = state_lib.create(model, tx, example, config.seed, mesh, ())
    except UserError as e:  # e.g. the objective's crops are smaller than the backbone accepts
        assert e.args[0].startswith(f"{family}:"), e
        pytest.skip(f"{family} cannot serve {objective}'s smoke views: {e}")
    if abstract:
        batch = {
            "image": jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.uint8),
            "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32),
        }
        return model, views_fn, state, tx, batch
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32),
    }
    return model, views_fn, state, tx, batch


@pytest.mark.parametrize("objective, family", list(pairs()))
def test_every_pair_builds_and_its_step_lowers(objective, family):
    """The default tier's check of the whole grid: each pair builds (or fails with a UserError,
    see `setup`) and its train step traces and lowers, with a scalar loss and a gradient for
    every parameter. The slow tier trains every pair; the default tier one per family (the
    reference-form pairs) and every objective on eight devices."""
    model, views_fn, state, tx, batch = setup(objective, family, abstract=True)
    grad_fn = step_lib.make_grad_fn(model, views_fn, seed=0)

    def step(state, batch):
        loss, _, grads, updates = grad_fn(state, batch)
        deltas, _ = tx.update(grads, state.opt_state, state.params)
        return loss, grads, optax.apply_updates(state.params, deltas)

    lowered = jax.jit(step).lower(state, batch)
    loss, grads, params = lowered.out_info
    assert loss.shape == () and jnp.issubdtype(loss.dtype, jnp.floating)
    assert jax.tree.structure(grads) == jax.tree.structure(state.params)
    assert jax.tree.structure(params) == jax.tree.structure(state.params)


@pytest.mark.slow
@pytest.mark.parametrize("objective, family", list(pairs()))
def test_finite_loss_gradients_everywhere_and_the_loss_falls(objective, family):
    model, views_fn, state, tx, batch = setup(objective, family)
    grad_fn = step_lib.make_grad_fn(model, views_fn, seed=0)

    @jax.jit
    def step(state):
        # Same step number each time: the same views and masks, so only the parameters move.
        loss, _, grads, updates = grad_fn(state, batch)
        deltas, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, deltas)
        model_state = {**state.model_state, **updates}
        new = state.replace(params=params, opt_state=opt_state, model_state=model_state)
        return new, loss, grads

    losses = []
    for i in range(8):
        state, loss, grads = step(state)
        losses.append(float(loss))
        if i == 0:
            # Parameters the objective's config freezes (unused by its loss) need no gradient.
            frozen = [re.compile(r) for r in smoke_configs()[objective].optim.frozen]
            named = [(pytree.path_str(p), g) for p, g in jax.tree_util.tree_leaves_with_path(grads)]
            dead = [
                name
                for name, g in named
                if not np.any(np.asarray(g)) and not any(r.fullmatch(name) for r in frozen)
            ]
            assert not dead, f"no gradient reaches {dead}"
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses


EIGHT_DEVICES = r"""
import json, sys, jax, numpy as np, optax
sys.path[:0] = ["tests", "tests/objectives"]
import test_shared as shared
from selfsup.train import loop, monitors, step as step_lib
from selfsup.parallel import sharding
from selfsup import pytree
from selfsup.train import state as state_lib
from selfsup import ops
out = {}
with ops.forms(FORM):  # traced in this form of every op
    for objective, family in GROUP:
        config = shared.smoke_configs().get(objective)
        if config is None:
            continue
        model, views_fn, state, tx, batch = shared.setup(objective, family or config.backbone.name)
        grads = {}
        for name, shape, devices in [("one", {"data": 1, "fsdp": 1}, jax.devices()[:1]),
                                     ("eight", {"data": 4, "fsdp": 2}, jax.devices())]:
            mesh = sharding.make_mesh(shape, devices)
            shardings = sharding.tree_shardings(state, mesh, [(".*", "fsdp")])
            placed = jax.device_put(jax.tree.map(np.asarray, state), shardings)
            b = jax.device_put(batch, sharding.batch_sharding(mesh))
            loss, _, g, _ = jax.jit(step_lib.make_grad_fn(model, views_fn, seed=0))(placed, b)
            grads[name] = (float(loss), {pytree.path_str(p): np.asarray(v)
                                         for p, v in jax.tree_util.tree_leaves_with_path(g)})
        (l1, g1), (l8, g8) = grads["one"], grads["eight"]
        # Relative to each leaf's scale, floored at 1e-3 of the largest: a leaf whose exact gradient
        # is zero (a bias right before a BatchNorm) holds float32 rounding noise only.
        floor = 1e-3 * max(float(np.abs(g).max()) for g in g1.values())
        err = max(float(np.abs(g1[k] - g8[k]).max() / max(np.abs(g1[k]).max(), floor)) for k in g1)
        out[objective] = {"loss": [l1, l8], "grad_err": err}
print(json.dumps(out))
"""


def has_own_eight_device_test(objective: str) -> bool:
    """Whether tests/objectives/test_<objective>.py compares eight devices with one itself, model
    state included (BatchNorm statistics, SwAV's queue), on a small ViT: compiling those objectives
    again here on their ResNet smoke configs would double the suite's slowest test."""
    path = REPO / "tests" / "objectives" / f"test_{objective}.py"
    return path.exists() and "def test_eight_devices_give_the_loss" in path.read_text()


# Found, not listed: every objective without its own test, on its first config's family.
COMPARED_HERE = tuple(o for o in OBJECTIVES if not has_own_eight_device_test(o))


def reference_form_pairs() -> tuple[tuple[str, str], ...]:
    """One objective per backbone family, found not listed: the first (in name order) of those
    compared here whose config trains that family."""
    pairs = []
    for family in FAMILIES:
        found = [o for o in COMPARED_HERE if (o, family) in config_pairs()]
        if found:
            pairs.append((found[0], family))
    return tuple(pairs)


# In the reference form of every op (what GPUs and TPUs run): the one-device test of each pair
# and the second eight-device group. (ops form, ((objective, family or None for its config's), ...))
REFERENCE_FORM_PAIRS = reference_form_pairs()
GROUPS = (
    ("auto", tuple((o, None) for o in COMPARED_HERE)),
    ("reference", REFERENCE_FORM_PAIRS),
)


TRAINING_SIDE, TRAINING_SIDE_IO = ["selfsup", "train"], ["selfsup", "io"]


def test_objectives_import_nothing_from_the_training_side():
    """An objective gets what it needs (e.g. a distillation teacher) from the training side: it
    never imports the loop's modules or reads checkpoints itself."""
    for path in sorted((REPO / "selfsup" / "objectives").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad = [n for n in names if n.split(".")[:2] in (TRAINING_SIDE_IO, TRAINING_SIDE)]
            assert not bad, f"{path.name} imports {bad[0]}"


@pytest.mark.parametrize(
    "objective, family", REFERENCE_FORM_PAIRS, ids=[f"{o}-{f}" for o, f in REFERENCE_FORM_PAIRS]
)
def test_reference_form_finite_loss_gradients_everywhere_and_the_loss_falls(objective, family):
    with ops.forms("reference"):
        test_finite_loss_gradients_everywhere_and_the_loss_falls(objective, family)


def eight_device_code(form: str, group) -> str:
    return f"FORM, GROUP = {form!r}, {list(group)!r}\n" + EIGHT_DEVICES


# The default tier's group shares the eight-device subprocess; the reference-form group runs in
# the slow tier, in a subprocess of its own.
EIGHT_DEVICE_CHECKS = {"shared_auto": eight_device_code(*GROUPS[0])}


def test_every_objective_and_family_is_compared_on_eight_devices():
    compared = {objective for form, group in GROUPS if form == "auto" for objective, _ in group}
    own = {o for o in OBJECTIVES if has_own_eight_device_test(o)}
    assert compared | own == set(OBJECTIVES) and "mae" in compared and "simclr" in own
    families = {family for form, group in GROUPS if form == "reference" for _, family in group}
    assert families == set(FAMILIES)


def test_eight_devices_equal_one_for_every_objective(eight_devices):
    check_eight_devices(*GROUPS[0], json.loads(eight_devices("shared_auto")))


@pytest.mark.slow
def test_eight_devices_equal_one_in_the_reference_form():
    form, group = GROUPS[1]
    code = eight_device_code(form, group)
    out = json.loads(run_python(code, devices=8, timeout=900).strip().splitlines()[-1])
    check_eight_devices(form, group, out)


def check_eight_devices(form, group, out):
    expected = {name for name, _ in group if name in smoke_configs()}
    assert set(out) == expected, (sorted(out), sorted(expected))
    for objective, result in out.items():
        one, eight = result["loss"]
        np.testing.assert_allclose(eight, one, rtol=1e-5, err_msg=objective)
        assert result["grad_err"] < 1e-4, (objective, result)
