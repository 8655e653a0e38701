"""Deltas over bfloat16/float16 bases (applied as a correction, not merged into the weight) and the
values' gradient from low-precision factors, against float32/float64 references."""

import copy
import warnings

import pytest
import torch
from torch import nn

import sparsedelta as sd
from conftest import TinyNet
from sparsedelta.core import ops
from sparsedelta.core.adapters import state_of

ALL_KINDS = ("weight", "bias", "embedding", "norm")


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bfloat16 numbers at |t| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(t.abs().float().clamp_min(1e-30))) - 7)


def deltas_of(model):
    return state_of(model).adapters["default"].deltas


def classifier(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.LayerNorm(1024), nn.Linear(1024, 32), nn.Tanh(), nn.Linear(32, 5))


def test_bf16_base_logits_equal_the_float32_computation():
    """Every entry's change is 0.45 of θ's last bf16 bit: merged into a bf16 weight it rounds away, and
    the logits' change (many such entries adding up) would be lost; as a correction it is kept."""
    model = classifier().bfloat16()
    reference = copy.deepcopy(model).float()  # the same θ, exactly
    center = torch.randn(1024)
    x = center + 0.1 * torch.randn(16, 1024)
    config = sd.MagnitudeConfig(density=0.5, parameter_kinds=("weight", "bias", "norm"))  # large |θ|

    def attach(m):
        sd.prepare(m, config)
        with torch.no_grad():
            for name, delta in deltas_of(m).items():
                change = 0.45 * bf16_ulp(delta.base)
                if name == "1.weight":  # the same sign as its input: the changes add up
                    change *= torch.sign(center)[delta.indices % 1024]
                delta.values.copy_(change)
        return m

    with torch.no_grad():
        without = reference(x)
        expected = attach(reference)(x)
        got = attach(model)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    tolerance = expected.abs().max() / 128  # one bf16 step at the logits' scale
    assert (expected - without).abs().max() > 2 * tolerance  # the delta matters beyond bf16's resolution
    torch.testing.assert_close(got.float(), expected, atol=float(tolerance), rtol=0)
    assert all(not d.holds_delta for d in deltas_of(model).values())
    with sd.disabled(model), torch.no_grad():  # the base model: the weights hold θ, no correction
        torch.testing.assert_close(model(x.bfloat16()).float(), without, atol=float(tolerance), rtol=0)


def test_every_path_on_a_bf16_base_matches_float32_and_its_gradient_float64():
    """Embedding and linear fast paths, the float32 generic path (LayerNorm, Conv1d, biases)."""
    torch.manual_seed(0)
    model = TinyNet().bfloat16()
    reference = copy.deepcopy(model).double()
    ids = torch.randint(1, 50, (3, 7))
    config = sd.RandomConfig(density=0.3, parameter_kinds=ALL_KINDS)
    sd.prepare(model, config)
    sd.prepare(reference, config)
    for (name, delta), ref in zip(deltas_of(model).items(), deltas_of(reference).values(), strict=True):
        assert torch.equal(delta.indices, ref.indices), name
        with torch.no_grad():
            change = 0.3 * bf16_ulp(delta.base) * torch.randn(len(delta.indices)).sign()
            delta.values.copy_(change)
            ref.values.copy_(change.double())

    def loss(m, dtype):
        return nn.functional.cross_entropy(m(ids).flatten(0, 1).to(dtype), ids.flatten())

    loss(model, torch.float32).backward()
    loss(reference, torch.float64).backward()
    with torch.no_grad():
        got, expected = model(ids).double(), reference(ids)
    torch.testing.assert_close(got, expected, atol=float(expected.abs().max()) / 64, rtol=0)
    for (name, delta), ref in zip(deltas_of(model).items(), deltas_of(reference).values(), strict=True):
        assert delta.values.dtype == torch.float32 and delta.values.grad is not None, name
        g, r = delta.values.grad.double(), ref.values.grad
        assert torch.nn.functional.cosine_similarity(g, r, dim=0) > 0.99, name
        assert (g - r).norm() < 0.1 * r.norm(), name


def train(model, steps=25):
    torch.manual_seed(0)
    x, y = torch.randn(32, 1024), torch.randint(0, 5, (32,))
    sd.prepare(model, sd.MagnitudeConfig(density=0.05, parameter_kinds=("weight", "bias", "norm")))
    optimizer = torch.optim.AdamW(sd.trainable_parameters(model), lr=5e-3)
    dtype = next(model.parameters()).dtype
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_training_on_a_bf16_base_decreases_the_loss_as_in_float32():
    fp32 = train(classifier())
    bf16 = train(classifier().bfloat16())
    assert fp32[-1] < 0.6 * fp32[0]
    assert bf16[-1] < 0.6 * bf16[0]
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.02 * fp32[0]  # the same curve


