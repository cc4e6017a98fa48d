"""Datasets in TFDS's ArrayRecord format, made without TensorFlow (`selfsup data convert`).

`config.data.source = "tfds"` reads ArrayRecord files with random access (`tfds.data_source`).
Three inputs become such a dataset, `<data_dir>/<name>/1.0.0/`:

- an image folder, `<class>/<image>` (one `train` split) or `<split>/<class>/<image>`; classes
  are the sorted folder names, over all splits. RGB JPEG and PNG files are stored as they are
  (no re-encoding); other images are converted to RGB and stored as PNG; undecodable files are
  skipped and counted.
- an `.npz` with `images` [N, H, W, 3] uint8 and `labels` [N], or `<split>_images` /
  `<split>_labels`; optional `label_names`. Images are stored as PNG.
- a TFDS dataset prepared as TFRecord (what `tfds build` writes by default; `tfds.data_source`
  cannot read it): its records are copied unchanged into ArrayRecord shards beside the TFRecord
  ones (or into another data_dir); dataset_info.json then names ArrayRecord as the format
  (TFRecord, still there, as the alternative).

The builder is built as `tfds.core.DatasetInfo(builder=self, ...)` and prepared with
`file_format="array_record"`; Image features get file paths or PIL images, never NumPy arrays
(their encoding calls TensorFlow). See ENVIRONMENT.md, "TFDS without TensorFlow".
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from selfsup.data.sources import IMAGE_EXTENSIONS
from selfsup.errors import UserError
from selfsup.io import paths

VERSION = "1.0.0"
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def convert(source: str, data_dir: str, name: str | None = None) -> dict:
    """Write `source` (image folder, .npz, or TFRecord TFDS dataset folder) as a TFDS ArrayRecord
    dataset in `data_dir`. Returns {"name", "path", "splits": {split: count}, "num_classes",
    "skipped"}."""
    src = Path(source).expanduser()
    if (src / "dataset_info.json").is_file():
        if name:
            raise UserError(f"{src} is a TFDS dataset named in its dataset_info.json: drop --name")
        return from_tfrecord(src, data_dir)
    if not name:
        raise UserError("--name is required: the dataset's TFDS name, e.g. --name my_pets")
    if not _NAME.fullmatch(name):
        raise UserError(
            f"--name {name!r}: TFDS names are lowercase letters, digits and '_', starting with "
            "a letter (e.g. my_pets)"
        )
    if src.is_dir():
        splits, classes, skipped = _folder_examples(src)
    elif src.is_file() and src.suffix == ".npz":
        splits, classes, skipped = _npz_examples(src)
    else:
        raise UserError(
            f"{src} is not an image folder, an .npz file, or a TFDS dataset folder "
            "(one with dataset_info.json); pass one of those"
        )
    out = Path(data_dir).expanduser() / name / VERSION
    if out.exists():
        raise UserError(f"{out} exists already: remove it or choose another --name")
    builder = _builder_class(name, classes, splits)(
        data_dir=os.fspath(Path(data_dir).expanduser()), file_format="array_record"
    )
    builder.download_and_prepare()
    counts = {split: info.num_examples for split, info in builder.info.splits.items()}
    return {
        "name": name,
        "path": str(out),
        "splits": counts,
        "num_classes": len(classes),
        "skipped": skipped,
    }


# ---------------------------------------------------------------------------------------------
# Image folders and .npz files.


def _is_split_layout(root: Path) -> bool:
    """`<split>/<class>/<image>` when no top-level folder holds images itself."""
    for entry in _subfolders(root):
        if any(_is_image(f) for f in entry.iterdir()):
            return False
    return True


def _subfolders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(file: Path) -> bool:
    return file.is_file() and file.name.lower().endswith(IMAGE_EXTENSIONS)


def _folder_examples(root: Path):
    """({split: [(example, label)]}, class names, skipped files)."""
    if not _subfolders(root):
        raise UserError(f"{root} has no class subfolders; expected {root}/<class>/<images>")
    roots = {s.name: s for s in _subfolders(root)} if _is_split_layout(root) else {"train": root}
    classes = sorted({c.name for split_root in roots.values() for c in _subfolders(split_root)})
    if not classes:
        raise UserError(f"{root} has no class subfolders; expected {root}/<split>/<class>/<images>")
    label_of = {c: i for i, c in enumerate(classes)}
    splits, skipped = {}, 0
    for split, split_root in roots.items():
        examples = []
        for class_dir in _subfolders(split_root):
            for file in sorted(f for f in class_dir.iterdir() if _is_image(f)):
                image = _storable(file)
                if image is None:
                    skipped += 1
                    continue
                examples.append((image, label_of[class_dir.name]))
        if not examples:
            raise UserError(f"{split_root} holds no decodable {'/'.join(IMAGE_EXTENSIONS)} files")
        splits[split] = examples
    return splits, classes, skipped


def _storable(file: Path):
    """The file's path if TFDS can store its bytes as they are (RGB JPEG or PNG), else the image
    as RGB (stored as PNG), or None when it does not decode."""
    try:
        with Image.open(file) as image:
            image.load()  # decodes the whole file: a truncated one fails here, not in training
            if image.format in ("JPEG", "PNG") and image.mode == "RGB":
                return os.fspath(file)
            return image.convert("RGB")
    except Exception as err:  # PIL raises many types for bad files; all mean "undecodable"
        print(f"selfsup: skipping undecodable image {file}: {err}", file=sys.stderr)
        return None


def _npz_examples(path: Path):
    with np.load(path, allow_pickle=False) as npz:
        keys = sorted(npz.files)
        prefixes = sorted(k.removesuffix("images") for k in keys if k.endswith("images"))
        if not prefixes:
            raise UserError(f"{path} has no 'images' or '<split>_images' array; it has {keys}")
        splits = {}
        for prefix in prefixes:
            split = prefix.removesuffix("_") or "train"
            images, labels_key = npz[prefix + "images"], prefix + "labels"
            if labels_key not in keys:
                raise UserError(f"{path} has {prefix}images but no {labels_key}")
            labels = npz[labels_key]
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise UserError(
                    f"{path}: {prefix}images must be uint8 [N, H, W, 3], got {images.dtype} "
                    f"{images.shape}"
                )
            if len(labels) != len(images):
                raise UserError(f"{path}: {len(images)} {prefix}images but {len(labels)} labels")
            splits[split] = [
                (image, int(label)) for image, label in zip(images, labels, strict=True)
            ]
        if "label_names" in keys:
            classes = [str(n) for n in npz["label_names"]]
        else:
            top = max(y for examples in splits.values() for _, y in examples)
            classes = [str(i) for i in range(top + 1)]
    return splits, classes, 0


def _builder_class(name: str, classes: list[str], splits: dict):
    """A TFDS builder of `splits` ({split: [(image, label)]}), defined here rather than found by
    registration (`skip_registration`: converting changes nothing global in TFDS)."""
    import tensorflow_datasets as tfds

    class Converted(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        # No source file to find checksums beside (TFDS's lookup needs importlib_resources).
        code_path = None

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=classes),
                }
            )
            return tfds.core.DatasetInfo(
                builder=self,
                description="Converted by `selfsup data convert`.",
                features=features,
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in splits}

        def _generate_examples(self, split):
            for i, (image, label) in enumerate(splits[split]):
                if isinstance(image, np.ndarray):  # TFDS would encode an array with TensorFlow
                    image = Image.fromarray(image)
                yield i, {"image": image, "label": label}

    Converted.name = name
    return Converted


# ---------------------------------------------------------------------------------------------
# TFRecord -> ArrayRecord.

_TFRECORD_SHARD = re.compile(r"^(?P<stem>.+)\.tfrecord-(?P<shard>\d+-of-\d+)$")


def from_tfrecord(src: Path, data_dir: str) -> dict:
    """Copy the records of the TFRecord TFDS dataset in `src` (a version folder) into ArrayRecord
    shards under `data_dir` (in place when `src` is already there) and record the format."""
    from tensorflow_datasets.core import file_adapters

    info = json.loads((src / "dataset_info.json").read_text())
    fmt = info.get("fileFormat", "tfrecord")
    if fmt == "array_record" or "array_record" in info.get("alternativeFileFormats", []):
        raise UserError(f"{src} is already ArrayRecord: use it as it is (config.data.source=tfds)")
    if fmt != "tfrecord":
        raise UserError(f"{src} is stored as {fmt}; only TFRecord datasets are converted")
    parts = [info["name"], *([info["configName"]] if info.get("configName") else [])]
    out = Path(data_dir).expanduser().joinpath(*parts, info["version"])
    in_place = out.resolve() == src.resolve()
    expected = {s["name"]: sum(int(n) for n in s.get("shardLengths", [])) for s in info["splits"]}

    shards = sorted(f for f in src.iterdir() if _TFRECORD_SHARD.match(f.name))
    if not shards:
        raise UserError(f"{src} has no *.tfrecord-NNNNN-of-NNNNN shards")
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for shard in shards:
        match = _TFRECORD_SHARD.match(shard.name)
        target = out / f"{match['stem']}.array_record-{match['shard']}"
        records = list(read_tfrecord(shard))
        tmp = target.with_name(target.name + ".tmp")
        file_adapters.ArrayRecordFileAdapter.write_examples(tmp, enumerate(records))
        os.replace(tmp, target)
        split = match["stem"].removeprefix(info["name"] + "-")
        counts[split] = counts.get(split, 0) + len(records)
    if counts != expected:
        raise UserError(
            f"{src}: the shards hold {counts} records but dataset_info.json says {expected}; "
            "the dataset is incomplete"
        )
    if in_place:
        # ArrayRecord becomes the format and TFRecord the alternative: TFDS 4.9.10 cannot open a
        # dataset in one of its `alternativeFileFormats` (DatasetInfo.set_file_format refuses).
        info["alternativeFileFormats"] = [*info.get("alternativeFileFormats", []), "tfrecord"]
    else:
        for extra in src.iterdir():  # features.json, label names: everything but the shards
            if extra.is_file() and not _TFRECORD_SHARD.match(extra.name):
                (out / extra.name).write_bytes(extra.read_bytes())
    info["fileFormat"] = "array_record"
    paths.write_text(out / "dataset_info.json", json.dumps(info, indent=2) + "\n")
    names = _label_names(out)
    return {
        "name": "/".join(parts),
        "path": str(out),
        "splits": counts,
        "num_classes": len(names) if names else None,
        "skipped": 0,
    }


def _label_names(folder: Path) -> list[str] | None:
    labels = sorted(folder.glob("*.labels.txt"))
    return labels[0].read_text().splitlines() if labels else None


def read_tfrecord(path: str | os.PathLike) -> Iterator[bytes]:
    """The records of a TFRecord file, in order. Each is framed as length (uint64 LE), masked
    CRC-32C of the length, data, masked CRC-32C of the data; the length's CRC is checked (cheap,
    and it catches a truncated or foreign file), the data's is not (pure Python is too slow)."""
    with paths.path(path).open("rb") as f:
        while header := f.read(12):
            length_bytes, length_crc = header[:8], header[8:]
            if len(header) < 12 or struct.unpack("<I", length_crc)[0] != masked_crc32c(
                length_bytes
            ):
                raise UserError(f"{path} is not a TFRecord file, or it is damaged")
            (length,) = struct.unpack("<Q", length_bytes)
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                raise UserError(f"{path} ends in the middle of a record: the file is truncated")
            yield data


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated right by 15 bits plus 0xA282EAD8."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
