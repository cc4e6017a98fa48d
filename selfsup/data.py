"""Datasets -> batches of uint8 images and int32 labels, one process's slice of each global batch.

The host only decodes, resizes to a fixed storage size S and batches; all random augmentation
runs later on the device. A `Source` gives random access to one split (`build_source`), a
`Loader` turns it into an endless, resumable stream of training batches whose order is a
function of (seed, epoch) alone, and `eval_batches` makes one ordered, padded pass.

Config keys (`config.data`, a ConfigDict or dict):
  source:      "builtin" | "npz" | "folder" | "tfds"
  name:        tfds dataset name, or the builtin dataset's name ("shapes")
  data_dir:    tfds data_dir (local; nothing is downloaded)
  path:        the .npz file or the image folder
  image_size:  S: images are resized so the shorter side is S, then centre-cropped to S x S

An npz or folder without a split of its own (`images`/`labels`; `path/<class>/<image>`) is never
evaluated on the images it trains on: its "train" split is all but a fixed 10% of each class and
its "test" split that 10% (`holdout`); give `<split>_images` or `path/<split>/` to choose your own.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from selfsup import builtin_data
from selfsup.errors import UserError

_log = logging.getLogger(__name__)

SOURCES = ("builtin", "npz", "folder", "tfds")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_PREFETCH = 3  # batches decoded ahead of the consumer


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
    """A procedurally generated split from `builtin_data`."""

    def __init__(self, name: str, split: str, size: int):
        if name not in builtin_data.NAMES:
            raise UserError(f"unknown builtin dataset {name!r}; choose one of {builtin_data.NAMES}")
        if split not in builtin_data.SPLIT_SIZES:
            splits = sorted(builtin_data.SPLIT_SIZES)
            raise UserError(f"builtin dataset has no split {split!r}; use one of {splits}")
        self.split, self.num_classes, self.image_size = split, builtin_data.NUM_CLASSES, size

    def __len__(self) -> int:
        return builtin_data.SPLIT_SIZES[self.split]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        image, label = builtin_data.example(self.split, i)
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
            own = _has_split(kind, path, split)
        else:  # checked first: a split layout without this split must not read path/ itself
            own = _has_split(kind, path, split)
            source = _FolderSource(path, split, size)
        return source if own else holdout(source, split, path)
    if kind == "tfds":
        if not get("name"):
            raise UserError("config.data.name is not set; give the TFDS dataset name")
        return _TfdsSource(get("name"), get("data_dir"), split, size)
    return _BuiltinSource(get("name") or builtin_data.NAMES[0], split, size)


_MAX_WARNINGS = 10  # per reader: a damaged dataset must not bury everything else in warnings
_PROBE = 32  # examples read by `check_decodes`
# ---------------------------------------------------------------------------------------------
# Sources without a test split: a fixed part of each class is held out as "test".

HOLDOUT_FRACTION = 0.1
_HOLDOUT_SEED = 20260  # fixed: the held-out images never depend on config.seed


def _has_split(kind: str, path: Path, split: str) -> bool:
    """Whether the npz / folder at `path` has its own `split` (`<split>_images`, `path/<split>/`).
    UserError for a folder with split subfolders but not this one."""
    if kind == "npz":
        with zipfile.ZipFile(path) as zf:
            return f"{split}_images.npy" in zf.namelist()
    if (path / split).is_dir():
        return True
    if (path / "train").is_dir():
        found = sorted(e.name for e in os.scandir(path) if e.is_dir() and e.name[0] != ".")
        raise UserError(
            f"{path} has split folders ({', '.join(found)}) but no {split}/; add "
            f"{path / split}/<class>/<images>, or evaluate on another split (e.g. "
            f"--config.test_split={found[-1]})"
        )
    return False


def holdout_mask(labels: np.ndarray, fraction: float = HOLDOUT_FRACTION) -> np.ndarray:
    """bool [N], True for the held-out rows: in each class of n rows, round(fraction * n) of them
    (at least 1 when n >= 2), picked by a permutation seeded with (class, n) only, so the same
    files are held out in every run, whatever the seed or the other classes."""
    labels = np.asarray(labels)
    held = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = len(rows)
        k = min(max(1, round(fraction * n)), n - 1) if n >= 2 else 0
        order = np.random.default_rng([_HOLDOUT_SEED, int(c), n]).permutation(n)
        held[rows[order[:k]]] = True
    return held


class HeldOut:
    """The train or test part of a source that has no test split (see `holdout`)."""

    def __init__(self, source: Source, rows: np.ndarray, description: str):
        self.source, self.rows, self.description = source, rows, description
        self.num_classes, self.image_size = source.num_classes, source.image_size
        self.labels = np.asarray(source.labels)[rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.source[int(self.rows[i])]


def holdout(source: Source, split: str, path: Any) -> HeldOut:
    """Split "train" or "test" of a source without one (an npz of `images`/`labels`, a folder
    of `<class>/<image>`): "test" is `holdout_mask` of its labels (10% of each class), "train"
    the rest, so pretraining never sees the images evaluation reports on."""
    if split not in ("train", "test"):
        raise UserError(
            f"{path} has no split {split!r}: without splits of its own, its 'train' is 90% of "
            f"each class and 'test' the other 10%; use those, or provide {split} separately"
        )
    held = holdout_mask(source.labels)
    rows = np.flatnonzero(held if split == "test" else ~held)
    part = "held out from 'train'" if split == "test" else "less the 10% of each class held out"
    return HeldOut(source, rows, f"{len(rows)} of the {len(held)} images of {path} ({part})")


class _Reader:
    """Reads examples; None for an undecodable one, remembered and warned about once (the first
    `_MAX_WARNINGS` of them; the rest are only counted)."""

    def __init__(self, source: Source):
        self.source, self._bad, self._lock = source, set(), threading.Lock()

    def get(self, index: int) -> tuple[np.ndarray, int] | None:
        if index in self._bad:
            return None
        try:
            return self.source[index]
        except DecodeError as err:
            with self._lock:
                first = index not in self._bad
                self._bad.add(index)
                count = len(self._bad)
            if first and count <= _MAX_WARNINGS:
                more = "; further ones are skipped silently" if count == _MAX_WARNINGS else ""
                _log.warning("skipping undecodable image (index %d): %s%s", index, err, more)
            return None


def check_decodes(source: Source, what: str) -> None:
    """UserError unless at least one of the first `_PROBE` examples decodes: a truncated or
    damaged data file is then reported before anything compiles, in one line."""
    first_error = None
    for index in range(min(len(source), _PROBE)):
        try:
            source[index]
            return
        except DecodeError as err:
            first_error = first_error or err
    if first_error is not None:
        cause = str(first_error).splitlines()[0][:300]
        raise UserError(
            f"{what}: none of the first {min(len(source), _PROBE)} images decodes ({cause}); "
            "the data file may be truncated or damaged: check or rebuild it"
        )


def first_decodable(source: Source, count: int) -> tuple[np.ndarray, int]:
    """(uint8 [n, S, S, 3], skipped): the images of the first `count` decodable examples in index
    order (n < count only if the split has fewer), and how many undecodable ones were skipped on
    the way (each warned about once, as the Loader does)."""
    reader, images, skipped = _Reader(source), [], 0
    for index in range(len(source)):
        if len(images) == count:
            break
        example = reader.get(index)
        if example is None:
            skipped += 1
        else:
            images.append(example[0])
    if not images:
        raise UserError(f"none of the {len(source)} images in the dataset decodes; check the data")
    return np.stack(images), skipped


def _collate(examples: list[tuple[np.ndarray, int]]) -> dict[str, np.ndarray]:
    images = np.stack([image for image, _ in examples])
    return {"image": images, "label": np.asarray([label for _, label in examples], np.int32)}


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if not 0 <= process_index < process_count:
        raise UserError(f"process_index {process_index} not in [0, {process_count})")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(
            f"batch size {global_batch_size} must be a positive multiple of the process count "
            f"{process_count}; change config.batch_size"
        )
    return global_batch_size // process_count


def _prefetch(
    make_batch: Callable[[int, ThreadPoolExecutor], dict], steps: Iterable[int], num_threads: int
) -> Iterator[dict]:
    """Yields make_batch(step, pool) for each step, built ahead in a background thread.

    Closing (or garbage-collecting) the generator stops and joins the thread.
    """
    out: queue.Queue = queue.Queue(maxsize=_PREFETCH)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            with ThreadPoolExecutor(num_threads, thread_name_prefix="selfsup-decode") as pool:
                for step in steps:
                    if not put(make_batch(step, pool)):
                        return
            put(end)
        except BaseException as err:  # re-raised in the consumer
            put(err)

    thread = threading.Thread(target=produce, name="selfsup-prefetch", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class Loader:
    """Training batches: an endless stream, resumable at any step, the same on every host count.

    Global batch b holds positions [k*G, (k+1)*G) of `epoch_order(b // steps_per_epoch)`, with
    k = b % steps_per_epoch and G the global batch size (the last partial batch of an epoch is
    dropped). This process gets rows [pid*L, (pid+1)*L) of it, L = G / process_count.
    """

    def __init__(
        self,
        source: Source,
        global_batch_size: int,
        *,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = 8,
    ):
        self.local_batch_size = _local_batch_size(global_batch_size, process_index, process_count)
        self.steps_per_epoch = len(source) // global_batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the split has {len(source)} examples, fewer than one batch of "
                f"{global_batch_size}; lower config.batch_size"
            )
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise UserError(f"seed {seed!r} must be a non-negative int")
        self.source, self.global_batch_size, self.seed = source, global_batch_size, int(seed)
        self.process_index, self.num_threads = process_index, max(1, num_threads)
        self._reader = _Reader(source)
        self._skipped = 0

    @property
    def skipped(self) -> int:
        """Rows of the batches yielded so far (this process) whose own example was undecodable
        and was replaced by the next decodable one in the epoch order."""
        return self._skipped

    def epoch_order(self, epoch: int) -> np.ndarray:
        """int64 [len(source)]: a permutation of range(len(source)), a function of (seed, epoch)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.source))

    def _example_at(self, order: np.ndarray, position: int) -> tuple[tuple[np.ndarray, int], bool]:
        """(example, replaced): the first decodable at `position`, position + 1, ... (wrapping)."""
        n = len(order)
        for offset in range(n):
            example = self._reader.get(int(order[(position + offset) % n]))
            if example is not None:
                return example, offset > 0
        raise UserError(f"none of the {n} images in the dataset decodes; check the data")

    def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches from global step `start_step` on (the data position saved in checkpoints):
        {"image": uint8 [L, S, S, 3], "label": int32 [L]}."""
        if start_step < 0:
            raise ValueError(f"start_step {start_step} < 0")
        g, lb = self.global_batch_size, self.local_batch_size
        current: dict[str, Any] = {"epoch": None}

        def make(step: int, pool: ThreadPoolExecutor) -> tuple[dict, int]:
            epoch, k = divmod(step, self.steps_per_epoch)
            if current["epoch"] != epoch:
                current.update(epoch=epoch, order=self.epoch_order(epoch))
            order, first = current["order"], k * g + self.process_index * lb
            rows = list(pool.map(lambda p: self._example_at(order, p), range(first, first + lb)))
            return _collate([example for example, _ in rows]), sum(r for _, r in rows)

        return self._counted(_prefetch(make, itertools.count(start_step), self.num_threads))

    def _counted(self, batches: Iterator[tuple[dict, int]]) -> Iterator[dict[str, np.ndarray]]:
        # Counted as batches are handed out, not as prefetched, so `skipped` is exact.
        with contextlib.closing(batches):
            for batch, replaced in batches:
                self._skipped += replaced
                yield batch


def eval_batches(
    source: Source,
    global_batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 8,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over the split: ceil(N / G) batches of
    {"image": uint8 [L, S, S, 3], "label": int32 [L], "valid": bool [L]}.

    Rows past the end (zero images, label 0) and undecodable images have valid = False. Every
    process gets the same number of batches, each its rows [pid*L, (pid+1)*L) of the global one.
    """
    lb = _local_batch_size(global_batch_size, process_index, process_count)
    n, reader = len(source), _Reader(source)
    blank = (np.zeros((source.image_size,) * 2 + (3,), np.uint8), 0)

    def make(step: int, pool: ThreadPoolExecutor) -> dict:
        first = step * global_batch_size + process_index * lb
        rows = list(pool.map(lambda i: reader.get(i) if i < n else None, range(first, first + lb)))
        batch = _collate([blank if row is None else row for row in rows])
        batch["valid"] = np.asarray([row is not None for row in rows])
        return batch

    return _prefetch(make, range(-(-n // global_batch_size)), max(1, num_threads))
