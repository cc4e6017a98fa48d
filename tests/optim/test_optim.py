"""Optimiser chains against NumPy float64 references of AdamW, SGD, clipping and the schedule."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from selfsup import config as config_lib
from selfsup import optim, pytree
from selfsup.errors import UserError

SHAPES = {
    "backbone/patch_embed/kernel": (4, 3),
    "backbone/patch_embed/bias": (3,),
    "backbone/pos_embed": (1, 5, 3),
    "backbone/cls_token": (1, 1, 3),
    "backbone/blocks_0/norm1/scale": (3,),
    "backbone/blocks_0/norm1/bias": (3,),
    "backbone/blocks_0/attn/qkv/kernel": (3, 9),
    "backbone/blocks_0/attn/qkv/bias": (9,),
    "decoder/mask_token": (1, 1, 3),
    "decoder/pred/kernel": (3, 2),
}
# Written out by hand: the default no_decay leaves exactly the weight matrices decayed.
DECAYED = {
    "backbone/patch_embed/kernel",
    "backbone/blocks_0/attn/qkv/kernel",
    "decoder/pred/kernel",
}


def _nest(flat):
    tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flat(tree):
    return dict(zip(pytree.leaf_paths(tree), jax.tree.leaves(tree), strict=True))


def _random(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {k: scale * rng.standard_normal(s) for k, s in SHAPES.items()}


def _jax(flat):
    return _nest({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


def _cfg(**kw):
    base = dict(name="adamw", base_lr=1e-2, lr_batch_divisor=0, warmup_steps=0, schedule="constant")
    return {**base, **kw}


def _run(tx, params, grads_seq):
    """Apply tx for each gradient in grads_seq; returns the final flat params (float64)."""
    params = _jax(params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = update(_jax(grads), state, params)
        params = optax.apply_updates(params, updates)
    return {k: np.asarray(v, np.float64) for k, v in _flat(params).items()}


def _np_schedule(step, peak, warmup, total, min_lr):
    if step < warmup:
        return peak * step / warmup
    progress = min((step - warmup) / (total - warmup), 1.0)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


# --- schedule and scaling ---------------------------------------------------------------------


def test_cosine_schedule_against_numpy():
    cfg = _cfg(
        base_lr=1.5e-4, lr_batch_divisor=256, warmup_steps=10, schedule="cosine", min_lr=1e-6
    )
    _, lr = optim.build(cfg, batch_size=512, total_steps=50)
    peak = 1.5e-4 * 512 / 256
    for step in (0, 5, 10, 11, 30, 49, 50, 60):  # start, mid-warmup, end of warmup, cosine, end
        want = _np_schedule(step, peak, 10, 50, 1e-6)
        np.testing.assert_allclose(float(lr(step)), want, rtol=1e-6, atol=1e-12)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(10)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(lr(50)), 1e-6, rtol=1e-5)
    # Traced steps give the same values.
    steps = jnp.arange(0, 61, 5)
    want = [_np_schedule(int(s), peak, 10, 50, 1e-6) for s in steps]
    np.testing.assert_allclose(jax.jit(jax.vmap(lr))(steps), want, rtol=1e-5, atol=1e-12)


def test_constant_schedule_with_warmup():
    _, lr = optim.build(_cfg(base_lr=0.1, warmup_steps=4), batch_size=8, total_steps=20)
    np.testing.assert_allclose(
        [float(lr(s)) for s in (0, 1, 2, 4, 19, 25)], [0, 0.025, 0.05, 0.1, 0.1, 0.1], rtol=1e-6
    )


@pytest.mark.parametrize(
    "base_lr, batch, divisor, want",
    [(1.5e-4, 4096, 256, 2.4e-3), (1e-4, 2048, 512, 4e-4), (3e-3, 4096, 0, 3e-3)],
)
def test_lr_scaling_rule(base_lr, batch, divisor, want):
    cfg = _cfg(base_lr=base_lr, lr_batch_divisor=divisor, schedule="cosine", warmup_steps=5)
    _, lr = optim.build(cfg, batch_size=batch, total_steps=100)
    np.testing.assert_allclose(float(lr(5)), want, rtol=1e-6)  # the peak, at the end of warmup


def test_config_dict_accepted():
    cfg = ml_collections.ConfigDict(_cfg(base_lr=0.5, lr_batch_divisor=4))
    _, lr = optim.build(cfg, batch_size=8, total_steps=10)
    np.testing.assert_allclose(float(lr(3)), 1.0, rtol=1e-6)


# --- AdamW with the weight-decay mask ---------------------------------------------------------


def _np_adamw(params, grads_seq, lrs, b1, b2, eps, wd, decayed):
    """torch.optim.AdamW: decoupled decay p -= lr * wd * p, bias-corrected moments."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
            decay = wd * p[k] if k in decayed else 0.0
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + eps) + decay)
    return p


