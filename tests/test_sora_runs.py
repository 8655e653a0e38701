"""SoRA as a method of the one loop: stages as phases (fresh optimizer and schedule, a checkpoint and
an evaluation at each stage's end), the proximal step after every optimizer step, products that eval,
inspect, merge and PEFT reproduce, and the Trainer callback."""

import json

import pytest
import torch

from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.methods import sora
from sparsedelta.train import load_run
from test_cli import tiny_args

SCHEDULE = "[0.5, 20, 200]"


@pytest.fixture(scope="module")
def staged_run(tiny_bert, topic_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sora") / "run"
    args = tiny_args(tiny_bert, topic_files, out, "--method", "sora", "--option", "r=4", "--option", f"schedule={SCHEDULE}",
                     "--max-steps", 9, "--eval-every", 100, "--lr", 5e-3, "--seed", 1)  # fmt: skip
    assert main(args) == 0
    return out


def test_stages_are_phases_with_checkpoints_and_evaluations(staged_run, capsys):
    m = json.loads((staged_run / "metrics.json").read_text())
    assert [e["step"] for e in m["events"]] == [3, 6]  # 9 steps, 3 stages
    assert [e["step"] for e in m["evals"]] == [3, 6, 9]  # each stage's end is evaluated
    lrs = [s["lr"] for s in m["steps"]]
    assert lrs[0] == lrs[3] == lrs[6] and lrs[2] < lrs[0]  # every stage restarts its lr schedule
    stages = json.loads((staged_run / "stages" / "stages.json").read_text())
    assert [s["xi"] for s in stages] == [0.5, 20.0, 200.0]
    gates = [s["nonzero_gates"] for s in stages]
    assert gates[0] >= gates[1] >= gates[2] and gates[2] < gates[0]  # a larger ξ kills more gates
    report = m["method_report"]
    assert report["nonzero_gates"] == gates[-1] and report["ranks"] == stages[-1]["gates"]
    # each stage's checkpoint is that stage's model
    from transformers import AutoModelForSequenceClassification

    config = json.loads((staged_run / "config.json").read_text())
    for stage in stages:
        base = AutoModelForSequenceClassification.from_pretrained(config["train"]["model"], num_labels=3)
        sora.load(base, staged_run / stage["checkpoint"])
        assert sora.gate_counts(base) == stage["gates"]


def test_eval_merge_peft_and_inspect_reproduce_the_run(staged_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    m = json.loads((staged_run / "metrics.json").read_text())
    assert main(["eval", str(staged_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(m["test"])
    run = load_run(staged_run)
    batch = run.task.tokenizer(["shares fell sharply", "the team won the cup"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = run.model(**batch).logits
        # the pruned adapter PEFT loads: an ordinary LoRA of the surviving ranks
        base = AutoModelForSequenceClassification.from_pretrained(run.cfg.model, num_labels=3)
        peft = PeftModel.from_pretrained(base, staged_run / "adapter").eval()
        torch.testing.assert_close(peft(**batch).logits, logits, rtol=1e-5, atol=1e-6)
    assert main(["merge", str(staged_run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, logits, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    assert main(["inspect", str(staged_run)]) == 0
    text = capsys.readouterr().out
    assert f"{m['method_report']['nonzero_gates']:,} of {m['method_report']['gates']:,} nonzero" in text
    assert (staged_run / "sora" / "inspect.png").read_bytes()[:4] == b"\x89PNG"


def test_the_run_prints_the_surviving_ranks(tiny_bert, topic_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(tiny_bert, topic_files, out, "--method", "sora", "--option", "xi=100000", "--max-steps", 2)) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "metrics.json").read_text())
    assert m["method_report"]["nonzero_gates"] == 0  # ξ·lr beyond every gate: all die
    assert f"surviving ranks: 0 of {m['method_report']['gates']:,} gates" in printed
    assert not (out / "adapter").exists()  # nothing for PEFT to hold; the state and the head remain
    assert main(["eval", str(out), "--json"]) == 0


def test_bad_sora_settings_are_refused_before_loading(tmp_path, capsys):
    for option, message in (("r=0", "r must be an integer >= 1"), ("xi=-1", "xi must be a finite number >= 0"),
                            ("schedule=[1, 0.5]", "must be strictly increasing")):  # fmt: skip
        assert main(["train", "--method", "sora", "--option", option, "--output-dir", str(tmp_path / "o")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_trainer_callback_runs_the_proximal_step(tiny_bert, tmp_path):
    """Under transformers.Trainer the gates are soft-thresholded after each optimizer step, at that
    step's learning rate."""
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from sparsedelta.methods import MethodSettings, make_runner
    from sparsedelta.train.hf import SparseDeltaCallback

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    runner = make_runner(MethodSettings(method="sora", lr=1e-2, options={"r": 4, "xi": 1.0, "gate_init": "ones"}))
    model = runner.prepare(model, head_modules=["classifier"], total_steps=3)
    ids = torch.randint(1000, 2000, (12, 8))
    data = [{"input_ids": ids[i], "attention_mask": torch.ones(8, dtype=torch.long), "labels": i % 3} for i in range(12)]
    optimizer = torch.optim.SGD(runner.param_groups(model), lr=1e-2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True, max_grad_norm=0.0,
                             lr_scheduler_type="constant")  # fmt: skip
    for layer in sora.layers(model).values():  # only the threshold moves the gates
        layer.gate.requires_grad_(False)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
            callbacks=[SparseDeltaCallback(runner)]).train()  # fmt: skip
    gate_lr = next(g["lr"] for g in optimizer.param_groups if g.get("name") == sora.GATE_GROUP)
    for layer in sora.layers(model).values():
        torch.testing.assert_close(layer.gate, torch.full((4,), 1 - 3 * gate_lr * 1.0))


@pytest.mark.parametrize(
    "damage",
    ['{"config": {', "[1, 2]", '{"config": {}, "layers": {"a": {"rank": "4"}}}', '{"layers": {}}'],
)
def test_inspect_of_a_damaged_sora_folder_is_one_line(damage, staged_run, tmp_path, capsys):
    import shutil

    from test_cli import cli_error

    shutil.copytree(staged_run / "sora", tmp_path / "sora")
    (tmp_path / "sora" / sora.CONFIG_FILE).write_text(damage)
    assert "the SoRA run is damaged" in cli_error(capsys, "inspect", tmp_path / "sora")
