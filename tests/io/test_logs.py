"""metrics.jsonl after a resume: one record per step."""

import json

from selfsup.io import logs


def test_records_after_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 7)]
    path.write_text("".join(lines) + '{"step": 7, "lo')  # the last one cut short by a kill
    logs.drop_records_after(str(tmp_path), 4)
    assert path.read_text() == "".join(lines[:4])
    writer = logs.Writer(str(tmp_path))
    for step in (5, 6):
        writer.scalars(step, {"loss": float(step)})
    writer.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    logs.drop_records_after(str(tmp_path), 6)  # nothing after step 6: the file is untouched
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    logs.drop_records_after(str(tmp_path / "no_such_dir"), 3)  # a new run: nothing to do