def test_adamw_steps_against_numpy_with_decay_mask():
    cfg = _cfg(
        base_lr=1e-2, schedule="cosine", warmup_steps=1, weight_decay=0.3, b1=0.8, b2=0.95, eps=1e-6
    )
    tx, _ = optim.build(cfg, batch_size=32, total_steps=6)
    params = _random(0)
    grads_seq = [_random(s, 0.1) for s in (1, 2, 3, 4)]
    lrs = [_np_schedule(s, 1e-2, 1, 6, 0.0) for s in range(4)]
    got = _run(tx, params, grads_seq)
    want = _np_adamw(params, grads_seq, lrs, 0.8, 0.95, 1e-6, 0.3, DECAYED)
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_weight_decay_only_where_expected():
    # Zero gradients: Adam's part is 0, so what moves is weight decay alone.
    tx, _ = optim.build(_cfg(base_lr=0.1, weight_decay=0.5), batch_size=1, total_steps=3)
    params = _random(0)
    zero = {k: np.zeros(s) for k, s in SHAPES.items()}
    got = _run(tx, params, [zero])
    for k in SHAPES:
        want = params[k] * (1 - 0.1 * 0.5) if k in DECAYED else params[k]
        np.testing.assert_allclose(got[k], want, rtol=1e-6, err_msg=k)


def test_custom_no_decay():
    cfg = _cfg(base_lr=0.1, weight_decay=0.5, no_decay=(r"decoder/.*",))
    tx, _ = optim.build(cfg, batch_size=1, total_steps=3)
    params = _random(0)
    got = _run(tx, params, [{k: np.zeros(s) for k, s in SHAPES.items()}])
    for k in SHAPES:
        factor = 1.0 if k.startswith("decoder/") else 0.95
        np.testing.assert_allclose(got[k], params[k] * factor, rtol=1e-6, err_msg=k)


# --- SGD, clipping, frozen, multipliers -------------------------------------------------------


