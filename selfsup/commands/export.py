"""`selfsup export`: a checkpoint's backbone as PyTorch weights (timm / torchvision layouts)."""

from __future__ import annotations

import sys

HELP = "export a checkpoint's backbone to PyTorch (safetensors + config.json)"


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", required=True, help="the training run's workdir")
    parser.add_argument("--out", required=True, help="directory for the exported files")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument(
        "--npz", action="store_true", help="also write model.npz (big_vision layout, ViT only)"
    )


def run(args, overrides: dict[str, str]) -> int:
    from selfsup import export
    from selfsup.errors import UserError

    if overrides:
        raise UserError(
            f"selfsup export takes no --config.* overrides, got --config.{next(iter(overrides))}"
        )
    record = export.export(args.workdir, args.out, args.step, npz=args.npz)
    files = ", ".join(record["files"].values())
    print(
        f"selfsup: exported step {record['source']['step']} to {args.out} ({files} + config.json): "
        f"{record['library']} {record['architecture']}, input {record['input_size']}",
        file=sys.stderr,
    )
    return 0
