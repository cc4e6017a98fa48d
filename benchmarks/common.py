"""Shared helpers of the benchmark scripts: the library's own train step, timing, FLOPs, peaks.

Every timing here is of `selfsup.step_lib.make_train_step` jitted exactly as `train_and_evaluate`
jits it (state donated, out_shardings from the state), fed a global batch of uint8 images: the
step the user runs, augmentation included. Timings on a shared machine are noisy, so the scripts
compare A and B interleaved in one process (A, B, A, B, ...) and report medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python benchmarks/run.py` from a checkout
    sys.path.insert(0, str(REPO))

from selfsup.train import host_memory  # noqa: E402

# The step timed here is the one `selfsup train` runs, so the process is tuned as that command
# tunes it on a CPU host, before any thread allocates; SELFSUP_HOST_MEMORY=default leaves it.
if host_memory.jax_runs_on_cpu_only():
    host_memory.keep_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections as mlc  # noqa: E402
import numpy as np  # noqa: E402

from selfsup import augment, optim  # noqa: E402
from selfsup import config as config_lib  # noqa: E402
from selfsup.parallel import sharding  # noqa: E402
from selfsup.train import state as state_lib  # noqa: E402
from selfsup.train import step as step_lib  # noqa: E402


def load_average() -> str:
    """'1m/5m/15m' load average: printed beside every figure (the machine is shared)."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def match_torch_threads() -> int:
    """Give PyTorch as many threads as the cores this process may run on (`taskset -c 0 ...`
    gives 1), which is how XLA:CPU sizes its thread pool; PyTorch otherwise takes the machine's
    cores and oversubscribes a restricted process. Returns the count."""
    import torch  # here: the scripts without a PyTorch side do not need it

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    return threads


def kernel_rounds(argv: list[str] | None, doc: str) -> int:
    """The interleaved rounds of a per-kernel script (matmul, conv, layers) from its command line
    (`--quick`: 3, else 7), with PyTorch's threads matched to this process' cores."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args(argv)
    match_torch_threads()
    return 3 if args.quick else 7


def small_config(spec: str, *, image_size: int, batch_size: int, **keys: Any) -> mlc.ConfigDict:
    """The config file `spec` at a CPU-sized resolution and batch, on the built-in dataset.

    Every view spec's output size (`rrc(224, ...)`) becomes `image_size`; `keys` are dotted
    config keys to set ('backbone.depth': 4). Compute stays float32 (bf16 is slower on CPU).
    """
    config = config_lib.load(spec)
    config.batch_size = batch_size
    config.compute_dtype = "float32"
    config.total_steps, config.total_epochs = 1000, 0.0
    config.optim.warmup_steps, config.optim.warmup_epochs = 10, 0.0
    config.data = dict(source="builtin", name="shapes", image_size=image_size)
    config.views = tuple(_resize_view(v, image_size) for v in config.views)
    for key, value in keys.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config_lib.resolve(config)


def _resize_view(spec: str, size: int) -> str:
    """A crop op's output size scaled by size / 224: 'rrc(224, ...)|flip' -> 'rrc(<size>, ...)';
    SwAV's 96-px local crops become 96 * size / 224."""
    ops = spec.split("|")
    for i, op in enumerate(ops):
        name, paren, rest = op.partition("(")
        head, comma, tail = rest.partition(",")
        if name.strip() in ("rrc", "random_resized_crop", "resize", "center_crop") and (
            head.strip().rstrip(")").isdigit()
        ):
            new = round(int(head.strip().rstrip(")")) * size / 224)
            ops[i] = f"{name}({new}{comma}{tail}" if comma else f"{name}({new})"
    return "|".join(ops)


@dataclasses.dataclass
class Step:
    """A compiled library train step with its state and one batch on the devices."""

    fn: Callable
    state: Any
    batch: dict
    compile_s: float
    flops: float  # XLA cost analysis, per step (forward, backward, optimizer, augmentation)
    temp_mib: float  # XLA's temporary buffers per device (the activations' peak)
    state_mib: float  # params + optimizer state per device

    def run(self, n: int = 1) -> float:
        """Run n steps; returns the median seconds per step (each step waited for)."""
        times = []
        for _ in range(n):
            start = time.perf_counter()
            self.state, metrics = self.fn(self.state, self.batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def library_step(config: mlc.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Step:
    """The loop's jitted train step for `config` (as built in `loop.train_and_evaluate`)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    tx, schedule = optim.build(
        mlc.ConfigDict(config.optim.to_dict()),
        batch_size=config.batch_size,
        total_steps=config.total_steps,
    )
    model = step_lib.build_model(config, num_classes=10)
    views_fn = augment.build(config.views)
    size = config.data.image_size
    shapes = jax.eval_shape(
        views_fn, jax.ShapeDtypeStruct((2, size, size, 3), jnp.uint8), jax.random.key(0)
    )
    example_views = tuple(jnp.zeros(v.shape, v.dtype) for v in shapes)
    state, shardings = state_lib.create(
        model, tx, example_views, config.seed, mesh, config.param_sharding
    )
    rng = np.random.default_rng(0)
    host = {
        "image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, (config.batch_size,), dtype=np.int32),
    }
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in host.items()}
    step = step_lib.jit_train_step(model, tx, views_fn, config.seed, schedule, mesh, shardings)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    return Step(
        fn=compiled,
        state=state,
        batch=batch,
        compile_s=compile_s,
        flops=step_flops(compiled),
        temp_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20,
        state_mib=sharding.bytes_per_device((state.params, state.opt_state)) / 2**20,
    )


def step_flops(compiled) -> float:
    """FLOPs of one call of a compiled function, from XLA's cost analysis (summed over devices'
    programs when the analysis is a list)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        return float(sum(c.get("flops", 0.0) for c in cost))
    return float(cost.get("flops", 0.0))


def interleave(
    fns: dict[str, Callable[[], float]], rounds: int, settle: bool = False
) -> dict[str, float]:
    """Median seconds of each timed function, called A, B, A, B, ... `rounds` times each.

    `settle`: call each function once, untimed, right before its timed call. The first work
    after the other framework's runs slow (up to 1.5x on a 6 ms conv, 2 cores: the other
    library's idle worker threads still spin on the cores for a while), which biases a short
    timing taken right after it; a long one (a train step) barely notices."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if settle:
                fn()
            times[name].append(fn())
    return {name: statistics.median(t) for name, t in times.items()}


def matmul_timer(n: int = 2048) -> tuple[Callable[[], float], float]:
    """(time_once, flops): a float32 [n, n] @ [n, n] under jax.jit, the machine's peak as XLA
    reaches it. Timed interleaved with the steps, so that MFU sees the same machine load."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()

    def once() -> float:
        start = time.perf_counter()
        for _ in range(3):
            dot(a, b).block_until_ready()
        return (time.perf_counter() - start) / 3

    return once, 2.0 * n**3


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of `rows` (dicts) over `columns`; floats printed with 3 significant
    digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.3g}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