@pytest.mark.parametrize("clip", [0.5, 100.0, None])
def test_sgd_gradient_clipping_against_numpy(clip):
    frozen = "decoder/pred/kernel"
    cfg = _cfg(name="sgd", base_lr=0.1, weight_decay=0.01, grad_clip_norm=clip, frozen=(frozen,))
    tx, _ = optim.build(cfg, batch_size=1, total_steps=3)
    params = _random(0)
    grads_seq = [_random(s) for s in (1, 2)]
    for g in grads_seq:
        g[frozen] *= 1e3  # a frozen leaf must not enter the clipping norm
    got = _run(tx, params, grads_seq)
    # torch: clip_grad_norm_ over trainable grads, then SGD adds wd * p and momentum 0.9.
    p = {k: v.copy() for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for grads in grads_seq:
        trainable = {k: g for k, g in grads.items() if k != frozen}
        norm = math.sqrt(sum((g * g).sum() for g in trainable.values()))
        factor = min(1.0, clip / norm) if clip else 1.0
        for k, g in trainable.items():
            d = g * factor + (0.01 * p[k] if k in DECAYED else 0.0)
            buf[k] = 0.9 * buf[k] + d
            p[k] = p[k] - 0.1 * buf[k]
    for k in SHAPES:
        np.testing.assert_allclose(got[k], p[k], rtol=2e-5, atol=1e-6, err_msg=k)
    if clip == 0.5:  # the clip really binds in this case
        assert math.sqrt(sum((g * g).sum() for k, g in grads_seq[0].items() if k != frozen)) > 5


def test_frozen_parameters_unchanged():
    frozen = (r"backbone/patch_embed/.*", r"decoder/mask_token")
    cfg = _cfg(base_lr=0.1, weight_decay=0.5, frozen=frozen, grad_clip_norm=1.0)
    tx, _ = optim.build(cfg, batch_size=1, total_steps=5)
    params = _random(0)
    got = _run(tx, params, [_random(s) for s in (1, 2, 3)])
    for k in SHAPES:
        if k.startswith("backbone/patch_embed/") or k == "decoder/mask_token":
            np.testing.assert_array_equal(got[k], params[k].astype(np.float32), err_msg=k)
        else:
            assert not np.allclose(got[k], params[k], atol=1e-3), k


def test_lr_multipliers_scale_updates_exactly():
    mults = ((r"backbone/blocks_0/.*", 0.5), (r"backbone/.*", 0.1))  # first match wins
    base = _cfg(base_lr=0.01, weight_decay=0.05, grad_clip_norm=1.0)
    tx0, _ = optim.build(base, batch_size=1, total_steps=5)
    tx1, _ = optim.build({**base, "lr_mults": mults}, batch_size=1, total_steps=5)
    params = _jax(_random(0))
    s0, s1 = tx0.init(params), tx1.init(params)
    for seed in (1, 2, 3):  # same params each step, so both Adam states see the same inputs
        grads = _jax(_random(seed))
        u0, s0 = tx0.update(grads, s0, params)
        u1, s1 = tx1.update(grads, s1, params)
        u0, u1 = _flat(u0), _flat(u1)
        for k in SHAPES:
            m = 0.5 if "blocks_0/" in k else (0.1 if k.startswith("backbone/") else 1.0)
            np.testing.assert_allclose(u1[k], m * np.asarray(u0[k]), rtol=1e-6, err_msg=k)


# --- paths and validation ---------------------------------------------------------------------


def test_param_paths_and_labels():
    tree = _nest({k: np.zeros(1) for k in SHAPES})
    assert sorted(pytree.leaf_paths(tree)) == sorted(SHAPES)
    rules = [(r".*/bias", "b"), (r"backbone/.*", "bb"), (r"decoder/pred/kernel", "k")]
    labels = _flat(optim.path_labels(tree, rules, "other"))
    assert labels["backbone/patch_embed/bias"] == "b"
    assert labels["backbone/pos_embed"] == "bb"
    assert labels["decoder/pred/kernel"] == "k"
    assert labels["decoder/mask_token"] == "other"
    # fullmatch: a regex must cover the whole path.
    assert _flat(optim.path_labels(tree, [(r"decoder", 1)], 0))["decoder/mask_token"] == 0


@pytest.mark.parametrize(
    "key, value",
    [
        ("no_decay", (r".*/bias", r".*/sacle")),
        ("frozen", (r"backbone/patch_embd/.*",)),
        ("lr_mults", ((r"decoder/.*", 2.0), (r"backbone/block_0/.*", 0.5))),
    ],
)
def test_typo_regex_raises(key, value):
    tx, _ = optim.build(_cfg(**{key: value}), batch_size=1, total_steps=5)
    bad = value[-1][0] if key == "lr_mults" else value[-1]
    with pytest.raises(UserError, match=f"config.optim.{key}: regex .* matches no parameter") as e:
        tx.init(_jax(_random(0)))
    assert bad in str(e.value)


def test_default_no_decay_allows_models_without_tokens():
    tx, _ = optim.build(_cfg(), batch_size=1, total_steps=5)
    conv = {"conv1": {"kernel": jnp.ones((3, 3, 3, 8))}, "bn1": {"scale": jnp.ones(8)}}
    tx.init(conv)  # no pos_embed / cls_token / mask_token: still fine


@pytest.mark.parametrize(
    "overrides, total, match",
    [
        ({"name": "adam_w"}, 10, "unknown optimiser 'adam_w'"),
        ({"warmup_steps": 11}, 10, "warmup_steps"),
        ({"schedule": "linear"}, 10, "unknown schedule"),
        ({"base_lr": None}, 10, "base_lr is missing"),
        ({"lr_batch_divisor": -1}, 10, "lr_batch_divisor"),
        ({"frozen": ("backbone/[",)}, 10, "not a valid regex"),
        ({"lr_mults": (("backbone/.*",),)}, 10, r"\(regex, multiplier\)"),
    ],
)
def test_config_errors(overrides, total, match):
    with pytest.raises(UserError, match=match):
        optim.build(_cfg(**overrides), batch_size=8, total_steps=total)


# --- LARS (both variants), LAMB, weight-decay schedule ---------------------------------------

NO_DECAY_DEFAULT = set(SHAPES) - DECAYED  # biases, scales, tokens, position embedding


def _np_trust(w, d, eta):
    """LARS' layer-wise trust ratio: eta ||w|| / ||d||, 1 where either norm is 0."""
    wn, dn = np.linalg.norm(w), np.linalg.norm(d)
    return eta * wn / dn if wn > 0 and dn > 0 else 1.0


def _np_lars(params, grads_seq, lrs, *, variant, wd, eta, m, decayed, adapted, mults):
    """LARS step by step. SimCLR (TF): v = m v + lr * trust * d; w -= v. Barlow Twins / BYOL
    (PyTorch): v = m v + trust * d; w -= lr * v. d = g + wd w (decayed leaves), per-leaf LR
    multipliers as per-parameter-group learning rates."""
    p = {k: v.copy() for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for grads, lr in zip(grads_seq, lrs, strict=True):
        for k, g in grads.items():
            d = g + (wd * p[k] if k in decayed else 0.0)
            trust = _np_trust(p[k], d, eta) if k in adapted else 1.0
            lr_k = lr * mults.get(k, 1.0)
            if variant == "lars_simclr":
                v[k] = m * v[k] + lr_k * trust * d
                p[k] = p[k] - v[k]
            else:
                v[k] = m * v[k] + trust * d
                p[k] = p[k] - lr_k * v[k]
    return p


@pytest.mark.parametrize("variant", ["lars_simclr", "lars"])
@pytest.mark.parametrize("lars_exclude", [None, (r".*/bias$",)])
def test_lars_against_numpy(variant, lars_exclude):
    frozen = "backbone/cls_token"
    # Barlow Twins' bias/BN learning rate: 0.0048 / 0.2 of the weights' LR.
    mults = ((r".*/bias$", 0.024), (r".*/scale$", 0.024))
    cfg = _cfg(
        name=variant,
        base_lr=0.4,
        schedule="cosine",
        warmup_steps=2,  # a changing LR is what tells the two variants apart
        weight_decay=0.05,
        momentum=0.8,
        trust_coefficient=0.01,
        lr_mults=mults,
        frozen=(frozen,),
        lars_exclude=lars_exclude,
    )
    tx, _ = optim.build(cfg, batch_size=1, total_steps=6)
    params = _random(0)
    params["decoder/pred/kernel"] *= 0.0  # ||w|| = 0: trust ratio 1 at the first step
    grads_seq = [_random(s, 0.1) for s in (1, 2, 3, 4, 5)]
    got = _run(tx, params, grads_seq)
    excluded = (
        NO_DECAY_DEFAULT if lars_exclude is None else {k for k in SHAPES if k.endswith("/bias")}
    )
    trainable = [k for k in SHAPES if k != frozen]
    want = _np_lars(
        {k: params[k] for k in trainable},
        [{k: g[k] for k in trainable} for g in grads_seq],
        [_np_schedule(s, 0.4, 2, 6, 0.0) for s in range(5)],
        variant=variant,
        wd=0.05,
        eta=0.01,
        m=0.8,
        decayed=DECAYED,
        adapted=set(trainable) - excluded,
        mults={k: 0.024 for k in SHAPES if k.endswith(("/bias", "/scale"))},
    )
    for k in trainable:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(got[frozen], params[frozen].astype(np.float32))
    # The reference discriminates: the other variant, or no trust ratio, gives other numbers.
    other = "lars" if variant == "lars_simclr" else "lars_simclr"
    kw = dict(wd=0.05, eta=0.01, m=0.8, decayed=DECAYED, mults={})
    lrs = [_np_schedule(s, 0.4, 2, 6, 0.0) for s in range(5)]
    swapped = _np_lars(params, grads_seq, lrs, variant=other, adapted=DECAYED, **kw)
    plain = _np_lars(params, grads_seq, lrs, variant=variant, adapted=set(), **kw)
    for ref in (swapped, plain):
        assert not np.allclose(
            ref["backbone/patch_embed/kernel"], got["backbone/patch_embed/kernel"]
        )


def _np_lamb(params, grads_seq, lrs, wds, *, b1, b2, eps, decayed, adapted):
    """LAMB (You et al. 2020; timm's Lamb): bias-corrected Adam step u, plus wd_t * w where
    decayed, times ||w|| / ||u|| where adapted (1 where a norm is 0); w -= lr_t * that."""
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, (grads, lr, wd) in enumerate(zip(grads_seq, lrs, wds, strict=True), start=1):
        for k, g in grads.items():
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            u = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            u = u + (wd * p[k] if k in decayed else 0.0)
            trust = _np_trust(p[k], u, 1.0) if k in adapted else 1.0
            p[k] = p[k] - lr * trust * u
    return p


def _np_wd(step, wd, end, total):
    """SparK's weight-decay schedule: cosine from wd at step 0 to end at the last step."""
    return end + (wd - end) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))