def test_dtype_changes_switch_between_merged_and_corrected(tiny):
    ids = torch.randint(1, 50, (2, 5))
    sd.prepare(tiny, sd.RandomConfig(density=0.2, parameter_kinds=ALL_KINDS))
    with torch.no_grad():
        for delta in deltas_of(tiny).values():
            delta.values.normal_(0, 1e-2)
        expected = tiny(ids)
    theta = {n: p.detach().clone() for n, p in sd.unload(copy.deepcopy(tiny)).named_parameters()}
    tiny.bfloat16()
    sd.sync(tiny)  # as every forward does: the bf16 weights get θ back, the delta becomes a correction
    for name, delta in deltas_of(tiny).items():
        assert not delta.holds_delta
        assert torch.equal(delta.weight.detach().float(), theta[name].bfloat16().float()), f"{name} holds θ"
    with torch.no_grad():
        torch.testing.assert_close(tiny(ids).float(), expected, atol=0.05, rtol=0)
    tiny.float()  # merged again: bit-exact θ + delta in float32 (θ here: its bf16 rounding)
    sd.sync(tiny)
    with torch.no_grad():
        for delta in deltas_of(tiny).values():
            assert delta.holds_delta
            merged = delta.weight.reshape(-1)[delta.indices]
            torch.testing.assert_close(merged, delta.base + delta.values, rtol=0, atol=0)


def test_save_load_and_switch_on_a_bf16_base(tiny, tmp_path):
    ids = torch.randint(1, 50, (2, 5))
    base = copy.deepcopy(tiny).bfloat16()
    model = copy.deepcopy(base)
    sd.prepare(model, sd.MagnitudeConfig(density=0.1, parameter_kinds=ALL_KINDS))
    with torch.no_grad():
        for delta in deltas_of(model).values():
            delta.values.copy_(0.4 * bf16_ulp(delta.base))
        out = model(ids)
    sd.save(model, tmp_path / "d")
    loaded = sd.load(copy.deepcopy(base), tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), out, rtol=0, atol=0)
        with sd.disabled(loaded):
            torch.testing.assert_close(loaded(ids), base(ids), rtol=0, atol=0)
        for (name, p), q in zip(sd.unload(loaded).named_parameters(), base.parameters(), strict=True):
            assert torch.equal(p, q), f"{name}: unload gives θ back bit for bit"


