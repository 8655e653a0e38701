"""SaRA's re-selection inside an ordinary training loop."""

import torch
from torch import nn

import sparsedelta as sd
from sparsedelta.core.adapters import state_of
from sparsedelta.methods.sara import reselect, reselect_relative


def test_reselect_while_the_last_graph_is_alive_keeps_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    sd.prepare(model, sd.SaRAConfig(density=0.5))
    optimizer = torch.optim.AdamW(sd.trainable_parameters(model), lr=1e-2)
    x = torch.randn(4, 8)
    for step in range(4):
        loss = model(x).pow(2).mean()  # `loss` keeps its graph alive into the next step, as in most loops
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            before = [len(v) for v in sd.trainable_parameters(model)]
            report = reselect(model, 0.05, optimizer)
            after = [len(v) for v in sd.trainable_parameters(model)]
            assert sum(after) == report.selected < sum(before)
    for v in sd.trainable_parameters(model):
        assert v.grad is None or v.grad.shape == v.shape


def test_frozen_entries_stay_merged_at_their_final_values():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    sd.prepare(model, sd.SaRAConfig(density=0.5, rank_penalty=0))
    optimizer = torch.optim.SGD(sd.trainable_parameters(model), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()  # values change after the forward that last wrote them into the weight
    reselect(model, 0.05, optimizer)
    delta = next(iter(state_of(model).adapters["default"].deltas.values()))
    assert len(delta.frozen_indices) > 0
    weight = model[0].weight.detach().reshape(-1)
    torch.testing.assert_close(weight[delta.frozen_indices], delta.frozen_base + delta.frozen_values, rtol=0, atol=0)


def test_relative_reselection_keeps_the_entries_still_smallest_in_their_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.Linear(12, 4))
    sd.prepare(model, sd.SaRAConfig(density=0.25, rank_penalty=0))
    deltas = state_of(model).adapters["default"].deltas
    with torch.no_grad():
        for delta in deltas.values():  # move a third of the entries far out, the others a little
            delta.values.copy_(torch.randn(len(delta.values)) * 0.01)
            delta.values[::3] += 1.0
    optimizer = torch.optim.AdamW(sd.trainable_parameters(model), lr=1e-3)
    model(torch.randn(3, 16)).sum().backward()
    optimizer.step()
    expected, moments = {}, {}
    for name, delta in deltas.items():  # brute force: rank every entry of the current tensor
        whole = delta.weight.detach().reshape(-1).clone()
        whole[delta.indices] = delta.current_values().detach()
        smallest = set(whole.abs().argsort()[: len(delta.indices)].tolist())
        kept = torch.tensor([i in smallest for i in delta.indices.tolist()])
        expected[name] = delta.indices[kept].clone()
        moments[name] = optimizer.state[delta.values]["exp_avg"][kept].clone()
    report = reselect_relative(model, optimizer)
    for name, delta in deltas.items():
        assert torch.equal(delta.indices, expected[name]) and 0 < len(expected[name])
        assert torch.equal(optimizer.state[delta.values]["exp_avg"], moments[name])  # the survivors' state kept
    assert report.selected == sum(len(e) for e in expected.values()) < report.eligible


def test_an_unknown_reselect_rule_is_refused():
    import pytest

    with pytest.raises(ValueError, match="reselect_rule must be 'absolute' or 'relative'"):
        sd.SaRAConfig(density=0.1, reselect_rule="quantile")
