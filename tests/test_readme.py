"""The README's data recipe runs as written: its CIFAR-10 `.npz` snippet, on stand-in files in
CIFAR-10's Python format, gives arrays the `npz` source reads with the right pixels and labels."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys

import numpy as np
from conftest import REPO

from selfsup import data

README = (REPO / "README.md").read_text()


def _npz_snippet() -> str:
    after = README[README.index("An `.npz` is a few lines of NumPy.") :]
    return re.search(r"```python\n(.*?)```", after, re.S).group(1)


def test_readme_points_at_no_file_users_do_not_have():
    assert "../shared" not in README


def test_readme_cifar_npz_snippet(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 2}
    rows, labels = {}, {}
    for name, n in batches.items():  # CIFAR-10's layout: rows of R, G, B planes, 32 x 32 each
        rows[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels[name] = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows[name], b"labels": labels[name]}, f)
    run = subprocess.run(
        [sys.executable, "-c", _npz_snippet()], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr

    train = data.build_source(
        {"source": "npz", "path": str(tmp_path / "cifar10.npz"), "image_size": 32}, "train"
    )
    assert len(train) == 15
    image, label = train[3]  # the first image of data_batch_2
    want = rows["data_batch_2"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(image, want)
    assert label == labels["data_batch_2"][0]
    test = data.build_source(
        {"source": "npz", "path": str(tmp_path / "cifar10.npz"), "image_size": 32}, "test"
    )
    assert len(test) == 2
