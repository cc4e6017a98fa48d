"""Quickstart: SimCLR on a small ViT, on the built-in `shapes` dataset, on a laptop CPU.

    selfsup train --config configs/quickstart.py --workdir /tmp/qs

500 steps of batch 128 (two views each), then the evaluation: 3 min 13 s wall on 2 idle CPU
cores (5.0 CPU-minutes, 2026-12-07). The NT-Xent loss falls from
~7.0 to ~4.8 (its contrastive accuracy, `contrast_acc`, rises); follow it with
`tensorboard --logdir /tmp/qs`. Interrupt it
with Ctrl-C and run the same command to resume. At the end it prints the k-NN and linear-probe
top-1 on the test split (fixed subsets: 1000 training, 500 test images) beside the same backbone
at random initialisation, and logs them as eval/<evaluator>/... and random_init/<evaluator>/...
in metrics.jsonl and TensorBoard. Measured (deterministic on a CPU): k-NN 21.2% against 8.4% at
random initialisation, linear probe 31.8% against 19.8% (chance is 10%); loss 4.94 at the end.

Why SimCLR and not MAE (the quickstart until 2026-12-07): after the same time MAE's features
stayed near random ones for k-NN (the token average 11.6% against 11.2%; linear probe 30.2%
against 14.6%), and no block, cls token or standardisation gave more than 15.4% (random: 10.4%):
in `shapes` colour carries no label, and pixel reconstruction keeps the colours. SimCLR's
colour distortion (hue shifted over the whole circle, grayscale half the time) and crops make
colour and position useless for telling images apart, so the features it learns are the shapes
and textures that the classes are. The ViT is narrower (width 96, 3 heads; ViT-Ti is 192) so
that 500 steps of two views fit the time; it pools the mean of its patch tokens (no cls token),
which is what the loss trains and what both evaluations read (`features="pooled"`), at random
initialisation too.
Views: RandomResizedCrop (scale 0.25-1) at 32 px, flip, colour jitter at SimCLR's strength 1
(0.8, 0.8, 0.8) with hue 0.5, grayscale p=0.5; temperature 0.2 (SimCLR's CIFAR-10 setting
for small batches); AdamW at 2e-3 (not scaled with the batch), 50 warmup steps, cosine.
Variant `smoke` runs a few steps of MAE on a tinier ViT in seconds (no evaluation): the loop's
quickest end-to-end check, used by the tests.
"""

import ml_collections as mlc

from selfsup.config import parse_arg

VIEW = (
    "rrc(32, scale=(0.25, 1.0))|flip|color_jitter(0.8, 0.8, 0.8, 0.5, p=0.8)|grayscale(0.5)"
    "|normalize('imagenet')"
)


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = mlc.ConfigDict()
    c.seed = 0
    c.batch_size = 128
    c.total_steps = 500
    c.log_every_steps = 10
    c.checkpoint_every_steps = 250
    c.data = dict(source="builtin", name="shapes", image_size=32)
    c.views = (VIEW, VIEW)
    c.backbone = dict(
        name="vit", variant="Ti/4", depth=4, width=96, num_heads=3, cls_token=False, pool="gap"
    )
    c.objective = dict(name="simclr", temperature=0.2, proj_layers=2, proj_dim=128)
    c.optim = dict(
        name="adamw", base_lr=2e-3, lr_batch_divisor=0, warmup_steps=50, weight_decay=0.05
    )
    # At the end: k-NN and linear probe on fixed subsets of the train / test splits, beside the
    # same backbone at random initialisation, on the pooled feature (the patch-token mean).
    subset = dict(features="pooled", train_limit=1000, test_limit=500, batch_size=250)
    c.evaluators = dict(
        every_steps=0,
        at_end=True,
        random_init=True,
        run=(dict(name="knn", **subset), dict(name="linear_probe", **subset)),
    )
    if arg.smoke:
        c.evaluators = dict(run=())
        c.batch_size = 16
        c.total_steps = 4
        c.log_every_steps = 1
        c.checkpoint_every_steps = 2
        c.image_every_steps = 0
        c.views = ("rrc(32, scale=(0.35, 1.0))|flip|normalize('imagenet')",)
        c.backbone = dict(name="vit", variant="Ti/8", depth=2, width=64, num_heads=2)
        c.objective = dict(name="mae", decoder_width=32, decoder_depth=1, decoder_heads=2)
        c.optim = dict(base_lr=1.5e-4 * 8, warmup_steps=1, weight_decay=0.05)
    return c
