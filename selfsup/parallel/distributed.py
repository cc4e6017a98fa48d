"""Multi-process runs: `jax.distributed.initialize()` from the environment, and agreement between
processes on when to stop.

A run is one process per TPU host, per GPU or per node (SLURM), or per emulated host on one
machine (`launch/local.py`). Where `initialize` takes its arguments, first match wins:

1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` on the command line, or
   the environment variables SELFSUP_COORDINATOR, SELFSUP_NUM_PROCESSES, SELFSUP_PROCESS_ID;
2. SLURM: inside an `srun` step of more than one task. JAX reads SLURM_* itself: the coordinator
   is the step's first node, the port comes from the job id, and each process keeps the GPU
   numbered SLURM_LOCALID unless JAX_LOCAL_DEVICE_IDS says otherwise (one process per node sets
   it to all the node's GPUs; `launch/slurm.py` does);
3. Cloud TPU VM (libtpu installed, TPU chips present): JAX reads the workers from the VM's
   metadata server;
4. otherwise one process, nothing to initialize.

`--distributed=off` (or SELFSUP_DISTRIBUTED=off) skips 2 and 3, e.g. to run a single process in
a shell of a multi-task SLURM allocation.

Every process runs the same program on its own slice of the data; collectives (gloo on CPU,
NCCL on GPU, ICI on TPU) connect them inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from selfsup.errors import UserError

ENV_COORDINATOR = "SELFSUP_COORDINATOR"
ENV_NUM_PROCESSES = "SELFSUP_NUM_PROCESSES"
ENV_PROCESS_ID = "SELFSUP_PROCESS_ID"
ENV_MODE = "SELFSUP_DISTRIBUTED"
MODES = ("auto", "off")

# The variables JAX's SLURM detection reads; all exist only inside an `srun` step.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the run: `source` is "explicit", "slurm", "tpu" or "none";
    `kwargs` go to `jax.distributed.initialize`."""

    source: str
    kwargs: dict[str, Any]


def _int(value: Any, what: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} is {value!r}; give an integer") from None


def _explicit(coordinator, num_processes, process_id) -> Plan:
    given = {
        f"--coordinator ({ENV_COORDINATOR})": coordinator,
        f"--num-processes ({ENV_NUM_PROCESSES})": num_processes,
        f"--process-id ({ENV_PROCESS_ID})": process_id,
    }
    missing = [name for name, value in given.items() if value in (None, "")]
    if missing:
        raise UserError(
            f"multi-process run: {missing[0]} is not set; --coordinator, --num-processes and "
            "--process-id go together"
        )
    host, _, port = str(coordinator).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--coordinator is {coordinator!r}; give HOST:PORT, e.g. 10.0.0.2:8476")
    n = _int(num_processes, "--num-processes")
    i = _int(process_id, "--process-id")
    if n < 1 or not 0 <= i < n:
        raise UserError(
            f"--process-id {i} with --num-processes {n}: ids run from 0 to num_processes - 1"
        )
    kwargs = {"coordinator_address": str(coordinator), "num_processes": n, "process_id": i}
    return Plan("explicit", kwargs)


def _on_cloud_tpu(environ: Mapping[str, str]) -> bool:
    """libtpu installed and TPU chips attached (`/dev/accel*` up to v4, `/dev/vfio/N` after)."""
    if "TPU_SKIP_MDS_QUERY" in environ or importlib.util.find_spec("libtpu") is None:
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def plan(
    coordinator: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    *,
    mode: str | None = None,
    environ: Mapping[str, str] | None = None,
    on_tpu: bool | None = None,
) -> Plan:
    """Decide how to initialize from the arguments, then the environment (see the module doc).

    Arguments left None fall back to SELFSUP_* variables. `on_tpu` overrides the TPU probe.
    """
    env = os.environ if environ is None else environ
    mode = mode or env.get(ENV_MODE) or "auto"
    if mode not in MODES:
        raise UserError(f"--distributed is {mode!r}; choose one of {MODES}")
    coordinator = coordinator or env.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else env.get(ENV_PROCESS_ID)
    if any(v not in (None, "") for v in (coordinator, num_processes, process_id)):
        return _explicit(coordinator, num_processes, process_id)
    if mode == "off":
        return Plan("none", {})
    if all(v in env for v in _SLURM_VARS) and _int(env["SLURM_NTASKS"], "SLURM_NTASKS") > 1:
        return Plan("slurm", {"cluster_detection_method": "slurm"})
    if on_tpu if on_tpu is not None else _on_cloud_tpu(env):
        return Plan("tpu", {})  # JAX asks the metadata server for the workers
    return Plan("none", {})


def initialize(
    coordinator: str | None = None,
    num_processes: int | str | None = None,
    process_id: int | str | None = None,
    *,
    mode: str | None = None,
) -> Plan:
    """Join the multi-process run this process belongs to, if any. Call before any other JAX
    call; a second call (or one after the user's own `jax.distributed.initialize`) does nothing.
    """
    import jax

    if jax.distributed.is_initialized():
        return Plan("none", {})
    chosen = plan(coordinator, num_processes, process_id, mode=mode)
    if chosen.source == "none":
        return chosen
    try:
        jax.distributed.initialize(**chosen.kwargs)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise UserError(
                "jax.distributed.initialize() came after JAX was first used: call "
                "selfsup.parallel.distributed.initialize() at the start of the program"
            ) from e
        raise
    return chosen


class StopVote:
    """Every process stops at the same step: the largest signal number any process has seen.

    One process: the local value, at once. Several: each call dispatches a tiny jitted max over
    one int32 per device and returns the previous call's result, so reading it waits only for
    the step that is already done (the loop fetches that step's metrics anyway); every process
    sees the same value at the same call, one step after the signal.
    """

    def __init__(self):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec

        self.multi = jax.process_count() > 1
        self._pending = None
        if not self.multi:
            return
        mesh = jax.sharding.Mesh(
            np.asarray(jax.devices()), ("all",), axis_types=(jax.sharding.AxisType.Auto,)
        )
        self._sharding = NamedSharding(mesh, PartitionSpec("all"))
        self._local = jax.local_device_count()
        self._max = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, local_signum: int) -> int:
        if not self.multi:
            return int(local_signum)
        import jax

        votes = jax.make_array_from_process_local_data(
            self._sharding, np.full((self._local,), local_signum, np.int32)
        )
        previous, self._pending = self._pending, self._max(votes)
        return 0 if previous is None else int(np.asarray(previous.addressable_data(0)))


def sum_over_processes(value: int) -> int:
    """The sum of an integer over all processes (every process must call it at the same point)."""
    import jax

    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int32(value))))
