"""`selfsup data convert`: image folders, .npz files and TFRecord TFDS datasets become TFDS
ArrayRecord datasets without TensorFlow, read back by `config.data.source=tfds` and trained on."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource
from conftest import REPO
from PIL import Image

from selfsup import cli, data
from selfsup.data import tfds_convert
from selfsup.errors import UserError


def _pixels(rng, shape=(20, 24, 3)):
    return rng.integers(0, 256, shape, dtype=np.uint8)


def _tfds(name, data_dir, split, size=16):
    return data.build_source(
        {"source": "tfds", "name": name, "data_dir": str(data_dir), "image_size": size}, split
    )


def _examples(source) -> list[tuple[int, bytes]]:
    """(label, image bytes) of every example, sorted: TFDS shuffles the order when it writes."""
    return sorted(
        (label, image.tobytes()) for image, label in (source[i] for i in range(len(source)))
    )


def test_masked_crc32c_matches_the_standard_check_value():
    crc = 0xE3069283  # CRC-32C of b"123456789" (RFC 3720, the Castagnoli check value)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert tfds_convert.masked_crc32c(b"123456789") == masked


def test_an_image_folder_becomes_a_tfds_dataset_that_trains(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = tmp_path / "pets"
    for split, count in (("train", 8), ("test", 3)):
        for name in ("cat", "dog"):
            (images / split / name).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(_pixels(rng)).save(images / split / name / f"{i}.png")
    Image.fromarray(_pixels(rng, (18, 18, 3))).save(images / "train" / "cat" / "photo.jpg")
    Image.fromarray(_pixels(rng, (18, 30))).save(images / "train" / "dog" / "gray.png")
    (images / "train" / "dog" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "tfds"

    argv = ["data", "convert", str(images), "--name", "my_pets", "--data-dir", str(out)]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    expected = (
        f"selfsup: wrote {out / 'my_pets' / '1.0.0'} (ArrayRecord; images: test 6, train 18, "
        "2 classes, 1 undecodable files skipped). Train on it with --config.data.source=tfds "
        f"--config.data.name=my_pets --config.data.data_dir={out}"
    )
    assert expected in err.splitlines()
    for split in ("train", "test"):
        folder = data.build_source(
            {"source": "folder", "path": str(images), "image_size": 16}, split
        )
        readable = [i for i in range(len(folder)) if not folder.files[i].endswith("broken.jpg")]
        want = sorted((folder[i][1], folder[i][0].tobytes()) for i in readable)
        converted = _tfds("my_pets", out, split)
        assert converted.num_classes == 2
        assert _examples(converted) == want  # the same pixels and labels, JPEG untouched

    assert cli.main(argv) == 2  # never overwrites
    assert "exists already" in capsys.readouterr().err

    workdir = tmp_path / "run"
    train = ["train", "--config", str(REPO / "configs" / "quickstart.py:smoke")]
    train += ["--workdir", str(workdir), "--config.total_steps=2", "--config.batch_size=8"]
    train += ["--config.data.source=tfds", "--config.data.name=my_pets"]
    assert cli.main([*train, f"--config.data.data_dir={out}"]) == 0
    err = capsys.readouterr().err
    assert f"selfsup: data: tfds my_pets in {out}: 18 training images, 2 classes" in err
    assert json.loads((workdir / "config.json").read_text())["data"]["name"] == "my_pets"


def test_an_npz_becomes_a_tfds_dataset_with_its_label_names(tmp_path, capsys):
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": _pixels(rng, (10, 16, 16, 3)),
        "train_labels": rng.integers(0, 3, 10),
        "test_images": _pixels(rng, (4, 16, 16, 3)),
        "test_labels": np.array([0, 1, 2, 2]),
        "label_names": np.array(["a", "b", "c"]),
    }
    np.savez(tmp_path / "mine.npz", **arrays)
    argv = ["data", "convert", str(tmp_path / "mine.npz"), "--name", "mine"]
    assert cli.main([*argv, "--data-dir", str(tmp_path / "tfds")]) == 0
    for split in ("train", "test"):
        converted = _tfds("mine", tmp_path / "tfds", split)
        want = sorted(
            (int(y), x.tobytes())
            for x, y in zip(arrays[f"{split}_images"], arrays[f"{split}_labels"], strict=True)
        )
        assert converted.num_classes == 3 and _examples(converted) == want  # PNG: lossless


def _write_tfrecord(path, records: list[bytes]) -> None:
    """TFRecord framing, as TensorFlow writes it."""
    with open(path, "wb") as f:
        for record in records:
            length = struct.pack("<Q", len(record))
            f.write(length + struct.pack("<I", tfds_convert.masked_crc32c(length)))
            f.write(record + struct.pack("<I", tfds_convert.masked_crc32c(record)))


def _as_tfrecord_dataset(version_dir) -> None:
    """Rewrite an ArrayRecord TFDS dataset the way `tfds build` stores it by default."""
    for shard in sorted(version_dir.glob("*.array_record-*")):
        source = ArrayRecordDataSource([str(shard)])
        records = [source[i] for i in range(len(source))]
        _write_tfrecord(
            shard.with_name(shard.name.replace(".array_record-", ".tfrecord-")), records
        )
        shard.unlink()
    info = json.loads((version_dir / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (version_dir / "dataset_info.json").write_text(json.dumps(info))


@pytest.mark.parametrize("where", ["in place", "another data_dir"])
def test_a_tfrecord_tfds_dataset_gets_array_record_shards(tmp_path, capsys, where):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "d.npz", images=_pixels(rng, (7, 12, 12, 3)), labels=np.arange(7) % 2)
    data_dir = tmp_path / "tfds"
    assert (
        cli.main(
            [
                "data",
                "convert",
                str(tmp_path / "d.npz"),
                "--name",
                "recs",
                "--data-dir",
                str(data_dir),
            ]
        )
        == 0
    )
    want = _examples(_tfds("recs", data_dir, "train"))
    version_dir = data_dir / "recs" / "1.0.0"
    _as_tfrecord_dataset(version_dir)
    with pytest.raises(UserError, match=r"is TFRecord.*`selfsup data convert .*recs/1.0.0"):
        _tfds("recs", data_dir, "train")
    capsys.readouterr()

    target = data_dir if where == "in place" else tmp_path / "converted"
    assert cli.main(["data", "convert", str(version_dir), "--data-dir", str(target)]) == 0
    assert "(ArrayRecord; images: train 7, 2 classes)" in capsys.readouterr().err
    assert _examples(_tfds("recs", target, "train")) == want
    assert (version_dir / "recs-train.tfrecord-00000-of-00001").exists()  # the original stays


def test_tfrecord_reader_rejects_a_damaged_file(tmp_path):
    _write_tfrecord(tmp_path / "ok", [b"abc", b"defg"])
    assert list(tfds_convert.read_tfrecord(tmp_path / "ok")) == [b"abc", b"defg"]
    whole = (tmp_path / "ok").read_bytes()
    (tmp_path / "cut").write_bytes(whole[:-6])
    with pytest.raises(UserError, match="truncated"):
        list(tfds_convert.read_tfrecord(tmp_path / "cut"))
    (tmp_path / "other").write_bytes(b"x" * 40)
    with pytest.raises(UserError, match="not a TFRecord file"):
        list(tfds_convert.read_tfrecord(tmp_path / "other"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--name", "My-Pets"], "TFDS names are lowercase letters"),
        ([], "--name is required"),
    ],
)
def test_name_mistakes_are_one_line_errors(tmp_path, capsys, args, message):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    argv = ["data", "convert", str(tmp_path / "imgs"), "--data-dir", str(tmp_path), *args]
    assert cli.main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("selfsup: error:") and message in line


def test_tfds_not_found_names_the_real_data_dir_and_the_commands(tmp_path, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(tmp_path / "default"))
    with pytest.raises(UserError) as error:
        data.build_source(
            {"source": "tfds", "name": "nope", "data_dir": "", "image_size": 8}, "train"
        )
    message = str(error.value)
    assert "(the TFDS default)" not in message and "\n" not in message
    assert f"not found in {tmp_path / 'default'}" in message
    assert (
        f"selfsup data convert IMAGES_OR_NPZ --name nope --data-dir {tmp_path / 'default'}"
        in message
    )
