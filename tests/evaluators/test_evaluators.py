"""Evaluators: feature selection, the linear probe's training and selection, k-NN and the
attentive probe's pooling against NumPy float64 references, and sharded feature extraction."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from selfsup import config as config_lib
from selfsup import evaluators
from selfsup.backbones import Features
from selfsup.errors import UserError
from selfsup.evaluators import attentive_probe, features, knn, linear_probe
from selfsup.parallel import sharding


def cfg(name: str, **kw):
    return evaluators.resolve({"name": name, **kw})


# ---------------------------------------------------------------- NumPy float64 references


def ref_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def ref_sgd_probe(x, y, c, w, b, *, lr, wd, mu, epochs, warmup):
    """Full-batch SGD (momentum mu, L2 decay wd on the weights) on softmax cross-entropy, one
    step per epoch, learning rate linear warmup then cosine to 0 (PyTorch SGD semantics)."""
    x, w, b = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    onehot = np.eye(c)[y]
    mw, mb = np.zeros_like(w), np.zeros_like(b)
    for t in range(epochs):
        if t < warmup:
            rate = lr * (t + 1) / warmup
        else:
            rate = lr * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (epochs - warmup)))
        err = (ref_softmax(x @ w + b) - onehot) / len(x)
        gw, gb = x.T @ err + wd * w, err.sum(0)
        mw, mb = mu * mw + gw, mu * mb + gb
        w, b = w - rate * mw, b - rate * mb
    return w, b


def ref_knn_scores(train_x, train_y, test_x, k, t, c):
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    scores = np.zeros((len(te), c))
    for i, q in enumerate(te.astype(np.float64)):
        sims = tr.astype(np.float64) @ q
        for j in np.argsort(-sims)[:k]:
            scores[i, train_y[j]] += np.exp(sims[j] / t)
    return scores


def ref_attentive_head(x, query, wk, wv, wl, heads, eps=1e-6):
    """AIM's head: BatchNorm1d(affine=False) over token features (statistics over images and
    tokens), one query attending per head with scale 1/sqrt(d), heads concatenated, linear."""
    x = x.astype(np.float64)
    mean, var = x.mean((0, 1)), x.var((0, 1))
    x = (x - mean) / np.sqrt(var + eps)
    b, n, dim = x.shape
    d = dim // heads
    out = np.zeros((b, dim))
    for i in range(b):
        k, v = x[i] @ wk, x[i] @ wv  # [N, D]
        for h in range(heads):
            s = slice(h * d, (h + 1) * d)
            a = ref_softmax(k[:, s] @ query[s] / np.sqrt(d))
            out[i, s] = a @ v[:, s]
    return out @ wl


# ---------------------------------------------------------------- features


def _vit_like(b=3, n=4, d=6, depth=3):
    rng = np.random.default_rng(0)
    blocks = {f"block_{i}": jnp.asarray(rng.normal(size=(b, n + 1, d))) for i in range(depth)}
    tokens = jnp.asarray(rng.normal(size=(b, n, d)))
    cls = jnp.asarray(rng.normal(size=(b, d)))
    return Features(pooled=cls, tokens=tokens, cls=cls, intermediates=blocks)


def test_select_reads_named_features():
    f = _vit_like()
    np.testing.assert_array_equal(features.select(f, "pooled"), f.pooled)
    np.testing.assert_array_equal(features.select(f, "cls"), f.cls)
    np.testing.assert_allclose(features.select(f, "avg"), np.mean(f.tokens, 1))
    # A block's patch tokens drop the cls token, which comes first.
    np.testing.assert_array_equal(features.select(f, "block_1"), f.intermediates["block_1"][:, 1:])
    want = (np.asarray(f.intermediates["block_1"]) + np.asarray(f.intermediates["block_2"])) / 2
    np.testing.assert_allclose(features.select(f, "last_2_blocks"), want[:, 1:], rtol=1e-6)

    maps = tuple(jnp.ones((2, 8 // 2**s, 8 // 2**s, 4 * 2**s)) * s for s in range(4))
    conv = Features(pooled=jnp.zeros((2, 32)), feature_maps=maps)
    stage = features.select(conv, "stage_3")
    assert stage.shape == (2, 4, 16) and float(stage[0, 0, 0]) == 2.0
    assert features.pool(np.asarray(stage)).shape == (2, 16)
    assert features.select(conv, "tokens").shape == (2, 1, 32)
    with pytest.raises(UserError, match="no cls token"):
        features.select(conv, "cls")


@pytest.mark.parametrize(
    "name, match",
    [
        ("block_9", "no such block"),
        ("stage_2", "stages"),
        ("last_4_blocks", "3 blocks"),
        ("nope", "unknown feature"),
    ],
)
def test_select_errors_name_the_fix(name, match):
    with pytest.raises(UserError, match=match):
        features.select(_vit_like(), name)


# ---------------------------------------------------------------- linear probe


def _clusters(n, c, d, seed, spread=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(c, d)) * 3
    y = rng.integers(0, c, n).astype(np.int32)
    return (centres[y] + spread * rng.normal(size=(n, d))).astype(np.float32), y


def test_linear_probe_separates_separable_features_and_picks_the_working_lr():
    # The same centres for train and test (same seed), independent noise.
    x, y = _clusters(400, 5, 16, seed=1)
    train, test = (x[:300], y[:300]), (x[300:], y[300:])
    # lr 1e-6 leaves the head at its init: the held-out split must reject it.
    config = cfg(
        "linear_probe",
        epochs=20,
        warmup_epochs=2,
        probe_batch_size=64,
        learning_rates=(1e-6, 0.1),
        weight_decays=(0.0, 1e-4),
    )
    out = linear_probe.probe(train, test, 5, config)
    assert out["top1"] >= 0.98 and out["top5"] == 1.0
    assert out["val_top1"] >= 0.95 and out["lr"] == 0.1


def test_linear_probe_on_random_labels_stays_near_chance():
    # The shapes and grid of the separable test above (its compiled probe is reused).
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 16)).astype(np.float32)
    y = rng.integers(0, 5, 400).astype(np.int32)
    config = cfg(
        "linear_probe",
        epochs=20,
        warmup_epochs=2,
        probe_batch_size=64,
        learning_rates=(1e-6, 0.1),
        weight_decays=(0.0, 1e-4),
    )
    out = linear_probe.probe((x[:300], y[:300]), (x[300:], y[300:]), 5, config)
    assert out["top1"] < 0.35 and out["val_top1"] < 0.45  # chance is 0.2


def test_fit_matches_numpy_sgd_with_momentum_decay_and_schedule():
    x, y = _clusters(24, 3, 5, seed=3, spread=1.0)
    init = linear_probe.linear_init(jax.random.key(0), 5, 3)
    kw = dict(lr=0.5, wd=0.01, mu=0.9, epochs=7, warmup=2)
    got = linear_probe.fit(
        linear_probe.linear_apply,
        init,
        x,
        y,
        jnp.asarray([kw["lr"]]),
        jnp.asarray([kw["wd"]]),
        jax.random.key(1),
        optimizer="sgd",
        epochs=7,
        warmup_epochs=2,
        batch_size=24,
        momentum=0.9,
    )
    w, b = ref_sgd_probe(x, y, 3, np.asarray(init["kernel"]), np.asarray(init["bias"]), **kw)
    np.testing.assert_allclose(got["kernel"][0], w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["bias"][0], b, rtol=1e-4, atol=1e-5)


def test_grid_heads_train_independently():
    x, y = _clusters(200, 4, 8, seed=4)
    init = linear_probe.linear_init(jax.random.key(0), 8, 4)
    kw = dict(optimizer="sgd", epochs=3, warmup_epochs=0, batch_size=32, momentum=0.9)
    key = jax.random.key(5)
    lrs, wds = jnp.asarray([1e-5, 0.1]), jnp.asarray([0.0, 1e-3])
    both = linear_probe.fit(linear_probe.linear_apply, init, x, y, lrs, wds, key, **kw)
    for g in range(2):
        one = linear_probe.fit(
            linear_probe.linear_apply, init, x, y, lrs[g : g + 1], wds[g : g + 1], key, **kw
        )
        np.testing.assert_allclose(both["kernel"][g], one["kernel"][0], rtol=1e-5, atol=1e-7)


def test_count_hits_breaks_ties_against_the_label():
    # A constant head must score like argmax (first class wins), not 100%.
    params = {"kernel": jnp.zeros((1, 2, 4)), "bias": jnp.zeros((1, 4))}
    y = jnp.asarray([0, 1, 2, 3, 0])
    hits = linear_probe.count_hits(
        linear_probe.linear_apply, params, jnp.ones((5, 2)), y, ks=(1, 2), chunk=2
    )
    assert hits.tolist() == [[2, 3]]


# ---------------------------------------------------------------- k-NN


@pytest.mark.parametrize("k, chunk", [(2, 8), (7, 8), (200, 64)])
def test_knn_scores_match_numpy(k, chunk):
    rng = np.random.default_rng(6)
    train_x = rng.normal(size=(60, 8)).astype(np.float32)
    train_y = rng.integers(0, 4, 60).astype(np.int32)
    test_x = rng.normal(size=(25, 8)).astype(np.float32)
    got = np.asarray(
        knn.knn_scores(train_x, train_y, test_x, k=k, temperature=0.07, num_classes=4, chunk=chunk)
    )
    want = ref_knn_scores(train_x, train_y, test_x, min(k, 60), 0.07, 4)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    test_y = rng.integers(0, 4, 25)
    config = cfg("knn", k=k, chunk=chunk)
    out = knn.knn((train_x, train_y), (test_x, test_y), 4, config)
    assert out["top1"] == pytest.approx(np.mean(want.argmax(1) == test_y))
    # DINO's top-5 reads the first min(5, k) predictions: top-2 for k = 2, all 4 classes else.
    ranked = np.argsort(-want, axis=1, kind="stable")[:, : min(5, k)]
    assert out["top5"] == pytest.approx(np.mean((ranked == test_y[:, None]).any(1)))
    assert (out["top5"] < 1.0) == (k == 2)


def test_knn_finds_clusters():
    x, y = _clusters(300, 6, 10, seed=7)
    out = knn.knn((x[:200], y[:200]), (x[200:], y[200:]), 6, cfg("knn"))
    assert out["top1"] >= 0.98


# ---------------------------------------------------------------- attentive probe


def test_attentive_head_matches_numpy():
    rng = np.random.default_rng(8)
    x = (rng.normal(size=(4, 5, 8)) * 2 + 1).astype(np.float32)
    params = attentive_probe.head_init(jax.random.key(0), 8, 3, num_heads=2)
    params = jax.tree.map(lambda p: p * 30, params)  # sharp attention, far from uniform
    got = attentive_probe.head_apply(params, linear_probe.standardize(x, x, (0, 1)))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    want = ref_attentive_head(x, p["query"].reshape(-1), p["k"], p["v"], p["linear"], heads=2)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_attentive_probe_learns_separable_tokens():
    x, y = _clusters(260, 4, 16, seed=9)
    rng = np.random.default_rng(10)
    tokens = (x[:, None, :] + rng.normal(size=(260, 3, 16))).astype(np.float32)  # [N, 3, D]
    config = cfg(
        "attentive_probe",
        epochs=15,
        warmup_epochs=1,
        probe_batch_size=32,
        learning_rates=(3e-3,),
        features="tokens",
    )
    out = attentive_probe.probe((tokens[:200], y[:200]), (tokens[200:], y[200:]), 4, config)
    assert out["top1"] >= 0.95


# ---------------------------------------------------------------- configs, extraction, run_all


def test_resolve_rejects_unknown_keys_and_types():
    with pytest.raises(UserError, match="unknown evaluator 'nope'"):
        evaluators.resolve({"name": "nope"})
    with pytest.raises(UserError, match="unknown evaluator key 'kk'"):
        evaluators.resolve({"name": "knn", "kk": 3})
    with pytest.raises(UserError, match="config.k"):
        evaluators.resolve({"name": "knn", "k": "many"})
    with pytest.raises(UserError, match="unknown feature"):
        evaluators.build(
            evaluators.resolve(
                {
                    "name": "knn",
                    "features": "blk",
                    "view": "normalize",
                    "data": {"source": "builtin", "image_size": 8},
                }
            ),
            None,
            mesh=None,
        )
    out = evaluators.resolve({"name": "knn"}, {"data.source": "npz", "k": "5"})
    assert out.data.source == "npz" and out.k == 5 and out.data.path is None


def test_default_view_keeps_size_and_normalisation():
    train = config_lib.resolve(config_lib.load(str(REPO / "configs" / "quickstart.py:smoke")))
    view = evaluators.default_view(train)
    assert view == "resize(37, method='bicubic')|center_crop((32, 32))|normalize('imagenet')"
    assert evaluators.default_view(train, 1.0).startswith("resize(32,")


def test_default_view_takes_the_normalisation_of_an_objective_that_normalises_inside():
    # Rotation normalises after rotating, so its view spec has no normalize op.
    spec = str(REPO / "configs" / "rotation_resnet_in1k.py:smoke")
    train = config_lib.resolve(config_lib.load(spec))
    assert "normalize" not in train.views[0]
    assert evaluators.default_view(train).endswith("|normalize('imagenet')")
    train = config_lib.resolve(config_lib.load(spec), {"objective.normalize": "none"})
    assert "normalize" not in evaluators.default_view(train)


EXTRACT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from selfsup import backbones, evaluators
from selfsup.parallel import sharding
from selfsup.backbones import Features
from selfsup.evaluators import features

def encode(params, images):  # [B, H, W, 3] -> mean colour [B, 3] and 4 corner tokens
    corners = jnp.stack([images[:, 0, 0], images[:, 0, -1], images[:, -1, 0], images[:, -1, -1]], 1)
    return Features(pooled=images.mean((1, 2)) * params, tokens=corners)

mesh = sharding.make_mesh({"data": -1, "fsdp": FSDP})
cfg = evaluators.resolve({"name": "linear_probe", "view": "normalize('none')", "batch_size": 16,
    "data": {"source": "npz", "path": PATH, "image_size": 8}, "epochs": 30,
    "warmup_epochs": 2, "probe_batch_size": 16, "learning_rates": (0.1,), "weight_decays": (0.0,)})
source = features.load_split(cfg.data, "train", 0, 0)
x, y = features.extract(encode, 2.0, source, view=cfg.view, feature="pooled", mesh=mesh,
    batch_size=16)
tok, _ = features.extract(encode, 2.0, source, view=cfg.view, feature="tokens", mesh=mesh,
    batch_size=16)
res = dict(evaluators.build(cfg, encode, mesh=mesh).run(2.0))
print(json.dumps({"x": x.tolist(), "y": y.tolist(), "tok": tok.tolist(), "res": res}))
"""


