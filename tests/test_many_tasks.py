"""Many tasks on one base, from the command line: `compose`, `inspect A B ...` and `predict` end to end
on tiny runs, each checked against the library and against every task's own model; bad input ends
with one line, exit status 2, and nothing written."""

import contextlib
import json

import pytest
import torch

import sparsedelta as sd
from fixtures_cli import make_rows, tiny_bert_fixture, topic_files_fixture, write_csv, write_jsonl  # noqa: F401
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.core.io import read
from sparsedelta.train.finished import load_base, load_run
from test_causal_lm import kjv, tokenizer  # noqa: F401  (fixtures)
from test_cli import cli_error, tiny_args


@pytest.fixture(scope="module", name="runs")
def runs_fixture(tiny_bert, topic_files, tmp_path_factory):
    """Two SaRA runs on the topics (seeds 0 and 1) and one on two of the three topics (other labels)."""
    root = tmp_path_factory.mktemp("runs")
    two = dict(topic_files)
    for role in ("train", "validation", "test"):
        rows = [r for r in make_rows(24 if role == "train" else 6, seed=len(role)) if r["label"] != "tech"]
        two[role] = write_csv(root / f"{role}-two.csv", rows)
    runs = {}
    for name, files, seed in (("a", topic_files, 0), ("b", topic_files, 1), ("two", two, 0)):
        out = root / name
        assert main(tiny_args(tiny_bert, files, out, "--max-steps", 3, "--seed", seed)) == 0
        runs[name] = out
    return runs


def tensors_of(path):
    return read(path)[1]


@pytest.fixture(scope="module", name="foreign")
def foreign_fixture(runs, tmp_path_factory):
    """Run a's positions and values saved over another base (every weight moved by 0.01): same
    tensors and shapes, another fingerprint."""
    _, task = load_base(runs["a"])
    with torch.no_grad():
        for p in task.model.parameters():
            p.add_(0.01)
    meta, tensors = read(runs["a"])
    names = list(meta["fingerprint"])
    config = sd.RandomConfig(density=0.01, modules_to_save=["classifier"])
    positions = {n: tensors[f"{n}.indices"] for n in names}
    sd.add_delta(task.model, config, positions, values={n: tensors[f"{n}.values"] for n in names})
    return sd.save(task.model, tmp_path_factory.mktemp("foreign")).parent


# -- compose and inspect --------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [["--how", "ties", "--density", "0.002"], ["--how", "dare", "--drop", "0.3", "--seed", "4"],
                                     ["--how", "sum", "--weights", "1", "-0.5", "--heads", "0"]])  # fmt: skip
def test_compose_writes_what_the_library_composes(runs, tmp_path, options, capsys):
    assert main(["compose", str(runs["a"]), str(runs["b"]), *options, "--output", str(tmp_path / "cli")]) == 0
    assert "composed 2 deltas" in capsys.readouterr().out
    _, task = load_base(runs["a"])
    how = options[1]
    kwargs = {"ties": {"density": 0.002}, "dare": {"drop": 0.3, "seed": 4}, "sum": {"weights": [1.0, -0.5], "heads": 0}}[how]
    files = [runs["a"] / "delta.safetensors", runs["b"] / "delta.safetensors"]
    sd.compose(task.model, files, tmp_path / "lib", how=how, **kwargs)
    cli, lib = tensors_of(tmp_path / "cli"), tensors_of(tmp_path / "lib")
    assert cli.keys() == lib.keys()
    for name in cli:
        assert torch.equal(cli[name], lib[name]), name
    sd.load(task.model, tmp_path / "cli")  # an ordinary delta of that base


def test_compose_bare_deltas_with_a_model(runs, tiny_bert, tmp_path):
    files = [str(runs[n] / "delta.safetensors") for n in ("a", "b")]
    assert main(["compose", *files, "--how", "mean", "--model", str(tiny_bert), "--output", str(tmp_path / "c")]) == 0
    meta, tensors = read(tmp_path / "c")
    assert meta["config"]["how"] == "mean" and tensors["classifier.weight"].shape == (3, 96)


