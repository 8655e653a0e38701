"""Targeting, freezing, merge/unmerge, switching between named deltas."""

import pytest
import torch

import sparsedelta as sd
from sparsedelta.core.adapters import state_of


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "sparse_delta" not in k}


def train_steps(model, batch_fn, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(sd.trainable_parameters(model), lr=lr)
    for _ in range(steps):
        batch_fn(model).backward()
        opt.step()
        opt.zero_grad()


def tiny_loss(ids):
    return lambda m: torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten())


def test_targeting_list_suffix_regex_exclude_and_kinds(tiny):
    targets = lambda cfg: set(state_of(sd.prepare(type(tiny)(), cfg)).adapters["default"].deltas)  # noqa: E731
    torch.manual_seed(0)
    assert targets(sd.RandomConfig(density=0.9, target_modules=["proj", "head"])) == {"proj.weight", "head.weight"}
    assert targets(sd.RandomConfig(density=0.9, target_modules=r"pro.|hea.")) == {"proj.weight", "head.weight"}
    assert targets(sd.RandomConfig(density=0.9, exclude_modules=["head"])) == {"proj.weight", "conv.weight"}
    assert targets(sd.RandomConfig(density=0.9, parameter_kinds=("bias", "norm"))) == {
        "proj.bias",
        "conv.bias",
        "norm.weight",
        "norm.bias",
    }
    assert targets(sd.RandomConfig(density=0.9, parameter_kinds=("embedding",))) == {"embed.weight"}


def test_unknown_target_lists_near_matches(tiny):
    with pytest.raises(ValueError, match=r"'projj' matches no module.*'proj'"):
        sd.prepare(tiny, sd.RandomConfig(target_modules=["projj"]))
    with pytest.raises(ValueError, match="regex"):
        sd.prepare(tiny, sd.RandomConfig(target_modules="nothing.*"))
    with pytest.raises(ValueError, match="parameter kinds"):
        sd.RandomConfig(parameter_kinds=("weights",))
    assert not hasattr(tiny, "_sparsedelta")  # nothing half-done


def test_only_selected_entries_change_and_everything_else_is_frozen(tiny):
    base = snapshot(tiny)
    sd.prepare(tiny, sd.RandomConfig(density=0.2, parameter_kinds=("weight", "bias", "embedding", "norm")))
    ids = torch.randint(1, 50, (4, 8))
    train_steps(tiny, tiny_loss(ids))
    deltas = state_of(tiny).adapters["default"].deltas
    for name, before in base.items():
        after = tiny.state_dict()[name]
        changed = torch.nonzero((after != before).reshape(-1)).squeeze(1)
        selected = deltas[name].indices if name in deltas else torch.empty(0, dtype=torch.long)
        assert torch.isin(changed, selected).all(), f"{name}: a non-selected entry changed"
        if name in deltas:
            assert len(changed) > 0, f"{name}: no selected entry was trained"


def test_merge_unmerge_round_trip_is_bit_exact(tiny):
    base = snapshot(tiny)
    sd.prepare(tiny, sd.RandomConfig(density=0.3))
    train_steps(tiny, tiny_loss(torch.randint(1, 50, (2, 5))))
    sd.sync(tiny)
    trained = snapshot(tiny)
    sd.unmerge(tiny)
    assert all(torch.equal(base[k], v) for k, v in snapshot(tiny).items())
    sd.merge(tiny)
    assert all(torch.equal(trained[k], v) for k, v in snapshot(tiny).items())
    with sd.disabled(tiny):
        assert all(torch.equal(base[k], v) for k, v in snapshot(tiny).items())
    assert all(torch.equal(trained[k], v) for k, v in snapshot(tiny).items())


def test_switching_between_named_deltas_reproduces_logits(tiny):
    ids = torch.randint(1, 50, (2, 6))
    base_logits = tiny(ids).detach()
    sd.prepare(tiny, sd.RandomConfig(density=0.2, seed=1), adapter_name="a")
    train_steps(tiny, tiny_loss(ids))
    logits_a = tiny(ids).detach()
    sd.prepare(tiny, sd.MagnitudeConfig(density=0.1), adapter_name="b")
    assert torch.equal(tiny(ids), base_logits)  # b starts at zero over the base, not over a
    train_steps(tiny, tiny_loss(ids.flip(1)))
    logits_b = tiny(ids).detach()
    for _ in range(2):
        sd.set_adapter(tiny, "a")
        assert torch.equal(tiny(ids), logits_a)
        sd.set_adapter(tiny, "b")
        assert torch.equal(tiny(ids), logits_b)
    sd.set_adapter(tiny, None)
    assert torch.equal(tiny(ids), base_logits)
    assert {p.requires_grad for p in sd.trainable_parameters(tiny)} == set()


def test_switching_back_after_more_training_writes_the_new_values(tiny):
    """Switching writes cached θ + delta per tensor; an optimizer step must not leave it stale."""
    ids = torch.randint(1, 50, (2, 6))
    for name, seed in (("a", 1), ("b", 2)):
        sd.prepare(tiny, sd.RandomConfig(density=0.2, seed=seed), adapter_name=name)
    deltas = state_of(tiny).adapters["a"].deltas
    for _ in range(2):
        sd.set_adapter(tiny, "a")
        train_steps(tiny, tiny_loss(ids))
        sd.set_adapter(tiny, "b")
        sd.set_adapter(tiny, "a")
        for delta in deltas.values():
            assert torch.equal(delta.weight.reshape(-1)[delta.indices], delta.base + delta.values.detach())


