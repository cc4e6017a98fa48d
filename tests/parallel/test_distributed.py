"""Multi-process runs: where `jax.distributed` gets its arguments, two processes on 127.0.0.1 that
train exactly like one process, a stop signal that reaches one process but stops all at the same
step, a checkpoint of two processes restored in one on another mesh, and FSDP over 8 devices.

Reference run: one process with 2 emulated CPU devices (mesh data=2) and the same global batch.
The two-process run has 1 CPU device per process (mesh data=2 over both), collectives over gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_python, xla_flags

from selfsup import cli
from selfsup.errors import UserError
from selfsup.io import checkpoint
from selfsup.parallel import distributed

# Checkpoints every step (all kept) so that every step can be compared; a learning rate large
# enough that one step's update stands well above float32 rounding.
SMOKE = [
    "--config",
    "configs/quickstart.py:smoke",
    "--config.total_steps=4",
    "--config.checkpoint_every_steps=1",
    "--config.keep_checkpoints=4",
    "--config.optim.base_lr=0.05",
]


def _records(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(workdir)}


def _flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[prefix + key] = np.asarray(value)
    return out


def _assert_params_close(a: Path, b: Path, step: int, atol: float) -> None:
    pa, _ = checkpoint.restore_params(a, step)
    pb, _ = checkpoint.restore_params(b, step)
    fa, fb = _flatten(pa), _flatten(pb)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_allclose(fa[key], fb[key], rtol=0, atol=atol, err_msg=key)


# --- where the arguments of jax.distributed.initialize come from --------------------------------

SLURM = {
    "SLURM_JOB_ID": "77",
    "SLURM_STEP_NODELIST": "gpu[001-002]",
    "SLURM_NTASKS": "16",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "3",
}


def test_explicit_arguments_come_from_flags_or_environment():
    env = {"SELFSUP_COORDINATOR": "10.0.0.2:8476", "SELFSUP_NUM_PROCESSES": "4"}
    got = distributed.plan(process_id=2, environ={**env, **SLURM}, on_tpu=True)
    assert got.source == "explicit"  # explicit settings win over SLURM and TPU detection
    assert got.kwargs == {
        "coordinator_address": "10.0.0.2:8476",
        "num_processes": 4,
        "process_id": 2,
    }
    got = distributed.plan(environ={**env, "SELFSUP_PROCESS_ID": "3"}, on_tpu=False)
    assert got.kwargs["process_id"] == 3


def test_slurm_tpu_and_single_process_detection():
    assert distributed.plan(environ=SLURM, on_tpu=False) == distributed.Plan(
        "slurm", {"cluster_detection_method": "slurm"}
    )
    one_task = {**SLURM, "SLURM_NTASKS": "1"}
    assert distributed.plan(environ=one_task, on_tpu=False).source == "none"
    outside_srun = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}
    assert distributed.plan(environ=outside_srun, on_tpu=False).source == "none"
    assert distributed.plan(environ={}, on_tpu=True) == distributed.Plan("tpu", {})
    assert distributed.plan(environ={}, on_tpu=False).source == "none"
    off = {**SLURM, "SELFSUP_DISTRIBUTED": "off"}
    assert distributed.plan(environ=off, on_tpu=True).source == "none"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"coordinator": "h:1", "num_processes": 2}, r"--process-id \(SELFSUP_PROCESS_ID\)"),
        ({"coordinator": "nohost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        ({"coordinator": "h:1", "num_processes": 2, "process_id": 2}, "ids run from 0"),
        ({"coordinator": "h:1", "num_processes": "two", "process_id": 0}, "give an integer"),
        ({"mode": "on"}, "choose one of"),
    ],
)
def test_bad_distributed_settings_are_one_line_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        distributed.plan(environ={}, on_tpu=False, **kwargs)


def test_every_command_takes_the_multi_process_flags(capsys):
    args = cli._parser().parse_args(
        ["train", "--config", "c.py", "--workdir", "w", "--coordinator", "h:9", "--process-id", "1"]
    )
    assert (args.coordinator, args.num_processes, args.process_id) == ("h:9", None, 1)
    # An incomplete set is a one-line error before anything is built.
    argv = ["train", "--config", "c.py", "--workdir", "w", "--coordinator", "127.0.0.1:9"]
    assert cli.main([*argv, "--num-processes", "2"]) == 2
    assert "--process-id (SELFSUP_PROCESS_ID) is not set" in capsys.readouterr().err


# --- agreement on when to stop -------------------------------------------------------------------

VOTE = r"""
import jax
from selfsup.parallel import distributed
distributed.initialize()
vote = distributed.StopVote()
signum, agreed = 0, []
for call in range(6):
    if jax.process_index() == 1 and call == 2:
        signum = 15  # only process 1 is signalled; like SignalCatcher, the flag stays set
    agreed.append(vote(signum))
