"""Compile time and step time of smoke configs' train steps under the XLA flags the test suite
uses (tests/conftest.py), against XLA's defaults, side by side on this machine.

Each flag set runs in its own process (XLA_FLAGS is read once per process), with the persistent
compilation cache off. `compile_s` is the compilation of the train step as the loop jits it
(`common.library_step`); `step_ms` the median of 5 steps after the first. A flag this XLA does
not know is reported and skipped.

    python benchmarks/compile_time.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

CONFIGS = (
    "configs/quickstart.py:smoke",
    "configs/simclr_resnet_in1k.py:smoke",
    "configs/spark_convnext_in1k.py:smoke",
)
FLAG_SETS = {
    "XLA defaults": "",
    "-O0": "--xla_backend_optimization_level=0",
    "-O0, elemental emitters (the suite's)": (
        "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    ),
}

CHILD = r"""
import json, sys
sys.path.insert(0, "benchmarks")
import common
import jax
from selfsup import config as config_lib
jax.config.update("jax_enable_compilation_cache", False)
out = {}
for name in sys.argv[1:]:
    step = common.library_step(config_lib.resolve(config_lib.load(name)))
    step.run()  # the first call
    out[name] = {"compile_s": step.compile_s, "step_ms": step.run(5) * 1e3}
print(json.dumps(out))
"""


def measure(flags: str) -> dict | str:
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *CONFIGS], capture_output=True, text=True, env=env
    )
    if proc.returncode != 0:
        return proc.stderr.strip().splitlines()[-1][:160]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    results = {label: measure(flags) for label, flags in FLAG_SETS.items()}
    base = results["XLA defaults"]
    print("| flags | config | compile s | x defaults | step ms | x defaults |")
    print("|---|---|---|---|---|---|")
    for label, result in results.items():
        if isinstance(result, str):
            print(f"| {label} | (not run: {result}) | | | | |")
            continue
        for name, r in result.items():
            c, s = r["compile_s"], r["step_ms"]
            print(
                f"| {label} | {name.split('/')[-1]} | {c:.1f} | {c / base[name]['compile_s']:.2f}"
                f" | {s:.0f} | {s / base[name]['step_ms']:.2f} |"
            )


if __name__ == "__main__":
    main()
