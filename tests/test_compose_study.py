"""The composition study (study/compose_bbc.py) end to end on a tiny model and tiny files: two runs on
skewed halves, four compositions, one predict call, the table; and resuming after a lost step."""

import json

import pytest

from conftest import load_script
from fixtures_cli import make_rows, tiny_bert_fixture, write_csv  # noqa: F401


@pytest.fixture(name="study")
def study_module():
    return load_script("study/compose_bbc.py", "compose_study")


def test_the_study_runs_resumes_and_reports(study, tiny_bert, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for role, n, seed in (("train", 16, 0), ("validation", 4, 1), ("test", 4, 2)):
        write_csv(data / f"{role}.csv", make_rows(n, seed=seed))
    args = ["--data", str(data), "--group-a", "sport", "money", "--model", str(tiny_bert), "--seeds", "0",
            "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
            "--train-flags", "--max-steps", "2", "--max-length", "16", "--batch-size", "8"]  # fmt: skip
    assert study.main(args) == 0
    summary = json.loads((tmp_path / "results" / "compose_bbc.json").read_text())
    assert list(summary["mean"]) == ["A", "B", "sum", "mean", "ties", "dare"]
    for scores in summary["per_seed"]["0"].values():
        assert set(scores) == {"test_A", "test_B", "all"} and all(0 <= v <= 1 for v in scores.values())
    seed = tmp_path / "work" / "seed0"
    half_a = [r for r in open(tmp_path / "work" / "data" / "train-A-seed0.csv").read().splitlines()[1:]]
    assert sum(r.endswith(",tech") for r in half_a) == round(0.1 * 16)  # the minority share of the other group
    lines = (seed / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 12  # every test row once per model, in one predict call
    assert "| ties |" in (tmp_path / "results" / "compose_bbc.md").read_text()

    kept = (seed / "A" / "metrics.json").stat().st_mtime_ns
    (seed / "predictions.jsonl").unlink()
    (seed / "ties" / "delta.safetensors").unlink()
    assert study.main([*args[:-7], "--report-only"]) == 2  # unfinished: no report
    assert study.main(args) == 0
    assert (seed / "A" / "metrics.json").stat().st_mtime_ns == kept  # the runs were not trained again
    assert len((seed / "predictions.jsonl").read_text().splitlines()) == 72
