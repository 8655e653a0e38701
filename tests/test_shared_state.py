"""State is per model: two models, two optimizers, copies and pickles never reach each other."""

import copy
import io

import pytest
import torch

import sparsedelta as sd
from conftest import TinyNet


def prepared(seed=0):
    torch.manual_seed(seed)
    return sd.prepare(TinyNet(), sd.RandomConfig(density=0.3, target_modules=["proj", "head"]))


def step(model, opt, ids):
    torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    opt.step()
    opt.zero_grad()


def reloaded(model, tmp_path, name):
    """A fresh base with `model`'s delta loaded: what `model` must compute."""
    sd.save(model, tmp_path / name)
    torch.manual_seed(0)
    return sd.load(TinyNet(), tmp_path / name)


def test_two_models_two_optimizers_and_assign_load(tmp_path):
    ids = torch.randint(1, 50, (2, 6))
    a, b = prepared(), prepared()
    opt_a = torch.optim.AdamW(sd.trainable_parameters(a), lr=1e-2)
    opt_b = torch.optim.AdamW(sd.trainable_parameters(b), lr=1e-2)
    a.load_state_dict(a.state_dict(), assign=True)  # replaces a's tensors: b's optimizer must not care
    for _ in range(2):
        step(b, opt_b, ids)
    with torch.no_grad():
        assert torch.equal(b(ids), reloaded(b, tmp_path, "b")(ids))
    with pytest.raises(RuntimeError, match="attach the delta again"):  # a says so itself, at its own forward
        step(a, opt_a, ids)


def test_deepcopy_and_pickle_follow_their_own_values(tmp_path):
    ids = torch.randint(1, 50, (2, 6))
    original = prepared()
    opt = torch.optim.AdamW(sd.trainable_parameters(original), lr=1e-2)
    for _ in range(3):  # the values' version counter moves past a fresh copy's
        step(original, opt, ids)
    with torch.no_grad():
        before = original(ids).clone()
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(original), torch.load(buffer, weights_only=False)):
        clone_opt = torch.optim.AdamW(sd.trainable_parameters(clone), lr=1e-2)
        for _ in range(3):
            step(clone, clone_opt, ids)
        sd.sync(clone)
        head = clone.head.weight.detach().clone()
        with torch.no_grad():
            assert torch.equal(clone(ids), reloaded(clone, tmp_path, f"c{id(clone)}")(ids))
            assert torch.equal(original(ids), before)  # the original is untouched
        assert torch.equal(clone.head.weight, head)  # sync wrote the copy's own values already
        assert not torch.equal(clone(ids), before)


def test_loaded_frozen_delta_has_nothing_trainable(tmp_path, capsys):
    sd.save(prepared(), tmp_path / "d")
    torch.manual_seed(0)
    frozen = sd.load(TinyNet(), tmp_path / "d")
    assert sd.trainable_parameters(frozen) == []
    sd.print_trainable_parameters(frozen)
    assert capsys.readouterr().out.startswith("trainable params: 0 ||")
    torch.manual_seed(0)
    trainable = sd.load(TinyNet(), tmp_path / "d", trainable=True)
    assert sum(p.numel() for p in sd.trainable_parameters(trainable)) > 0
