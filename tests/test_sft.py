"""`--task sft`: chat and prompt-completion data, the loss on the answer tokens only (checked on the
gradient of the logits), packing without leaks between examples, truncation that never cuts an
answer, every method through the one loop, and the embedded BBC instruction default."""

import json

import pytest
import torch

from fixtures_lm import tiny_llama_dir_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.data import instructions as ins
from sparsedelta.errors import UsageError
from sparsedelta.methods import method_names
from sparsedelta.train.config import TrainConfig
from sparsedelta.train.tasks import make_task
from test_causal_lm import kjv, one_thread, tokenizer  # noqa: F401  (fixtures)
from test_cli import cli_error

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<eos>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)
WORDS = ["light", "water", "earth", "heaven", "night", "day"]


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        word = WORDS[int(torch.randint(len(WORDS), (1,), generator=g))]
        filler = " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (int(torch.randint(2, 9, (1,), generator=g)),), generator=g))
        rows.append({"messages": [
            {"role": "system", "content": "Say the word."},
            {"role": "user", "content": f"{filler}. The word is {word}."},
            {"role": "assistant", "content": word},
        ]})  # fmt: skip
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    template = root / "template.jinja"
    template.write_text(TEMPLATE)
    chat = {role: write_jsonl(root / f"chat-{role}.jsonl", chat_rows(n, seed))
            for role, n, seed in (("train", 24, 0), ("validation", 6, 1), ("test", 6, 2))}  # fmt: skip
    plain = {
        role: write_jsonl(root / f"plain-{role}.jsonl", [
            {"prompt": r["messages"][1]["content"] + " Answer:", "completion": " " + r["messages"][2]["content"]}
            for r in chat_rows(n, seed)
        ])  # fmt: skip
        for role, n, seed in (("train", 24, 0), ("validation", 6, 1), ("test", 6, 2))
    }
    return {"template": template, "chat": chat, "plain": plain}


def sft_args(model_dir, files, out, kind="chat", *extra):
    data = files[kind]
    return [str(a) for a in [
        "train", "--task", "sft", "--model", model_dir, "--train-file", data["train"], "--validation-file",
        data["validation"], "--test-file", data["test"], "--chat-template", files["template"], "--max-length", 96,
        "--batch-size", 4, "--max-new-tokens", 4, "--output-dir", out, "--no-progress", "--threads", 1, *extra,
    ]]  # fmt: skip


def loaded_task(model_dir, files, kind="chat", **settings):
    data = files[kind]
    settings = {"max_length": 200 if settings.get("packing") else 96, **settings}  # packed: room for several
    cfg = TrainConfig(task="sft", model=str(model_dir), train_file=str(data["train"]), validation_file=str(data["validation"]),
                      test_file=str(data["test"]), chat_template=str(files["template"]), **settings)  # fmt: skip
    task = make_task(cfg.resolved())
    task.load(log=lambda *a: None)
    return task


# -- labels: the answers, and nothing else --------------------------------------------------------
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_only_answer_tokens_carry_loss(kind, packing, tiny_llama_dir, sft_files, one_thread):  # noqa: F811
    task = loaded_task(tiny_llama_dir, sft_files, kind, packing=packing)
    batch = next(task.batches(list(range(task.train_size)), 4))
    full = task.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    expected = torch.nn.functional.cross_entropy(full[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    torch.testing.assert_close(task.loss(task.model, batch), expected)  # the logits at answer positions only: the same loss
    examples = task.encoded["train"]
    for e in examples:  # the labelled tokens are exactly the answer and its end
        answered = task.tokenizer.decode([t for t in e.labels if t != ins.IGNORE])
        assert answered.strip() == f"{e.answer.strip()}<eos>"
    batch = next(task.batches(list(range(task.train_size)), 4))
    assert ("position_ids" in batch) == packing and ("attention_mask" in batch) != packing
    captured = {}

    def keep(module, args, output):
        output.retain_grad()
        captured["logits"] = output

    # the final hidden state h_t feeds only the logits at t: ∂loss/∂h_t is zero exactly when the
    # logits at t carry no loss (the task computes logits at the answer positions alone)
    hook = task.model.model.norm.register_forward_hook(keep)
    task.loss(task.model, batch).backward()
    hook.remove()
    grad = captured["logits"].grad.abs().sum(-1)  # (rows, positions)
    predicts_answer = torch.zeros_like(batch["labels"], dtype=torch.bool)
    predicts_answer[:, :-1] = batch["labels"][:, 1:] != ins.IGNORE  # logits at t score the token at t + 1
    assert predicts_answer.any() and (~predicts_answer).any()
    assert (grad[~predicts_answer] == 0).all()  # every prompt (and padding) position: no gradient at all
    assert (grad[predicts_answer] > 0).all()
    if packing:  # several examples share a row, each one's labels intact
        assert task.train_size < len(examples)
        assert sum((torch.tensor(r.labels) != ins.IGNORE).sum() for r in task.rows) == sum(
            sum(t != ins.IGNORE for t in e.labels) for e in examples
        )


def test_packed_examples_see_only_themselves(tiny_llama_dir, sft_files, one_thread):  # noqa: F811
    task = loaded_task(tiny_llama_dir, sft_files, packing=True)
    row = next(r for r in task.rows if r.position_ids.count(0) >= 3)
    batch = task._batch([row])
    with torch.no_grad():
        packed = task.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row)]
        for a, b in zip(starts, starts[1:]):
            alone = task.model(input_ids=torch.tensor([row.input_ids[a:b]])).logits[0]
            torch.testing.assert_close(packed[a:b], alone, atol=1e-5, rtol=1e-5)


