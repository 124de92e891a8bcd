"""bench/preread.py in its tiny configuration: both epochs read every sample, the preread
one reports its read, and the rows record the device's read-ahead."""

from __future__ import annotations

import json

from bench import preread


def test_tiny_run(tmp_path):
    rows = preread.run(tiny=True, tmp_dir=tmp_path, out_dir=tmp_path, trials=2)
    configs = [json.loads(r["config"]) for r in rows]
    assert [c.get("cache", c["stage"]) for c in configs] == ["sequential", "cold", "cold-preread"] * 2
    assert all(c["tiny"] and c["dim"] == 32 and c["file_bytes"] > 0 and "read_ahead_kb" in c for c in configs)
    epochs = [r for r, c in zip(rows, configs) if c["stage"] == "epoch"]
    assert len({int(r["samples"]) for r in epochs}) == 1 and int(epochs[0]["samples"]) > 0
    for r, c in zip(rows, configs):
        if c.get("cache") == "cold-preread":
            assert 0 < float(r["preread_s"]) < float(r["seconds"])
        elif c.get("cache") == "cold":
            assert float(r["preread_s"]) < 0.01  # nothing read ahead of the epoch
    assert (tmp_path / "preread.csv").is_file() and "cold-preread" in preread.summary(rows)
