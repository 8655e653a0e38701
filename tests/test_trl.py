"""TRL's SFTTrainer training a sparse delta (sparsedelta.train.trl_sft): prompt-completion data with
completion_only_loss, chat data with assistant_only_loss, packing; the loss reaches the answer tokens
only (the gradient of the last hidden states is zero at every other position); only the delta's entries move; the
saved delta reproduces the trained model; a PEFT config is refused."""

import pytest
import torch

import sparsedelta as sd
from fixtures_lm import tiny_llama_dir_fixture  # noqa: F401
from sparsedelta.core.adapters import state_of
from sparsedelta.errors import UsageError
from sparsedelta.methods import MethodSettings
from test_causal_lm import kjv, one_thread, tokenizer  # noqa: F401  (fixtures)
from test_sft import WORDS, chat_rows

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

# a chat template with generation markers (assistant_only_loss needs them), its end-of-turn inside
MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}[assistant] {% generation %}{{ m['content'] }}<eos>"
    "{% endgeneration %}\n{% else %}[{{ m['role'] }}] {{ m['content'] }}<eos>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = MARKED
    return AutoModelForCausalLM.from_pretrained(model_dir), tok


def dataset(kind: str, n: int = 16):
    rows = chat_rows(n)
    if kind == "chat":
        return datasets.Dataset.from_list(rows)
    return datasets.Dataset.from_list(
        [{"prompt": r["messages"][1]["content"] + " Answer:", "completion": " " + r["messages"][2]["content"]} for r in rows]
    )


def trainer_for(model_dir, tmp_path, kind, **config):
    from sparsedelta.train.trl_sft import sparse_sft_trainer

    model, tok = load(model_dir)
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, use_cpu=True,
                         report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, max_length=128,
                         bf16=False, **config)  # fmt: skip
    # bf16=False: TRL's default bf16 autocast would stay on the model's forward after training
    settings = MethodSettings(method="sara", task="sft", density=0.1, lr=2e-2)
    return sparse_sft_trainer(model, settings, args=args, train_dataset=dataset(kind), processing_class=tok)


def logit_gradients(trainer) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(|∂loss/∂h| per position, which positions' next label is scored, the batch) for one training
    batch. h is the final hidden state, the lm head's only input at its position: TRL computes the
    loss through a fused head that never builds the logits, and ∂loss/∂h_t is zero exactly when
    ∂loss/∂logits_t is."""
    batch = next(iter(trainer.get_train_dataloader()))
    model, captured = trainer.model, {}

    def keep(module, args, output):
        output.retain_grad()
        captured["hidden"] = output

    hook = model.model.norm.register_forward_hook(keep)
    model.train()
    trainer.compute_loss(model, dict(batch)).backward()
    hook.remove()
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != -100
    return captured["hidden"].grad.abs().sum(-1), scored, batch


@pytest.mark.parametrize(
    "kind, config",
    [("plain", {"completion_only_loss": True}), ("chat", {"assistant_only_loss": True}),
     ("plain", {"completion_only_loss": True, "packing": True}), ("chat", {"assistant_only_loss": True, "packing": True})],
)  # fmt: skip
def test_trl_trains_the_delta_on_the_answers_only(kind, config, tiny_llama_dir, tmp_path, one_thread):  # noqa: F811
    trainer = trainer_for(tiny_llama_dir, tmp_path, kind, **config)
    grad, scored, batch = logit_gradients(trainer)
    assert scored.any() and (~scored).any()
    assert (grad[~scored] == 0).all() and (grad[scored] > 0).all()
    tok = trainer.processing_class
    answers = tok.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert any(w in answers for w in WORDS) and "The word is" not in answers  # an answer, never the prompt
    if config.get("packing"):  # several examples in one row, positions restarting at each
        assert "position_ids" in batch and (batch["position_ids"][0] == 0).sum() > 1

    model = trainer.model
    base, _ = load(tiny_llama_dir)
    trainer.model.zero_grad()
    trainer.train()
    # only the delta's entries moved; the saved delta reproduces the trained model on a fresh base
    deltas = state_of(model).adapters["default"].deltas
    params = dict(model.named_parameters())
    moved = 0
    for name, p in base.named_parameters():
        changed = torch.nonzero((params[name].detach() != p.detach()).reshape(-1)).squeeze(1)
        allowed = deltas[name].indices if name in deltas else changed[:0]
        assert torch.isin(changed, allowed).all(), name
        moved += len(changed)
    assert moved > 0
    sd.save(model, tmp_path / "delta")
    fresh = sd.load(load(tiny_llama_dir)[0], tmp_path / "delta")
    ids = batch["input_ids"][:1, :16]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_peft_config_or_an_optimizer_is_refused(tiny_llama_dir, tmp_path):
    from peft import LoraConfig

    from sparsedelta.train.trl_sft import sparse_sft_trainer

    model, tok = load(tiny_llama_dir)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, use_cpu=True, report_to=[])
    settings = MethodSettings(method="sara", task="sft")
    with pytest.raises(UsageError, match="peft_config adds a PEFT adapter"):
        sparse_sft_trainer(model, settings, args=args, train_dataset=dataset("plain"), peft_config=LoraConfig())
    with pytest.raises(UsageError, match="drop optimizers="):
        sparse_sft_trainer(model, settings, args=args, train_dataset=dataset("plain"), optimizers=(None, None))
    assert getattr(model, "_sparsedelta", None) is None  # refused before the delta went on
