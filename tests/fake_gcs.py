"""A stand-in for Google Cloud Storage: `gs://BUCKET/KEY` kept in a local folder, `root/BUCKET/KEY`.

It replaces only the GCS clients under selfsup's dependencies: gcsfs (fsspec's `gs` protocol,
which etils.epath uses without TensorFlow), tensorstore's `gcs` kvstore (orbax's array writes)
and google-cloud-storage's bucket lookup (orbax's step listing). Everything above them, selfsup's
own path handling included, runs as it would against a bucket. Like GCS, it cannot append to an
object, so code that appends to a `gs://` file fails here as it would there.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem


def install(monkeypatch, root: Path) -> None:
    """Route `gs://` to `root` for the rest of the test (monkeypatch undoes it)."""
    from etils.epath import backend
    from orbax.checkpoint._src.path import gcs_utils

    class FakeGCS(DirFileSystem):
        protocol = ("gs", "gcs")
        cachable = False  # every test gets its own root

        def __init__(self, *args, **kwargs):
            super().__init__(path=str(root), fs=LocalFileSystem(auto_mkdir=True))

        def _join(self, path):
            if isinstance(path, str):
                return super()._join(path.split("://", 1)[-1])
            return [self._join(p) for p in path]

        def open(self, path, mode="rb", *args, **kwargs):
            if "a" in mode:
                raise NotImplementedError("GCS objects cannot be appended to")
            return super().open(path, mode, *args, **kwargs)

    registry = importlib.import_module("fsspec.registry")
    for name in FakeGCS.protocol:
        monkeypatch.setitem(registry._registry, name, FakeGCS)
    monkeypatch.setenv("EPATH_USE_TF", "false")  # epath would use tf.io.gfile if TF is there
    backend.fsspec_backend._get_filesystem.cache_clear()  # epath caches one instance per name
    monkeypatch.setattr(
        gcs_utils,
        "get_kvstore_for_gcs",
        lambda url: {"driver": "file", "path": str(root / url.removeprefix("gs://"))},
    )
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
    monkeypatch.chdir(root)  # a `gs:` folder created by mistake would appear here


def uninstall() -> None:
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