def test_compose_refuses_bad_input_and_writes_nothing(runs, foreign, tmp_path, capsys):
    a, b, out = str(runs["a"]), str(runs["b"]), tmp_path / "out"
    assert "1 --weights for 2 deltas" in cli_error(capsys, "compose", a, b, "--weights", "1", "--output", out)
    assert "give density" in cli_error(capsys, "compose", a, b, "--how", "ties", "--output", out)
    assert "heads must be 'average'" in cli_error(capsys, "compose", a, b, "--heads", "7", "--output", out)
    assert "is a bare delta: name its base model" in cli_error(capsys, "compose", runs["a"] / "delta.safetensors", "--output", out)
    lora = tmp_path / "lora-run"
    (lora / "adapter").mkdir(parents=True)
    assert "holds a PEFT adapter" in cli_error(capsys, "compose", a, lora, "--output", out)
    assert "base fingerprint mismatch" in cli_error(capsys, "compose", a, foreign, "--output", out)
    assert not out.exists()
    out.mkdir()
    (out / "x").write_text("keep")
    assert "not an empty folder" in cli_error(capsys, "compose", a, b, "--output", out)
    assert [p.name for p in out.iterdir()] == ["x"]


def test_inspect_several_deltas_prints_the_comparison_and_a_png(runs, tmp_path, capsys):
    png = tmp_path / "cmp.png"
    assert main(["inspect", str(runs["a"]), str(runs["b"]), str(runs["two"]), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "A vs B" in out and "B vs C" in out and "cos shared" in out and f"figure: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["inspect", str(runs["a"]), str(runs["b"]), "--json", "--no-png"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pairs"][0]["total"]["shared"] > 0  # same base, same SaRA rule: the same positions


# -- predict --------------------------------------------------------------------------------------------
@pytest.fixture(name="table")
def table_fixture(tmp_path):
    rows = make_rows(3, seed=7)
    for i, row in enumerate(rows):
        row["task"] = ["a", "b", "two", "a"][i % 4]
    return write_csv(tmp_path / "input.csv", rows), rows


def own_probabilities(run, text):
    finished = load_run(run, splits=())
    batch = finished.task.tokenizer([text], truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        return finished.model(**batch).logits.softmax(-1)[0], finished.task.label_names


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_predict_matches_each_tasks_own_model(runs, table, tmp_path, suffix, capsys):
    path, rows = table
    out = tmp_path / f"predictions{suffix}"
    adapters = [f"--adapter={n}={runs[n]}" for n in ("a", "b", "two")]
    assert main(["predict", *adapters, "--input-file", str(path), "--output", str(out), "--batch-size", "4"]) == 0
    assert f"predicted {len(rows)} rows of 3 task(s)" in capsys.readouterr().out
    predictions = read_predictions(out)
    assert [p["row"] for p in predictions] == list(range(len(rows)))
    if suffix != ".jsonl":
        return  # the values are checked once; the other formats hold the same rows
    for row, prediction in zip(rows, predictions, strict=True):
        expected, labels = own_probabilities(runs[row["task"]], row["text"])
        got = prediction["probabilities"]
        assert list(got) == labels  # "two" has its own label set: a base of its own
        torch.testing.assert_close(torch.tensor(list(got.values())), expected, atol=1e-5, rtol=1e-5)
        assert prediction["label"] == labels[int(expected.argmax())] and prediction["task"] == row["task"]


def read_predictions(path):
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import datasets

    loader = "csv" if path.suffix == ".csv" else "parquet"
    table = datasets.load_dataset(loader, data_files=str(path), split="train")
    return [dict(r) | {"probabilities": json.loads(r["probabilities"])} for r in table]


def test_predict_prints_throughput_and_serves_one_adapter_without_a_task_column(runs, tmp_path, capsys):
    rows = [{"text": r["text"]} for r in make_rows(2, seed=3)]
    path = write_csv(tmp_path / "plain.csv", rows)
    out = tmp_path / "p.json"
    threads = torch.get_num_threads()
    try:
        assert main(["predict", "--adapter", f"a={runs['a']}", "--input-file", str(path), "--output", str(out), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "rows/s on 1 thread(s)" in captured.out and "predict" in captured.err  # the throughput line and the progress bar
    assert {p["task"] for p in json.loads(out.read_text())} == {"a"}


def test_predict_refuses_bad_input_and_writes_nothing(runs, foreign, table, tmp_path, capsys):
    path, rows = table
    out = tmp_path / "out.jsonl"
    out.write_text("earlier\n")
    args = ["predict", "--adapter", f"a={runs['a']}", "--adapter", f"b={runs['b']}", "--input-file", path, "--output", out]
    assert "row 2 names task 'two', which no --adapter gives" in cli_error(capsys, *args)
    bad = dict(rows[0])
    bad.pop("task")
    plain = write_csv(tmp_path / "no-task.csv", [bad])
    assert "no task column 'task'" in cli_error(capsys, *args[:5], "--input-file", plain, "--output", out)
    assert "no text column 'body'" in cli_error(capsys, *args, "--text-column", "body")
    err = cli_error(capsys, *args, "--adapter", f"two={foreign}")
    assert "--adapter two=" in err and "base fingerprint mismatch" in err
    assert "newly initialised" in cli_error(capsys, *args[:5], "--input-file",
                                            write_csv(tmp_path / "base.csv", [{"text": "x", "task": "__base__"}]), "--output", out)  # fmt: skip
    assert "unknown file type .xlsx" in cli_error(capsys, *args[:7], "--output", tmp_path / "p.xlsx")
    assert "does not exist; create it" in cli_error(capsys, *args[:7], "--output", tmp_path / "no" / "p.csv")
    assert "given twice" in cli_error(capsys, *args[:3], "--adapter", f"a={runs['b']}", *args[5:])
    assert out.read_text() == "earlier\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_predict_generates_each_row_with_its_task(tiny_llama_dir, kjv_text, tmp_path, capsys):
    """A causal-LM run served beside the bare base: each row's greedy continuation is the one its own
    model (the run's, or the base) generates alone."""
    run = tmp_path / "lm"
    assert main(lm_args(tiny_llama_dir, kjv_text, run, "--max-steps", 2, "--lr", "0.05")) == 0
    prompts = ["And God said", "And God said", "In the beginning", "In the beginning", "The LORD is my"]
    rows = [{"prompt": p, "task": t} for p, t in zip(prompts, ["kjv", "__base__"] * 2 + ["kjv"], strict=True)]
    out = tmp_path / "gen.jsonl"
    args = ["predict", "--adapter", f"kjv={run}", "--input-file", write_jsonl(tmp_path / "in.jsonl", rows),
            "--text-column", "prompt", "--output", out, "--max-new-tokens", 5, "--no-progress"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    generated = [json.loads(line)["generation"] for line in out.read_text().splitlines()]
    finished = load_run(run, splits=())
    tok, model = finished.task.tokenizer, finished.model
    for row, text in zip(rows, generated, strict=True):
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        alone = sd.disabled(model) if row["task"] == "__base__" else contextlib.nullcontext()
        with alone, torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1] :]  # fmt: skip
        assert text == tok.decode(new, skip_special_tokens=True)
    assert generated[0] != generated[1] or generated[2] != generated[3]  # the run changed the model
    # the bare delta file with its base named: no head saved, so a causal LM; the same generations
    bare = ["predict", "--adapter", f"kjv={run / 'delta.safetensors'}", "--model", tiny_llama_dir, *args[3:]]
    assert main([str(a) for a in bare]) == 0
    assert [json.loads(line)["generation"] for line in out.read_text().splitlines()] == generated