def test_merge_and_unload_on_a_bf16_base_warns_and_rounds(tiny):
    model = tiny.bfloat16()
    sd.prepare(model, sd.MagnitudeConfig(density=0.1))
    with torch.no_grad():
        for delta in deltas_of(model).values():
            delta.values.copy_(0.4 * bf16_ulp(delta.base))
    with pytest.warns(UserWarning, match="call model.float"):
        merged = sd.merge_and_unload(copy.deepcopy(model))
    assert not any(hasattr(m, "sparse_delta") for m in merged.modules())
    exact = sd.merge_and_unload(copy.deepcopy(model).float())  # the exact merged model, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd.merge_and_unload(copy.deepcopy(model).float())
    assert exact.proj.weight.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_sampled_values_gradient_from_low_precision_factors(monkeypatch, dtype, transposed):
    """The k-entry product from bf16/fp16 factors, accumulated in float32, against float64 autograd."""
    monkeypatch.setattr(ops, "native_bf16_matmul", lambda: False)  # take the sampled product for bf16 too
    torch.manual_seed(0)
    n, fan_in, fan_out = 700, 48, 24  # more tokens than one chunk
    shape = (fan_in, fan_out) if transposed else (fan_out, fan_in)
    weight = torch.randn(shape)
    indices = torch.randperm(weight.numel())[: weight.numel() // 20].sort().values
    x, g = torch.randn(n, fan_in), torch.randn(n, fan_out)
    from sparsedelta.core.delta import csr_of

    assert ops.sampled_pays(weight, len(indices), dtype)
    values = torch.zeros(len(indices), requires_grad=True)
    out = ops.LinearDelta.apply(x.to(dtype), weight.to(dtype), None, values, indices, transposed, csr_of(indices, shape))
    out.backward(g.to(dtype))
    dense = (x.double().t() @ g.double()) if transposed else (g.double().t() @ x.double())
    expected = dense.reshape(-1)[indices]
    assert values.grad.dtype == torch.float32
    scale = float(expected.abs().max())
    torch.testing.assert_close(values.grad.double(), expected, atol=scale * 2**-7, rtol=0)


def test_bf16_gradient_path_follows_the_cpu(monkeypatch):
    weight = torch.zeros(64, 64)
    monkeypatch.setattr(ops, "native_bf16_matmul", lambda: True)
    assert not ops.sampled_pays(weight, 40, torch.bfloat16)  # AMX/AVX512-BF16: the dense bf16 product
    assert ops.sampled_pays(weight, 40, torch.float16) and ops.sampled_pays(weight, 40, torch.float32)
    monkeypatch.setattr(ops, "native_bf16_matmul", lambda: False)
    assert ops.sampled_pays(weight, 40, torch.bfloat16)


def test_a_float32_delta_goes_onto_a_bf16_model_through_model_bfloat16(tiny, tmp_path):
    ids = torch.randint(1, 50, (2, 5))
    base = copy.deepcopy(tiny)
    sd.prepare(tiny, sd.RandomConfig(density=0.2, parameter_kinds=ALL_KINDS))
    with torch.no_grad():
        for delta in deltas_of(tiny).values():
            delta.values.normal_(0, 1e-2)
        expected = tiny(ids)
    sd.save(tiny, tmp_path / "d")
    with pytest.raises(sd.DeltaFileError, match="dtype mismatch"):
        sd.load(copy.deepcopy(base).bfloat16(), tmp_path / "d")
    model = sd.load(base, tmp_path / "d").bfloat16()
    with torch.no_grad():
        got = model(ids)
    assert got.dtype == torch.bfloat16 and all(not d.holds_delta for d in deltas_of(model).values())
    torch.testing.assert_close(got.float(), expected, atol=float(expected.abs().max()) / 32, rtol=0)


def test_conv1d_on_a_bf16_base_matches_float64():
    """transformers' Conv1D stores its weight (in, out): the correction's transposed layout."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(24, 16), nn.Tanh(), Conv1D(8, 24)).bfloat16()
    reference = copy.deepcopy(model).double()
    config = sd.RandomConfig(density=0.3, parameter_kinds=("weight", "bias"))
    sd.prepare(model, config)
    sd.prepare(reference, config)
    for delta, ref in zip(deltas_of(model).values(), deltas_of(reference).values(), strict=True):
        with torch.no_grad():
            change = 0.3 * bf16_ulp(delta.base) * torch.randn(len(delta.indices)).sign()
            delta.values.copy_(change)
            ref.values.copy_(change.double())
    x = torch.randn(4, 5, 16)
    x16, x64 = x.bfloat16().requires_grad_(True), x.double().requires_grad_(True)
    got, expected = model(x16), reference(x64)
    scale = float(expected.detach().abs().max())
    torch.testing.assert_close(got.detach().double(), expected.detach(), atol=scale / 64, rtol=0)
    got.float().pow(2).sum().backward()
    expected.pow(2).sum().backward()
    assert torch.nn.functional.cosine_similarity(x16.grad.double().flatten(), x64.grad.flatten(), dim=0) > 0.999
    for delta, ref in zip(deltas_of(model).values(), deltas_of(reference).values(), strict=True):
        assert torch.nn.functional.cosine_similarity(delta.values.grad.double(), ref.values.grad, dim=0) > 0.99


def test_model_bfloat16_keeps_the_trained_values_float32(tiny):
    sd.prepare(tiny, sd.RandomConfig(density=0.2))
    with torch.no_grad():
        for delta in deltas_of(tiny).values():
            delta.values.normal_(0, 1e-4)
    before = {n: d.values.detach().clone() for n, d in deltas_of(tiny).items()}
    params = {n: d.values for n, d in deltas_of(tiny).items()}
    tiny.bfloat16()
    for name, delta in deltas_of(tiny).items():
        assert delta.values is params[name]  # the same Parameter: an optimizer keeps following it
        assert delta.values.dtype == torch.float32 and torch.equal(delta.values.detach(), before[name])
        assert delta.base.dtype == torch.bfloat16
    tiny.double()
    assert all(d.values.dtype == torch.float64 for d in deltas_of(tiny).values())  # widening casts apply
