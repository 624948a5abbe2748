"""JSONL sinks: rows survive a torn last line and bytes that are not UTF-8 (readers skip them, a resumed run
drops them and says how many)."""

import json

from flowtrain.sinks.jsonl import JsonlSink, read_jsonl


def _write(path, *rows, tail=b""):
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + tail)


def test_readers_skip_unreadable_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, {"step": 1}, {"step": 2}, tail=b'\xff\xfe\x00 not text\n[1, 2]\n{"step": "x"}\n{"step": 3}\n{"st')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]


def test_truncation_keeps_the_history_up_to_a_step_and_counts_what_it_could_not_read(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, {"step": 1}, {"step": 2}, tail=b"\xff garbage\n" + b'{"step": 3}\n{"step": 4}\n{"step": 5, "lo')
    assert JsonlSink.truncate_after(path, 3) == 1  # the torn last line is what a kill leaves: not counted
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    before = path.stat().st_mtime_ns
    assert JsonlSink.truncate_after(path, 3) == 0 and path.stat().st_mtime_ns == before  # nothing to drop
    evals = tmp_path / "eval.jsonl"
    _write(evals, {"step": 3, "val_loss": 2.0}, {"step": 3, "val_loss_full": 2.1})
    JsonlSink.truncate_after(evals, 3, lambda r: "val_loss_full" in r)
    assert read_jsonl(evals) == [{"step": 3, "val_loss": 2.0}]


def test_a_sink_flushes_to_disk_on_request(tmp_path):
    sink = JsonlSink(tmp_path / "metrics.jsonl", flush_every=50)
    sink.write(1, {"loss": float("nan")})
    sink.flush()  # what the loop does before every checkpoint
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": "nan"}]
    sink.close()