# -- truncation -------------------------------------------------------------------------------------
def test_long_prompts_are_refused_or_cut_from_the_left_but_answers_never(tokenizer):  # noqa: F811
    tokenizer.chat_template = TEMPLATE
    long = ins.Example(messages=[{"role": "user", "content": "water " * 40}, {"role": "assistant", "content": "light"}])
    full = ins.encode(tokenizer, long, 1000)
    with pytest.raises(UsageError, match="more than --max-length 20.*--truncation left"):
        ins.encode(tokenizer, long, 20, where="row 7")
    cut = ins.encode(tokenizer, long, 20, "left")
    assert len(cut) == 20 and cut.input_ids == full.input_ids[-20:] and cut.labels == full.labels[-20:]
    assert tokenizer.decode(cut.input_ids[cut.prompt_length :]).lstrip().startswith("light<eos>")
    answer = ins.Example(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "water " * 40}])
    with pytest.raises(UsageError, match="answers are never cut: raise --max-length"):
        ins.encode(tokenizer, answer, 20, "left")


def test_bad_sft_data_is_one_line(tiny_llama_dir, sft_files, tmp_path, capsys):
    args = sft_args(tiny_llama_dir, sft_files, tmp_path / "a")
    no_template = [a for a in args if a not in ("--chat-template", str(sft_files["template"]))]
    assert "has no chat template" in cli_error(capsys, *no_template)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    assert "must end with the assistant's" in cli_error(capsys, *args[:5], "--train-file", bad, *args[7:])
    other = write_jsonl(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}] * 5)
    err = cli_error(capsys, *args[:5], "--train-file", other, *args[7:])
    assert "--prompt-column/--completion-column" in err
    for row in ({"messages": "not a list"}, {"messages": [{"role": "wizard", "content": "x"}]},
                {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]},
                {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, {"messages": [[1, 2]]},
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
                {"prompt": ["a"], "completion": "b"}, {"prompt": "a", "completion": ""}, {"prompt": None, "completion": "b"}):  # fmt: skip
        hostile = write_jsonl(tmp_path / "hostile.jsonl", [row] * 5)
        cli_error(capsys, *args[:5], "--train-file", hostile, *args[7:])  # one line, exit 2, whatever the row
    assert "--packing: only for --task sft" in cli_error(capsys, "train", "--packing", "--output-dir", tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- the one loop -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_on_sft_and_eval_reproduces(method, tiny_llama_dir, sft_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama_dir, sft_files, out, "chat", "--method", method, "--max-steps", 3, "--eval-every", 3)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "sft" and metrics["metric"] == "exact_match"
    test = metrics["test"]
    assert 0 <= test["exact_match"] <= 1 and test["perplexity"] > 1 and test["examples"] == 6
    assert len(metrics["samples"]["answers"]) == 3 and "answers" in metrics["baseline"]
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {k: result[k] for k in test} == pytest.approx(test, rel=1e-6)


def test_a_sft_run_learns_the_answers(tiny_llama_dir, sft_files, tmp_path, capsys):
    """Prompt-completion data, packed: the answer perplexity falls well below the base's."""
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama_dir, sft_files, out, "plain", "--packing", "--max-steps", 20, "--lr", 1e-2, "--method", "full",
                         "--max-length", 160)) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "test answer perplexity" in printed and "test exact match" in printed
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["perplexity"] < 0.5 * m["baseline"]["test"]["perplexity"]
    assert not (out / "chat_template.jinja").exists()  # plain text: predict feeds its inputs as they are
    assert m["evals"][-1]["loss"] < m["evals"][0]["loss"]


