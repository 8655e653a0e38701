"""The memory model (sparsedelta.train.memory, `sparsedelta estimate`): its arithmetic, the counts it
reads off models built on the meta device, and a measured step of a tiny model."""

import dataclasses
import json

import pytest
import torch

from conftest import load_script
from fixtures_cli import tiny_bert_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.train import memory
from sparsedelta.train.memory import Shape, estimate

SHAPE = Shape(name="toy", parameters=1_000_000, largest=300_000, linear_weights=600_000, targeted=500_000,
              lora_per_rank=4_000, head=1_000, largest_targeted=100_000, widest_linear=1_000, layers=2, hidden=64,
              intermediate=256, heads=4, output_width=10, keeps_attention_probs=True)  # fmt: skip


def test_the_arithmetic_of_each_part():
    per_token = 2 * (6.46 * 64 + 17.56 * 256 + 13.51 * 4 * 32) + 17.66 * 10
    activations = round(8 * 32 * per_token)
    assert memory.activation_bytes(SHAPE, 8, 32, "fp32") == activations

    sara = estimate(SHAPE, "sara", batch=8, seq=32, density=0.01)
    k = 5_000
    assert sara.trainable == k + 1_000
    assert sara.weights == 4_000_000
    assert sara.state == k * 32 + 1_000 * 12  # value, AdamW, int64 position, θ, CSR column, merged value; the head
    assert sara.gradients == 4 * (k + 1_000)
    assert sara.optimizer_temporaries == 2 * 4 * 1_000  # CPU AdamW: tensor by tensor, the largest (here the head)
    assert sara.total == sara.weights + sara.state + activations

    full = estimate(SHAPE, "full", batch=8, seq=32)
    assert full.state == 8_000_000 and full.gradients == 4_000_000
    assert full.optimizer_temporaries == 2 * 4 * 300_000
    assert full.total == 4_000_000 + 8_000_000 + max(activations, 4_000_000 + 2_400_000)
    big = estimate(SHAPE, "full", batch=512, seq=32)
    assert big.activations > big.gradients + big.optimizer_temporaries
    assert big.total == big.weights + big.state + big.activations  # the max switched over

    lora = estimate(SHAPE, "lora", batch=8, seq=32, lora_rank=4)
    assert lora.trainable == 4 * 4_000 + 1_000 and lora.state == 12 * lora.trainable


def test_precision_base_dtype_and_device():
    fp32 = estimate(SHAPE, "sara", batch=8, seq=32)
    on_bf16 = estimate(SHAPE, "sara", batch=8, seq=32, base_dtype="bfloat16")
    assert on_bf16.weights == fp32.weights // 2
    assert on_bf16.state == fp32.state - 5_000 * 4  # θ and the merged value in 2 bytes each
    lora32 = estimate(SHAPE, "lora", batch=8, seq=32, precision="bf16")
    lora16 = estimate(SHAPE, "lora", batch=8, seq=32, precision="bf16", base_dtype="bfloat16")
    bf16 = memory.activation_bytes(SHAPE, 8, 32, "bf16")
    assert lora32.activations == bf16 + 2 * 600_000  # autocast's bf16 copies of float32 weights
    assert lora16.activations == memory.activation_bytes(SHAPE, 8, 32, "bf16", "bfloat16") < bf16
    cuda = estimate(SHAPE, "full", batch=8, seq=32, device="cuda")
    assert cuda.optimizer_temporaries == 4 * 1_000_000  # foreach AdamW: one copy of every trainable tensor
    with pytest.raises(Exception, match="full fine-tuning trains the base itself"):
        estimate(SHAPE, "full", base_dtype="bfloat16")
    with pytest.raises(Exception, match="--method shira"):
        estimate(SHAPE, "shira")


def test_reference_models_are_counted_exactly():
    shape = memory.model_shape("llama-3.1-8b")
    assert shape.parameters == 8_030_261_248  # Llama 3.1 8B's published count
    assert shape.layers == 32 and shape.output_width == 128_256 and not shape.keeps_attention_probs
    q, k, v, o, mlp = 4096 * 4096, 1024 * 4096, 1024 * 4096, 4096 * 4096, 3 * 4096 * 14336
    assert shape.targeted == 32 * (q + k + v + o + mlp)  # the attention and MLP projections


