"""What a run reads and writes: checkpoints (`checkpoint`, orbax, atomic, checksummed), logs
(`logs`: TensorBoard, metrics.jsonl, PNG), the workdir (`workdir`: creation, shared-disk and
full-disk checks) and paths that may be URLs (`paths`: gs://...).
"""