def test_lamb_with_weight_decay_schedule_against_numpy():
    cfg = _cfg(
        name="lamb",
        base_lr=0.01,
        schedule="cosine",
        warmup_steps=1,
        b1=0.9,
        b2=0.95,
        eps=1e-6,
        weight_decay=0.04,
        weight_decay_end=0.2,
    )
    tx, _ = optim.build(cfg, batch_size=1, total_steps=5)
    params = _random(0)
    grads_seq = [_random(s, 0.1) for s in (1, 2, 3, 4)]
    got = _run(tx, params, grads_seq)
    want = _np_lamb(
        params,
        grads_seq,
        [_np_schedule(s, 0.01, 1, 5, 0.0) for s in range(4)],
        [_np_wd(s, 0.04, 0.2, 5) for s in range(4)],
        b1=0.9,
        b2=0.95,
        eps=1e-6,
        decayed=DECAYED,
        adapted=DECAYED,  # lars_exclude None: the no_decay parameters are not adapted
    )
    for k in SHAPES:
        np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_lamb_matches_timm():
    tc = pytest.importorskip("torch_compat")
    torch = tc.torch
    from timm.optim import Lamb

    cfg = _cfg(name="lamb", base_lr=0.02, b1=0.9, b2=0.95, eps=1e-6, weight_decay=0.05)
    tx, _ = optim.build(cfg, batch_size=1, total_steps=10)
    params = _random(0)
    grads_seq = [_random(s, 0.1) for s in (1, 2, 3)]
    got = _run(tx, params, grads_seq)
    # timm: two parameter groups as SparK builds them; only the decayed group is adapted.
    tp = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    groups = [
        {"params": [tp[k] for k in SHAPES if k in DECAYED], "weight_decay": 0.05},
        {"params": [tp[k] for k in SHAPES if k not in DECAYED], "weight_decay": 0.0},
    ]
    opt = Lamb(groups, lr=0.02, betas=(0.9, 0.95), eps=1e-6, max_grad_norm=None)
    for grads in grads_seq:
        for k, t in tp.items():
            t.grad = torch.tensor(grads[k])
        opt.step()
    for k in SHAPES:
        np.testing.assert_allclose(got[k], tp[k].detach().numpy(), rtol=2e-5, atol=1e-6, err_msg=k)


