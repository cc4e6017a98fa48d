"""The one prepared GPU run: numerics on the device, then throughput beside PyTorch.

Written for one H100 or H200 with no network, where jax (CUDA), flax, optax, orbax, torch,
timm and einops are installed; the other pure-Python packages selfsup needs (ml-collections,
tensorflow-datasets, tensorboardX, ...) travel as wheels in `.whl/` beside the checkout and are
installed from there into a temporary folder. Prints one table:

1. the numerics tests (`pytest -m numerics`: every op against NumPy float64 in both forms, the
   objectives' losses against their NumPy references) on the GPU, float32 matmuls at full
   precision;
2. MAE ViT-B/16 at 224 px in bf16: step time, images/s, compile time, XLA's FLOPs per step and
   MFU against a bf16 matmul timed in the same run; beside it the PyTorch reference
   (`torch_reference.MAE`: timm blocks as `models_mae.py` builds them, SDPA) under bf16
   autocast and `torch.compile`;
3. SimCLR ResNet-50 at 224 px in bf16, beside torchvision + NT-Xent under `torch.compile`.

    python benchmarks/gpu.py                 # on the GPU machine, under 8 minutes
    python benchmarks/gpu.py --cpu-smoke     # tiny sizes on the CPU, eager PyTorch (CI)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / ".whl"
NEEDED = ("ml_collections", "tensorflow_datasets", "tensorboardX", "etils")


def ensure_packages() -> None:
    """Re-run this script with the `.whl/` wheels installed into a temporary folder and the
    checkout on the path, when selfsup's dependencies are not importable here."""
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    on_path = importlib.util.find_spec("selfsup") is not None
    if not missing and on_path:
        return
    if os.environ.get("SELFSUP_GPU_REEXEC"):
        sys.exit(f"gpu.py: still missing {missing or ['selfsup']} after installing {WHEELS}")
    env = {**os.environ, "SELFSUP_GPU_REEXEC": "1"}
    path = [str(REPO)]
    if missing:
        wheels = sorted(WHEELS.glob("*.whl"))
        if not wheels:
            sys.exit(f"gpu.py: {missing} are not installed and {WHEELS} holds no wheels")
        site = tempfile.mkdtemp(prefix="selfsup-wheels-")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
        subprocess.run([*pip, "--no-compile", "--target", site, *map(str, wheels)], check=True)
        path.append(site)
    env["PYTHONPATH"] = os.pathsep.join([*path, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)


def numerics(cpu_smoke: bool, timeout: int) -> dict:
    """Run the `numerics` tests in a subprocess; {"passed": n, "failed": n, "seconds": s}."""
    env = {**os.environ, "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    targets = ["tests/ops/test_gelu.py"] if cpu_smoke else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [*cmd, *targets], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        out = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        out = f"{e.stdout or ''} timed out after {timeout} s"
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|skipped)", out)}
    failed = re.findall(r"^FAILED (\S+)", out, re.M)
    return {**counts, "seconds": time.perf_counter() - start, "failures": failed[:5]}


def matmul_peak(dtype, n: int) -> float:
    """FLOP/s of a jitted [n, n] @ [n, n] in `dtype` on the default device (median of 10)."""
    import statistics

    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)


def selfsup_row(name, spec, size, batch, steps, cpu_smoke, peak) -> dict:
    import common

    from selfsup import config as config_lib

    config = config_lib.load(spec)
    config.batch_size, config.total_steps, config.total_epochs = batch, 1000, 0.0
    config.optim.warmup_steps, config.optim.warmup_epochs = 10, 0.0
    config.data = dict(source="builtin", name="shapes", image_size=size)
    config.compute_dtype = "float32" if cpu_smoke else "bfloat16"
    config = config_lib.resolve(config)
    step = common.library_step(config)
    step.run(2)
    seconds = step.run(steps)
    return {
        "workload": name,
        "impl": "selfsup (jax)",
        "dtype": config.compute_dtype,
        "batch": batch,
        "step_ms": 1e3 * seconds,
        "img_s": batch / seconds,
        "compile_s": step.compile_s,
        "tflop_step": step.flops / 1e12,
        "mfu": step.flops / seconds / peak,
    }