@pytest.fixture(scope="module")
def colour_npz(tmp_path_factory):
    """50 train / 30 test 8x8 images whose class (of 3) is the dominant colour channel."""
    return write_colour_npz(tmp_path_factory.mktemp("colour"))


def write_colour_npz(folder) -> tuple[Path, dict]:
    """(folder/colour.npz, its arrays); the eight-device check writes its own copy."""
    rng = np.random.default_rng(11)
    arrays = {}
    for split, n in (("train", 50), ("test", 30)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 90, (n, 8, 8, 3))
        images[np.arange(n), :, :, labels] += 150
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images.astype(np.uint8), labels
    path = Path(folder) / "colour.npz"
    np.savez(path, **arrays)
    return path, arrays


# 8 devices, batch 16 split over data x fsdp = 4 x 2; 50 rows: the last batch is padded.
EIGHT_DEVICE_CHECKS = {
    "evaluator_extraction": "import sys\n"
    "sys.path[:0] = ['tests', 'tests/evaluators']\n"
    "from test_evaluators import write_colour_npz\n"
    "PATH, FSDP = str(write_colour_npz(TMP)[0]), 2\n" + EXTRACT
}


def test_extraction_is_sharded_like_training_and_equals_numpy(colour_npz, eight_devices):
    _, arrays = colour_npz
    out = json.loads(eight_devices("evaluator_extraction"))
    images = arrays["train_images"].astype(np.float64) / 255
    np.testing.assert_allclose(out["x"], images.mean((1, 2)) * 2, rtol=1e-5)
    np.testing.assert_array_equal(out["y"], arrays["train_labels"])
    np.testing.assert_allclose(np.asarray(out["tok"])[:, 3], images[:, -1, -1], rtol=1e-6)
    assert out["res"]["top1"] == 1.0  # the class is the dominant channel: linearly separable