def test_adamw_weight_decay_follows_cosine_schedule():
    # Zero gradients: Adam's part is 0, so each step multiplies decayed leaves by 1 - lr * wd_t.
    cfg = _cfg(base_lr=0.1, weight_decay=0.5, weight_decay_end=0.1)
    tx, _ = optim.build(cfg, batch_size=1, total_steps=4)
    params = _random(0)
    zero = {k: np.zeros(s) for k, s in SHAPES.items()}
    got = _run(tx, params, [zero] * 5)  # one step past the end: held at weight_decay_end
    factor = np.prod([1 - 0.1 * _np_wd(s, 0.5, 0.1, 4) for s in range(5)])
    assert abs(_np_wd(4, 0.5, 0.1, 4) - 0.1) < 1e-12 and abs(_np_wd(0, 0.5, 0.1, 4) - 0.5) < 1e-12
    for k in SHAPES:
        want = params[k] * factor if k in DECAYED else params[k]
        np.testing.assert_allclose(got[k], want, rtol=1e-6, err_msg=k)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"name": "lars", "lars_exclude": (r".*/bais$",)}, "lars_exclude: regex .* matches no"),
        ({"name": "lamb", "weight_decay_end": -0.1}, "weight_decay_end must be a number >= 0"),
        ({"name": "lars", "momentum": -0.9}, "momentum must be a number >= 0"),
        ({"name": "lars", "trust_coefficient": "big"}, "trust_coefficient must be a number"),
        ({"name": "lars", "lars_exclude": ("[",)}, "lars_exclude: .* not a valid regex"),
    ],
)
def test_lars_lamb_config_errors(overrides, match):
    with pytest.raises(UserError, match=match):
        tx, _ = optim.build(_cfg(**overrides), batch_size=1, total_steps=5)
        tx.init(_jax(_random(0)))