print("agreed", agreed, "sum", distributed.sum_over_processes(10 + jax.process_index()))
"""


def test_stop_vote_gives_every_process_the_same_answer_at_the_same_call():
    proc = subprocess.run(
        [sys.executable, "launch/local.py", "-n", "2", "--", sys.executable, "-c", VOTE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    # One call of lag: the signal seen at call 2 is agreed at call 3, by both processes.
    for i in (0, 1):
        assert f"[{i}] agreed [0, 0, 0, 15, 15, 15] sum 21" in proc.stdout, proc.stdout[-3000:]


# --- training with two processes ----------------------------------------------------------------

# Process 1 (only) gets SIGTERM while it takes the batch of step 2 (index 1).
SIGNAL_PROCESS_1 = r"""
import os, signal, sys
from selfsup import cli, data
if os.environ["SELFSUP_PROCESS_ID"] == "1":
    iterate = data.Loader.iterate
    def iterate_then_signal(self, start_step=0):
        for i, batch in enumerate(iterate(self, start_step)):
            if start_step + i == 1:
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch
    data.Loader.iterate = iterate_then_signal
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Started together, so that their compilations overlap: the reference (one process, 2
    emulated devices, 4 steps), and two processes on 127.0.0.1 via launch/local.py of which
    process 1 alone gets SIGTERM."""
    one, two = tmp_path_factory.mktemp("one_process"), tmp_path_factory.mktemp("two_processes")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = xla_flags(2)
    reference_argv = ["train", *SMOKE, "--workdir", str(one), "--config.num_images=0"]
    with open(one.parent / "one_process.log", "w") as log:
        reference = subprocess.Popen(
            [sys.executable, "-m", "selfsup.cli", *reference_argv],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        train = ["train", *SMOKE, "--workdir", str(two), "--config.image_every_steps=2"]
        command = [sys.executable, "-c", SIGNAL_PROCESS_1, *train]
        proc = subprocess.run(
            [sys.executable, "launch/local.py", "-n", "2", "--", *command],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert reference.wait(timeout=900) == 0, (one.parent / "one_process.log").read_text()
    return one, two, proc


@pytest.fixture(scope="module")
def reference(runs) -> Path:
    return runs[0]


@pytest.fixture(scope="module")
def two_processes(runs) -> tuple[Path, subprocess.CompletedProcess]:
    return runs[1], runs[2]


@pytest.mark.slow  # two training processes, then a resume on 8 devices
def test_two_processes_train_exactly_like_one_process(reference, two_processes):
    workdir, proc = two_processes
    lines = proc.stdout.splitlines()
    # Only process 0 writes: one metrics record per step, one memory line, the images.
    steps = [r["step"] for r in _records(workdir)]
    assert steps == [1, 2, 3], (steps, proc.stdout[-3000:])
    memory = [line for line in lines if "params+optimizer:" in line]
    assert len(memory) == 1 and memory[0].startswith("[0] selfsup: params+optimizer: "), memory
    assert (workdir / "images" / "reconstruction_0000002.png").is_file()
    first, ref_first = _records(workdir)[0], _records(reference)[0]
    assert first["params_optimizer_mib_per_device"] == ref_first["params_optimizer_mib_per_device"]

    ref = _losses(reference)
    for step, loss in _losses(workdir).items():
        np.testing.assert_allclose(loss, ref[step], rtol=1e-6, err_msg=f"step {step}")
    _assert_params_close(workdir, reference, step=3, atol=1e-6)


@pytest.mark.slow  # two training processes, then a resume on 8 devices
def test_a_signal_to_one_process_stops_all_at_the_same_step(two_processes):
    workdir, proc = two_processes
    assert proc.returncode == 128 + 15, proc.stdout[-3000:]
    for i in (0, 1):  # process 0 never got a signal, yet stops with process 1
        assert f"[{i}] selfsup: interrupted by SIGTERM at step 3" in proc.stdout, proc.stdout[
            -3000:
        ]
    assert checkpoint.Manager(workdir).all_steps() == [1, 2, 3]


# One process, 8 devices, mesh fsdp=8: restore step 3 of the two-process run exactly, report the
# placement and memory, then let the loop resume and train step 4.
RESUME_ON_EIGHT_DEVICES = r"""
import json, math, sys
import jax, numpy as np, orbax.checkpoint as ocp
from selfsup import config as C
from selfsup.train import loop
from selfsup.io import checkpoint
from selfsup.parallel import sharding
from selfsup import pytree

