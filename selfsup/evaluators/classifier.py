"""The run's own classifier on the test split: top-1 / top-5 of a fine-tuned (or supervised, or
distilled) network, during training or at its end.

The objectives that train a classifier (`supervised`, `distill`) name its linear layer `head`
(kernel [D, C], bias [C]) on the backbone's pooled feature. This evaluator extracts the pooled
feature of every test image with the frozen backbone (inference mode: running BatchNorm
statistics, no dropout or drop path) and applies that head: logits = pooled @ kernel + bias.
It reads the head from `params["head"]`, which the training loop passes beside the backbone's
variables (`selfsup.evaluators.periodic`); it trains nothing and reads no training split.

    c.evaluators = dict(every_steps=1000, at_end=True, run=(dict(name="classifier"),))

Reported: top-1 and top-5 on `test_split` (fractions), over `test_limit` images (0: all).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import ml_collections as mlc
import numpy as np

from selfsup.errors import UserError
from selfsup.evaluators import features as features_lib
from selfsup.evaluators.knn import topk_accuracy

HEAD = "head"


def defaults() -> mlc.ConfigDict:
    """The classifier evaluator's keys (beside the common ones in `selfsup.evaluators.COMMON`)."""
    return mlc.ConfigDict({"features": "pooled"})


def logits(pooled: np.ndarray, head: dict) -> np.ndarray:
    """pooled [N, D] through the linear head {"kernel" [D, C], "bias" [C]} -> float64 [N, C]."""
    kernel, bias = (np.asarray(head[k], np.float64) for k in ("kernel", "bias"))
    return np.asarray(pooled, np.float64) @ kernel + bias


class Evaluator:
    """Test top-1 / top-5 of the head in `params[HEAD]` on `encode_fn`'s pooled feature."""

    def __init__(self, encode_fn, config: Any, *, mesh: jax.sharding.Mesh):
        if config.features != "pooled":
            raise UserError("classifier: the head reads the pooled feature; set features='pooled'")
        self.encode_fn, self.config, self.mesh = encode_fn, config, mesh
        self.data: dict = {}  # what run() read (features.describe)

    def run(self, params: Any) -> Iterator[tuple[str, float]]:
        """params: the backbone's variables plus the objective's head under `HEAD`."""
        head = params.get(HEAD) if isinstance(params, dict) else None
        if not isinstance(head, dict) or {"kernel", "bias"} - set(head):
            raise UserError(
                "classifier evaluator: the run has no classifier head (params 'head' with kernel "
                "and bias); use it with the supervised or distill objective"
            )
        variables = {k: v for k, v in params.items() if k != HEAD}
        config = self.config
        split, limit = config.test_split, config.test_limit
        source = features_lib.load_split(config.data, split, limit, config.seed)
        pooled, labels = features_lib.extract(
            self.encode_fn,
            variables,
            source,
            view=config.view,
            feature="pooled",
            mesh=self.mesh,
            batch_size=config.batch_size,
            max_gb=config.max_feature_gb,
        )
        self.data = {"test": features_lib.describe(source, config.test_split, labels)}
        scores = logits(pooled, jax.device_get(head))
        yield "top1", topk_accuracy(scores, labels, 1)
        yield "top5", topk_accuracy(scores, labels, min(5, scores.shape[1]))
