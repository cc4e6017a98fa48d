"""The data layer: order, process slices, resume, each source, skipping, eval passes, builtin."""

from __future__ import annotations

import gc
import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import REPO
from PIL import Image

from selfsup import data
from selfsup.data import builtin, sources
from selfsup.errors import UserError

SHARED_DATA = REPO.parent / "shared" / "data"
CIFAR = SHARED_DATA / "cifar10_subset.npz"
needs_cifar = pytest.mark.skipif(
    not CIFAR.is_file(),
    reason=f"{CIFAR} absent: the shared CIFAR-10 subset exists only beside the project checkout",
)


# ----------------------------------------------------------------------------- helpers


def id_images(ids: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, size, size, 3] whose first two channels spell each example's id (little endian)."""
    images = np.zeros((len(ids), size, size, 3), np.uint8)
    images[..., 0] = (ids % 256)[:, None, None]
    images[..., 1] = (ids // 256)[:, None, None]
    images[..., 2] = 77
    return images


def ids_of(batch: dict) -> np.ndarray:
    image = batch["image"].astype(np.int64)
    return image[:, 0, 0, 0] + 256 * image[:, 0, 0, 1]


def id_source(tmp_path: Path, n: int = 37, size: int = 4) -> data.Source:
    """An npz source of n examples whose label is id % 5 (a train split of its own: all n)."""
    ids = np.arange(n)
    path = tmp_path / "ids.npz"
    np.savez(path, train_images=id_images(ids, size), train_labels=ids % 5)
    return data.build_source({"source": "npz", "path": str(path), "image_size": size}, "train")


def take(iterator, n: int) -> list[dict]:
    batches = [next(iterator) for _ in range(n)]
    iterator.close()
    return batches


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def selfsup_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("selfsup-")]


# ----------------------------------------------------------------------------- Loader


def test_epoch_order_is_a_permutation_fixed_by_seed_and_epoch(tmp_path):
    source = id_source(tmp_path)
    loader = data.Loader(source, 8, seed=3)
    order = loader.epoch_order(0)
    np.testing.assert_array_equal(np.sort(order), np.arange(37))
    np.testing.assert_array_equal(order, data.Loader(source, 8, seed=3).epoch_order(0))
    assert not np.array_equal(order, loader.epoch_order(1))
    assert not np.array_equal(order, data.Loader(source, 8, seed=4).epoch_order(0))
    assert not np.array_equal(order, np.arange(37))


