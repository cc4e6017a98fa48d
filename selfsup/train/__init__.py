"""Training: the loop (`loop.train_and_evaluate`), the jitted step built from a config
(`step.build_program`), the state (`state.TrainState`), what the loop watches (`monitors`),
fine-tuning initialisation (`finetune`), a distilling objective's teacher (`teacher`), lowering
for other platforms (`lower`) and the CPU host's allocator setting (`host_memory`).

    python -m selfsup.train --config configs/quickstart.py --workdir /tmp/qs
"""
