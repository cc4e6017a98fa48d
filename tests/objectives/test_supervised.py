"""The supervised objective: cross-entropy with label smoothing against NumPy float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from selfsup import objectives
from selfsup.errors import UserError
from selfsup.objectives.supervised import cross_entropy


def reference_ce(logits, labels, smoothing):
    logits = logits.astype(np.float64)
    c = logits.shape[1]
    log_p = logits - logits.max(1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))
    target = np.full_like(log_p, smoothing / c)
    target[np.arange(len(labels)), labels] += 1.0 - smoothing
    return -(target * log_p).sum(1).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5])
def test_cross_entropy_matches_numpy(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, 7)
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
    np.testing.assert_allclose(float(got), reference_ce(logits, labels, smoothing), rtol=1e-5)


def test_num_classes_default_fills_only_an_unset_field():
    backbone = {"name": "vit", "variant": "Ti/8", "depth": 1, "width": 32, "num_heads": 2}
    model = objectives.build({"name": "supervised"}, backbone, num_classes=7)
    assert model.num_classes == 7
    model = objectives.build({"name": "supervised", "num_classes": 3}, backbone, num_classes=7)
    assert model.num_classes == 3
    images = jnp.zeros((2, 16, 16, 3))
    variables = model.init(jax.random.key(0), (images,), train=False, labels=jnp.zeros(2, int))
    assert variables["params"]["head"]["kernel"].shape == (32, 3)


def test_bad_label_smoothing_is_a_user_error():
    with pytest.raises(UserError, match="label_smoothing"):
        objectives.build(
            {"name": "supervised", "label_smoothing": 1.5},
            {"name": "vit", "variant": "Ti/8", "depth": 1, "width": 32, "num_heads": 2},
        )