def torch_rows(name, kind, size, batch, steps, cpu_smoke, jax_row) -> list[dict]:
    import statistics

    import torch
    import torch_reference

    device = "cpu" if cpu_smoke else "cuda"
    if cpu_smoke:  # beside XLA's idle threads, more than one thread only spins on a small CPU
        torch.set_num_threads(1)
    torch.manual_seed(0)
    if kind == "mae":
        tiny = dict(variant="Ti/8", decoder_width=32, decoder_depth=1, decoder_heads=2)
        model = torch_reference.MAE(size, **(tiny if cpu_smoke else {}))
        inputs = torch_reference.mae_inputs(batch, size, device)
    else:
        model = torch_reference.SimCLR(arch="resnet18" if cpu_smoke else "resnet50")
        inputs = torch_reference.simclr_inputs(batch, size, device)
    trainer = torch_reference.Trainer(
        model,
        inputs,
        compiled=not cpu_smoke,
        autocast=None if cpu_smoke else torch.bfloat16,
    )
    trainer.step()
    seconds = statistics.median(trainer.step() for _ in range(steps))
    impl = "torch eager" if cpu_smoke else "torch.compile, bf16 autocast"
    return [
        {
            "workload": name,
            "impl": impl,
            "dtype": "float32" if cpu_smoke else "bf16 autocast",
            "batch": batch,
            "step_ms": 1e3 * seconds,
            "img_s": batch / seconds,
            "compile_s": trainer.compile_s,
            "selfsup/torch": (batch / jax_row["step_ms"] * 1e3) / (batch / seconds),
        }
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument("--steps", type=int, default=0, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--numerics-timeout", type=int, default=180)
    args = parser.parse_args(argv)
    ensure_packages()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    if not args.cpu_smoke and device.platform != "gpu":
        sys.exit(f"gpu.py: no GPU here ({device}); use --cpu-smoke")
    steps = args.steps or (2 if args.cpu_smoke else 20)
    started = time.perf_counter()
    print(f"# benchmarks/gpu.py on {device.device_kind}, jax {jax.__version__}", flush=True)

    tests = numerics(args.cpu_smoke, args.numerics_timeout)
    print(f"numerics: {tests}", flush=True)
    if args.cpu_smoke:
        peak = matmul_peak(jnp.float32, 512)
        work = [
            ("mae", "configs/mae_vit_in1k.py:smoke", 32, 8),
            ("simclr", "configs/simclr_resnet_in1k.py:smoke", 32, 8),
        ]
    else:
        peak = matmul_peak(jnp.bfloat16, 8192)
        work = [
            ("mae", "configs/mae_vit_in1k.py:variant=B/16", 256, 128),
            ("simclr", "configs/simclr_resnet_in1k.py", 256, 128),
        ]
    print(f"matmul peak: {peak / 1e12:.2f} TFLOP/s", flush=True)
    rows = []
    for kind, spec, size, batch in work:
        name = f"{kind} {spec.split('/')[-1]}"
        row = selfsup_row(name, spec, size, batch, steps, args.cpu_smoke, peak)
        rows.append(row)
        print(common.table([row], list(row)), flush=True)
        crop = 32 if args.cpu_smoke else 224
        rows += torch_rows(name, kind, crop, batch, steps, args.cpu_smoke, row)
    columns = [
        "workload", "impl", "dtype", "batch", "step_ms", "img_s", "compile_s", "tflop_step",
        "mfu", "selfsup/torch",
    ]  # fmt: skip
    wall = time.perf_counter() - started
    print(f"\n## {device.device_kind}: numerics and throughput ({wall:.0f} s)")
    passed, failed = tests.get("passed", 0), tests.get("failed", 0) + tests.get("error", 0)
    print(f"numerics tests on the device: {passed} passed, {failed} failed {tests['failures']}")
    dtype = "float32" if args.cpu_smoke else "bf16"
    print(f"{dtype} matmul peak (MFU's denominator): {peak / 1e12:.2f} TFLOP/s")
    print(common.table(rows, columns))
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
