"""A server's memory for its deltas (bench/serve_memory.py's child, in a fresh process): loading 16
deltas grows the resident memory by a small multiple of the bytes the library holds for them, and
the library holds about 20 bytes per entry (int64 position, θ's value, the value, the merged cache)."""

import json
import os
import subprocess
import sys

from conftest import load_script


def test_loading_16_deltas_grows_rss_by_little_more_than_they_hold(tmp_path):
    bench = load_script("bench/serve_memory.py", "bench_serve_memory")
    base = bench.tiny_base(tmp_path / "base")
    files = bench.make_deltas(bench.base_model(base), tmp_path, 16, density=0.05)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, bench.__file__, "--model", base, "--child", *files]
    row = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
    assert row["n"] == 16 and row["entries"] > 3_000_000
    assert row["held"] > 40 * 2**20  # tens of MiB, well above the noise of a process's RSS
    assert row["held"] <= 20 * row["entries"]
    assert row["rss_after"] - row["rss_before"] < 3 * row["held"]
    # decoding in mixed batches builds each layer's table (12 bytes per entry): no per-step plans kept
    assert row["rss_serving"] - row["rss_before"] < 3 * row["held"]
