"""What a run reads and writes: checkpoints (`checkpoint`, orbax, atomic; `checksums` of every
array, checked on every restore), logs (`logs`: TensorBoard, metrics.jsonl, PNG), the workdir
(`workdir`: creation, shared-disk and full-disk checks) and paths that may be URLs (`paths`:
gs://...).
"""
