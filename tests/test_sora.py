"""SoRA (arXiv 2311.11696): the gated layer, the soft threshold and proximal step, gates that die, exact
pruning, a PEFT adapter that PEFT alone loads, merging, saving/loading, the ξ grids and the stages."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import TinyNet
from sparsedelta import SoRAConfig, sora

R = 4


def linear_model(d_in=4, d_out=3, dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, d_out)).to(dtype)


# -- the operator and the proximal step on known numbers ---------------------------------------------
def test_soft_threshold_known_values():
    g = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.25, 1.0, 2.5], dtype=torch.float64)
    expected = torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5], dtype=torch.float64)
    assert torch.equal(sora.soft_threshold(g, 1.0), expected)
    assert torch.equal(sora.soft_threshold(g, 0.0), g)
    # T shrinks 1.2 to 0.2; the official code's three sequential masks would zero it (any gate in (ξ, 2ξ))
    assert torch.allclose(sora.soft_threshold(torch.tensor([1.2]), 1.0), torch.tensor([0.2]))
    with pytest.raises(ValueError, match=">= 0"):
        sora.soft_threshold(g, -0.1)


def test_proximal_step_both_modes_known_numbers():
    gate = torch.tensor([0.5, -0.1, 0.05, -1.0], dtype=torch.float64)
    model = sora.attach(linear_model(), SoRAConfig(r=R, xi=2.0, threshold="proximal"))
    layer = model[0]
    with torch.no_grad():
        layer.gate.copy_(gate)
    applied = sora.proximal_step(model, 0.1)  # t = lr·ξ = 0.2
    assert applied == {"0": pytest.approx(0.2)}
    assert torch.allclose(layer.gate, torch.tensor([0.3, 0.0, 0.0, -0.8], dtype=torch.float64))

    model = sora.attach(linear_model(), SoRAConfig(r=R, xi=0.2, threshold="official"))
    with torch.no_grad():
        model[0].gate.copy_(gate)
    sora.proximal_step(model, 123.0)  # the lr plays no part: t = ξ
    assert torch.allclose(model[0].gate, torch.tensor([0.3, 0.0, 0.0, -0.8], dtype=torch.float64))
    assert model[0].gate[1].item() == 0.0 and model[0].gate[2].item() == 0.0


def test_proximal_hook_reads_the_gate_groups_current_lr():
    model = sora.attach(linear_model(), SoRAConfig(r=R, xi=2.0, gate_init="ones"))
    gate = model[0].gate
    optimizer = torch.optim.SGD(sora.param_groups(model, lr=1.0, gate_lr=0.1))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
    sora.proximal_hook(model, optimizer)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # SGD leaves every value alone: only the threshold acts
    optimizer.step()  # gate lr 0.1 -> t = 0.2
    assert torch.allclose(gate, torch.full((R,), 0.8, dtype=torch.float64))
    scheduler.step()
    optimizer.step()  # gate lr 0.05 -> t = 0.1
    assert torch.allclose(gate, torch.full((R,), 0.7, dtype=torch.float64))


def test_proximal_step_refuses_an_optimizer_without_the_gates():
    model = sora.attach(linear_model(), SoRAConfig(r=R))
    optimizer = torch.optim.SGD([model[0].lora_A, model[0].lora_B], lr=0.1)
    with pytest.raises(ValueError, match="does not hold the gates"):
        sora.proximal_hook(model, optimizer)
    with pytest.raises(ValueError, match="no SoRA layers"):
        sora.proximal_step(linear_model(), 0.1)


def test_gradscaler_skipped_step_leaves_the_gates_alone():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    except (RuntimeError, TypeError, AttributeError):
        pytest.skip("this torch has no CPU GradScaler")
    model = sora.attach(linear_model(dtype=torch.float32), SoRAConfig(r=R, xi=1.0, gate_init="ones"))
    optimizer = torch.optim.SGD(sora.param_groups(model, lr=0.0, gate_lr=0.1))
    sora.proximal_hook(model, optimizer)
    scaler.scale(model(torch.randn(2, 4)).sum()).backward()
    model[0].gate.grad[0] = math.inf  # overflow: the scaler skips optimizer.step, so no threshold either
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model[0].gate.detach(), torch.ones(R))
    optimizer.zero_grad()
    scaler.scale(model(torch.randn(2, 4)).sum() * 0).backward()
    scaler.step(optimizer)  # a real step: SGD moves nothing (zero grads), the threshold 0.1·1 acts
    assert torch.allclose(model[0].gate.detach(), torch.full((R,), 0.9))


def test_l1_penalty_value_and_gradient():
    model = sora.attach(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double(), SoRAConfig(r=R, threshold="official"))
    assert config_l1(model) == 10.0  # the official scripts' sparse_lambda
    gates = [m.gate for m in sora.layers(model).values()]
    penalty = sora.l1_penalty(model)
    expected = 10.0 * sum(g.abs().sum() for g in gates) / (2 * R)
    assert torch.allclose(penalty, expected)
    penalty.backward()
    for g in gates:
        assert torch.allclose(g.grad, 10.0 * torch.sign(g.detach()) / (2 * R))
    proximal = sora.attach(linear_model(), SoRAConfig(r=R))
    assert sora.l1_penalty(proximal).item() == 0.0 and not sora.l1_penalty(proximal).requires_grad


def config_l1(model):
    return sora.config_of(model).l1_in_loss


# -- the layer and the targeting ---------------------------------------------------------------------
def test_layer_formula_init_and_unchanged_start():
    base = linear_model(5, 4)
    x = torch.randn(3, 5, dtype=torch.float64)
    before = base(x)
    model = sora.attach(base, SoRAConfig(r=3, lora_alpha=6, seed=0))
    layer = model[0]
    assert torch.equal(model(x), before)  # B = 0: the model is unchanged at start
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(5)  # kaiming-uniform(a=√5): bound 1/√in
    assert not torch.equal(layer.gate, torch.ones(3, dtype=torch.float64))  # N(0, 1), as the official code
    with torch.no_grad():
        layer.lora_B.normal_()
    a, b, g = layer.lora_A, layer.lora_B, layer.gate
    expected = before + ((x @ a.T) * g) @ b.T * (6 / 3)
    assert torch.allclose(model(x), expected, atol=1e-12)

    again = sora.attach(linear_model(5, 4), SoRAConfig(r=3, seed=0))
    assert torch.equal(again[0].lora_A, layer.lora_A) and torch.equal(again[0].gate, layer.gate)
    ones = sora.attach(linear_model(5, 4), SoRAConfig(r=3, gate_init="ones"))
    assert torch.equal(ones[0].gate, torch.ones(3, dtype=torch.float64))


def test_attach_targets_freezes_and_groups():
    torch.manual_seed(0)
    model = sora.attach(TinyNet(), SoRAConfig(r=R))
    assert set(sora.layers(model)) == {"proj", "head"}  # every nn.Linear; Conv1d and Embedding are not linear
    assert sora.ranks(model) == {"proj": R, "head": R}

    model = sora.attach(TinyNet(), SoRAConfig(r=R, modules_to_save=["head"], gate_lr=0.5))
    assert set(sora.layers(model)) == {"proj"}  # the saved head gets no branch
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"proj.lora_A", "proj.lora_B", "proj.gate", "head.weight"}
    groups = sora.param_groups(model, lr=1e-3, weight_decay=0.1)
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(trainable)
    gate_group = next(g for g in groups if g.get("name") == sora.GATE_GROUP)
    assert gate_group["params"] == [model.proj.gate] and gate_group["weight_decay"] == 0.0
    assert gate_group["lr"] == 0.5  # the config's gate_lr; an explicit argument wins
    assert next(g for g in sora.param_groups(model, 1e-3, gate_lr=0.2) if g.get("name") == sora.GATE_GROUP)["lr"] == 0.2

    model = sora.attach(TinyNet(), SoRAConfig(r=R, exclude_modules=["proj"]))
    assert set(sora.layers(model)) == {"head"}
    with pytest.raises(ValueError, match="already has SoRA"):
        sora.attach(model, SoRAConfig())
    with pytest.raises(ValueError, match="matches no module"):
        sora.attach(TinyNet(), SoRAConfig(target_modules=["prj"]))
    with pytest.raises(ValueError, match="no nn.Linear"):
        sora.attach(TinyNet(), SoRAConfig(target_modules=["conv"]))
    with pytest.raises(ValueError, match="no nn.Linear"):  # MultiheadAttention never calls its out_proj
        sora.attach(nn.Sequential(nn.MultiheadAttention(8, 2)), SoRAConfig())


def test_half_precision_base_keeps_float32_adapters():
    model = sora.attach(linear_model(dtype=torch.bfloat16), SoRAConfig(r=R, lora_dropout=0.1))
    layer = model[0]
    assert {p.dtype for p in (layer.lora_A, layer.lora_B, layer.gate)} == {torch.float32}
    out = model(torch.randn(2, 4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0


# -- gates that must die do --------------------------------------------------------------------------
def rank2_task(d=16, n=512):
    """A linear layer and data from the same layer plus a rank-2 change: only 2 of r = 8 directions help."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(d, d))
    with torch.no_grad():
        change = 0.5 * torch.randn(d, 2) @ torch.randn(2, d) / math.sqrt(d)
        x = torch.randn(n, d)
        y = x @ (base[0].weight + change).T + base[0].bias
    return base, x, y


