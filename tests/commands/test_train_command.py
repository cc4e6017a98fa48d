"""What `selfsup train` tells the user: the data it found, resuming, a finished run, and no empty
workdir left behind by a configuration or data error."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from selfsup import cli
from selfsup import config as config_lib

SMOKE = str(REPO / "configs" / "quickstart.py:smoke")


def _image_folder(root, classes=("cat", "dog"), per_class=16):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("mistake", ["missing data folder", "init_from without checkpoint"])
def test_an_error_before_anything_is_written_leaves_no_workdir(tmp_path, capsys, mistake):
    workdir = tmp_path / "runs" / "new"
    if mistake == "missing data folder":
        args = ["--config.data.source=folder", f"--config.data.path={tmp_path / 'nowhere'}"]
        message = "image folder"
    else:  # found only after the checkpoint manager opened the workdir
        (tmp_path / "empty").mkdir()
        args = [f"--config.init_from={tmp_path / 'empty'}"]
        message = "no checkpoint in"
    code = cli.main(["train", "--config", SMOKE, "--workdir", str(workdir), *args])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("selfsup: error:")]
    assert message in line
    assert not workdir.exists()


@pytest.mark.slow  # end to end through the loop
def test_data_summary_resume_and_finished_run_messages(tmp_path, capsys):
    data = _image_folder(tmp_path / "pets")
    workdir = str(tmp_path / "run")
    train = ["train", "--config", SMOKE, "--workdir", workdir, "--config.data.source=folder"]
    train.append(f"--config.data.path={data}")

    assert cli.main([*train, "--config.total_steps=2"]) == 0
    err = capsys.readouterr().err
    # 32 images, 2 per class held out as the test split (see data.holdout)
    assert f"selfsup: data: folder {data}: 28 training images, 2 classes" in err
    assert "resuming" not in err

    assert cli.main([*train, "--config.total_steps=3"]) == 0
    assert "selfsup: resuming from step 2 of 3" in capsys.readouterr().err

    assert cli.main([*train, "--config.total_steps=3"]) == 0
    err = capsys.readouterr().err
    assert f"selfsup: the run in {workdir} is finished: its checkpoint is at step 3 of 3" in err
    assert "100%" not in err and "resuming" not in err  # no progress bar, nothing trained


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["train", "--config", SMOKE, "--print-config", "--config.batch_size=8"]
    assert cli.main([*argv, "--config.data.source=npz", "--config.data.path=x.npz"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = config_lib.resolve(
        config_lib.load(SMOKE), {"batch_size": "8", "data.source": "npz", "data.path": "x.npz"}
    )
    assert printed == json.loads(config_lib.to_json(expected))
    assert printed["batch_size"] == 8 and printed["data"] == {
        "source": "npz",
        "path": "x.npz",
        "image_size": 32,
    }
    assert list(tmp_path.iterdir()) == []  # nothing trained, nothing written


def test_train_without_workdir_is_a_one_line_error(capsys):
    assert cli.main(["train", "--config", SMOKE]) == 2
    assert capsys.readouterr().err.strip() == (
        "selfsup: error: --workdir is required: the folder (or gs:// URL) the run writes to "
        "(only --lower-only and --print-config run without one)"
    )
