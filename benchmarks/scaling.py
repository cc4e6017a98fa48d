"""Scaling: step time on 1, 2, 4, 8 emulated CPU devices at a fixed per-device batch (weak
scaling), and FSDP off/on memory per device.

Each device count runs in its own process (`XLA_FLAGS=--xla_force_host_platform_device_count=N`)
with the library's MAE train step on a ViT-S/16 at 64 px, per-device batch 4, once data-parallel
(mesh data=N) and once fully sharded (mesh fsdp=N). The emulated devices share the machine's
cores, so the ideal step time grows as N: `overhead` = t_N / (N * t_1) is what partitioning and
collectives cost (1.0 = none). `state_mib` is params + AdamW state per device (read from the
arrays' shardings), `temp_mib` XLA's temporary buffers per device.

    python benchmarks/scaling.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common

CHILD = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import common
per_device, n, rounds = {per_device}, {n}, {rounds}
out = []
meshes = [{{"data": -1, "fsdp": 1}}] + ([{{"data": 1, "fsdp": n}}] if n > 1 else [])
for mesh in meshes:
    config = common.small_config(
        "configs/mae_vit_in1k.py", image_size=64, batch_size=per_device * n, mesh=mesh,
        backbone={{"name": "vit", "variant": "S/16"}},
        **{{"objective.decoder_width": 256, "objective.decoder_depth": 2,
            "objective.decoder_heads": 8}},
    )
    step = common.library_step(config)
    step.run(1)
    out.append(dict(devices=n, fsdp=mesh["fsdp"] > 1, step_s=step.run(rounds),
                    compile_s=step.compile_s, state_mib=step.state_mib, temp_mib=step.temp_mib))
print("RESULT" + json.dumps(out))
"""


def measure(n: int, per_device: int, rounds: int) -> list[dict]:
    """Rows for n emulated devices, from a fresh process."""
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
        "JAX_PLATFORMS": "cpu",
    }
    code = CHILD.format(per_device=per_device, n=n, rounds=rounds)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=common.REPO
    )
    if proc.returncode:
        raise RuntimeError(f"{n} devices failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1, 2 and 8 devices, 2 rounds")
    args = parser.parse_args(argv)
    counts = (1, 2, 8) if args.quick else (1, 2, 4, 8)
    per_device, rounds = 4, 2 if args.quick else 4
    rows = []
    for n in counts:
        rows += measure(n, per_device, rounds)
        print(f"{n} devices done  load {common.load_average()}", file=sys.stderr, flush=True)
    base = next(r["step_s"] for r in rows if r["devices"] == 1)
    for r in rows:
        r["overhead"] = r["step_s"] / (r["devices"] * base)
        r["batch"] = per_device * r["devices"]
    columns = ("devices", "fsdp", "batch", "step_s", "overhead", "compile_s", "state_mib")
    print(common.table(rows, (*columns, "temp_mib")))
    return rows


if __name__ == "__main__":
    main()
