"""Sources: random access to one split of a dataset, each example a uint8 [S, S, 3] image (resized
so the shorter side is S, then centre-cropped) and an int label. `build_source(config.data, split)`.
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from selfsup.data import builtin
from selfsup.data.holdout import has_split, holdout
from selfsup.errors import UserError

_log = logging.getLogger(__name__)
SOURCES = ("builtin", "npz", "folder", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class DecodeError(Exception):
    """An example whose image cannot be decoded; the message names the file or index."""


class Source(Protocol):
    """Random access over one split, after decode and resize."""

    num_classes: int
    image_size: int  # S

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """(uint8 [S, S, 3], label); raises DecodeError for an undecodable image."""
        ...


def _fit(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
    """[H, W], [H, W, C] with C in (1, 3, 4), or a PIL image -> uint8 [size, size, 3].

    Bilinear (antialiased when shrinking) resize of the centred square of side min(H, W): the same
    as resizing the shorter side to `size` and centre-cropping, without rounding the middle size.
    """
    if isinstance(image, np.ndarray):
        if image.dtype == np.uint16:  # 16-bit PNGs: 65535 is white, as 255 is in 8 bits
            image = np.round(image / 257.0).astype(np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
            raise DecodeError(f"image of shape {image.shape} is not [H, W, 1|3|4]")
        image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
        if image.shape[:2] == (size, size):  # a copy: never a read-only view of a memmap
            return np.array(image, dtype=np.uint8, order="C")
        image = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR, box=box))


class _ArraySource:
    """Examples from in-memory or memory-mapped arrays: images [N, H, W(, C)] uint8, labels [N]."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, size: int):
        self.images, self.labels = images, labels
        self.num_classes, self.image_size = num_classes, size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return _fit(np.asarray(self.images[i]), self.image_size), int(self.labels[i])


def _read_npz_member(path: Path, zf: zipfile.ZipFile, key: str) -> np.ndarray:
    """One array of an .npz; an uncompressed (np.savez) member is memory-mapped, not read."""
    info = zf.getinfo(key + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)  # the local header's name and extra-field lengths
            name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
            f.seek(info.header_offset + 30 + int(name_len) + int(extra_len))
            version = np.lib.format.read_magic(f)
            if version in ((1, 0), (2, 0)):
                read_header = getattr(np.lib.format, f"read_array_header_{version[0]}_0")
                shape, fortran, dtype = read_header(f)
                if not dtype.hasobject:
                    order = "F" if fortran else "C"
                    return np.memmap(path, dtype, "r", f.tell(), shape, order)
    with zf.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _check_npz_arrays(path: Path, prefix: str, images: np.ndarray, labels: np.ndarray):
    """Shapes and dtypes first, so each mistake gets its own error; returns labels as int [N]
    (any integer dtype; [N, 1] is read as [N])."""
    what = f"{path}: {prefix}images"
    if images.dtype != np.uint8:
        raise UserError(
            f"{what} has dtype {images.dtype}; store uint8 pixels 0..255 "
            "(e.g. (x * 255).round().astype(np.uint8))"
        )
    if images.ndim == 4 and images.shape[-1] not in (1, 3, 4) and images.shape[1] in (1, 3, 4):
        raise UserError(
            f"{what} has shape {images.shape}, channels first (NCHW); store [N, H, W, 3] "
            "(images.transpose(0, 2, 3, 1))"
        )
    if images.ndim not in (3, 4) or images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
        raise UserError(f"{what} has shape {images.shape}; store [N, H, W, 3] (or [N, H, W])")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{path}: {prefix}labels has dtype {labels.dtype} and shape {labels.shape}; store "
            "integer class ids of shape [N]"
        )
    if len(images) != len(labels):
        raise UserError(
            f"{what} holds {len(images)} images but {prefix}labels {len(labels)} labels; store "
            "one label per image"
        )
    return labels


