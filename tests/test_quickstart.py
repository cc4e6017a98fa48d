"""The quickstart as a user runs it: `selfsup train --config configs/quickstart.py` ends with a
k-NN and a linear probe at least 10 points above the same backbone at random initialisation,
through the same protocol, and says so on its last line (several minutes: marked slow)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, USER_XLA_FLAGS


@pytest.mark.slow
@pytest.mark.longest
def test_quickstart_beats_random_init_by_ten_points_on_both_protocols(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "selfsup.cli", "train", "--config", "configs/quickstart.py"]
        + ["--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": USER_XLA_FLAGS},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    results = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        results.update(json.loads(line))
    for name in ("knn", "linear_probe"):
        trained, random = results[f"eval/{name}/top1"], results[f"random_init/{name}/top1"]
        assert trained - random >= 0.10, (name, trained, random)
        shown = f"{name} top-1 {100 * trained:.1f}% (random init {100 * random:.1f}%)"
        assert shown in last, last
    assert re.match(r"selfsup: done, loss \d", last)
