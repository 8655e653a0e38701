"""The many-tasks benchmark (bench/multitask.py) run in-process on a tiny model and batch (the timings
themselves are not checked): every method and T is measured, the counts and memory are right."""

import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/multitask.py", "bench_multitask")


def test_quick_mode_is_a_small_run(bench, tmp_path):
    args = bench.parse_args(["--quick", "--output", str(tmp_path / "q.json")])
    assert (args.rows, args.seq, args.tasks, args.rounds) == (8, 16, [1, 2, 8], 1)
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "4", "--tasks", "8"])  # more tasks than rows


def test_the_quick_run_measures_every_method_and_task_count(bench, minilm_path, tmp_path, capsys):
    assert bench.main(["--quick", "--model", str(minilm_path), "--output", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    rows = results["tasks"]
    assert list(rows) == ["1", "2", "8"] and results["threads"] == 1
    for entry in rows.values():
        assert set(entry["median_s"]) == {"mixed", "switch", "lora", "base"}
        assert all(s > 0 for s in entry["median_s"].values())
        # LoRA at the rank whose count is nearest the delta's: within half a rank's worth
        assert abs(entry["lora_k"] - entry["k"]) < 0.5 * entry["lora_k"] / entry["lora_rank"]
    # memory grows with the tasks held: their entries (+ the form a mixed batch prepared from them:
    # T = 1 runs the task's merged model, T = 2 runs its rows merged, T = 8 corrects them), never a
    # weight copy per task
    per_task = {t: rows[t]["delta_bytes"] / int(t) for t in rows}
    assert per_task["1"] < per_task["2"] and per_task["1"] < per_task["8"]
    assert per_task["2"] == pytest.approx(per_task["8"], rel=0.25)
    weights = sum(m.weight.numel() * 4 for m in bench.adapted(bench.load_base(str(minilm_path))).values())
    assert max(per_task.values()) < 0.1 * weights  # 1% of the entries at about 24 bytes each, and the head
    out = capsys.readouterr().out
    assert "mixed/base" in out and "profile of one mixed batch at T = 8" in out
