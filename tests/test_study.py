"""The SST-2 accuracy study (study/sst2.py) end to end on a tiny model and tiny files."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fixtures_cli import make_rows, tiny_bert_fixture  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "study" / "sst2.py"


@pytest.fixture(name="study")
def study_module():
    spec = importlib.util.spec_from_file_location("sst2_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def write_tsv(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{r['text']}\t{r['label']}\n" for r in rows))


@pytest.fixture(name="tiny_sst2")
def tiny_sst2_fixture(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    for role, seed in (("train", 0), ("validation", 1), ("test", 2)):
        write_tsv(folder / f"{role}.tsv", make_rows(n_per_label=6, seed=seed))
    return folder


def tiny_args(tiny_bert, data, tmp_path, *extra):
    return ["--data", str(data), "--model", str(tiny_bert), "--work-dir", str(tmp_path / "work"),
            "--results", str(tmp_path / "results"), "--steps", "2", "--batch-size", "4", "--max-length", "16",
            "--validation-samples", "8", "--workers", "1", *extra]  # fmt: skip


def test_every_method_runs_and_the_report_picks_the_best_validation_lr(study, tiny_bert, tiny_sst2, tmp_path):
    args = tiny_args(tiny_bert, tiny_sst2, tmp_path, "--seeds", "0", "1", "--lr-multipliers", "1", "4")
    assert study.main(args) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert set(summary["methods"]) == set(study.METHODS)
    for method, result in summary["methods"].items():
        by_lr = result["validation_by_lr"]
        assert len(by_lr) in (2, 3) and by_lr[f"{result['lr']:g}"] == max(by_lr.values())
        top = 4 * study.METHODS[method][1]  # widened to 8 × the centre exactly when 4 × beat 1 ×
        assert (len(by_lr) == 3) == (by_lr[f"{top:g}"] > by_lr[f"{top / 4:g}"])
        runs = [tmp_path / "work" / study.Run(method, result["lr"], s).name for s in (0, 1)]
        tests = [json.loads((r / "metrics.json").read_text())["test"]["accuracy"] for r in runs]
        assert result["test_accuracy"] == tests
        assert result["mean"] == pytest.approx(sum(tests) / 2)
        assert result["stored_bytes"] == study.stored_bytes(runs[0]) > 0
    sparse = summary["methods"]["sara-1%"]
    assert sparse["delta_entries"] == summary["methods"]["random-1%"]["delta_entries"]
    assert sparse["stored_bytes"] < summary["methods"]["full"]["stored_bytes"]
    assert (tmp_path / "results" / "accuracy_vs_bytes.png").stat().st_size > 0
    assert "| sara-2% |" in (tmp_path / "results" / "table.md").read_text()


def test_an_interrupted_study_reruns_only_what_is_missing(study, tiny_bert, tiny_sst2, tmp_path):
    args = tiny_args(tiny_bert, tiny_sst2, tmp_path, "--methods", "sara-1%", "random-1%", "--seeds", "0",
                     "--lr-multipliers", "1")  # fmt: skip
    assert study.main(args) == 0
    work = tmp_path / "work"
    kept, lost = (work / study.Run(m, study.METHODS[m][1], 0).name for m in ("sara-1%", "random-1%"))
    before = (kept / "metrics.json").stat().st_mtime_ns
    (lost / "metrics.json").unlink()  # as if killed before the end
    assert study.main([*args, "--report-only"]) == 2  # unfinished: no report
    assert study.main([*args, "--workers", "2"]) == 0  # the subprocess path
    assert (kept / "metrics.json").stat().st_mtime_ns == before
    assert study.finished(lost) is not None


def test_missing_data_is_a_clear_error(study, tmp_path, capsys):
    assert study.main(["--data", str(tmp_path)]) == 2
    assert "lacks train.tsv" in capsys.readouterr().err