@pytest.mark.parametrize("procs", [1, 2, 4])
def test_process_slices_are_disjoint_and_make_the_global_batch(tmp_path, procs):
    source, g, steps = id_source(tmp_path), 8, 7  # 37 // 8 = 4 steps per epoch: crosses epochs
    reference = data.Loader(source, g, seed=0)
    single = [ids_of(b) for b in take(reference.iterate(), steps)]
    for b in range(steps):  # the documented layout of global batch b
        k = b % 4
        np.testing.assert_array_equal(single[b], reference.epoch_order(b // 4)[k * g : (k + 1) * g])
    per_process = []
    for pid in range(procs):
        loader = data.Loader(source, g, seed=0, process_index=pid, process_count=procs)
        assert (loader.local_batch_size, loader.steps_per_epoch) == (g // procs, 4)
        batches = take(loader.iterate(), steps)
        for batch in batches:
            assert (
                batch["image"].shape == (g // procs, 4, 4, 3) and batch["image"].dtype == np.uint8
            )
            assert batch["label"].dtype == np.int32
            np.testing.assert_array_equal(batch["label"], ids_of(batch) % 5)
        per_process.append([ids_of(batch) for batch in batches])
    for b in range(steps):
        parts = [per_process[pid][b] for pid in range(procs)]
        assert len(set(np.concatenate(parts).tolist())) == g  # disjoint
        np.testing.assert_array_equal(np.concatenate(parts), single[b])


def test_iterate_from_a_start_step_matches_the_uninterrupted_stream(tmp_path):
    loader = data.Loader(id_source(tmp_path), 8, seed=1)  # 4 steps per epoch
    full = [ids_of(b) for b in take(loader.iterate(), 10)]
    for start in (3, 4, 6):  # before, at and after the epoch boundary
        resumed = [ids_of(b) for b in take(loader.iterate(start_step=start), 10 - start)]
        for got, want in zip(resumed, full[start:], strict=True):
            np.testing.assert_array_equal(got, want)


def test_closing_or_dropping_the_iterator_stops_its_threads(tmp_path):
    loader = data.Loader(id_source(tmp_path), 8, seed=0, num_threads=2)
    iterator = loader.iterate()
    next(iterator)
    assert "selfsup-prefetch" in selfsup_threads()
    iterator.close()
    assert selfsup_threads() == []
    iterator = loader.iterate()
    next(iterator)
    del iterator
    gc.collect()
    assert selfsup_threads() == []


def test_loader_rejects_bad_batch_sizes(tmp_path):
    source = id_source(tmp_path)
    with pytest.raises(UserError, match="multiple of the process count"):
        data.Loader(source, 6, seed=0, process_count=4)
    with pytest.raises(UserError, match="fewer than one batch"):
        data.Loader(source, 64, seed=0)


# ----------------------------------------------------------------------------- skipping


def test_undecodable_images_are_replaced_by_the_next_in_order_and_counted(tmp_path, caplog):
    good = np.arange(20)
    for i in good:
        folder = tmp_path / "x" / f"class_{i % 2}"  # split "x"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(png_bytes(id_images(np.array([i]), 8)[0]))
    (tmp_path / "x" / "class_0" / "05.png").write_bytes(b"not an image at all")
    truncated = png_bytes(np.random.default_rng(0).integers(0, 255, (8, 8, 3), np.uint8))
    (tmp_path / "x" / "class_1" / "13.png").write_bytes(truncated[: len(truncated) // 2])
    source = data.build_source({"source": "folder", "path": str(tmp_path), "image_size": 8}, "x")
    bad = {source.files.index(str(tmp_path / "x" / "class_0" / "05.png"))}
    bad.add(source.files.index(str(tmp_path / "x" / "class_1" / "13.png")))

    caplog.set_level(logging.WARNING)
    n = len(source)  # 21 files, two of them bad: 5 steps of 4 per epoch
    loader = data.Loader(source, 4, seed=0, num_threads=3)
    batches = take(loader.iterate(), 10)
    replaced = 0
    for step, batch in enumerate(batches):
        assert batch["image"].shape == (4, 8, 8, 3)
        order, k = loader.epoch_order(step // 5), step % 5
        want = []
        for p in range(4 * k, 4 * k + 4):
            q = p
            while int(order[q % n]) in bad:
                q += 1
            replaced += q > p
            want.append(int(Path(source.files[int(order[q % n])]).stem))  # the id in the image
        np.testing.assert_array_equal(ids_of(batch), want)
    assert replaced >= 2 and loader.skipped == replaced
    for name in ("05.png", "13.png"):
        assert sum(name in r.getMessage() for r in caplog.records) == 1


# ----------------------------------------------------------------------------- sources


@needs_cifar
def test_npz_source_reads_the_cifar_subset():
    raw = np.load(CIFAR)
    config = {"source": "npz", "path": str(CIFAR), "image_size": 32}
    for split, n in (("train", 5085), ("test", 1017)):
        source = data.build_source(config, split)
        assert (len(source), source.num_classes) == (n, 10)
        for i in (0, 123, n - 1):
            image, label = source[i]
            np.testing.assert_array_equal(image, raw[f"{split}_images"][i])
            assert label == raw[f"{split}_labels"][i]


def _bilinear_halve(image: np.ndarray) -> np.ndarray:
    """float64 reference: a triangle (bilinear) filter widened by the scale factor 2 has taps
    [1, 3, 3, 1] / 8 around each output centre, renormalised where they fall off the edge."""
    x = image.astype(np.float64)
    for axis in (0, 1):
        x = np.moveaxis(x, axis, 0)
        n = x.shape[0]
        out = np.zeros((n // 2,) + x.shape[1:])
        for j in range(n // 2):
            taps = [
                (2 * j + d, w) for d, w in ((-1, 1), (0, 3), (1, 3), (2, 1)) if 0 <= 2 * j + d < n
            ]
            out[j] = sum(w * x[i] for i, w in taps) / sum(w for _, w in taps)
        x = np.moveaxis(out, 0, axis)
    return x


@needs_cifar
def test_npz_source_resizes_cifar_bilinearly():
    raw = np.load(CIFAR)["test_images"]
    source = data.build_source({"source": "npz", "path": str(CIFAR), "image_size": 16}, "test")
    for i in (0, 7, 500):
        image, _ = source[i]
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        # PIL rounds to uint8 after each of its two passes: at most 1 level off the exact filter.
        np.testing.assert_allclose(image, _bilinear_halve(raw[i]), atol=1.01)


@pytest.mark.parametrize("portrait", [False, True])
def test_non_square_images_are_centre_cropped(tmp_path, portrait):
    image = np.zeros((20, 40, 3), np.uint8)  # red | green (columns 5..35) | blue
    image[:, :5, 0], image[:, 5:35, 1], image[:, 35:, 2] = 255, 255, 255
    if portrait:
        image = image.transpose(1, 0, 2).copy()
    np.savez(tmp_path / "a.npz", images=image[None], labels=np.array([0]))
    config = {"source": "npz", "path": str(tmp_path / "a.npz"), "image_size": 10}
    got, _ = data.build_source(config, "train")[0]
    # Shorter side 20 -> 10, then the middle 10 x 10: source columns 10..30, all green.
    np.testing.assert_array_equal(
        got, np.broadcast_to(np.array([0, 255, 0], np.uint8), (10, 10, 3))
    )


def test_npz_split_keys_memmap_and_class_count(tmp_path):
    ids = np.arange(12)
    arrays = {
        "train_images": id_images(ids, 4),
        "train_labels": ids % 4,
        "test_images": id_images(ids[:5] + 100, 4)[..., :1],  # grayscale [N, H, W, 1]
        "test_labels": np.array([0, 5, 1, 2, 3]),
    }
    np.savez(tmp_path / "plain.npz", **arrays)
    np.savez_compressed(tmp_path / "zipped.npz", **arrays)
    for name in ("plain.npz", "zipped.npz"):
        config = {"source": "npz", "path": str(tmp_path / name), "image_size": 4}
        train, test = data.build_source(config, "train"), data.build_source(config, "test")
        assert isinstance(train.images, np.memmap) == (name == "plain.npz")
        assert train.num_classes == test.num_classes == 6  # max label over both splits + 1
        image, label = train[7]
        np.testing.assert_array_equal(image, arrays["train_images"][7])
        assert label == 3
        image, label = test[1]
        assert image.shape == (4, 4, 3) and label == 5
        np.testing.assert_array_equal(image, np.repeat(arrays["test_images"][1], 3, axis=-1))


@needs_cifar
def test_folder_source_reads_cifar_pngs_from_class_folders(tmp_path):
    raw = np.load(CIFAR)
    images, labels, names = raw["train_images"], raw["train_labels"], raw["label_names"]
    expected = []
    for folder_label, cifar_label in enumerate((0, 3, 9)):  # airplane < cat < truck
        folder = tmp_path / "train" / str(names[cifar_label])
        folder.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(labels == cifar_label)[:12]):
            suffix = ".PNG" if j % 3 == 0 else ".png"
            (folder / f"img{j:02d}{suffix}").write_bytes(png_bytes(images[i]))
            expected.append((images[i], folder_label))
        (folder / "notes.txt").write_text("not an image")
    (tmp_path / "test" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat" / "a.png").write_bytes(png_bytes(images[0]))

    config = {"source": "folder", "path": str(tmp_path), "image_size": 32}
    source = data.build_source(config, "train")
    assert (len(source), source.num_classes) == (36, 3)
    for i, (image, label) in enumerate(expected):
        got_image, got_label = source[i]
        np.testing.assert_array_equal(got_image, image)
        assert got_label == label
    assert len(data.build_source(config, "test")) == 1
    flat = data.build_source({**config, "path": str(tmp_path / "train")}, "train")
    # No train/ folder inside: classes directly, one image of each 12 held out as "test".
    assert (len(flat), flat.num_classes) == (33, 3)


def test_holdout_mask_takes_a_fixed_tenth_of_each_class():
    labels = np.repeat([0, 1, 2, 3], [30, 11, 2, 1])
    held = data.holdout_mask(labels)
    assert [int(held[labels == c].sum()) for c in range(4)] == [3, 1, 1, 0]  # >= 1 if n >= 2
    np.testing.assert_array_equal(held, data.holdout_mask(labels))  # no seed: always the same
    # A class's held-out rows depend on that class alone, not on the others or their order.
    other = np.concatenate([np.full(7, 9), labels[labels == 0]])
    np.testing.assert_array_equal(data.holdout_mask(other)[7:], held[labels == 0])


def _flat_npz_and_folder(tmp_path: Path) -> list[dict]:
    """The same 3 x 20 id images as an npz of images/labels and as a folder of class folders."""
    ids = np.arange(60)
    images = id_images(ids, 4)
    np.savez(tmp_path / "flat.npz", images=images, labels=ids % 3)
    for i in ids:
        folder = tmp_path / "flat" / f"c{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:02d}.png").write_bytes(png_bytes(images[i]))
    return [
        {"source": "npz", "path": str(tmp_path / "flat.npz"), "image_size": 4},
        {"source": "folder", "path": str(tmp_path / "flat"), "image_size": 4},
    ]


def test_a_source_without_a_test_split_holds_one_out_of_train(tmp_path):
    for config in _flat_npz_and_folder(tmp_path):
        train, test = data.build_source(config, "train"), data.build_source(config, "test")
        assert (len(train), len(test), train.num_classes) == (54, 6, 3)
        train_ids = {int(ids_of({"image": train[i][0][None]})[0]) for i in range(len(train))}
        test_ids = {int(ids_of({"image": test[i][0][None]})[0]) for i in range(len(test))}
        assert not train_ids & test_ids and train_ids | test_ids == set(range(60))
        assert sorted(i % 3 for i in test_ids) == [0, 0, 1, 1, 2, 2]
        assert "held out" in test.description and str(config["path"]) in test.description
        # The training loop reads split "train": the held-out images are never pretrained on.
        loader = data.Loader(train, 6, seed=0, num_threads=1)
        seen = np.concatenate([ids_of(b) for b in take(loader.iterate(), 9)])
        assert set(seen.tolist()) == train_ids
        with pytest.raises(UserError, match=r"no split 'validation'.*'train'.*'test'"):
            data.build_source(config, "validation")


def test_a_split_layout_without_the_asked_split_is_refused(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "a.png").write_bytes(png_bytes(id_images(np.arange(1), 4)[0]))
    (tmp_path / "val" / "cat").mkdir(parents=True)
    config = {"source": "folder", "path": str(tmp_path), "image_size": 4}
    assert len(data.build_source(config, "train")) == 1  # its own split: nothing held out
    with pytest.raises(UserError, match=r"split folders \(train, val\) but no test/.*test_split"):
        data.build_source(config, "test")


def test_missing_data_raises_user_error_naming_it(tmp_path):
    with pytest.raises(UserError, match="missing.npz"):
        data.build_source(
            {"source": "npz", "path": str(tmp_path / "missing.npz"), "image_size": 8}, "train"
        )
    with pytest.raises(UserError, match="no_such_folder"):
        data.build_source(
            {"source": "folder", "path": str(tmp_path / "no_such_folder"), "image_size": 8}, "train"
        )
    np.savez(tmp_path / "other.npz", pixels=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(UserError, match=r"other\.npz lacks .*'pixels'"):
        data.build_source(
            {"source": "npz", "path": str(tmp_path / "other.npz"), "image_size": 8}, "train"
        )
    for name in ("selfsup_no_such_dataset", "selfsup_tiny_rgb"):  # unknown; known but not prepared
        with pytest.raises(UserError) as err:
            data.build_source(
                {
                    "source": "tfds",
                    "name": name,
                    "data_dir": str(tmp_path / "tfds"),
                    "image_size": 8,
                },
                "train",
            )
        message = str(err.value)
        assert name in message and str(tmp_path / "tfds") in message and "tfds build" in message
    with pytest.raises(UserError, match="source"):
        data.build_source({"source": "webdataset", "image_size": 8}, "train")


# ----------------------------------------------------------------------------- tfds


def _tfds_image(i: int, channels: int) -> np.ndarray:
    image = id_images(np.array([i]), 8)[0]
    return image[..., 0] if channels == 1 else image  # [H, W] saves as a grayscale PNG


class SelfsupTinyRgb(tfds.core.GeneratorBasedBuilder):
    """Tiny RGB dataset for the round-trip test; DatasetInfo built directly (no TF needed)."""

    VERSION = tfds.core.Version("1.0.0")
    CHANNELS = 3

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, self.CHANNELS)),
            "label": tfds.features.ClassLabel(num_classes=4),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {
            "train": self._generate_examples(range(6)),
            "test": self._generate_examples(range(40, 43)),
        }

    def _generate_examples(self, ids):
        for i in ids:
            yield i, {"image": png_bytes(_tfds_image(i, self.CHANNELS)), "label": i % 4}


class SelfsupTinyGray(SelfsupTinyRgb):
    CHANNELS = 1


def test_tfds_source_round_trip(tmp_path):
    data_dir = tmp_path / "tfds"
    for builder in (SelfsupTinyRgb, SelfsupTinyGray):
        builder(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    for name in ("selfsup_tiny_rgb", "selfsup_tiny_gray"):
        config = {"source": "tfds", "name": name, "data_dir": str(data_dir), "image_size": 8}
        for split, ids in (("train", range(6)), ("test", range(40, 43))):
            source = data.build_source(config, split)
            assert (len(source), source.num_classes) == (len(ids), 4)
            seen = []
            for index in range(len(ids)):  # TFDS stores records shuffled: match them by id
                image, label = source[index]
                i = int(image[0, 0, 0])  # ids < 256: the first channel alone
                want = id_images(np.array([i]), 8)[0]
                if name.endswith("gray"):
                    want = np.repeat(want[..., :1], 3, axis=-1)
                np.testing.assert_array_equal(image, want)
                assert label == i % 4
                seen.append(i)
            assert sorted(seen) == list(ids)
        small = data.build_source({**config, "image_size": 4}, "train")
        assert small[0][0].shape == (4, 4, 3)
        with pytest.raises(UserError, match="val"):
            data.build_source(config, "val")


# ----------------------------------------------------------------------------- eval


@pytest.mark.parametrize("procs", [1, 2, 4])
def test_eval_batches_cover_every_example_once_in_order(tmp_path, procs):
    source, g = id_source(tmp_path), 8  # 37 examples: 5 batches, the last with 5 real rows
    seen = []
    for pid in range(procs):
        lb = g // procs
        batches = list(data.eval_batches(source, g, process_index=pid, process_count=procs))
        assert len(batches) == 5
        for b, batch in enumerate(batches):
            rows = b * g + pid * lb + np.arange(lb)
            np.testing.assert_array_equal(batch["valid"], rows < 37)
            valid = batch["valid"]
            np.testing.assert_array_equal(ids_of(batch)[valid], rows[valid])
            np.testing.assert_array_equal(batch["label"][valid], rows[valid] % 5)
            assert not batch["image"][~valid].any()
            assert batch["image"].shape == (lb, 4, 4, 3) and batch["valid"].dtype == bool
            seen += ids_of(batch)[valid].tolist()
    assert sorted(seen) == list(range(37))


# ----------------------------------------------------------------------------- builtin


@pytest.fixture(scope="module")
def shapes():
    """Raw builtin examples: 2000 train and the whole 2000-image test split."""

    def load(split, n):
        examples = [builtin.example(split, i) for i in range(n)]
        return np.stack([x for x, _ in examples]), np.array([y for _, y in examples])

    return load("train", 2000), load("test", 2000)


def test_builtin_is_deterministic_with_fixed_shapes(shapes):
    config = {"source": "builtin", "name": "shapes", "image_size": 32}
    train, test = data.build_source(config, "train"), data.build_source(config, "test")
    assert (len(train), len(test), train.num_classes) == (20000, 2000, 10)
    (train_x, _), (test_x, _) = shapes
    for i in (0, 1, 1999):
        image, label = train[i]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8 and 0 <= label < 10
        assert image.tobytes() == train_x[i].tobytes() == builtin.example("train", i)[0].tobytes()
    assert not np.array_equal(train_x[5], train_x[15])  # same class, another draw
    assert not np.array_equal(train_x[:10], test_x[:10])  # splits differ
    assert data.build_source({**config, "image_size": 16}, "test")[3][0].shape == (16, 16, 3)
    with pytest.raises(UserError, match="validation"):
        data.build_source(config, "validation")


def test_builtin_classes_are_balanced(shapes):
    _, (_, test_y) = shapes
    np.testing.assert_array_equal(np.bincount(test_y, minlength=10), np.full(10, 200))
    train = data.build_source({"source": "builtin", "image_size": 32}, "train")
    labels = [train[i][1] for i in range(0, 20000, 7)]
    counts = np.bincount(labels, minlength=10)
    assert counts.min() >= counts.max() - 1  # every 7th of i % 10: balanced to within one


def _ridge_accuracy(train_f, train_y, test_f, test_y, lam):
    """Test accuracy of a ridge (least-squares, one-vs-all) probe on standardised features.

    Solved in the dual, (A A^T + lam I) c = Y, predictions B A^T c: the same predictor as the
    primal ridge, cheaper with more features than examples. float32 is ample for a probe.
    """
    mu, sd = train_f.mean(0), train_f.std(0) + 1e-8
    a = np.hstack([(train_f - mu) / sd, np.ones((len(train_f), 1))]).astype(np.float32)
    b = np.hstack([(test_f - mu) / sd, np.ones((len(test_f), 1))]).astype(np.float32)
    c = np.linalg.solve(a @ a.T + lam * np.eye(len(a), dtype=np.float32), np.eye(10)[train_y])
    predicted = ((b @ a.T) @ c).argmax(1)
    return float(np.mean(predicted == test_y))


def _spectrum(images):
    """Translation- and polarity-invariant features: |2-D FFT| of each mean-free channel, summed."""
    x = images.astype(np.float64) / 255
    x -= x.mean(axis=(1, 2), keepdims=True)
    magnitude = np.abs(np.fft.fft2(x, axes=(1, 2))).sum(-1).reshape(len(x), -1)
    return magnitude / (np.linalg.norm(magnitude, axis=1, keepdims=True) + 1e-8)


def test_builtin_defeats_raw_pixel_linear_probes_but_not_shape_features(shapes):
    (train_x, train_y), (test_x, test_y) = shapes
    test_x, test_y = test_x[:1000], test_y[:1000]
    raw = _ridge_accuracy(
        train_x.reshape(2000, -1) / 255.0, train_y, test_x.reshape(1000, -1) / 255.0, test_y, 1000.0
    )
    spectral = _ridge_accuracy(_spectrum(train_x), train_y, _spectrum(test_x), test_y, 100.0)
    assert 0.1 < raw < 0.4  # chance is 0.1
    assert spectral > 0.85 and spectral > raw + 0.4


# ----------------------------------------------------------------------------- issue 27


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int64])
@pytest.mark.parametrize("column", [False, True])
def test_npz_labels_of_any_integer_dtype_and_n_by_1(tmp_path, dtype, column):
    labels = (np.arange(12) % 10).astype(dtype)  # no label_names: the classes are counted
    np.savez(  # a train split of its own: no images held out
        tmp_path / "d.npz",
        train_images=id_images(np.arange(12), 8),
        train_labels=labels[:, None] if column else labels,
    )
    source = data.build_source(
        {"source": "npz", "path": str(tmp_path / "d.npz"), "image_size": 8}, "train"
    )
    assert source.num_classes == 10
    assert [source[i][1] for i in range(12)] == list(range(10)) + [0, 1]
    assert all(type(source[i][1]) is int for i in range(3))


def _sixteen_bit_png(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sixteen_bit_pngs_are_scaled_to_eight_bits(tmp_path):
    want = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4  # 0..252
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.png").write_bytes(_sixteen_bit_png(want.astype(np.uint16) * 257))
    assert Image.open(tmp_path / "train" / "a" / "x.png").mode.startswith(
        "I"
    )  # a 16-bit image indeed
    source = data.build_source(
        {"source": "folder", "path": str(tmp_path), "image_size": 8}, "train"
    )
    image, _ = source[0]
    np.testing.assert_array_equal(image, np.repeat(want[..., None], 3, axis=-1))
    # The same through an array source (TFDS hands over uint16 arrays for 16-bit images).
    np.testing.assert_array_equal(sources._fit(want.astype(np.uint16) * 257, 8)[..., 0], want)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose header claims width x height: PIL refuses it on opening as a
    decompression bomb (over twice Image.MAX_IMAGE_PIXELS), as it would a real 14000 x 14000."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="JPEG")
    jpeg = bytearray(buffer.getvalue())
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(jpeg)


def test_the_first_decodable_images_skip_and_count_bad_ones(tmp_path, caplog):
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(6):
        (tmp_path / "train" / "a" / f"{i}.png").write_bytes(
            png_bytes(id_images(np.array([i]), 8)[0])
        )
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"not an image")
    (tmp_path / "train" / "a" / "3.png").unlink()
    (tmp_path / "train" / "a" / "3.jpg").write_bytes(_jpeg_claiming(14000, 14000))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "train" / "a" / "3.jpg")
    source = data.build_source(
        {"source": "folder", "path": str(tmp_path), "image_size": 8}, "train"
    )
    caplog.set_level(logging.WARNING)
    images, skipped = data.first_decodable(source, 3)
    assert skipped == 2 and images.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 2, 4])
    assert sum("3.jpg" in r.getMessage() for r in caplog.records) == 1
    data.check_decodes(source, "x")  # some decode: no error
    for i in (0, 2, 4, 5):
        (tmp_path / "train" / "a" / f"{i}.png").write_bytes(b"truncated")
    with pytest.raises(
        UserError, match="none of the first 6 images decodes .*truncated or damaged"
    ):
        data.check_decodes(source, "x")
    with pytest.raises(UserError, match="none of the 6 images"):
        data.first_decodable(source, 3)