def train(model, x, y, steps, optimizer, scheduler=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=generator)
        loss = ((model(x[i]) - y[i]) ** 2).mean() + sora.l1_penalty(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    with torch.no_grad():
        return ((model(x) - y) ** 2).mean().item(), losses


@pytest.mark.parametrize("xi", [0.0, 0.5])
def test_gates_that_must_die_do(xi):
    base, x, y = rank2_task()
    model = sora.attach(base, SoRAConfig(r=8, xi=xi, seed=0))
    optimizer = torch.optim.Adam(sora.param_groups(model, lr=1e-2, gate_lr=0.05))
    sora.proximal_hook(model, optimizer)
    final, losses = train(model, x, y, 300, optimizer)
    nonzero = sora.gate_counts(model)["0"]
    assert final < losses[0] / 100  # the loss still falls
    if xi == 0:
        assert nonzero == 8  # no L1: no gate is exactly zero
    else:
        assert 2 <= nonzero < 8  # the rank-2 change needs 2; several of the 8 gates died


# -- pruning, PEFT export, merging (float64) ---------------------------------------------------------
VOCAB = 64


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("sora_bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def load_bert(path):
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification.from_pretrained(path).double().eval()


def inputs():
    generator = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(1, VOCAB, (3, 7), generator=generator)}


def logits(model):
    with torch.no_grad():
        return model(**inputs()).logits


DEAD = "bert.encoder.layer.1.attention.self.key"


def trained_sora_bert(path, config=None):
    """A SoRA BERT whose branches are nonzero, whose ranks differ per layer and with one layer whose
    gates all died (as training would leave it), and a changed classifier head."""
    model = sora.attach(load_bert(path), config or SoRAConfig(r=R, seed=0, modules_to_save=["classifier"]))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for i, (name, layer) in enumerate(sora.layers(model).items()):
            layer.lora_B.copy_(0.3 * torch.randn(layer.lora_B.shape, generator=generator, dtype=torch.float64))
            layer.gate[torch.arange(R) % 3 == i % 3] = 0.0
            if name == DEAD:
                layer.gate.zero_()
        model.classifier.weight.add_(0.1)
    return model


def test_prune_is_exact(bert_dir):
    model = trained_sora_bert(bert_dir)
    before = logits(model)
    counts = sora.gate_counts(model)
    assert counts[DEAD] == 0 and set(counts.values()) != {R}
    assert sora.prune(model) == counts == sora.ranks(model)
    assert torch.allclose(logits(model), before, rtol=0, atol=1e-12)
    assert all(torch.equal(m.gate, torch.ones_like(m.gate)) for m in sora.layers(model).values())
    assert sora.layers(model)[DEAD].lora_A.shape == (0, 16)


def test_export_peft_reloads_with_the_same_logits(bert_dir, tmp_path):
    from peft import PeftModel

    model = trained_sora_bert(bert_dir)
    expected = logits(model)
    exported = sora.export_peft(model, tmp_path / "adapter", base_model_name_or_path=str(bert_dir))
    counts = sora.gate_counts(model)
    assert exported == {n: k for n, k in counts.items() if k} and DEAD not in exported  # dead layer left out
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["rank_pattern"].values()) == sorted(exported.values())
    assert config["modules_to_save"] == ["classifier"]
    assert config["task_type"] == "SEQ_CLS" and config["base_model_name_or_path"] == str(bert_dir)
    sora.export_peft(model, tmp_path / "unnamed")  # the base's name comes from the model itself
    assert json.loads((tmp_path / "unnamed" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(bert_dir)

    peft_model = PeftModel.from_pretrained(load_bert(bert_dir), tmp_path / "adapter").eval()
    for name, k in exported.items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        assert peft_layer.r["default"] == k
        assert peft_layer.scaling["default"] == 16 / R  # α/r kept exactly at rank nnz(g)
    assert not hasattr(peft_model.base_model.model.get_submodule(DEAD), "lora_A")
    assert torch.allclose(logits(peft_model), expected, rtol=0, atol=1e-12)  # g folded into B: rounding only
    sora.prune(model)
    assert torch.equal(logits(peft_model), logits(model))  # the pruned branch is PEFT's LoRA, bit for bit

    # PEFT alone, in a process that cannot import sparsedelta, loads it to the same logits
    child = textwrap.dedent(f"""
        import sys
        sys.modules["sparsedelta"] = None
        import torch
        from peft import PeftModel
        from transformers import BertForSequenceClassification
        base = BertForSequenceClassification.from_pretrained({str(bert_dir)!r}).double().eval()
        model = PeftModel.from_pretrained(base, {str(tmp_path / "adapter")!r}).eval()
        ids = torch.tensor({inputs()["input_ids"].tolist()})
        with torch.no_grad():
            torch.save(model(input_ids=ids).logits, {str(tmp_path / "child.pt")!r})
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert torch.allclose(torch.load(tmp_path / "child.pt"), expected, rtol=0, atol=1e-12)


def test_merge_gives_the_plain_model_with_the_same_logits(bert_dir):
    model = trained_sora_bert(bert_dir)
    expected = logits(model)
    plain = sora.merge(model)
    assert plain is model and not any(isinstance(m, sora.SoRALinear) for m in model.modules())
    assert not hasattr(model, "_sora")
    assert set(model.state_dict()) == set(load_bert(bert_dir).state_dict())
    assert torch.allclose(logits(model), expected, rtol=0, atol=1e-12)
    dead = model.get_submodule(DEAD).weight
    assert torch.equal(dead, load_bert(bert_dir).get_submodule(DEAD).weight)  # a dead layer is untouched


def test_conv1d_layers_of_gpt2(tmp_path):
    """transformers' Conv1D (weight stored as in × out): forward, PEFT export and merge."""
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "gpt2"
    )
    load = lambda: GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").double().eval()  # noqa: E731
    model = sora.attach(load(), SoRAConfig(r=R, seed=0, exclude_modules=["lm_head"]))
    assert {type(m.base_layer).__name__ for m in sora.layers(model).values()} == {"Conv1D"}
    with torch.no_grad():
        for layer in sora.layers(model).values():
            layer.lora_B.normal_(std=0.3)
            layer.gate[0] = 0.0
    expected = logits(model)
    sora.export_peft(model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(load(), tmp_path / "adapter").eval()
    assert torch.allclose(logits(peft_model), expected, rtol=0, atol=1e-12)
    assert torch.allclose(logits(sora.merge(model)), expected, rtol=0, atol=1e-12)


def test_export_refuses_when_every_gate_died(bert_dir, tmp_path):
    model = sora.attach(load_bert(bert_dir), SoRAConfig(r=R))
    with torch.no_grad():
        for layer in sora.layers(model).values():
            layer.gate.zero_()
    with pytest.raises(ValueError, match="every gate of every layer is zero"):
        sora.export_peft(model, tmp_path)


def test_exported_alpha_keeps_the_scaling():
    exact = 0
    for alpha, r in ((16, 8), (16, 16), (16, 12), (7, 24), (16, 25), (32, 48)):
        scaling = alpha / r
        for k in range(1, r + 1):
            error = abs(sora.export._exact_alpha(scaling, k) / k - scaling)
            assert error <= math.ulp(scaling)
            exact += error == 0
            if r in (8, 16):
                assert error == 0  # power-of-two ranks: always bit for bit
    assert exact > 0.9 * sum(r for _, r in ((16, 8), (16, 16), (16, 12), (7, 24), (16, 25), (32, 48)))


# -- saving and loading the unpruned state -----------------------------------------------------------
def test_save_and_load_round_trip(bert_dir, tmp_path):
    model = trained_sora_bert(bert_dir, SoRAConfig(r=R, seed=0, modules_to_save=["classifier"], xi=0.7))
    expected = logits(model)
    path = sora.save(model, tmp_path / "state")
    assert sorted(os.listdir(tmp_path / "state")) == [sora.CONFIG_FILE, sora.STATE_FILE]  # no temporary left
    info = json.loads((tmp_path / "state" / sora.CONFIG_FILE).read_text())
    assert info["config"]["xi"] == 0.7 and info["layers"][DEAD] == {"rank": R, "nonzero_gates": 0}

    loaded = sora.load(load_bert(bert_dir), tmp_path / "state")
    assert torch.equal(logits(loaded), expected)
    assert sora.gate_counts(loaded) == sora.gate_counts(model) and sora.config_of(loaded).xi == 0.7
    assert loaded.classifier.weight.requires_grad and not loaded.bert.embeddings.word_embeddings.weight.requires_grad

    sora.prune(model)  # a pruned state comes back pruned
    sora.save(model, tmp_path / "pruned")
    assert sora.ranks(sora.load(load_bert(bert_dir), tmp_path / "pruned")) == sora.ranks(model)

    with pytest.raises(ValueError, match="matches no module|does not fit"):
        sora.load(TinyNet().double(), path)
    with pytest.raises(FileNotFoundError, match="sora.save"):
        sora.load(load_bert(bert_dir), tmp_path / "nowhere")


# -- settings and grids ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": 2.5}, "r must be an integer >= 1"),
        ({"xi": -0.1}, "xi must be a finite number >= 0"),
        ({"l1_in_loss": -1}, "l1_in_loss must be"),
        ({"lora_alpha": 0}, "lora_alpha must be a positive"),
        ({"lora_dropout": 1.0}, "lora_dropout must be in"),
        ({"gate_init": "zeros"}, "gate_init must be one of"),
        ({"threshold": "hard"}, "threshold must be 'proximal'"),
        ({"gate_lr": 0}, "gate_lr must be > 0"),
        ({"schedule": [0.1, 0.3, 0.2]}, "strictly increasing"),
        ({"schedule": [0.1, 0.1]}, "strictly increasing"),
        ({"schedule": []}, "schedule is empty"),
        ({"schedule": [-1.0, 1.0]}, "every ξ of the schedule"),
        ({"modules_to_save": "classifier"}, "modules_to_save must be a list"),
    ],
)
def test_bad_settings_get_clear_errors(settings, message):
    with pytest.raises(ValueError, match=message):
        SoRAConfig(**settings)


def test_config_defaults_and_round_trip():
    proximal, official = SoRAConfig(), SoRAConfig(threshold="official")
    assert (proximal.r, proximal.lora_alpha, proximal.gate_init) == (8, 16.0, "normal")
    assert (proximal.xi, proximal.l1_in_loss) == (0.375, 0.0)
    assert (official.xi, official.l1_in_loss) == (3e-4, 10.0)
    assert SoRAConfig.from_dict(json.loads(json.dumps(official.to_dict()))) == official
    with pytest.raises(ValueError, match="unknown SoRA settings"):
        SoRAConfig.from_dict({"rank": 8})


def test_xi_grids_are_increasing_and_correct():
    assert sora.xi_schedule("linear", 0.0, 1.0, 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert sora.xi_schedule("exp_linear", 1e-3, 1e-1, 3) == pytest.approx([1e-3, 1e-2, 1e-1])
    log_linear = sora.xi_schedule("log_linear", 0.0, 2.0, 3)
    assert log_linear == pytest.approx([0.0, math.log((1 + math.exp(2)) / 2), 2.0])
    for kind in sora.GRIDS:
        values = sora.xi_schedule(kind, 0.01, 3.0, 7)
        assert len(values) == 7 and values[0] == 0.01 and values[-1] == 3.0
        assert all(b > a for a, b in zip(values, values[1:]))
    assert sora.xi_schedule("linear", 0.5, 0.5, 1) == [0.5]
    with pytest.raises(ValueError, match="cannot start at ξ = 0"):
        sora.xi_schedule("exp_linear", 0.0, 1.0, 4)
    with pytest.raises(ValueError, match="overflows"):
        sora.xi_schedule("log_linear", 0.0, 1000.0, 4)
    with pytest.raises(ValueError, match="stop must be greater"):
        sora.xi_schedule("linear", 1.0, 0.5, 4)
    with pytest.raises(ValueError, match="stages must be"):
        sora.xi_schedule("linear", 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="unknown ξ grid"):
        sora.xi_schedule("cosine", 0.0, 1.0, 3)


# -- the sparsifying scheduler -----------------------------------------------------------------------
def test_sparsify_stages_fresh_optimizers_and_checkpoints(tmp_path):
    base, x, y = rank2_task()
    model = sora.attach(base, SoRAConfig(r=8, seed=0))
    made, first_lrs = [], []

    def make_optimizer(model):
        optimizer = torch.optim.Adam(sora.param_groups(model, lr=1e-2, gate_lr=0.05))
        made.append(optimizer)
        return optimizer, torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.0, total_iters=150)

    def train_fn(model, optimizer, scheduler, index):
        first_lrs.append([g["lr"] for g in optimizer.param_groups])
        final, _ = train(model, x, y, 150, optimizer, scheduler, seed=index)
        return {"mse": final}

    stages = sora.sparsify(model, sora.xi_schedule("linear", 0.1, 1.0, 3), make_optimizer, train_fn, tmp_path)
    assert [s.xi for s in stages] == [0.1, 0.55, 1.0] and len({id(o) for o in made}) == 3
    assert first_lrs == [[1e-2, 0.05]] * 3  # every stage starts its own lr schedule from the top
    assert stages[-1].nonzero < 8 and stages[-1].nonzero <= stages[0].nonzero
    assert all(s.metrics["mse"] < 0.05 for s in stages)
    summary = json.loads((tmp_path / "stages.json").read_text())
    assert [s["nonzero"] for s in summary] == [s.nonzero for s in stages]
    for stage in stages:  # each stage's checkpoint holds that stage's gates
        again = sora.load(rank2_task()[0], stage.checkpoint)
        assert sora.gate_counts(again) == stage.gates and sora.config_of(again).xi == stage.xi

    same = torch.optim.Adam(sora.param_groups(model, lr=1e-2))
    with pytest.raises(ValueError, match="previous stage's optimizer"):
        sora.sparsify(model, [1.0, 2.0], lambda m: same, lambda *a: None)