def test_run_all_prefixes_names_and_honours_every_steps(colour_npz):
    path, _ = colour_npz
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    data = {"source": "npz", "path": str(path), "image_size": 8}

    def encode(params, images):
        return Features(pooled=images.mean((1, 2)))

    configs = [
        {"name": "knn", "view": "normalize('none')", "data": data, "batch_size": 10},
        {
            "name": "knn",
            "label": "knn_k1",
            "k": 1,
            "every_steps": 2,
            "view": "normalize('none')",
            "data": data,
            "batch_size": 10,
        },
    ]
    out = evaluators.run_all(configs, encode, None, mesh=mesh, step=3)
    assert set(out) == {"knn/top1", "knn/top5", "knn/seconds"} and out["knn/top1"] == 1.0
    out = evaluators.run_all(configs, encode, None, mesh=mesh, step=4)
    assert "knn_k1/top1" in out and out["knn_k1/top1"] == 1.0


def test_at_random_init_evaluates_the_untrained_backbone(colour_npz):
    path, _ = colour_npz
    train = config_lib.resolve(
        config_lib.load(str(REPO / "configs" / "quickstart.py:smoke")),
        {
            "data.source": "npz",
            "data.path": str(path),
            "data.image_size": "8",
            "views": "('normalize',)",
            "backbone.variant": "Ti/4",
            "backbone.depth": "1",
        },
    )
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    configs = [{"name": "knn", "k": 3, "batch_size": 10, "crop_pct": 1.0}]
    out = evaluators.at_random_init(configs, train, mesh=mesh, seed=3)
    assert set(out) == {"knn/top1", "knn/top5", "knn/seconds"}
    # The same numbers from the config's backbone initialised by hand with that seed.
    backbone, encode, _ = evaluators.build_backbone(train.backbone, "normalize", 8)
    variables = jax.jit(backbone.init)(jax.random.key(3), jnp.zeros((1, 8, 8, 3)))
    by_hand = evaluators.run_all(configs, encode, variables, mesh=mesh, step=0, train_config=train)
    assert out["knn/top1"] == by_hand["knn/top1"] and out["knn/top5"] == by_hand["knn/top5"]