def _npz_source(path: Path, split: str, size: int) -> _ArraySource:
    """`images`/`labels`, or `<split>_images`/`<split>_labels`; optional `label_names`."""
    if not path.is_file():
        raise UserError(f"npz file {path} not found; set config.data.path to an existing .npz")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not an .npz (zip) file; write it with np.savez") from None
    with zf:
        keys = sorted(n.removesuffix(".npy") for n in zf.namelist())
        prefix = f"{split}_" if f"{split}_images" in keys else ""
        missing = [k for k in (prefix + "images", prefix + "labels") if k not in keys]
        if missing:
            raise UserError(
                f"{path} lacks {missing} for split {split!r}; it has {keys} (expected "
                f"'{split}_images'/'{split}_labels' or 'images'/'labels')"
            )
        images = _read_npz_member(path, zf, prefix + "images")
        labels = _check_npz_arrays(
            path, prefix, images, _read_npz_member(path, zf, prefix + "labels")
        )
        if "label_names" in keys:
            num_classes = len(_read_npz_member(path, zf, "label_names"))
        else:  # over every split's labels, so train and test agree
            label_keys = [k for k in keys if k == "labels" or k.endswith("_labels")]
            # Through int64: `max(initial=-1)` of uint8 labels (CIFAR's dtype) overflows.
            num_classes = 1 + max(
                int(np.max(_read_npz_member(path, zf, k).astype(np.int64), initial=-1))
                for k in label_keys
            )
    return _ArraySource(images, labels, num_classes, size)


# Modes of 16-bit grayscale PNGs (Pillow opens older ones as 32-bit "I"); `convert("RGB")`
# would clip every value above 255 to white.
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I")


def _sixteen_bit(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)
    if image.mode == "I" and pixels.max(initial=0) <= 255:  # an 8-bit image stored wide
        return pixels.clip(0, 255).astype(np.uint8)
    return pixels.clip(0, 65535).astype(np.uint16)  # _fit scales it to 8 bits


