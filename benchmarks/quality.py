"""Representation-quality benchmark: pretrain each objective on the real CIFAR-10 subset for the
same number of images seen, then k-NN and linear-probe its frozen backbone, beside two baselines
of the same backbone measured in the same run: random initialisation and supervised training
on the same images for the same budget.

    python benchmarks/quality.py                      # the table in BENCHMARKS.md
    python benchmarks/quality.py --quick              # 1 epoch each: ~25 minutes on 2 idle cores
    python benchmarks/quality.py --objectives mae,simclr --images-seen 20000 --workdir /tmp/q
    python benchmarks/quality.py --objectives mae --images-seen 50850 --no-supervised
    python benchmarks/quality.py --objectives swav --set swav.objective.num_prototypes=3000
    python benchmarks/quality.py --objectives swav --set swav.backbone=vit --no-supervised
    python benchmarks/quality.py --objectives simclr --set simclr.backbone=resnet18_cifar

Data: `../shared/data/cifar10_subset.npz` (5085 train / 1017 test images, 32 px) through the
`npz` source, the code path of a user's own arrays. Every run is `selfsup.train.
train_and_evaluate` on a config built here (batch 128, the same images seen for every objective
and for the supervised baseline). Each objective trains a small network of its paper's family:
a ViT (ViT-Ti width at patch 4, 4 blocks, 32 px) for MAE, SimMIM and AIM, a ResNet-18 (64 px) for
SimCLR, Barlow Twins, SwAV, rotation and SparK; each backbone brings its own random-init and
supervised baselines. The frozen backbone of the last checkpoint is evaluated with the protocols
of `configs/eval/knn.py` (k = 20, T = 0.07) and `configs/eval/linear_probe.py` (MAE's, 90 epochs;
30 with `--quick`) on the pooled feature, through `evaluators.default_view` without a centre crop;
both read features extracted once (`selfsup eval` extracts them per evaluator). Prints a
Markdown table (top-1 in %) and writes `<workdir>/quality.json`, row by row, so that an
interrupted run keeps what it measured.

The per-objective settings are each paper's views and loss scaled to 32 or 64 px and a few
hundred steps. Deviations from the papers' recipes, for the short CPU budget: AdamW with 10%
warmup and cosine for every objective (not LARS or SGD: one optimiser that needs no per-method
tuning at this length), small heads and projectors, no Gaussian blur (as SimCLR's CIFAR setting),
SwAV with 2 x 64 + 2 x 32 crops (2 x 32 + 2 x 16 on the ViT), 100 prototypes (paper: 3000) and
no queue, colour distortion at SimCLR's CIFAR strength 0.5 for SimCLR, Barlow Twins (officially
saturation 0.2) and SwAV (officially strength 1), ResNet-18 with the ImageNet stem on upsampled
images (solo-learn's CIFAR ResNet-18 has a 3x3 stride-1 stem and no max-pool instead: backbone
`resnet18_cifar`, at 32 px, for every convnet objective but SparK, whose mask needs the stride-32
grid; its stages work on 34-px maps, about 4x the compute of the 64-px ImageNet-stem runs).
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import importlib.util
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from selfsup import config as config_lib  # noqa: E402
from selfsup import evaluators  # noqa: E402
from selfsup.evaluators import features, knn, linear_probe  # noqa: E402
from selfsup.io import checkpoint  # noqa: E402
from selfsup.parallel import sharding  # noqa: E402
from selfsup.train.loop import train_and_evaluate  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cifar10_subset.npz"
TRAIN_IMAGES = 5085
BATCH = 128

# Each objective trains its paper's family: the ViT papers' (MAE, SimMIM, AIM) ViT-Ti width and
# heads at patch 4 (64 tokens at 32 px), 4 blocks (the quickstart's), mean-pooled, no cls token;
# the convnet papers' (SimCLR, Barlow Twins, SwAV, rotation, SparK) ResNet-18, solo-learn's CIFAR
# backbone. One pair of baselines per backbone. `--set OBJ.backbone=vit` runs a convnet paper's
# objective on the ViT (the views below have both sizes).
VIT = dict(name="vit", variant="Ti/4", depth=4, cls_token=False, pool="gap")
RESNET = dict(name="resnet", variant="18", bn_momentum=0.9, zero_init_last_bn=True)
# solo-learn's CIFAR ResNet-18 (3x3/1 stem, no max-pool), at the data's 32 px.
RESNET_CIFAR = dict(RESNET, cifar_stem=True)
BACKBONES = {"vit": VIT, "resnet18": RESNET, "resnet18_cifar": RESNET_CIFAR}

IMAGENET = "|normalize('imagenet')"
# Colour distortion at strength 0.5, SimCLR's CIFAR-10 setting (Chen et al. 2020, appendix B.9).
JITTER = "|color_jitter(0.4, 0.4, 0.4, 0.1, p=0.8)|grayscale(0.2)"
# View size and resize method per backbone: the ViT at the data's 32 px, the ResNet (ImageNet
# stem, stride 32) at 64 px upsampled bicubically, so that its last stage is 2 x 2.
SIZES = {"vit": (32, ""), "resnet18": (64, ", method='bicubic'"), "resnet18_cifar": (32, "")}


def adamw(lr: float, warmup: float = 0.1, wd: float = 0.05, **extra) -> dict:
    """AdamW at peak `lr` (not scaled with the batch), warmup as a fraction of the steps."""
    return dict(
        name="adamw", base_lr=lr, lr_batch_divisor=0, weight_decay=wd, warmup=warmup, **extra
    )


# objective -> backbone key, views, objective dict, optimiser. Views at 32 px from each paper.
OBJECTIVES = {
    # He et al. 2021: RandomResizedCrop(0.2, 1) + flip, 75% masking, norm-pix loss.
    "mae": dict(
        backbone="vit",
        views=(f"rrc(32, scale=(0.2, 1.0), method='bicubic')|flip{IMAGENET}",),
        objective=dict(
            name="mae", mask_ratio=0.75, decoder_width=128, decoder_depth=2, decoder_heads=4
        ),
        optim=adamw(1.5e-3),
    ),
    # Xie et al. 2021: crop scale (0.67, 1), 60% masking of mask patches 8 px (4 x 4 at 32 px).
    "simmim": dict(
        backbone="vit",
        views=(f"rrc(32, scale=(0.67, 1.0))|flip{IMAGENET}",),
        objective=dict(name="simmim", mask_patch_size=8, mask_ratio=0.6),
        optim=adamw(1e-3, b2=0.999, grad_clip_norm=5.0),
    ),
    # El-Nouby et al. 2024: crop scale (0.4, 1), colour jitter, prefix-causal next-patch MSE.
    "aim": dict(
        backbone="vit",
        views=(
            "rrc(32, scale=(0.4, 1.0), method='bicubic')|flip"
            f"|color_jitter(0.4, 0.4, 0.2, 0.1, p=0.8){IMAGENET}",
        ),
        objective=dict(name="aim", head_width=256, head_depth=2),
        optim=adamw(1e-3, grad_clip_norm=1.0),
    ),
    # Chen et al. 2020 (CIFAR setting: no blur), temperature 0.2 for a batch of 128.
    "simclr": dict(
        backbone="resnet18",
        views={
            b: (f"rrc({s}, scale=(0.08, 1.0){m})|flip{JITTER}|normalize('none')",) * 2
            for b, (s, m) in SIZES.items()
        },
        objective=dict(name="simclr", temperature=0.2, proj_layers=2, proj_dim=128),
        optim=adamw(2e-3, wd=1e-4),
    ),
    # Zbontar et al. 2021: asymmetric solarisation (blur dropped, as above), lambda 0.0051.
    "barlow_twins": dict(
        backbone="resnet18",
        views={
            b: (
                f"rrc({s}, scale=(0.08, 1.0){m})|flip{JITTER}{IMAGENET}",
                f"rrc({s}, scale=(0.08, 1.0){m})|flip{JITTER}|solarize(0.2){IMAGENET}",
            )
            for b, (s, m) in SIZES.items()
        },
        objective=dict(name="barlow_twins", projector=(1024, 1024, 1024), lambd=0.0051),
        optim=adamw(2e-3, wd=1e-4),
    ),
    # Caron et al. 2020: multi-crop, 2 crops at the view size (scale 0.14-1) + 2 at half of it
    # (0.05-0.14), prototypes frozen for the first 10% of the steps.
    "swav": dict(
        backbone="resnet18",
        views={
            b: (
                *[f"rrc({s}, scale=(0.14, 1.0){m})|flip{JITTER}{IMAGENET}"] * 2,
                *[f"rrc({s // 2}, scale=(0.05, 0.14){m})|flip{JITTER}{IMAGENET}"] * 2,
            )
            for b, (s, m) in SIZES.items()
        },
        objective=dict(
            name="swav",
            num_views=4,
            num_prototypes=100,
            proj_hidden=512,
            proj_dim=128,
            temperature=0.1,
            epsilon=0.05,
        ),
        optim=adamw(2e-3, wd=1e-4, freeze_prototypes=0.1),
    ),
    # Gidaris et al. 2018: all 4 rotations of every image; the objective normalises.
    "rotation": dict(
        backbone="resnet18",
        views={b: (f"rrc({s}, scale=(0.5, 1.0){m})|flip",) for b, (s, m) in SIZES.items()},
        objective=dict(name="rotation", normalize="imagenet"),
        optim=adamw(2e-3, wd=1e-4),
    ),
    # Tian et al. 2023: 60% of the stride-32 cells masked, so the images are upsampled to 64 px
    # (a 2 x 2 grid; the ResNet baselines see 64 px too); a light decoder.
    "spark": dict(
        backbone="resnet18",
        views=(f"rrc(64, scale=(0.67, 1.0), method='bicubic')|flip{IMAGENET}",),
        objective=dict(name="spark", mask_ratio=0.6, decoder_width=128),
        optim=adamw(1e-3, wd=0.04, b2=0.95),
    ),
}
# The baselines: the supervised objective on each backbone, at that backbone's view size.
SUPERVISED = dict(
    views={b: (f"rrc({s}, scale=(0.35, 1.0){m})|flip{IMAGENET}",) for b, (s, m) in SIZES.items()},
    objective=dict(name="supervised", label_smoothing=0.1),
    optim={
        "vit": adamw(1e-3),
        "resnet18": adamw(2e-3, wd=1e-4),
        "resnet18_cifar": adamw(2e-3, wd=1e-4),
    },
)


def train_config(spec: dict, backbone: str, images_seen: int) -> dict:
    """The selfsup config (a plain dict) of one pretraining run."""
    steps = max(1, images_seen // BATCH)
    optim = dict(spec["optim"] if "name" in spec["optim"] else spec["optim"][backbone])
    optim["warmup_steps"] = max(1, round(optim.pop("warmup") * steps))
    freeze = optim.pop("freeze_prototypes", 0.0)
    if freeze:
        optim["frozen_until"] = (("prototypes", max(1, round(freeze * steps))),)
    return dict(
        seed=0,
        batch_size=BATCH,
        total_steps=steps,
        log_every_steps=max(1, steps // 10),
        checkpoint_every_steps=steps,
        keep_checkpoints=1,
        image_every_steps=0,
        num_images=0,
        data=dict(source="npz", path=str(DATA), image_size=32),
        views=spec["views"] if isinstance(spec["views"], tuple) else spec["views"][backbone],
        backbone=BACKBONES[backbone],
        objective=spec["objective"],
        optim=optim,
    )


def eval_configs(quick: bool) -> list:
    """k-NN (k = 20, T = 0.07) and the linear probe from configs/eval, without a centre crop."""
    out = []
    for name in ("knn", "linear_probe"):
        c = config_lib.load(str(ROOT / "configs" / "eval" / f"{name}.py"))
        c.crop_pct = 1.0
        c.batch_size = 256
        if quick and name == "linear_probe":
            c.epochs, c.warmup_epochs = 30, 3
        out.append(evaluators.resolve(c))
    return out


def evaluate(train_config, variables: dict, quick: bool) -> tuple[float, float]:
    """(k-NN, linear-probe) test top-1 of the backbone `variables` ({"params": ...,
    "batch_stats": ...}) of `train_config`'s backbone. The two protocols read the same pooled
    features, so they are extracted once (`selfsup eval` would extract them per evaluator)."""
    knn_config, probe_config = (evaluators.inherit(c, train_config) for c in eval_configs(quick))
    _, encode_fn, _ = evaluators.build_backbone(
        train_config.backbone, knn_config.view, train_config.data.image_size
    )
    mesh = sharding.make_mesh(knn_config.mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    train, test, num_classes = features.extract_splits(encode_fn, variables, knn_config, mesh)
    knn_top1 = knn.knn(train, test, num_classes, knn_config)["top1"]
    return knn_top1, linear_probe.probe(train, test, num_classes, probe_config)["top1"]


def pretrain_and_eval(label: str, config: dict, workdir: Path, quick: bool):
    """Train `config` from scratch in workdir/label, then evaluate its last checkpoint."""
    run_dir = workdir / label
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time, not a resume
    resolved = config_lib.resolve(mlc.ConfigDict(config))
    start = time.perf_counter()
    last = train_and_evaluate(resolved, str(run_dir))
    seconds = time.perf_counter() - start
    trees, _ = checkpoint.restore_tree(run_dir, ("params", "model_state"))
    variables = evaluators.backbone_variables(trees["params"], trees["model_state"])
    knn_top1, linear_top1 = evaluate(resolved, variables, quick)
    return dict(
        knn=knn_top1,
        linear=linear_top1,
        pretrain_seconds=seconds,
        images_per_s=last.get("images_per_s", 0.0),
        final_loss=last.get("loss"),
    )


def random_init(config: dict, quick: bool) -> tuple[float, float]:
    """(k-NN, linear) top-1 of the config's backbone at its random initialisation (seed 0)."""
    resolved = config_lib.resolve(mlc.ConfigDict(config))
    backbone, _, example = evaluators.build_backbone(
        resolved.backbone, evaluators.default_view(resolved, 1.0), resolved.data.image_size
    )
    variables = jax.jit(backbone.init)(
        jax.random.key(resolved.seed), jnp.zeros(example.shape, example.dtype)
    )
    return evaluate(resolved, variables, quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images-seen", type=int, default=0, help="per run (default 3 epochs)")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="1 epoch, a 30-epoch linear probe")
    parser.add_argument("--workdir", default="/tmp/selfsup_quality")
    parser.add_argument(
        "--no-supervised", action="store_true", help="random-init baseline only (budget sweeps)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OBJ.SECTION.KEY=VALUE",
        help="override one setting, e.g. swav.objective.num_prototypes=3000 or "
        "swav.backbone=vit (repeatable)",
    )
    args = parser.parse_args(argv)
    objectives = copy.deepcopy(OBJECTIVES)
    for item in args.set:
        path, _, value = item.partition("=")
        name, _, rest = path.partition(".")
        section, _, key = rest.partition(".")
        if rest == "backbone" and name in objectives:
            if not isinstance(objectives[name]["views"], dict) or value not in BACKBONES:
                parser.error(f"--set {item!r}: {name} has views for {backbone_choices(name)}")
            objectives[name]["backbone"] = value
            continue
        if not value or name not in objectives or section not in ("objective", "optim") or not key:
            parser.error(
                f"--set {item!r}: expected OBJ.objective.KEY=VALUE, OBJ.optim.KEY=VALUE "
                "or OBJ.backbone=NAME"
            )
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a bare string
        objectives[name][section][key] = value
    if not DATA.is_file():
        print(f"quality: {DATA} not found; this benchmark needs ../shared/data", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.objectives.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        parser.error(f"unknown objective {unknown[0]!r}; choose from {', '.join(OBJECTIVES)}")
    if "spark" in names and importlib.util.find_spec("selfsup.objectives.spark") is None:
        print("quality: selfsup/objectives/spark.py does not exist yet; skipping spark")
        names.remove("spark")
    images_seen = args.images_seen or TRAIN_IMAGES * (1 if args.quick else 3)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    record = dict(
        date=datetime.date.today().isoformat(),
        command=" ".join(["python", "benchmarks/quality.py", *(argv or sys.argv[1:])]),
        machine=f"{os.cpu_count()}-core {platform.machine()} CPU, jax {jax.__version__} "
        f"on {jax.devices()[0].platform}",
        data=str(DATA),
        batch_size=BATCH,
        images_seen=images_seen,
        quick=args.quick,
        backbones={},
        rows=[],
    )

    def save() -> None:  # after every run, so that an interrupted benchmark keeps its rows
        (workdir / "quality.json").write_text(json.dumps(record, indent=2) + "\n")

    baselines = {}
    for backbone in dict.fromkeys(objectives[n]["backbone"] for n in names):
        config = train_config(SUPERVISED, backbone, images_seen)
        rand = random_init(config, args.quick)
        if args.no_supervised:
            sup = dict(knn=float("nan"), linear=float("nan"), pretrain_seconds=0.0)
        else:
            sup = pretrain_and_eval(f"supervised_{backbone}", config, workdir, args.quick)
        baselines[backbone] = dict(
            random_knn=rand[0], random_linear=rand[1], sup_knn=sup["knn"], sup_linear=sup["linear"]
        )
        record["backbones"][backbone] = dict(
            config=BACKBONES[backbone], supervised_seconds=sup["pretrain_seconds"]
        )
        save()
        print(
            f"quality: {backbone}: random init k-NN {rand[0]:.3f} linear {rand[1]:.3f}; "
            f"supervised {sup['knn']:.3f} / {sup['linear']:.3f} ({sup['pretrain_seconds']:.0f} s)",
            flush=True,
        )
    for name in names:
        spec = objectives[name]
        config = train_config(spec, spec["backbone"], images_seen)
        row = pretrain_and_eval(name, config, workdir, args.quick)
        row = dict(
            objective=name,
            backbone=spec["backbone"],
            images_seen=images_seen,
            **row,
            **baselines[spec["backbone"]],
        )
        record["rows"].append(row)
        save()
        print(
            f"quality: {name}: k-NN {row['knn']:.3f} linear {row['linear']:.3f} "
            f"({row['pretrain_seconds']:.0f} s)",
            flush=True,
        )

    print_table(record["rows"])
    print(f"quality: wrote {workdir / 'quality.json'}")
    losing = [
        r["objective"]
        for r in record["rows"]
        if r["knn"] <= r["random_knn"] and r["linear"] <= r["random_linear"]
    ]
    if losing:
        print(f"quality: NOT above random init on either protocol: {', '.join(losing)}")
    return 1 if losing else 0


def backbone_choices(name: str) -> str:
    """The backbones objective `name` has views for, for --set's error."""
    views = OBJECTIVES[name]["views"]
    return ", ".join(views) if isinstance(views, dict) else OBJECTIVES[name]["backbone"] + " only"


def print_table(rows: list[dict]) -> None:
    """The Markdown table of BENCHMARKS.md (top-1 in %)."""
    head = (
        "objective",
        "backbone",
        "images seen",
        "pretrain",
        "k-NN",
        "linear",
        "random k-NN / linear",
        "supervised k-NN / linear",
    )
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = (
            r["objective"],
            r["backbone"],
            f"{r['images_seen']:,}",
            f"{r['pretrain_seconds'] / 60:.1f} min",
            f"{100 * r['knn']:.1f}",
            f"{100 * r['linear']:.1f}",
            f"{100 * r['random_knn']:.1f} / {100 * r['random_linear']:.1f}",
            f"{100 * r['sup_knn']:.1f} / {100 * r['sup_linear']:.1f}",
        )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