def test_the_default_data_is_bbc_news_as_topic_questions():
    cfg = TrainConfig(task="sft", max_train_samples=10, max_eval_samples=4).resolved()
    task = make_task(cfg)
    examples, source = task._examples(("train", "validation", "test"))
    assert {r: len(v) for r, v in examples.items()} == {"train": 10, "validation": 4, "test": 4}
    first = examples["train"][0].messages
    assert [m["role"] for m in first] == ["system", "user", "assistant"]
    assert first[1]["content"].startswith("Which topic is this article about?\n\n")
    topics = {"business", "entertainment", "politics", "sport", "tech"}
    assert first[2]["content"] in topics | {"sports"} and first[2]["content"] in first[0]["content"]
    assert len(first[1]["content"].split()) <= ins.BBC_WORDS + 8


def test_a_finished_sft_run_keeps_its_chat_template_for_eval_predict_merge_and_card(tiny_llama_dir, sft_files, tmp_path, capsys):
    import shutil

    from sparsedelta.models.causal_lm import load_causal_lm

    files = {**sft_files, "template": tmp_path / "template.jinja"}
    shutil.copy(sft_files["template"], files["template"])
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama_dir, files, out, "chat", "--max-steps", 4, "--method", "full", "--lr", 1e-2)) == 0
    files["template"].unlink()  # the run folder has its own copy
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert json.loads(capsys.readouterr().out)["exact_match"] == pytest.approx(test["exact_match"])
    delta_run = tmp_path / "sara"
    assert main(sft_args(tiny_llama_dir, {**sft_files}, delta_run, "chat", "--max-steps", 2)) == 0
    assert "```jinja\n" + TEMPLATE in (delta_run / "README.md").read_text()

    # predict answers each text as the user's message, through the template
    rows = tmp_path / "in.jsonl"
    write_jsonl(rows, [{"text": "day. The word is day."}, {"text": "night night. The word is night."}])
    assert main(["predict", "--adapter", f"a={delta_run}", "--input-file", str(rows), "--output", str(tmp_path / "out.jsonl"),
                 "--max-new-tokens", "4", "--no-progress"]) == 0  # fmt: skip
    predicted = [json.loads(line)["generation"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    from sparsedelta.train.finished import load_run

    run = load_run(delta_run, splits=())
    tok = run.task.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "day. The word is day."}], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = run.model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert predicted[0] == tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)

    capsys.readouterr()
    assert main(["export", str(delta_run), "--output", str(tmp_path / "shira")]) == 0  # a PEFT adapter
    assert "AutoModelForCausalLM" in capsys.readouterr().out
    peft = pytest.importorskip("peft")
    adapter = peft.PeftModel.from_pretrained(load_causal_lm(tiny_llama_dir).model, str(tmp_path / "shira")).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(input_ids=ids).logits, run.model(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert main(["merge", str(delta_run), "--output", str(tmp_path / "merged")]) == 0
    assert "AutoModelForCausalLM" in capsys.readouterr().out
    merged = load_causal_lm(tmp_path / "merged")
    assert merged.tokenizer.chat_template == TEMPLATE
    with torch.no_grad():
        torch.testing.assert_close(merged.model(input_ids=ids).logits, run.model(input_ids=ids).logits)


def test_sft_trains_under_bf16_autocast(tiny_llama_dir, sft_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sft_args(tiny_llama_dir, sft_files, out, "chat", "--precision", "bf16", "--max-steps", 3)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["perplexity"] > 1 and all(s["loss"] == s["loss"] for s in m["steps"])
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "bf16"


def test_a_hub_dataset_gives_its_splits(tiny_llama_dir, sft_files, monkeypatch):
    """The hub path (its download is the datasets library's): each split's table becomes examples."""
    import datasets

    from sparsedelta.train.tasks import sft

    asked = []

    def fake_hub(name, config):
        asked.append((name, config))
        return {role: datasets.Dataset.from_list(chat_rows(n, seed)) for role, n, seed in
                (("train", 12, 0), ("validation", 3, 1), ("test", 4, 2))}  # fmt: skip

    monkeypatch.setattr(sft, "load_hub_dataset", fake_hub)
    cfg = TrainConfig(task="sft", model=str(tiny_llama_dir), dataset="someone/chats", dataset_config="en",
                      chat_template=str(sft_files["template"]), max_length=96).resolved()  # fmt: skip
    task = make_task(cfg)
    task.load(log=lambda *a: None)
    assert asked == [("someone/chats", "en")] and task.source == "someone/chats"
    assert {r: len(v) for r, v in task.encoded.items()} == {"train": 12, "validation": 3, "test": 4}