class _FolderSource:
    """`root/<class>/<image>`, classes and files sorted by name; root: `path/<split>` or `path`."""

    def __init__(self, path: Path, split: str, size: int):
        if not path.is_dir():
            raise UserError(f"image folder {path} not found; set config.data.path to it")
        root = path / split if (path / split).is_dir() else path
        # Hidden folders (.ipynb_checkpoints, ...) are not classes.
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and e.name[0] != ".")
        if not classes:
            raise UserError(f"{root} has no class subfolders; expected {root}/<class>/<images>")
        self.files: list[str] = []
        labels = []
        for label, name in enumerate(classes):
            files = sorted(
                e.path
                for e in os.scandir(root / name)
                if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
            if not files:
                raise UserError(
                    f"class folder {root / name} has no {'/'.join(IMAGE_EXTENSIONS)} files "
                    f"(for split folders, {path / split} must exist)"
                )
            self.files += files
            labels += [label] * len(files)
        self.labels = np.asarray(labels, dtype=np.int32)
        self.classes, self.num_classes, self.image_size = classes, len(classes), size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        path = self.files[i]
        try:
            with Image.open(path) as image:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale, never below S: much cheaper.
                image.draft("RGB", (self.image_size, self.image_size))
                image = _sixteen_bit(image) if image.mode in _WIDE_MODES else image.convert("RGB")
        except Exception as err:  # PIL raises many types for bad files; all mean "undecodable"
            raise DecodeError(f"{path}: {err}") from err
        return _fit(image, self.image_size), int(self.labels[i])


def _opencv_hint(record: logging.LogRecord) -> bool:
    return "OpenCV is not installed" not in record.getMessage()


def _quiet_opencv_hint() -> None:
    """TFDS logs a speed hint ("OpenCV is not installed") at its first image decode: on stderr,
    it would stand before a user's one-line error. Drop exactly that record."""
    absl = logging.getLogger("absl")
    if _opencv_hint not in absl.filters:
        absl.addFilter(_opencv_hint)


class _TfdsSource:
    """A prepared TFDS dataset in ArrayRecord format, read without TensorFlow."""

    def __init__(self, name: str, data_dir: str | None, split: str, size: int):
        import tensorflow_datasets as tfds  # slow import: only when used

        # Without data_dir, TFDS looks in $TFDS_DATA_DIR or ~/tensorflow_datasets.
        where = data_dir or tfds.core.constants.DATA_DIR
        how = (
            f"set config.data.data_dir to the folder that holds {name}/, or make the dataset: "
            f"`selfsup data convert IMAGES_OR_NPZ --name {name} --data-dir {where}` for your own "
            f"images, `tfds build {name} --data_dir {where} --file_format array_record` for a "
            "TFDS catalogue dataset (needs TensorFlow)"
        )
        try:
            builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError:
            raise UserError(f"TFDS dataset {name!r} not found in {where}; {how}") from None
        except ValueError as err:  # "File format array_record does not match ...": TFRecord
            if "file format" not in str(err).lower():
                raise
            folder = tfds.builder(name, data_dir=data_dir).data_dir
            raise UserError(
                f"TFDS dataset {name!r} in {folder} is TFRecord, which has no random access; "
                f"add ArrayRecord shards with `selfsup data convert {folder} --data-dir {where}` "
                "(no TensorFlow needed)"
            ) from None
        if not builder.is_prepared():
            raise UserError(f"TFDS dataset {name!r} is not prepared in {where}; {how}")
        try:
            self._records = builder.as_data_source(split=split)
        except ValueError as err:  # unknown split
            raise UserError(f"TFDS dataset {name!r} in {where}: {err}") from None
        except NotImplementedError:  # prepared as tfrecord: no random access
            raise UserError(
                f"TFDS dataset {name!r} in {where} is not ArrayRecord; add ArrayRecord shards with "
                f"`selfsup data convert {where}/{name} --data-dir {where}` (no TensorFlow needed)"
            ) from None
        _quiet_opencv_hint()
        features = builder.info.features
        if "image" not in features or "label" not in features:
            raise UserError(f"TFDS dataset {name!r} needs 'image' and 'label' features: {features}")
        self.num_classes = int(features["label"].num_classes)
        self.name, self.image_size = name, size

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        try:
            record = self._records[i]
            image = _fit(np.asarray(record["image"]), self.image_size)
        except IndexError:
            raise
        except Exception as err:  # the record's bytes do not decode
            raise DecodeError(f"{self.name} example {i}: {err}") from err
        return image, int(record["label"])


class _BuiltinSource:
    """A procedurally generated split from `builtin`."""

    def __init__(self, name: str, split: str, size: int):
        if name not in builtin.NAMES:
            raise UserError(f"unknown builtin dataset {name!r}; choose one of {builtin.NAMES}")
        if split not in builtin.SPLIT_SIZES:
            splits = sorted(builtin.SPLIT_SIZES)
            raise UserError(f"builtin dataset has no split {split!r}; use one of {splits}")
        self.split, self.num_classes, self.image_size = split, builtin.NUM_CLASSES, size

    def __len__(self) -> int:
        return builtin.SPLIT_SIZES[self.split]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        image, label = builtin.example(self.split, i)
        return _fit(image, self.image_size), label


def build_source(data_config: Any, split: str) -> Source:
    """The `Source` for one split ("train", "test", ...) described by `config.data`."""
    get = data_config.get
    kind, size = get("source"), get("image_size")
    if kind not in SOURCES:
        raise UserError(f"config.data.source is {kind!r}; choose one of {SOURCES}")
    if not isinstance(size, int | np.integer) or size <= 0:
        raise UserError(f"config.data.image_size is {size!r}; set a positive int (e.g. 32)")
    size = int(size)
    if kind in ("npz", "folder") and not get("path"):
        raise UserError(f"config.data.path is not set; source {kind!r} reads from it")
    if kind in ("npz", "folder"):
        path = Path(get("path")).expanduser()
        if kind == "npz":
            source = _npz_source(path, split, size)
            own = has_split(kind, path, split)
        else:  # checked first: a split layout without this split must not read path/ itself
            own = has_split(kind, path, split)
            source = _FolderSource(path, split, size)
        return source if own else holdout(source, split, path)
    if kind == "tfds":
        if not get("name"):
            raise UserError("config.data.name is not set; give the TFDS dataset name")
        return _TfdsSource(get("name"), get("data_dir"), split, size)
    return _BuiltinSource(get("name") or builtin.NAMES[0], split, size)
