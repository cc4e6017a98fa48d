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

Modules: `sources` (one per kind), `holdout` (the 10% held out of sources without a test split),
`loader` (training stream, evaluation pass), `builtin` (the quickstart's generated dataset),
`tfds_convert` (`selfsup data convert`: ArrayRecord without TensorFlow).
"""

from selfsup.data.holdout import holdout, holdout_mask
from selfsup.data.loader import Loader, check_decodes, eval_batches, first_decodable
from selfsup.data.sources import DecodeError, Source, build_source

__all__ = [
    "DecodeError",
    "Loader",
    "Source",
    "build_source",
    "check_decodes",
    "eval_batches",
    "first_decodable",
    "holdout",
    "holdout_mask",
]
