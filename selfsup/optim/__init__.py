"""Optax chains from `config.optim`: schedule, batch-size LR scaling, and parameter masks.

Parameter subsets are addressed by regexes over '/'-joined key paths
("backbone/blocks_0/attn/qkv/kernel"), matched with `re.fullmatch`, first match winning:
`no_decay` (no weight decay), `frozen` (zero updates, no optimiser state, outside the clipping
norm), `lr_mults` (per-parameter LR multipliers) and `lars_exclude` (no trust-ratio adaptation in
LARS and LAMB; None: the `no_decay` regexes). The chain for trainable parameters is
clip-by-global-norm -> optimiser (its LR from the schedule) -> LR multipliers.

An optimiser is one function `(cfg, Hyper) -> GradientTransformation` in `OPTIMIZERS`:

- `adamw`: decoupled weight decay (optax.adamw, as torch.optim.AdamW).
- `sgd`: momentum SGD with L2 decay added to the gradient (torch.optim.SGD).
- `lars_simclr`: LARS as SimCLR's TF implementation (You et al. 2017; Chen et al. 2020), the LR
  inside the momentum: v = m v + lr * trust * (g + wd w); w -= v.
- `lars`: LARS as Barlow Twins' and BYOL's implementations, the LR after the momentum:
  v = m v + trust * (g + wd w); w -= lr * v.
  Both: trust = eta ||w|| / ||g + wd w|| per parameter array (1 where a norm is 0), eta =
  `trust_coefficient` (1e-3). The variants differ while the LR changes (warmup, cosine).
  Barlow Twins' separate bias/BN LR (0.0048 vs 0.2 x batch/256) is
  `lr_mults=((r".*/bias$", 0.024), (r".*/scale$", 0.024))` with `base_lr=0.2`.
- `lamb`: LAMB (You et al. 2020) as timm's Lamb, which SparK uses: u = Adam's bias-corrected
  step + wd w, scaled by ||w|| / ||u|| per parameter array (1 where a norm is 0) except for the
  `lars_exclude` parameters (timm adapts only its weight-decayed group); w -= lr * that.

`frozen_until` is a list of (regex, steps): those parameters are frozen for the first `steps`
steps, then train (SwAV's prototypes, frozen for the first epoch). While held, they get no update,
their optimiser state does not change (as a PyTorch parameter whose .grad is None), and they are
left out of the clipping norm; integer counters (the LR schedule's) advance, so the LR is the
global schedule's (for Adam, the bias correction also counts from step 0: a deviation from
PyTorch's per-parameter step count).

`layer_decay` (0: off) multiplies each parameter's learning rate by decay^(L - layer id), BEiT /
MAE's layer-wise decay over the layers the backbone declares (`build(..., backbone=)`), after the
`lr_mults` (see `selfsup.train.finetune.layer_decay_multipliers`).
As in PyTorch, where it scales a parameter group's lr, it scales AdamW's decoupled weight decay too.

`weight_decay_end` (None: constant) makes the weight decay a cosine from `weight_decay` at step 0
to `weight_decay_end` at the last step, for every optimiser (SparK: 0.04 -> 0.2, DINO-style).

Modules: `schedules` (the learning rate), `optimizers` (one function each), `transforms` (path
labels, multipliers, layer-wise decay, holds), `build` (the chain from `config.optim`).
"""

from selfsup.optim.build import build
from selfsup.optim.schedules import make_schedule, scaled_lr
from selfsup.optim.transforms import path_labels

__all__ = ["build", "make_schedule", "path_labels", "scaled_lr"]
