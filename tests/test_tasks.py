"""One loop for every task and method: each registered method trains, saves, reloads and evaluates
to the same numbers on a tiny classifier and a tiny causal LM; a causal-LM run end to end."""

import json

import pytest
import torch

import sparsedelta as sd
from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.methods import method_names
from sparsedelta.models.causal_lm import load_causal_lm, perplexity
from sparsedelta.train.finished import load_run
from test_causal_lm import kjv, one_thread, tokenizer  # noqa: F401  (fixtures)
from test_cli import tiny_args


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_every_method_on_every_task_trains_saves_and_evaluates_equal(task, method, tmp_path, capsys, request):
    out = tmp_path / "run"
    extra = ["--method", method, "--max-steps", 3, "--eval-every", 3, "--threads", 1]
    if task == "classification":
        args = tiny_args(request.getfixturevalue("tiny_bert"), request.getfixturevalue("topic_files"), out, *extra)
    else:
        args = lm_args(request.getfixturevalue("tiny_llama_dir"), request.getfixturevalue("kjv_text"), out, *extra)
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == metrics["task"] == task and config["method"]["method"] == method
    assert [s["step"] for s in metrics["steps"]] == [1, 2, 3]
    assert (out / metrics["product"]).exists() and (out / "training.png").exists()
    metric = "accuracy" if task == "classification" else "perplexity"
    assert math_finite(metrics["test"][metric])
    # eval rebuilds the trained model from the run folder alone and reproduces the test metrics
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: result[k] for k in metrics["test"]} == pytest.approx(metrics["test"], rel=1e-6)
    if task == "causal-lm" and method != "full":  # the base model's perplexity, measured before training
        assert result["base"]["perplexity"] == pytest.approx(metrics["baseline"]["test"]["perplexity"], rel=1e-6)


def math_finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def test_causal_lm_run_end_to_end(tiny_llama_dir, kjv_text, tmp_path, capsys):
    """The default job's shape on a tiny model: perplexity and samples before/after, the delta, the
    plot; a fresh load, eval and merge give the run's numbers; a second run into the folder is refused."""
    out = tmp_path / "run"
    assert main(lm_args(tiny_llama_dir, kjv_text, out, "--max-steps", 12, "--batch-size", 8, "--lr", 2e-2,
                        "--threshold", 2e-3, "--threads", 1)) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "test perplexity:" in printed and "sample after:" in printed
    assert {p.name for p in out.iterdir()} >= {"delta.safetensors", "metrics.json", "config.json", "training.png"}
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["perplexity"] < m["baseline"]["test"]["perplexity"]
    assert m["evals"][0]["step"] == 0 and m["evals"][-1]["perplexity"] < m["evals"][0]["perplexity"]
    assert isinstance(m["baseline"]["sample"], str) and isinstance(m["samples"]["sample"], str)
    assert m["budget"]["selected"] == sum(len(t) for k, t in sd.read(out)[1].items() if k.endswith(".values"))

    run = load_run(out, splits=("validation", "test"))
    assert perplexity(run.model, run.task.blocks["test"], 8) == pytest.approx(m["test"]["perplexity"], rel=1e-6)
    assert perplexity(run.model, run.task.blocks["validation"], 8) == pytest.approx(m["evals"][-1]["perplexity"], rel=1e-6)
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    merged = load_causal_lm(tmp_path / "merged").model
    ids = run.task.blocks["test"][:2]
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, run.model(input_ids=ids).logits)
    capsys.readouterr()
    assert main(lm_args(tiny_llama_dir, kjv_text, out, "--max-steps", 2)) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_causal_lm_flags_and_errors(tiny_llama_dir, kjv_text, tmp_path, capsys):
    def error(*args):
        assert main([str(a) for a in args]) == 2
        return capsys.readouterr().err

    assert "--label-column: only for --task classification" in error(*lm_args(tiny_llama_dir, kjv_text, tmp_path / "a", "--label-column", "x"))  # fmt: skip
    assert "--eval-blocks: only for --task causal-lm" in error("train", "--eval-blocks", 3, "--output-dir", tmp_path / "b")
    short = tmp_path / "short.txt"
    short.write_text("In the beginning.\n" * 3)
    err = error(*lm_args(tiny_llama_dir, short, tmp_path / "c", "--validation-file", kjv_text, "--test-file", kjv_text))
    assert "fewer than one block of 32" in err


def test_eval_takes_the_data_flags_of_train(tiny_bert, topic_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_bert, topic_files, out, "--max-steps", 2)) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--max-eval-samples", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 5
    assert main(["eval", str(out), "--max-length", "8", "--eval-batch-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 18
    assert main(["eval", str(out), "--eval-blocks", "3"]) == 2
    assert "--eval-blocks: only for --task causal-lm" in capsys.readouterr().err