def test_merge_and_unload_and_unload(tiny):
    ids = torch.randint(1, 50, (2, 6))
    base = snapshot(tiny)
    sd.prepare(tiny, sd.RandomConfig(density=0.2))
    train_steps(tiny, tiny_loss(ids))
    tuned = tiny(ids).detach()
    plain = sd.merge_and_unload(tiny)
    assert not any("sparse_delta" in k for k in plain.state_dict())
    assert "forward" not in plain.proj.__dict__
    assert torch.equal(plain(ids), tuned)

    torch.manual_seed(0)
    from conftest import TinyNet

    other = TinyNet()
    sd.prepare(other, sd.RandomConfig(density=0.2))
    train_steps(other, tiny_loss(ids))
    sd.unload(other)
    assert all(torch.equal(base[k], v) for k, v in snapshot(other).items())


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_model_with_deltas_pickles_and_trains_on(tiny, how, tmp_path):
    import copy

    ids = torch.randint(1, 50, (2, 6))
    sd.prepare(tiny, sd.RandomConfig(density=0.2, modules_to_save=["head"]))
    train_steps(tiny, tiny_loss(ids), steps=1)
    if how == "torch.save":
        torch.save(tiny, tmp_path / "model.pt")
        copied = torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        copied = copy.deepcopy(tiny)
    assert torch.equal(copied(ids), tiny(ids))
    for model in (tiny, copied):  # the same step on both: the copy's merged weights follow its values
        train_steps(model, tiny_loss(ids), steps=2)
    assert torch.equal(copied(ids), tiny(ids))
    assert torch.equal(sd.merge_and_unload(copied)(ids), sd.merge_and_unload(tiny)(ids))
    assert "forward" not in copied.proj.__dict__


def test_modules_to_save_are_dense_per_adapter(tiny):
    ids = torch.randint(1, 50, (2, 6))
    head0 = tiny.head.weight.detach().clone()
    sd.prepare(tiny, sd.RandomConfig(density=0.1, target_modules=["proj"], modules_to_save=["head"]), adapter_name="a")
    assert tiny.head.weight.requires_grad
    train_steps(tiny, tiny_loss(ids))
    head_a = tiny.head.weight.detach().clone()
    assert not torch.equal(head_a, head0)
    with sd.disabled(tiny):
        assert torch.equal(tiny.head.weight, head0)
    sd.prepare(tiny, sd.RandomConfig(density=0.1, target_modules=["proj"], modules_to_save=["head"]), adapter_name="b")
    assert torch.equal(tiny.head.weight, head0)
    sd.set_adapter(tiny, "a")
    assert torch.equal(tiny.head.weight, head_a)


def test_trainable_count_and_print(tiny, capsys):
    sd.prepare(tiny, sd.RandomConfig(density=0.25, target_modules=["proj"], modules_to_save=["norm"]))
    trainable, total = sd.count_parameters(tiny)
    assert trainable == round(0.25 * 256) + 32
    assert total == sum(p.numel() for n, p in tiny.named_parameters() if "sparse_delta" not in n)
    sd.print_trainable_parameters(tiny)
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


def test_plain_adamw_over_all_requires_grad_parameters_uses_k_sized_state(tiny):
    sd.prepare(tiny, sd.RandomConfig(density=0.1))
    params = [p for p in tiny.parameters() if p.requires_grad]
    k = sum(p.numel() for p in params)
    assert k == sum(d.values.numel() for d in state_of(tiny).adapters["default"].deltas.values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    tiny_loss(torch.randint(1, 50, (2, 5)))(tiny).backward()
    opt.step()
    state_entries = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in opt.state.values())
    assert state_entries == 2 * k
    # the merged weight follows the step without any call
    delta = state_of(tiny).adapters["default"].deltas["proj.weight"]
    tiny(torch.randint(1, 50, (1, 3)))
    torch.testing.assert_close(tiny.proj.weight.reshape(-1)[delta.indices], delta.base + delta.values.detach())


def test_weights_follow_an_optimizer_step_at_the_next_forward_or_sync(tiny):
    """No process-wide optimizer hook: the model's own forward (or sparsedelta.sync) writes the step."""
    sd.prepare(tiny, sd.RandomConfig(density=0.1, target_modules=["proj"]))
    opt = torch.optim.SGD(sd.trainable_parameters(tiny), lr=0.1)
    tiny_loss(torch.randint(1, 50, (2, 5)))(tiny).backward()
    opt.step()
    delta = state_of(tiny).adapters["default"].deltas["proj.weight"]
    assert delta.values.detach().abs().sum() > 0
    merged = lambda: tiny.proj.weight.reshape(-1)[delta.indices]  # noqa: E731
    torch.testing.assert_close(merged(), delta.base)  # not yet written
    sd.sync(tiny)
    torch.testing.assert_close(merged(), delta.base + delta.values.detach())


def test_no_matching_parameter_names_the_flags_and_the_python_fields(tiny):
    with pytest.raises(ValueError, match=r"--target-modules, --parameter-kinds; in Python target_modules=, parameter_kinds="):
        sd.prepare(tiny, sd.RandomConfig(target_modules=["norm"], parameter_kinds=("embedding",)))
