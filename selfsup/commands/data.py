"""`selfsup data convert`: an image folder, an .npz or a TFRecord TFDS dataset as a TFDS
ArrayRecord dataset, without TensorFlow (see selfsup/tfds_convert.py).

    selfsup data convert ~/pets --name pets --data-dir ~/tensorflow_datasets
    selfsup data convert ~/tensorflow_datasets/imagenet2012/5.1.0 --data-dir ~/tensorflow_datasets
"""

from __future__ import annotations

import os
import sys

from selfsup.errors import UserError

HELP = "convert an image folder, an .npz or a TFRecord TFDS dataset to TFDS ArrayRecord (no TF)"
LOCAL = True  # one process, no multi-process run to join


def add_arguments(parser) -> None:
    parser.add_argument("action", choices=("convert",), help="what to do")
    parser.add_argument(
        "source",
        help="<class>/<image> or <split>/<class>/<image> folder, .npz, or a TFDS dataset folder "
        "prepared as TFRecord (the one holding dataset_info.json)",
    )
    parser.add_argument("--data-dir", required=True, help="TFDS data_dir to write the dataset to")
    parser.add_argument("--name", help="the new dataset's name (folders and .npz files)")


def run(args, overrides: dict[str, str]) -> int:
    from selfsup.data import tfds_convert

    if overrides:
        raise UserError(f"selfsup data takes no overrides, got --config.{next(iter(overrides))}")
    out = tfds_convert.convert(args.source, args.data_dir, args.name)
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    counts = ", ".join(f"{split} {n}" for split, n in sorted(out["splits"].items()))
    classes = f", {out['num_classes']} classes" if out["num_classes"] else ""
    skipped = f", {out['skipped']} undecodable files skipped" if out["skipped"] else ""
    print(
        f"selfsup: wrote {out['path']} (ArrayRecord; images: {counts}{classes}{skipped}). Train "
        f"on it with --config.data.source=tfds --config.data.name={out['name']} "
        f"--config.data.data_dir={data_dir}",
        file=sys.stderr,
    )
    return 0