workdir = sys.argv[1]
cfg = C.resolve(C.load("configs/quickstart.py:smoke"), {
    "total_steps": "4", "checkpoint_every_steps": "1", "keep_checkpoints": "4",
    "optim.base_lr": "0.05", "num_images": "0", "mesh.data": "1", "mesh.fsdp": "8"})
mesh = sharding.make_mesh(cfg.mesh)

# The files as plain NumPy, read without any sharding.
path = f"{workdir}/checkpoints/3/state"
reader = ocp.PyTreeCheckpointer()
stored = reader.metadata(path).item_metadata.tree
shapes = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), stored,
                      is_leaf=lambda x: hasattr(x, "shape"))
as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), shapes)
files = reader.restore(path, args=ocp.args.PyTreeRestore(item=shapes, restore_args=as_numpy))

# The same step restored onto this mesh with the loop's placement rules.
shardings = sharding.tree_shardings(shapes, mesh, cfg.param_sharding)
target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
restored, meta = checkpoint.Manager(workdir).restore(target, step=3)
pairs = zip(jax.tree_util.tree_leaves_with_path(files), jax.tree.leaves(restored), strict=True)
report = {"step": meta["step"], "differ": [], "specs": {}, "devices": set()}
for (key, a), b in pairs:
    name = pytree.path_str(key)
    if not np.array_equal(a, np.asarray(b)):
        report["differ"].append(name)
    report["specs"][name] = str(b.sharding.spec)
    report["devices"].add(len(b.sharding.device_set))
report["devices"] = sorted(report["devices"])

# Memory of params + optimizer state, counted shard by shard (not with bytes_per_device).
tree = (restored["params"], restored["opt_state"])
held = {}
for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
        held[shard.device] = held.get(shard.device, 0) + shard.data.nbytes
report["counted"] = max(held.values())
report["reported"] = sharding.bytes_per_device(tree)
report["unsharded"] = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))

loop.train_and_evaluate(cfg, workdir)  # the loop resumes at step 3 on this mesh
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def resumed_on_eight_devices(two_processes, tmp_path_factory) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("eight_devices") / "run"
    shutil.copytree(two_processes[0], workdir)
    code = RESUME_ON_EIGHT_DEVICES.replace("sys.argv[1]", repr(str(workdir)))
    return workdir, json.loads(run_python(code, devices=8).strip().splitlines()[-1])


@pytest.mark.slow  # two training processes, then a resume on 8 devices
def test_checkpoint_of_two_processes_restores_in_one_process_on_another_mesh(
    reference, resumed_on_eight_devices
):
    workdir, report = resumed_on_eight_devices
    assert report["step"] == 3
    assert report["differ"] == []  # bit-identical to the files
    assert report["devices"] == [8]
    # The loop went on from there as the uninterrupted single-process run did.
    resumed, ref = _losses(workdir), _losses(reference)
    assert sorted(resumed) == [1, 2, 3, 4]
    np.testing.assert_allclose(resumed[4], ref[4], rtol=1e-5)


@pytest.mark.slow  # two training processes, then a resume on 8 devices
def test_fsdp_on_eight_devices_shards_memory_and_steps_like_unsharded(
    reference, resumed_on_eight_devices
):
    workdir, report = resumed_on_eight_devices
    # Parameters and their Adam moments are split over the fsdp axis.
    sharded = [k for k, spec in report["specs"].items() if "fsdp" in spec]
    for name in (
        "params/backbone/blocks_0/attn/qkv/kernel",
        "mu/backbone/blocks_0/attn/qkv/kernel",
    ):
        assert any(k.endswith(name) for k in sharded), (name, sharded)
    # bytes_per_device agrees with a shard-by-shard count and shrinks with the fsdp axis.
    assert report["reported"] == report["counted"]
    assert report["counted"] < report["unsharded"] / 6
    # The loop logs that figure at the first log step of each run (4: where this one started).
    key = "params_optimizer_mib_per_device"
    logged = {r["step"]: r[key] for r in _records(workdir) if key in r}
    assert logged[4] == report["counted"] / 2**20
    assert logged[1] == report["unsharded"] / 2**20  # the two-process run replicated everything
    assert sorted(logged) == [1, 4]
    # Step 4 from the same state: the FSDP update equals the unsharded (data-parallel) one to
    # within 1% of the update, per leaf (float32 rounding of different reduction orders).
    before, _ = checkpoint.restore_params(reference, 3)
    after, _ = checkpoint.restore_params(reference, 4)
    fsdp, _ = checkpoint.restore_params(workdir, 4)
    before, after, fsdp = _flatten(before), _flatten(after), _flatten(fsdp)
    assert fsdp.keys() == after.keys()
    for key in after:
        update = np.abs(after[key] - before[key]).max()
        assert update > 1e-5, key  # every leaf moved
        assert np.abs(fsdp[key] - after[key]).max() <= 1e-2 * update, key