def test_bf16_terms_match_a_count_of_a_tiny_llama():
    """Counted by hand from the config: the weights, the delta's state and autocast's weight copies."""
    from transformers import LlamaConfig

    hidden, layers, intermediate, vocab, kv = 64, 2, 160, 1000, 32
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True)  # fmt: skip
    shape = memory.shape_from_config(config, "causal-lm", name="tiny-llama")
    projections = layers * (2 * hidden * hidden + 2 * kv * hidden + 3 * hidden * intermediate)
    head = vocab * hidden  # the output head, tied to the embeddings: a plain linear layer for a delta method
    assert shape.targeted == projections and shape.linear_weights == projections + head
    assert shape.untargeted_linear_weights == head
    assert shape.parameters == head + projections + (2 * layers + 1) * hidden

    settings = {"batch": 2, "seq": 16, "precision": "bf16", "density": 0.01, "task": "causal-lm"}
    k = round(0.01 * projections)
    autocast = estimate(shape, "sara", **settings)
    assert autocast.weights == 4 * shape.parameters
    assert autocast.activations == memory.activation_bytes(shape, 2, 16, "bf16") + 2 * head
    bf16 = estimate(shape, "sara", base_dtype="bfloat16", **settings)
    assert bf16.weights == 2 * shape.parameters
    assert bf16.state == k * (8 + 4 + 8 + 2 + 4 + 2)  # AdamW, value, int64 position, θ, CSR column, merged value
    assert bf16.activations == memory.activation_bytes(shape, 2, 16, "bf16", "bfloat16")  # no float32 weight to copy
    per_hidden, per_intermediate, _, per_output = memory.ACTIVATION["bf16-base"]
    assert not shape.keeps_attention_probs  # SDPA, no attention dropout
    per_token = layers * (per_hidden * hidden + per_intermediate * intermediate) + per_output * vocab
    assert bf16.activations == round(2 * 16 * per_token)
    lora = estimate(shape, "lora", **settings)
    assert lora.activations == memory.activation_bytes(shape, 2, 16, "bf16") + 2 * (projections + head)


def peak_by_category():
    return load_script("bench/memory_model.py", "memory_model").peak_by_category


@pytest.mark.parametrize("method", ["sara", "full"])
def test_estimate_is_within_15_percent_of_a_measured_tiny_step(tiny_bert, method):
    """15%: the activation multiples were fitted to MiniLM-L6 and SmolLM2 (within 5% there, bench/
    memory_model.py); a 2-layer width-96 model keeps relatively more outside its layers."""
    from transformers import AutoModelForSequenceClassification

    import sparsedelta as sd

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=5)
    shape = memory.shape_of(model, "classification", "tiny")
    if method == "sara":
        sd.prepare(model, sd.SaRAConfig(density=0.01, modules_to_save=["classifier"]))
        params = sd.trainable_parameters(model)
    else:
        params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(1000, 20000, (8, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 5

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    measured = peak_by_category()(step)["peak_bytes"]
    expected = estimate(shape, method, batch=8, seq=64, density=0.01).total
    assert abs(expected / measured - 1) < 0.15, (expected, measured)


def test_cli_prints_every_method_and_json(tiny_bert, capsys):
    assert main(["estimate", "--model", str(tiny_bert), "--batch", "4", "--seq", "32"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("full", "lora", "sara")) and "peak GiB" in out
    assert main(["estimate", "--model", "smollm2-135m", "--method", "sara", "--base-dtype", "bfloat16", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["model"] == "smollm2-135m" and row["method"] == "sara" and row["total"] > row["weights"] > 0
    assert main(["estimate", "--model", "smollm2-135m", "--method", "sara", "--base-dtype", "bfloat16", "--json",
                 "--task", "sft"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out) == [row]  # instruction tuning trains the causal LM the same way
    assert main(["estimate", "--model", "smollm2-135m", "--method", "shira"]) == 2
    assert "covers full, lora" in capsys.readouterr().err


def test_largest_fitting_model_grows_with_the_budget():
    small = memory.largest_fitting(16, method="sara", batch=1, seq=512, precision="bf16", base_dtype="bfloat16",
                                   device="cuda", names=("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"))  # fmt: skip
    big = memory.largest_fitting(80, method="sara", batch=1, seq=512, precision="bf16", base_dtype="bfloat16",
                                 device="cuda", names=("smollm2-135m", "llama-3.2-1b", "llama-3.1-8b"))  # fmt: skip
    assert small == "llama-3.1-8b" or small == "llama-3.2-1b"
    assert big == "llama-3.1-8b"
    assert dataclasses.is_dataclass(estimate(SHAPE, "sara"))
