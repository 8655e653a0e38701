"""The SST-2 accuracy study (study/sst2.py) end to end on a tiny model and tiny files."""

import dataclasses
import json
import shutil

import pytest

from conftest import load_script
from fixtures_cli import make_rows, tiny_bert_fixture  # noqa: F401


@pytest.fixture(name="study")
def study_module():
    return load_script("study/sst2.py", "sst2_study")


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
    methods = study.CONFIGS["short"].methods
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert list(summary["methods"]) == list(methods)
    records = json.loads((tmp_path / "results" / "runs.json").read_text())
    for method, result in summary["methods"].items():
        by_lr = result["validation_by_lr"]
        assert len(by_lr) in (2, 3) and by_lr[f"{result['lr']:g}"] == max(by_lr.values())
        top = 4 * methods[method].lr  # widened to 8 × the centre exactly when 4 × beat 1 ×
        assert (len(by_lr) == 3) == (by_lr[f"{top:g}"] > by_lr[f"{top / 4:g}"])
        runs = [tmp_path / "work" / study.Run(method, result["lr"], s).name for s in (0, 1)]
        tests = [json.loads((r / "metrics.json").read_text())["test"]["accuracy"] for r in runs]
        assert result["test_accuracy"] == tests == [records[r.name]["test"]["accuracy"] for r in runs]
        assert result["mean"] == pytest.approx(sum(tests) / 2)
        assert result["stored_bytes"] == study.stored_bytes(runs[0]) > 0
    sparse = summary["methods"]["sara-1%"]
    assert sparse["delta_entries"] == summary["methods"]["random-1%"]["delta_entries"]
    assert sparse["stored_bytes"] < summary["methods"]["full"]["stored_bytes"]
    assert summary["methods"]["sora-r8"]["rank_max"] > 0 and len(summary["methods"]["sora-r16"]["ranks"]) == 2
    assert (tmp_path / "results" / "accuracy_vs_bytes.png").stat().st_size > 0
    assert "| sara-2% |" in (tmp_path / "results" / "table.md").read_text()


def test_the_realistic_configuration_ablations_share_their_parents_rate(study, tiny_bert, tiny_sst2, tmp_path):
    """Ablations run at their parent's picked rate; the records alone regenerate the report."""
    methods = ["sara-1%", "sara-1%-no-penalty", "sara-1%-no-reselection", "sara-1%-neither",
               "diff-pruning-0.5%-p30", "diff-pruning-0.5%-p50", "spiel-1%"]  # fmt: skip
    args = tiny_args(tiny_bert, tiny_sst2, tmp_path, "--config", "realistic", "--steps", "4", "--seeds", "0",
                     "--lr-multipliers", "0.5", "1", "--methods", *methods)  # fmt: skip
    assert study.main(args) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    config = study.CONFIGS["realistic"].methods
    for name in methods:
        parent = config[name].lr_from
        if parent:
            assert summary["methods"][name]["lr"] == summary["methods"][parent]["lr"]
            assert summary["methods"][name]["validation_by_lr"] == {}
    work = tmp_path / "work"
    sara = json.loads((work / study.Run("sara-1%", summary["methods"]["sara-1%"]["lr"], 0).name / "config.json").read_text())
    assert sara["method"]["config"]["reselect_step"] == 2 and sara["train"]["group_by_length"] is True
    p50 = json.loads((work / study.Run("diff-pruning-0.5%-p50", summary["methods"]["diff-pruning-0.5%-p50"]["lr"], 0).name
                      / "metrics.json").read_text())  # fmt: skip
    assert [e["step"] for e in p50["events"]] == [2]  # projection half-way
    # the projection as the loop logged it: density through phase 1, validation just before and after
    before = next(e for e in p50["evals"] if e.get("before_phase"))
    projected = summary["methods"]["diff-pruning-0.5%-p50"]["projection"][0]
    assert projected["step"] == 2 and projected["before"] == before["accuracy"]
    assert projected["after"] == next(e["accuracy"] for e in p50["evals"] if e["step"] == 2 and not e.get("before_phase"))
    assert [d[0] for d in projected["density"]] == [1, 2]  # the first, every 10th and the last step of phase 1
    assert all(0 < d[1] <= 1 for d in projected["density"])
    assert [e["step"] for e in summary["methods"]["diff-pruning-0.5%-p50"]["validation_curve"]] == [2, 4]  # once per step
    assert (tmp_path / "results" / "dp_density.png").stat().st_size > 0
    assert "projection" not in summary["methods"]["spiel-1%"]
    assert len(summary["methods"]["spiel-1%"]["validation_by_lr"]) >= 2  # SpIEL is tuned like SaRA and random
    assert [e["step"] for e in summary["methods"]["sara-1%"]["validation_curve"]] == [4]  # eval_every 250 > steps
    table = (tmp_path / "results" / "table.md").read_text()
    pairs = {(c["a"], c["b"]): c for c in summary["paired"]}
    dp = pairs[("diff-pruning-0.5%-p50", "diff-pruning-0.5%-p30")]
    assert dp["differences"] == [summary["methods"]["diff-pruning-0.5%-p50"]["test_accuracy"][0]
                                 - summary["methods"]["diff-pruning-0.5%-p30"]["test_accuracy"][0]]  # fmt: skip
    assert ("sara-1%", "full") not in pairs  # full was not studied here
    assert "| sara-1% − sara-1%-neither |" in table and "| spiel-1% − sara-1% |" in table
    assert "| diff-pruning-0.5%-p50, seed 0 | 2 |" in table
    shutil.rmtree(work)  # the committed records are enough for the report
    (tmp_path / "results" / "table.md").unlink()
    assert study.main([*args, "--report-only"]) == 0
    assert (tmp_path / "results" / "table.md").read_text() == table


