"""--precision bf16|fp16 in the one loop (autocast, float32 values and optimizer state, fp16 loss
scaling whose skipped steps run no runner hook) and under transformers.Trainer."""

import json

import pytest
import torch

import sparsedelta as sd
from fixtures_cli import product_tensors, tiny_bert_fixture, topic_files_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.train import precision as precision_module
from sparsedelta.train.precision import Precision
from test_cli import tiny_args


def run(tiny_bert, topic_files, out, *extra):
    args = tiny_args(tiny_bert, topic_files, out, "--max-steps", 6, "--eval-every", 6, "--threads", 1, *extra)
    assert main(args) == 0
    return json.loads((out / "metrics.json").read_text()), json.loads((out / "config.json").read_text())


def test_bf16_run_follows_the_fp32_run_and_keeps_float32_state(tiny_bert, topic_files, tmp_path):
    fp32, _ = run(tiny_bert, topic_files, tmp_path / "fp32", "--method", "magnitude", "--density", "0.05")
    bf16, config = run(tiny_bert, topic_files, tmp_path / "bf16", "--method", "magnitude", "--density", "0.05",
                       "--precision", "bf16", "--checkpoint-every", 3)  # fmt: skip
    assert config["train"]["precision"] == "bf16"
    losses32, losses16 = [s["loss"] for s in fp32["steps"]], [s["loss"] for s in bf16["steps"]]
    assert losses16 != losses32  # autocast ran
    assert max(abs(a - b) for a, b in zip(losses32, losses16, strict=True)) < 0.01 * losses32[0]
    assert bf16["test"]["accuracy"] == pytest.approx(fp32["test"]["accuracy"], abs=0.2)
    tensors = product_tensors(tmp_path / "bf16" / bf16["product"])
    assert all(t.dtype in (torch.float32, torch.int32, torch.uint8) for t in tensors.values())
    assert any(k.endswith("/classifier.weight") and t.dtype == torch.float32 for k, t in tensors.items())


def test_precision_is_checked(tiny_bert, topic_files, tmp_path, capsys):
    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "x", "--precision", "fp8")) == 2
    assert "--precision fp8: choose one of fp32, bf16, fp16" in capsys.readouterr().err


def overflow_at(monkeypatch, *skipped: int):
    """Make the loop's optimizer steps number `skipped` (1-based) overflow, as GradScaler does on
    inf/NaN gradients: no step, the scale halved."""
    real_step, calls = Precision.step, []

    def step(self, optimizer):
        calls.append(1)
        if len(calls) in skipped:
            self.scaler.update(self.scaler.get_scale() / 2)
            return False
        return real_step(self, optimizer)

    monkeypatch.setattr(precision_module.Precision, "step", step)


def test_fp16_skipped_step_moves_sara_reselection_to_the_next_step_taken(tiny_bert, topic_files, tmp_path, monkeypatch):
    """An fp16 overflow skips the optimizer step and its hooks; the re-selection due then (step 2) runs
    at the next step taken, once."""
    sara = ["--method", "sara", "--threshold", "2e-2", "--option", "reselect_step=2", "--precision", "fp16"]
    fine, _ = run(tiny_bert, topic_files, tmp_path / "fine", *sara)
    assert [e["step"] for e in fine["events"]] == [2]
    overflow_at(monkeypatch, 2)
    skipped, _ = run(tiny_bert, topic_files, tmp_path / "skipped", *sara)
    assert [e["step"] for e in skipped["events"]] == [3]
    assert skipped["events"][0]["event"].startswith("SaRA re-selection")


@pytest.mark.parametrize("phase1, skipped, projected_at", [(0.3, (2,), 3), (0.9, (5, 6), None)])
def test_fp16_skipped_steps_still_project_diff_pruning(
    tiny_bert, topic_files, tmp_path, monkeypatch, phase1, skipped, projected_at
):
    """Diff Pruning's projection (step 2 of 6; step 5 of 6) moves to the next step taken, or, when every
    step from it on was skipped, to the run's end: the run still saves a delta of the budget."""
    overflow_at(monkeypatch, *skipped)
    args = ("--method", "diff-pruning", "--density", "0.01", "--option", f"phase1_fraction={phase1}", "--precision", "fp16")
    metrics, _ = run(tiny_bert, topic_files, tmp_path / "dp", *args)
    assert [e["step"] for e in metrics["events"]] == ([projected_at] if projected_at else [])
    assert metrics["budget"]["selected"] == pytest.approx(0.01 * metrics["budget"]["eligible"], rel=0.01)
    _, tensors = sd.read(tmp_path / "dp" / metrics["product"])
    assert sum(len(t) for k, t in tensors.items() if k.endswith(".indices")) == metrics["budget"]["selected"]


