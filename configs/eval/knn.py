"""Weighted k-NN classification (Wu et al. 2018; DINO's protocol) of a checkpoint's frozen
backbone: cosine similarity, k = 20 neighbours voting with weight exp(similarity / 0.07).

    selfsup eval --workdir /tmp/qs --config configs/eval/knn.py --random-init

Uses the pooled feature (the patch-token mean for the quickstart's ViT) on the checkpoint's
dataset (train split as the memory bank, test split reported) and writes top-1/top-5 to
/tmp/qs/eval/knn_step<N>.json. No training: the quickest check of a checkpoint. The result to
compare with is the same backbone at random initialisation, which `--random-init` measures.
Variants: `smoke` (256 + 128 images: seconds), `k=<int>`.
"""

import ml_collections as mlc

from selfsup.config import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, smoke=False, k=20)
    c = mlc.ConfigDict()
    c.name = "knn"
    c.features = "pooled"
    c.k = arg.k
    c.temperature = 0.07
    if arg.smoke:
        c.train_limit = 256
        c.test_limit = 128
        c.batch_size = 64
    return c
