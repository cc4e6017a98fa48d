"""MAE's visible-only encoder: does the saving show? Step-time ratio vs XLA's FLOP ratio.

The library's MAE train step at mask ratio 0.75 (the encoder sees 25% of the patches) and at 0
(it sees all of them; the decoder works on all patches in both), timed interleaved. The target
(issue 8): (t_all / t_masked) within 15% of (flops_all / flops_masked).

    python benchmarks/masking.py [--quick]
"""

from __future__ import annotations

import argparse

import common


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args(argv)
    steps = {}
    for ratio in (0.75, 0.0):
        config = common.small_config(
            "configs/mae_vit_in1k.py",
            image_size=112,
            batch_size=16,
            **{"objective.mask_ratio": ratio},
        )
        steps[ratio] = common.library_step(config)
        steps[ratio].run(1)
    times = common.interleave({r: s.run for r, s in steps.items()}, 3 if args.quick else 6)
    time_ratio = times[0.0] / times[0.75]
    flop_ratio = steps[0.0].flops / steps[0.75].flops
    row = {
        "model": "MAE ViT-B/16, 112 px, batch 16",
        "step_s_mask0.75": times[0.75],
        "step_s_all": times[0.0],
        "time_ratio": time_ratio,
        "flop_ratio": flop_ratio,
        "time/flop": time_ratio / flop_ratio,
        "load": common.load_average(),
    }
    print(common.table([row], tuple(row)))
    return row


if __name__ == "__main__":
    main()
