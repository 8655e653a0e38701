"""The Diff Pruning projection study (study/dp_projection.py) on a tiny model: every run logs phase 1's
expected density and validates before and after the projection; the table and the plot come out."""

import json

from conftest import load_script
from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401


def test_the_study_runs_and_reports(tiny_bert, topic_files, tmp_path):
    study = load_script("study/dp_projection.py", "dp_projection_study")
    args = ["--penalties", "1.25e-7", "1e-3", "--work-dir", str(tmp_path / "work"), "--results", str(tmp_path / "results"),
            "--train-flags", "--model", str(tiny_bert), "--train-file", str(topic_files["train"]),
            "--validation-file", str(topic_files["validation"]), "--test-file", str(topic_files["test"]),
            "--max-steps", "10", "--max-length", "16", "--batch-size", "8", "--threads", "1"]  # fmt: skip
    assert study.main(args) == 0
    records = json.loads((tmp_path / "results" / "dp_projection.json").read_text())
    assert [r["l0_penalty"] for r in records] == [1.25e-7, 1e-3]
    for r in records:
        assert r["projection_step"] == 3 and [s for s, _ in r["density"]] == [1, 2, 3]
        assert all(0 <= v <= 1 for v in (r["accuracy_before"], r["accuracy_after"], r["test"]))
    paper, strong = (r["density"][-1][1] for r in records)
    assert strong < paper  # a larger λ thins the diff faster
    assert (tmp_path / "results" / "dp_projection.png").stat().st_size > 10_000
    assert study.main([*args[:7], "--report-only"]) == 0  # from the kept runs, nothing retrained
