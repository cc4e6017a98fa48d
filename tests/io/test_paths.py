"""Workdirs that are URLs (`gs://bucket/run`): selfsup.paths, the log writer, and `selfsup train`,
`eval` and `export` end to end against a stand-in bucket (tests/fake_gcs.py)."""

from __future__ import annotations

import json
import os

import fake_gcs
import numpy as np
import pytest
from conftest import REPO
from PIL import Image

from selfsup import cli
from selfsup.io import logs, paths


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """`gs://...` kept under the returned folder for this test."""
    root = tmp_path / "gcs"
    root.mkdir()
    fake_gcs.install(monkeypatch, root)
    yield root
    fake_gcs.uninstall()


def test_path_keeps_urls_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.path("gs://bucket/runs/a")) == "gs://bucket/runs/a"
    assert (
        str(paths.path("gs://bucket/runs") / "a" / "config.json")
        == "gs://bucket/runs/a/config.json"
    )
    assert str(paths.path("runs/a")) == str(tmp_path / "runs" / "a")
    assert str(paths.path("~/x")) == os.path.expanduser("~/x")
    assert paths.is_url("gs://b/x") and not paths.is_url("/gs:/b/x")


def test_write_bytes_replaces_a_local_file_whole_and_writes_a_url(bucket, tmp_path):
    local = tmp_path / "out" / "record.json"
    paths.write_text(local, "first")
    paths.write_text(local, "second")
    assert local.read_text() == "second" and sorted(os.listdir(local.parent)) == ["record.json"]
    paths.write_text("gs://b/out/record.json", "remote")
    assert (bucket / "b" / "out" / "record.json").read_text() == "remote"


def test_log_writer_stages_and_uploads_to_a_url_and_appends_on_resume(bucket):
    workdir = "gs://b/run"
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, :4] = 255
    writer = logs.Writer(workdir)
    writer.scalars(1, {"loss": 2.0})
    png = writer.image(1, "reconstruction", image)
    writer.close()
    assert png == "gs://b/run/images/reconstruction_0000001.png"
    with Image.open(bucket / "b" / "run" / "images" / "reconstruction_0000001.png") as im:
        np.testing.assert_array_equal(np.asarray(im), image)

    writer = logs.Writer(workdir)  # a resumed run
    writer.scalars(2, {"loss": 1.5})
    writer.close()
    run = bucket / "b" / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    events = sorted((run / "tensorboard").iterdir())
    assert len(events) == 2 and all(e.name.startswith("events.out.tfevents.") for e in events)
    assert all(e.stat().st_size > 0 for e in events)
    assert not (bucket / "gs:").exists()  # nothing went to a local `gs:` folder


@pytest.mark.slow
def test_train_resume_eval_and_export_with_a_gs_workdir(bucket, capsys):
    """The commands a TPU user types, with `--workdir gs://...`: every file lands in the bucket,
    the run resumes from it, and nothing is written to a local `./gs:` folder."""
    config = str(REPO / "configs" / "quickstart.py:smoke")
    train = ["train", "--config", config, "--workdir", "gs://b/run", "--config.image_every_steps=2"]
    assert cli.main([*train, "--config.total_steps=2"]) == 0
    assert cli.main([*train, "--config.total_steps=3"]) == 0
    assert "resuming from step 2 of 3" in capsys.readouterr().err
    run = bucket / "b" / "run"
    assert json.loads((run / "config.json").read_text())["total_steps"] == 3
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert len(list((run / "tensorboard").iterdir())) == 2
    assert (run / "images" / "reconstruction_0000002.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]

    knn = str(REPO / "configs" / "eval" / "knn.py:smoke")
    assert cli.main(["eval", "--workdir", "gs://b/run", "--config", knn]) == 0
    record = json.loads((run / "eval" / "knn_step3.json").read_text())
    assert record["step"] == 3 and record["workdir"] == "gs://b/run"
    assert cli.main(["export", "--workdir", "gs://b/run", "--out", "gs://b/export"]) == 0
    exported = json.loads((bucket / "b" / "export" / "config.json").read_text())
    assert exported["source"] == {**exported["source"], "workdir": "gs://b/run", "step": 3}
    assert (bucket / "b" / "export" / "model.safetensors").stat().st_size > 0
    assert not (bucket / "gs:").exists()
