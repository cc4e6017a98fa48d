"""Input pipeline: images/s the data layer delivers per host against what the train step consumes.

Times `selfsup.data.Loader` (decode, resize to the storage size, batch; its prefetch thread and
decode pool as the loop uses them) plus placing each batch on the devices with
`jax.make_array_from_process_local_data`, as `train_and_evaluate` does, over:
- a folder of JPEGs (real CIFAR-10 images upscaled to 320x240 and re-encoded at quality 90, about
  ImageNet's mean size), resized to 256 px storage: the in1k configs' `folder` path;
- the `npz` source (CIFAR-10 subset arrays, already decoded) at 32 px;
- the built-in `shapes` dataset (generated) at 32 px.
The consumption side is the MAE ViT-B/16 step's images/s from `throughput.py` (pass it with
`--consumes`), or measured here on the quickstart config if not given. A loop whose host
delivers faster than the step consumes never waits for data (the prefetch queue stays full).

The process keeps freed host memory as `selfsup train` does on a CPU host
(`selfsup/train/host_memory.py`, applied by `common`), or not with SELFSUP_HOST_MEMORY=default;
`--ab` runs both settings in alternating fresh processes and prints their delivered images/s side by
side.

    python benchmarks/pipeline.py [--quick] [--consumes IMG_PER_S]
    python benchmarks/pipeline.py --ab [--quick] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from PIL import Image

from selfsup import data
from selfsup.parallel import sharding

CIFAR = common.REPO.parent / "shared" / "data" / "cifar10_subset.npz"


def jpeg_folder(root: Path, count: int) -> Path:
    """`count` JPEGs of 320x240 px under root/<class>/, made from real CIFAR-10 images when the
    shared subset is present (natural images compress and decode like photographs), else noise."""
    rng = np.random.default_rng(0)
    if CIFAR.exists():
        with np.load(CIFAR) as z:
            key = next(k for k in z.files if k.endswith("images"))
            images = z[key][:count]
    else:
        images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        folder = root / f"class_{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(image).resize((320, 240), Image.Resampling.BICUBIC)
        big.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def delivered(source, batch_size: int, batches: int) -> float:
    """Images/s of Loader batches placed on all devices (the first batch, warm-up, not timed)."""
    import jax

    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    place = sharding.batch_sharding(mesh)
    stream = data.Loader(source, batch_size, seed=0).iterate()
    try:
        next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(stream)
            arrays = [jax.make_array_from_process_local_data(place, v) for v in batch.values()]
            jax.block_until_ready(arrays)
        return batches * batch_size / (time.perf_counter() - start)
    finally:
        stream.close()


def consumed_quickstart() -> float:
    """Images/s of the quickstart step (SimCLR, small ViT, 32 px) when no figure is given."""
    config = common.small_config("configs/quickstart.py", image_size=32, batch_size=128)
    step = common.library_step(config)
    step.run(1)
    return config.batch_size / step.run(3)


def host_memory_ab(quick: bool, rounds: int) -> list[dict]:
    """Delivered images/s per source with freed host memory kept and with glibc's default, each
    setting in its own fresh process (malloc's setting must precede the first thread), the two
    alternating `rounds` times; medians and the keep/default ratio."""
    rates: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for setting in ("default", "keep"):
            cmd = [sys.executable, __file__, "--consumes", "1", "--json", *["--quick"] * quick]
            env = {**os.environ, "SELFSUP_HOST_MEMORY": "default" if setting == "default" else ""}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            for row in json.loads(out.strip().splitlines()[-1]):
                rates.setdefault(row["source"], {}).setdefault(setting, []).append(row["img_s"])
    rows = []
    for source, by_setting in rates.items():
        default, keep = (statistics.median(by_setting[k]) for k in ("default", "keep"))
        rows.append(
            {
                "source": source,
                "default img_s": default,
                "keep img_s": keep,
                "keep/default": keep / default,
            }
        )
    print(common.table(rows, ("source", "default img_s", "keep img_s", "keep/default")))
    print(f"load: {common.load_average()}")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches")
    parser.add_argument("--consumes", type=float, default=0.0, help="the step's images/s")
    parser.add_argument("--ab", action="store_true", help="both host-memory settings, side by side")
    parser.add_argument("--rounds", type=int, default=2, help="--ab: alternations")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    args = parser.parse_args(argv)
    if args.ab:
        return host_memory_ab(args.quick, args.rounds)
    batches = 4 if args.quick else 10
    batch = 64
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = jpeg_folder(Path(tmp), batch * (batches + 2))
        cases = [("folder (JPEG 320x240)", {"source": "folder", "path": str(folder)}, 256)]
        if CIFAR.exists():
            cases.append(("npz (CIFAR-10)", {"source": "npz", "path": str(CIFAR)}, 32))
        cases.append(("builtin (shapes)", {"source": "builtin", "name": "shapes"}, 32))
        for name, keys, size in cases:
            source = data.build_source({**keys, "image_size": size}, "train")
            rate = delivered(source, batch, batches)
            rows.append(
                {"source": name, "storage_px": size, "img_s": rate, "load": common.load_average()}
            )
    consumes = args.consumes or consumed_quickstart()
    for row in rows:
        row["step_img_s"] = consumes
        row["headroom"] = row["img_s"] / consumes
    print(common.table(rows, ("source", "storage_px", "img_s", "step_img_s", "headroom", "load")))
    if args.json:
        print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