def test_fp16_loss_scaler_skips_overflowing_steps_and_keeps_its_state():
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    amp = Precision("fp16", torch.device("cpu"))
    with amp.autocast():
        loss = (param * 2).sum()
    amp.backward(loss)
    assert param.grad[0] == 2 * amp.scaler.get_scale()  # scaled
    amp.unscale(optimizer)
    assert torch.equal(param.grad, torch.full((3,), 2.0))
    assert amp.step(optimizer) and torch.allclose(param.detach(), torch.full((3,), 0.8))
    scale = amp.scaler.get_scale()
    param.grad = torch.tensor([float("inf"), 0.0, 0.0])
    assert not amp.step(optimizer)  # skipped: the parameter did not move, the scale halved
    assert torch.allclose(param.detach(), torch.full((3,), 0.8)) and amp.scaler.get_scale() == scale / 2
    again = Precision("fp16", torch.device("cpu"))
    again.load_state_dict(amp.state_dict())
    assert again.scaler.get_scale() == scale / 2
    assert Precision("bf16", torch.device("cpu")).state_dict() == {}  # no scaling outside fp16


def test_trainer_in_bf16_trains_float32_values(tiny_bert):
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    import sparsedelta as sd
    from sparsedelta.methods import MethodSettings, make_runner
    from sparsedelta.train.hf import SparseDeltaCallback

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    runner = make_runner(MethodSettings(method="sara", threshold=2e-2))
    model = runner.prepare(model, head_modules=["classifier"], total_steps=3)
    before = [v.detach().clone() for v in sd.trainable_parameters(model)]
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1000, 5000, (12,), generator=gen), "labels": i % 3} for i in range(12)]
    args = TrainingArguments(output_dir=str(tiny_bert.parent / "hf-bf16"), max_steps=3, per_device_train_batch_size=4,
                             use_cpu=True, bf16=True, report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
    optimizer = torch.optim.AdamW(runner.param_groups(model))
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None),
                      callbacks=[SparseDeltaCallback(runner)])  # fmt: skip
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    after = sd.trainable_parameters(model)
    assert all(v.dtype == torch.float32 for v in after)
    assert all(not torch.equal(a.detach(), b) for a, b in zip(after, before, strict=True))
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())


def test_trainer_callback_runs_no_hook_after_a_skipped_step():
    from types import SimpleNamespace

    from sparsedelta.methods import MethodSettings, make_runner
    from sparsedelta.train.hf import SparseDeltaCallback

    calls = []
    runner = make_runner(MethodSettings(method="sara"))
    runner.after_optimizer_step = lambda model, optimizer: calls.append("after")
    runner.on_step = lambda model, step, optimizer: calls.append("on_step")
    callback = SparseDeltaCallback(runner)
    state = SimpleNamespace(global_step=1, log_history=[])
    for skipped in (True, False):
        optimizer = SimpleNamespace(step_was_skipped=skipped)
        callback.on_optimizer_step(None, state, None, model=None, optimizer=optimizer)
        callback.on_step_end(None, state, None, model=None, optimizer=optimizer)
    assert calls == ["after", "on_step"]  # only for the step that was taken


def test_trainer_callback_unscales_fp16_gradients_once_before_the_penalty():
    from types import SimpleNamespace

    from sparsedelta.train.hf import _unscale

    param = torch.nn.Parameter(torch.ones(2))
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    inner = torch.optim.SGD([param], lr=0.1)
    optimizer = SimpleNamespace(scaler=scaler, optimizer=inner)
    scaler.scale(param.sum()).backward()
    assert torch.equal(param.grad, torch.full((2,), 8.0))
    _unscale(optimizer)
    _unscale(optimizer)  # already unscaled (e.g. by the Trainer's clipping): left alone
    assert torch.equal(param.grad, torch.ones(2))
    _unscale(SimpleNamespace(step_was_skipped=False))  # no scaler (bf16, fp32): nothing to do
