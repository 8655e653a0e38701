"""The command line: the default pipeline end to end, every method, eval/inspect/merge, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsedelta as sd
from conftest import SHARED_DATA
from fixtures_cli import make_rows, tiny_bert_fixture, topic_files_fixture, write_csv  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.core.io import read
from sparsedelta.methods import method_names, runner_class

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*args, env=None, timeout=300):
    """`python -m sparsedelta ...` in a fresh process, importing this checkout."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sparsedelta", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout
    )


def tiny_args(tiny_bert, files, out, *extra):
    return [str(a) for a in [
        "train", "--model", tiny_bert, "--train-file", files["train"], "--validation-file", files["validation"],
        "--test-file", files["test"], "--max-length", 16, "--batch-size", 8, "--output-dir", out, "--no-progress",
        *extra,
    ]]  # fmt: skip


def cli_error(capsys, *args) -> str:
    """Run the CLI in this process; it must fail with status 2 and a one-line message, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.startswith("sparsedelta ") and err.count("\n") == 1, err
    return err


# -- the default pipeline, shortened -----------------------------------------------------------------
@pytest.fixture(scope="module")
def default_run(tmp_path_factory, minilm_path):
    """The no-argument run (MiniLM-L6 + BBC News + SaRA) cut to a few steps on a small slice."""
    out = tmp_path_factory.mktemp("default") / "run"
    args = ["train", "--max-train-samples", 32, "--max-eval-samples", 20, "--max-steps", 4, "--max-length", 32,
            "--batch-size", 8, "--eval-every", 2, "--output-dir", out]  # fmt: skip
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_default_pipeline_end_to_end(default_run, minilm_path):
    out, result = default_run
    lines = result.stdout
    for needle in ("test accuracy:", "trainable:", "delta entries", "wall time:", "peak memory:", f"run folder: {out}"):
        assert needle in lines
    assert "step/s" in result.stderr or "s/step" in result.stderr  # the progress bar
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "metrics.json", "delta.safetensors", "delta_config.json", "training.png", "density.png"} <= names
    assert "checkpoint.pt" not in names
    for png in ("training.png", "density.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((out / "config.json").read_text())
    assert config["labels"] == ["business", "entertainment", "politics", "sports", "tech"]
    assert config["method"]["config"]["method"] == "sara" and config["method"]["config"]["threshold"] == 1e-3
    assert config["head_modules"] == ["classifier"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["step"] for s in metrics["steps"]] == [1, 2, 3, 4]
    assert all(s["extra_loss"] > 0 for s in metrics["steps"])  # the nuclear-norm term was in the loss
    assert [e["step"] for e in metrics["evals"]] == [2, 4]
    assert metrics["test"]["examples"] == 20 and 0 <= metrics["test"]["accuracy"] <= 1
    assert metrics["memory"]["peak_rss_mib"][0] > 100 and metrics["timings"]["train_s"] > 0
    printed = float(lines.split("test accuracy: ")[1].split()[0])
    assert printed == pytest.approx(metrics["test"]["accuracy"], abs=1e-4)

    # the delta is the core format: it loads onto a fresh base and holds exactly the SaRA positions
    meta, tensors = read(out)
    assert meta["config"]["method"] == "sara"
    budget = metrics["budget"]
    assert sum(len(v) for k, v in tensors.items() if k.endswith(".values")) == budget["selected"]
    assert budget["density"] == pytest.approx(budget["selected"] / budget["eligible"])
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5)
    for name, p in base.named_parameters():
        key = f"{name}.indices"
        if key in tensors:
            assert bool((p.detach().reshape(-1)[tensors[key].long()].abs() < 1e-3).all()), name


def test_eval_reproduces_the_test_accuracy_and_reads_other_files(default_run, tmp_path, capsys):
    out, _ = default_run
    metrics = json.loads((out / "metrics.json").read_text())
    threads = torch.get_num_threads()
    try:
        assert main(["eval", str(out), "--json", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(metrics["test"]["accuracy"], abs=1e-9)
    rows = [{"text": "shares in the bank fell as profits dropped", "topic": "business"},
            {"text": "the striker scored twice in the cup final", "topic": "sports"}]  # fmt: skip
    custom = ["eval", out, "--test-file", write_csv(tmp_path / "t.csv", rows), "--label-column", "topic", "--json"]
    assert main([str(a) for a in custom]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 2


def test_inspect_and_merge(default_run, tmp_path, minilm_path, capsys):
    out, _ = default_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert main(["inspect", str(out), "--png", str(tmp_path / "d.png"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["entries"] == metrics["budget"]["selected"]
    assert summary["file_bytes"] == (out / "delta.safetensors").stat().st_size
    assert len(summary["content_sha256"]) == 64 and summary["dense_entries"] == 5 * 384 + 5
    assert all(0 < t["density"] < 0.1 for t in summary["tensors"].values())
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"

    merged_dir = tmp_path / "merged"
    assert main(["merge", str(out), "--output", str(merged_dir)]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    with_delta = sd.load(AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5), out).eval()
    batch = AutoTokenizer.from_pretrained(merged_dir)(["the economy grew", "a new film opened"], return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, with_delta(**batch).logits)
    assert merged.config.id2label[3] == "sports"


# -- methods ---------------------------------------------------------------------------------------
def test_baselines_match_saras_budget_and_full_and_lora_write_their_products(tiny_bert, topic_files, tmp_path, capsys):
    counts = {}
    for method in ("sara", "random", "magnitude"):
        assert main(tiny_args(tiny_bert, topic_files, tmp_path / method, "--method", method, "--max-steps", 2)) == 0
        counts[method] = json.loads((tmp_path / method / "metrics.json").read_text())["budget"]["selected"]
    assert counts["sara"] == counts["random"] == counts["magnitude"] > 0
    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "rand2", "--method", "random", "--density", 0.02,
                          "--max-steps", 1)) == 0  # fmt: skip
    budget = json.loads((tmp_path / "rand2" / "metrics.json").read_text())["budget"]
    assert budget["selected"] == round(0.02 * budget["eligible"])

    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "full", "--method", "full", "--max-steps", 2)) == 0
    assert (tmp_path / "full" / "model" / "config.json").exists()
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())["budget"]
    assert full["trainable"] == full["total"]
    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "lora", "--method", "lora", "--max-steps", 2,
                          "--option", "r=4", "--target-modules", "query", "value")) == 0  # fmt: skip
    assert (tmp_path / "lora" / "adapter" / "adapter_config.json").exists()
    lora = json.loads((tmp_path / "lora" / "metrics.json").read_text())["budget"]
    assert 0 < lora["trainable"] < lora["total"]
    capsys.readouterr()
    for run in ("full", "lora"):  # eval rebuilds the trained model from the run folder alone
        assert main(["eval", str(tmp_path / run), "--json"]) == 0
        test = json.loads((tmp_path / run / "metrics.json").read_text())["test"]
        assert json.loads(capsys.readouterr().out) == pytest.approx(test)
    # a merged LoRA run is an ordinary model with the same test metrics
    assert main(["merge", str(tmp_path / "lora"), "--output", str(tmp_path / "lora-merged")]) == 0
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sparsedelta.data.batches import encode
    from sparsedelta.data.tables import load_labelled_file
    from sparsedelta.train.tasks.classification import evaluate_classifier

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lora-merged")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "lora-merged")
    labels = json.loads((tmp_path / "lora" / "config.json").read_text())["labels"]
    encoded = encode(tokenizer, load_labelled_file(topic_files["test"], labels, None, None), max_length=16)
    test = json.loads((tmp_path / "lora" / "metrics.json").read_text())["test"]
    assert evaluate_classifier(merged, encoded, tokenizer, len(labels), 64) == pytest.approx(test)


@pytest.mark.parametrize("rule", ["absolute", "relative"])
def test_sara_options_reach_the_config(tiny_bert, topic_files, tmp_path, rule):
    args = ["--density", 0.05, "--option", "rank_penalty=0", "--option", "reselect_step=2", "--max-steps", 3,
            "--option", f"reselect_rule={rule}"]  # fmt: skip
    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "r", *args)) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())["method"]["config"]
    assert config["rank_penalty"] == 0 and config["reselect_step"] == 2 and config["density"] == 0.05
    assert config["reselect_rule"] == rule
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert [e["step"] for e in metrics["events"]] == [2] and "re-selection" in metrics["events"][0]["event"]
    assert ("smallest of its tensor" in metrics["events"][0]["event"]) == (rule == "relative")
    assert "extra_loss" not in metrics["steps"][0]


@pytest.mark.parametrize("structured", [False, True])
def test_diff_pruning_runs_both_phases_and_saves_the_projected_delta(tiny_bert, topic_files, tmp_path, capsys, structured):
    out = tmp_path / "dp"
    extra = ["--method", "diff-pruning", "--density", 0.01, "--max-steps", 6, "--eval-every", 6]
    assert main(tiny_args(tiny_bert, topic_files, out, *extra, *(["--structured"] if structured else []))) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["events"]] == [2] and "Diff Pruning" in metrics["events"][0]["event"]
    assert "extra_loss" in metrics["steps"][0] and "extra_loss" not in metrics["steps"][-1]
    densities = [s.get("expected_density") for s in metrics["steps"]]
    assert all(0 < d <= 1 for d in densities[:2]) and densities[2:] == [None] * 4  # logged in phase 1 only
    before, after = (e for e in metrics["evals"] if e["step"] == 2)  # validated just before and after the projection
    assert before["before_phase"] and "before_phase" not in after and {"accuracy"} <= set(before) & set(after)
    # phase 1 for 30% of the steps, then phase 2 on a schedule of its own at 5 × w's learning rate
    # (2 + 4 steps, no warm-up at this length, cosine decay in each)
    runner = runner_class("diff-pruning")
    lr = runner.lrs["default"]
    phase2 = [runner.phase2_lr_factor * lr * 0.5 * (1 + math.cos(math.pi * i / 4)) for i in range(4)]
    assert [s["lr"] for s in metrics["steps"]] == pytest.approx([lr, lr / 2, *phase2])
    meta, tensors = read(out)
    assert meta["config"]["method"] == "diff-pruning" and meta["config"]["structured"] is structured
    selected = sum(f["entries"] for f in meta["fingerprint"].values())
    assert selected == metrics["budget"]["selected"] == round(0.01 * metrics["budget"]["eligible"])
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0  # the saved delta reproduces the run's test metrics
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics["test"])


def test_sst2_files_train(tiny_bert, tmp_path):
    folder = SHARED_DATA / "sst2"
    if not (folder / "train.tsv").exists():
        pytest.skip(f"SST-2 not found under {folder}")
    files = {role: folder / f"{role}.tsv" for role in ("train", "validation", "test")}
    args = tiny_args(tiny_bert, files, tmp_path / "sst2", "--max-train-samples", 64, "--max-eval-samples", 32,
                     "--max-steps", 2)  # fmt: skip
    assert main(args) == 0
    config = json.loads((tmp_path / "sst2" / "config.json").read_text())
    assert config["labels"] == ["0", "1"] and config["data"]["text_columns"] == ["sentence"]


# -- bad input -------------------------------------------------------------------------------------
def test_bad_data_input_gives_one_clear_line(tmp_path, capsys):
    base = ["train", "--output-dir", tmp_path / "out"]
    assert "nope.csv does not exist" in cli_error(capsys, *base, "--train-file", tmp_path / "nope.csv")
    good = write_csv(tmp_path / "good.csv", make_rows(3))
    err = cli_error(capsys, *base, "--train-file", good, "--text-column", "body")
    assert "unknown text column 'body'; the columns are ['text', 'label']" in err
    (tmp_path / "empty.csv").write_text("text,label\n")
    assert "has no rows" in cli_error(capsys, *base, "--train-file", tmp_path / "empty.csv")
    rows = make_rows(3)
    rows[4]["label"] = ""
    err = cli_error(capsys, *base, "--train-file", write_csv(tmp_path / "gaps.csv", rows))
    assert "label column 'label' is empty in 1 of 9 rows (row 4" in err
    numbers = write_csv(tmp_path / "n.csv", [{"text": "a", "n": 1, "label": 0}, {"text": "b", "n": 2, "label": 1}])
    assert "holds int64 values, not text" in cli_error(capsys, *base, "--train-file", numbers, "--text-column", "n")


def test_bad_method_model_and_hub_access(tmp_path, capsys):
    base = ["train", "--output-dir", tmp_path / "out"]
    err = cli_error(capsys, *base, "--method", "sarah")
    assert f"unknown method 'sarah'; choose one of: {', '.join(method_names())}" in err
    assert "not --threshold" in cli_error(capsys, *base, "--method", "diff-pruning", "--threshold", 1e-3)
    assert "the model path does not exist" in cli_error(capsys, *base, "--model", tmp_path / "no-model")
    assert "not a model folder" in cli_error(capsys, *base, "--model", tmp_path)
    offline = cli_error(capsys, *base, "--dataset", "stanfordnlp/sst2")
    assert "--dataset stanfordnlp/sst2" in offline and "not reachable (HF_HUB_OFFLINE is set)" in offline
    assert "--train-file" in offline  # names the fix
    offline = cli_error(capsys, *base, "--model", "bert-base-uncased")
    assert "not reachable" in offline and "--model PATH" in offline
    assert "drop --threshold" in cli_error(capsys, *base, "--method", "full", "--threshold", 1e-3)
    assert "rank_penalty" in cli_error(capsys, *base, "--option", "rank_penalti=1")
    assert not (tmp_path / "out").exists()  # nothing was written for a failed start


def test_eval_inspect_and_resume_refuse_wrong_folders(tmp_path, capsys):
    assert "does not exist" in cli_error(capsys, "eval", tmp_path / "none")
    assert "not a run folder" in cli_error(capsys, "eval", tmp_path)
    assert "no delta file" in cli_error(capsys, "inspect", tmp_path)
    (tmp_path / "afile").write_text("")
    err = cli_error(capsys, "inspect", tmp_path / "none", "--png", tmp_path / "afile" / "x.png")
    assert "afile is a file, not a folder" in err  # checked before the delta is read
    assert "is a folder; name a file" in cli_error(capsys, "inspect", tmp_path / "none", "--png", tmp_path)
    assert "not a run folder" in cli_error(capsys, "train", "--resume", tmp_path)
    assert "drop --epochs" in cli_error(capsys, "train", "--resume", tmp_path, "--epochs", 2, "--no-progress")


def test_user_errors_print_no_traceback_in_a_real_process(tmp_path):
    result = run_cli("train", "--train-file", tmp_path / "missing.tsv", "--output-dir", tmp_path / "o", timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "missing.tsv does not exist" in result.stderr


@pytest.mark.parametrize("bug", [ValueError("x must be > 0"), KeyError("layer.0"), TypeError("NoneType"), IndexError()])
def test_a_bug_is_a_traceback_and_exit_1_not_a_user_error(bug, capsys, monkeypatch):
    """Only the library's own error types (and the file system's) are the user's mistakes; a ValueError
    from deep inside, say, is a bug and must look like one."""
    from sparsedelta.cli import methods

    def broken(args):
        raise bug

    monkeypatch.setattr(methods, "run", broken)
    assert main(["methods"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and f"{type(bug).__name__}" in err
    assert err.rstrip().endswith("internal error (a bug in sparsedelta, not a mistake of yours); please report it "
                                 "with the traceback above")  # fmt: skip
    # the library's own errors stay one line, exit 2
    monkeypatch.setattr(methods, "run", lambda args: sd.load(torch.nn.Linear(2, 2), "/nonexistent/delta"))
    assert "nonexistent" in cli_error(capsys, "methods")


def test_shira_trains_r_times_in_plus_out_entries_per_linear_layer_and_eval_reproduces(tiny_bert, topic_files, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    run = tmp_path / "shira"
    args = ["--method", "shira", "--option", "r=2", "--max-steps", 2, "--max-validation-samples", 5]
    assert main(tiny_args(tiny_bert, topic_files, run, *args)) == 0
    sizes = json.loads((run / "config.json").read_text())["data"]["sizes"]
    assert sizes["validation"] == 5 and sizes["test"] > 5  # a cheaper validation, the whole test set
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n]
    head = sum(p.numel() for p in model.classifier.parameters())
    budget = json.loads((run / "metrics.json").read_text())["budget"]
    assert budget["trainable"] == sum(2 * (m.in_features + m.out_features) for m in linear) + head
    assert (run / "adapter" / "adapter_config.json").exists()
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(json.loads((run / "metrics.json").read_text())["test"])


def test_output_paths_and_estimate_flags_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    err = cli_error(capsys, "train", "--output-dir", afile, "--model", tmp_path / "no-model")
    assert f"--output-dir {afile} is a file" in err  # refused before the model is looked at
    assert afile.read_text() == "keep me"
    for flags, expected in [(("--density", -1), "--density -1"), (("--density", 5), "--density 5"),
                            (("--batch", 0), "--batch 0"), (("--seq", 0), "--seq 0")]:  # fmt: skip
        assert expected in cli_error(capsys, "estimate", "--model", "smollm2-135m", *flags)


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    from sparsedelta.train import runfolder

    monkeypatch.setattr(runfolder.time, "strftime", lambda fmt: "20261205-070000")
    first, second = (runfolder.new_run_path("sara", tmp_path) for _ in range(2))
    assert first != second and first.is_dir() and second.is_dir()
    assert second.name == "20261205-070000-sara-2"


def test_a_default_run_that_fails_leaves_no_empty_folders(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()  # found, so the run folder is made; it fails to load
    assert "not a model folder" in cli_error(capsys, "train", "--model", tmp_path / "empty", "--no-progress")
    assert [p.name for p in tmp_path.iterdir()] == ["empty"]  # neither the run's folder nor runs/
    (tmp_path / "runs" / "older").mkdir(parents=True)
    cli_error(capsys, "train", "--model", tmp_path / "empty", "--no-progress")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["older"]  # others' folders stay


def test_importing_the_cli_leaves_plotting_and_hf_libraries_unloaded():
    code = "import sys, sparsedelta.cli; print(sorted(m for m in ('matplotlib', 'transformers', 'peft') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(SRC)})  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_bert, topic_files, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_bert) / name, bare / name)
    err = cli_error(capsys, *tiny_args(bare, topic_files, tmp_path / "run", "--max-steps", 1))
    assert "maps every word to [UNK]" in err and "lacks its tokenizer files" in err
    assert not (tmp_path / "run").exists()


def test_diff_pruning_keeps_the_logits_rate_constant_while_w_decays(tiny_bert, topic_files, tmp_path, monkeypatch):
    seen = []
    step = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.append({g.get("name"): g["lr"] for g in self.param_groups})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    extra = ["--method", "diff-pruning", "--density", 0.01, "--max-steps", 8, "--eval-every", 8, "--warmup-ratio", 0.25]
    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "dp", *extra)) == 0
    phase1 = [s for s in seen if "alpha" in s]
    assert len(phase1) == 2 and {s["alpha"] for s in phase1} == {0.1}  # the official code's constant rate
    assert len({s["w"] for s in phase1}) == 2  # while w's follows the schedule
