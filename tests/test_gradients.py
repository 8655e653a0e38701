"""The values' gradient equals the dense autograd gradient at the selected positions (float64)."""

import copy

import pytest
import torch
from torch import nn

import sparsedelta as sd
from sparsedelta.core import ops, patching
from sparsedelta.core.adapters import state_of

ALL_KINDS = ("weight", "bias", "embedding", "norm")


@pytest.fixture
def sampled_calls(monkeypatch):
    """A list that grows by one per sampled weight-gradient product."""
    calls = []
    sampled = ops._sampled_weight_grad
    monkeypatch.setattr(ops, "_sampled_weight_grad", lambda *a: calls.append(1) or sampled(*a))
    return calls


@pytest.fixture(params=["dense", "sampled"])
def weight_grad_path(request, monkeypatch, sampled_calls):
    """Run a test through both ways of taking a linear layer's values gradient."""
    monkeypatch.setattr(ops, "SAMPLED_MAX_DENSITY", 1.0 if request.param == "sampled" else 0.0)
    yield
    assert bool(sampled_calls) == (request.param == "sampled")


def dense_reference_grads(model, loss_fn):
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    loss_fn(ref).backward()
    return dict(ref.named_parameters(remove_duplicate=False))


def check_values_grads(model, config, loss_fn):
    reference = dense_reference_grads(model, loss_fn)
    sd.prepare(model, config)
    loss_fn(model).backward()
    deltas = state_of(model).adapters["default"].deltas
    assert deltas, "nothing was targeted"
    for name, delta in deltas.items():
        expected = reference[name].grad.reshape(-1)[delta.indices]
        assert delta.values.grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(delta.values.grad.double(), expected, rtol=1e-10, atol=1e-12, msg=name)
    return deltas


def lm_loss(ids):
    return lambda m: torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten())


def test_values_gradient_matches_dense_autograd_float64(tiny, weight_grad_path):
    tiny = tiny.double()
    ids = torch.randint(0, 50, (3, 7))
    ids[0, :2] = 0  # padding rows get no gradient, as in F.embedding
    check_values_grads(tiny, sd.RandomConfig(density=0.3, parameter_kinds=ALL_KINDS), lm_loss(ids))
    # every kind went through its own path: embedding/linear fast paths, conv/norm/bias fallback
    kinds = {type(m).__name__ for m in tiny.modules() if patching.is_wrapped(m, "sparsedelta")}
    assert kinds == {"Embedding", "Linear", "LayerNorm", "Conv1d"}


def test_tied_weights_receive_gradient_from_both_uses():
    from conftest import TinyNet

    torch.manual_seed(1)
    model = TinyNet(tied=True).double()
    ids = torch.randint(1, 50, (2, 5))
    deltas = check_values_grads(
        model, sd.RandomConfig(density=0.5, parameter_kinds=("embedding", "weight")), lm_loss(ids)
    )
    assert "embed.weight" in deltas and "head.weight" not in deltas  # one delta for the shared tensor


def test_transformers_conv1d_fast_path_float64(weight_grad_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.Tanh(), Conv1D(3, 6)).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    check_values_grads(
        model, sd.RandomConfig(density=0.4, parameter_kinds=("weight", "bias")), lambda m: m(x).pow(2).sum()
    )


def test_sampled_product_is_the_default_at_low_density_on_cpu(minilm, minilm_batch, sampled_calls):
    sd.prepare(minilm, sd.SaRAConfig(density=0.01, modules_to_save=["classifier"]))
    minilm(**minilm_batch).loss.backward()
    assert len(sampled_calls) == 37  # every targeted linear layer: 6 × (q, k, v, o, up, down) + the pooler


def test_sampled_gradient_follows_reselection_float64(minilm, minilm_batch, weight_grad_path):
    """Freezing entries changes the positions; the cached CSR pattern must follow."""
    model = minilm.double()
    sd.prepare(model, sd.RandomConfig(density=0.05, modules_to_save=["classifier"]))
    model(**minilm_batch).loss.backward()
    deltas = state_of(model).adapters["default"].deltas
    for delta in deltas.values():
        delta.freeze_entries(torch.rand(len(delta.indices)) < 0.5)
        delta.values.grad = None
    reference = dense_reference_grads(sd.merge_and_unload(copy.deepcopy(model)), lambda m: m(**minilm_batch).loss)
    model(**minilm_batch).loss.backward()
    for name, delta in deltas.items():
        expected = reference[name].grad.reshape(-1)[delta.indices]
        torch.testing.assert_close(delta.values.grad, expected, rtol=1e-10, atol=1e-12, msg=name)


def test_input_gradient_unchanged_by_delta_path(tiny):
    tiny = tiny.double()
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    layer = tiny.proj
    x1 = x.clone().requires_grad_(True)
    layer(x1).sum().backward()
    sd.prepare(tiny, sd.RandomConfig(density=0.2, target_modules=["proj"]))
    x2 = x.clone().requires_grad_(True)
    layer(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


def test_frozen_weights_keep_no_gradient(minilm, minilm_batch):
    sd.prepare(
        minilm, sd.SaRAConfig(threshold=1e-3, parameter_kinds=("weight", "embedding"), modules_to_save=["classifier"])
    )
    minilm(**minilm_batch).loss.backward()
    trainable = {id(p) for p in sd.trainable_parameters(minilm)}
    for name, p in minilm.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"frozen {name} has a gradient"
            assert not p.requires_grad, name


def test_minilm_values_gradient_float64(minilm, minilm_batch, weight_grad_path):
    """Linear, Embedding and the fallback (LayerNorm, biases) on the embedded model."""
    model = minilm.double()
    config = sd.RandomConfig(density=0.02, parameter_kinds=ALL_KINDS, modules_to_save=["classifier"])
    check_values_grads(model, config, lambda m: m(**minilm_batch).loss)


def test_gradient_accumulation_and_clipping_behave_like_parameters(tiny, weight_grad_path):
    ids = torch.randint(1, 50, (2, 6))
    loss = lm_loss(ids)
    sd.prepare(tiny, sd.RandomConfig(density=0.3))
    values = sd.trainable_parameters(tiny)
    loss(tiny).backward()
    once = [v.grad.clone() for v in values]
    loss(tiny).backward()
    for v, g in zip(values, once, strict=True):
        torch.testing.assert_close(v.grad, 2 * g)
    norm = torch.nn.utils.clip_grad_norm_(values, max_norm=1e-3)
    assert norm > 1e-3
    clipped = torch.sqrt(sum(v.grad.pow(2).sum() for v in values))
    assert clipped == pytest.approx(1e-3, rel=1e-4)


@pytest.mark.parametrize("density", [0.3, 0.05])  # 0.05: the sampled path's pattern is set, bf16 takes the dense one
def test_autocast_bfloat16_matches_float32_roughly(tiny, density):
    ids = torch.randint(1, 50, (2, 6))
    sd.prepare(tiny, sd.RandomConfig(density=density, parameter_kinds=ALL_KINDS))
    lm_loss(ids)(tiny).backward()
    exact = [v.grad.clone() for v in sd.trainable_parameters(tiny)]
    tiny.zero_grad()
    for v in sd.trainable_parameters(tiny):
        v.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(ids)(tiny)
    loss.backward()
    for v, g in zip(sd.trainable_parameters(tiny), exact, strict=True):
        assert v.grad.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(v.grad, g, dim=0)
        assert cos > 0.98
