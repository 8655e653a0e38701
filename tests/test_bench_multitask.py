"""The many-tasks benchmark (bench/multitask.py) run in-process on a tiny model and batch (the timings
themselves are not checked): every method and T is measured, the counts and memory are right."""

import importlib.util
import sys
from pathlib import Path

import pytest

from fixtures_cli import tiny_bert_fixture  # noqa: F401

BENCH = Path(__file__).resolve().parents[1] / "bench" / "multitask.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_multitask", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_quick_mode_is_a_small_run(bench, tmp_path):
    args = bench.parse_args(["--quick", "--output", str(tmp_path / "q.json")])
    assert (args.rows, args.seq, args.tasks, args.rounds) == (8, 16, [1, 2, 8], 1)
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "4", "--tasks", "8"])  # more tasks than rows


def test_every_method_and_task_count_is_measured(bench, tiny_bert, tmp_path, capsys):
    argv = ["--model", str(tiny_bert), "--rows", "4", "--seq", "8", "--tasks", "1", "2", "4", "--rounds", "1",
            "--repeats", "1", "--threads", "1", "--output", str(tmp_path / "r.json")]  # fmt: skip
    assert bench.main(argv) == 0
    import json

    results = json.loads((tmp_path / "r.json").read_text())
    rows = results["tasks"]
    assert list(rows) == ["1", "2", "4"]
    for entry in rows.values():
        assert set(entry["median_s"]) == {"mixed", "switch", "lora", "base"}
        assert all(s > 0 for s in entry["median_s"].values())
        # LoRA's rank is the one closest to the delta's count (tiny layers: rank 1 at least)
        assert entry["lora_k"] > 0 and entry["k"] > 0
    # memory grows with the tasks held: their entries (+ the correction cache once a mixed batch ran:
    # T = 1 runs the task's merged model), never a weight copy per task
    per_task = {t: rows[t]["delta_bytes"] / int(t) for t in rows}
    assert per_task["2"] == pytest.approx(per_task["4"], rel=0.05) and per_task["1"] < per_task["2"]
    model = bench.load_base(str(tiny_bert))
    weights = sum(m.weight.numel() * 4 for m in bench.adapted(model).values())
    assert per_task["4"] < 0.1 * weights  # 1% of the entries, at 24 bytes each, and the head
    out = capsys.readouterr().out
    assert "mixed/base" in out and "profile of one mixed batch at T = 4" in out