def test_new_optim_keys_have_defaults():
    d = config_lib.defaults().optim
    assert d.momentum == 0.9 and d.trust_coefficient == 1e-3
    assert d.lars_exclude is None and d.weight_decay_end is None
    for name in ("lars", "lars_simclr", "lamb"):  # the defaults build for every optimiser
        tx, _ = optim.build({**d.to_dict(), "name": name}, batch_size=8, total_steps=5)
        tx.init(_jax(_random(0)))


def test_missing_keys_take_config_defaults(monkeypatch):
    # A plain dict without no_decay, weight_decay, b1... steps as the dict of every default.
    params, grads = _random(0), [_random(s, 0.1) for s in (1, 2)]
    full = {**config_lib.defaults().optim.to_dict(), **_cfg()}
    expect = _run(optim.build(full, batch_size=1, total_steps=5)[0], params, grads)
    got = _run(optim.build(_cfg(), batch_size=1, total_steps=5)[0], params, grads)
    assert got.keys() == expect.keys()
    for key in expect:
        np.testing.assert_array_equal(got[key], expect[key], err_msg=key)
    # ...read from config.defaults(), the one place they are written.
    defaults = config_lib.defaults()
    defaults.optim.no_decay = (r".*",)  # nothing decays
    monkeypatch.setattr(config_lib, "defaults", lambda: defaults)
    plain = _run(optim.build(_cfg(), batch_size=1, total_steps=5)[0], params, grads)
    changed = {k for k in got if not np.array_equal(plain[k], got[k])}
    assert changed == DECAYED