def test_a_study_cut_short_in_stage_2_reports_the_seeds_each_method_has(study, tiny_bert, tiny_sst2, tmp_path, monkeypatch):
    realistic = dataclasses.replace(study.CONFIGS["realistic"], eval_every=1, curves=("sara-1%",))
    monkeypatch.setitem(study.CONFIGS, "realistic", realistic)  # a validation curve of two points
    args = tiny_args(tiny_bert, tiny_sst2, tmp_path, "--config", "realistic", "--methods", "sara-1%", "random-1%",
                     "--seeds", "0", "1", "--lr-multipliers", "1")  # fmt: skip
    assert study.main(args) == 0
    records_path = tmp_path / "results" / "runs.json"
    records = json.loads(records_path.read_text())
    lost = study.Run("random-1%", study.CONFIGS["realistic"].methods["random-1%"].lr, 1).name
    del records[lost]  # as if the study stopped before random-1%'s second seed
    records_path.write_text(json.dumps(records))
    shutil.rmtree(tmp_path / "work")
    assert study.main([*args, "--report-only"]) == 0
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    sara, rand = summary["methods"]["sara-1%"], summary["methods"]["random-1%"]
    assert sara["seeds"] == [0, 1] and rand["seeds"] == [0] and rand["std"] == 0.0
    assert rand["test_accuracy"] == [records[lost.replace("seed1", "seed0")]["test"]["accuracy"]]
    (pair,) = summary["paired"]
    assert pair["seeds"] == [0] and pair["differences"] == [sara["test_accuracy"][0] - rand["test_accuracy"][0]]
    assert [e["step"] for e in sara["validation_curve"]] == [1, 2]
    assert study.curves_plot(summary, tmp_path / "curves.png", realistic.curves) == ["sara-1%"]
    assert (tmp_path / "results" / "accuracy_vs_steps.png").stat().st_size > 0
    table = (tmp_path / "results" / "table.md").read_text()
    assert "± 0.0000 (seed 0 only) |" in table and table.count("(seed 0 only) |") == 2  # the row and the pair
    first = study.Run("random-1%", study.CONFIGS["realistic"].methods["random-1%"].lr, 0).name
    del records[first]  # without a first-seed run there is no study to report
    records_path.write_text(json.dumps(records))
    assert study.main([*args, "--report-only"]) == 2


def test_the_table_says_when_a_reselection_froze_entries(study):
    row = {"mean": 0.9, "std": 0.0, "seeds": [0], "stored_bytes": 10, "lr": 4e-3, "validation_by_lr": {"0.004": 0.9}}
    summary = {"settings": {"seeds": [0]}, "methods": {
        "sara-1%": {**row, "trainable": 1_645, "delta_entries": 107_643},  # most entries left the mask
        "sara-1%-neither": {**row, "trainable": 108_413, "delta_entries": 107_643},  # + a dense head
    }}  # fmt: skip
    table = study.table(summary)
    assert "| sara-1% | 0.9000 ± 0.0000 | 107,643 + head, 1,645 after re-selection | 10 |" in table
    assert "| sara-1%-neither | 0.9000 ± 0.0000 | 108,413 | 10 |" in table


def test_an_ablation_needs_its_parent(study, tmp_path, capsys):
    with pytest.raises(SystemExit):
        study.main(["--config", "realistic", "--methods", "sara-1%-neither", "--results", str(tmp_path)])
    assert "takes the rate of sara-1%" in capsys.readouterr().err


def test_an_interrupted_study_reruns_only_what_is_missing(study, tiny_bert, tiny_sst2, tmp_path):
    args = tiny_args(tiny_bert, tiny_sst2, tmp_path, "--methods", "sara-1%", "random-1%", "--seeds", "0",
                     "--lr-multipliers", "1")  # fmt: skip
    assert study.main(args) == 0
    work = tmp_path / "work"
    kept, lost = (work / study.Run(m, study.CONFIGS["short"].methods[m].lr, 0).name for m in ("sara-1%", "random-1%"))
    before = (kept / "metrics.json").stat().st_mtime_ns
    (lost / "metrics.json").unlink()  # as if killed before the end: no metrics, no record
    records = tmp_path / "results" / "runs.json"
    records.write_text(json.dumps({k: v for k, v in json.loads(records.read_text()).items() if k != lost.name}))
    assert study.main([*args, "--report-only"]) == 2  # unfinished: no report
    assert study.main([*args, "--workers", "2"]) == 0  # the subprocess path
    assert (kept / "metrics.json").stat().st_mtime_ns == before
    assert study.finished(lost) is not None


def test_missing_data_is_a_clear_error(study, tmp_path, capsys):
    assert study.main(["--data", str(tmp_path)]) == 2
    assert "lacks train.tsv" in capsys.readouterr().err
