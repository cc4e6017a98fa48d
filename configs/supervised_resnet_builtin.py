"""Supervised training of ResNet-18 on the built-in `shapes` dataset (the ResNet baseline of the
quality benchmark, and a template for ResNet fine-tuning configs).

    selfsup train --config configs/supervised_resnet_builtin.py --workdir /tmp/sup_resnet

SGD with momentum 0.9 at lr = 0.1 x batch / 256 (Goyal et al. 2017), 40 warmup steps then
cosine, weight decay 1e-4 on conv and linear kernels (BN parameters and biases exempt),
BatchNorm momentum 0.9 (PyTorch's 0.1), each block's last BN scale zero-initialised. Train
accuracy (logged as `accuracy`) RESULT_PLACEHOLDER. Variant `smoke` runs 3 steps in seconds.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False)
    c = mlc.ConfigDict()
    c.batch_size = 128
    c.total_steps = 400
    c.log_every_steps = 10
    c.checkpoint_every_steps = 200
    c.data = dict(source="builtin", name="shapes", image_size=32)
    c.views = ("rrc(32, scale=(0.35, 1.0))|flip|normalize('imagenet')",)
    c.backbone = dict(name="resnet", variant="18", zero_init_last_bn=True)
    c.objective = dict(name="supervised", label_smoothing=0.1)
    c.optim = dict(base_lr=2e-3, lr_batch_divisor=256, warmup_steps=40, weight_decay=0.05)
    if arg.smoke:
        c.batch_size = 16
        c.total_steps = 3
        c.log_every_steps = 1
        c.optim.warmup_steps = 1
        # Every residual branch live from step 0, so the export tests see all layers at work.
        c.backbone.zero_init_last_bn = False
    return c
