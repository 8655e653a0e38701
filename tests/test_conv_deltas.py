"""Convolutions as delta targets (patching's "conv" fast path, ops.ConvDelta): on a float64 net of
Conv1d, Conv2d and Conv3d layers (groups, stride, dilation, 'same' and 'valid' padding) the values'
gradient is the dense autograd gradient at the positions, training changes only those entries and
keeps no dense gradient, and merge, files, mixed batches and compose are exact; export to PEFT
SHiRA refuses a conv kernel by name."""

import copy

import pytest
import torch
from torch import nn

import sparsedelta as sd
from sparsedelta.core import adapters, ops, patching
from sparsedelta.errors import UsageError

F64 = torch.float64
KINDS = ("weight", "bias")
pytestmark = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel lengths")  # the reference model's own


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding="same")
        self.c1_even = nn.Conv1d(6, 6, 4, padding="same")  # even reach: one more pixel on the right
        self.c2 = nn.Conv2d(6, 8, 3, groups=2, stride=2, dilation=2, padding=1)
        self.c2_same = nn.Conv2d(8, 8, 3, groups=2, dilation=2, padding="same")
        self.c3 = nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding="valid")

    def forward(self, x):  # x: (B, 4, 144)
        h = torch.tanh(self.c1_even(torch.tanh(self.c1(x))))
        h = torch.tanh(self.c2_same(torch.tanh(self.c2(h.view(len(h), 6, 12, 12)))))  # (B, 8, 5, 5)
        return self.c3(h.view(len(h), 2, 4, 5, 5)).flatten(1)  # (B, 72)


def make_net(seed=0):
    torch.manual_seed(seed)
    return ConvNet().double()


def batch(seed=1, rows=3, dtype=F64):
    return torch.randn(rows, 4, 144, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def loss_of(x, target):
    return lambda m: (m(x) - target).pow(2).mean()


def sara(density=0.2):
    """SaRA's smallest |θ| within each tensor, so that every kernel and bias gets entries."""
    return sd.SaRAConfig(density=density, per_tensor=True, parameter_kinds=KINDS, rank_penalty=0.0)


@pytest.fixture
def conv_calls(monkeypatch):
    """The conv layers that went through the fast path, by weight shape."""
    calls = []
    real = adapters.FAST["conv"]
    monkeypatch.setitem(adapters.FAST, "conv", lambda m, *a: calls.append(tuple(m.weight.shape)) or real(m, *a))
    return calls


def deltas_of(model, name="default"):
    return sd.state_of(model).adapters[name].deltas


def test_every_conv_takes_the_fast_path_and_others_fall_back():
    net = ConvNet()
    assert all(patching.fast_path(m).kind == "conv" for m in (net.c1, net.c2, net.c3))
    assert patching.fast_path(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")) is None  # generic path
    assert patching.fast_path(nn.ConvTranspose2d(2, 2, 3)) is None


def test_values_gradient_equals_dense_autograd_at_the_positions(conv_calls):
    net, x = make_net(), batch().requires_grad_(True)
    target = torch.randn(3, 72, dtype=F64)
    ref, x_ref = copy.deepcopy(net), x.detach().clone().requires_grad_(True)
    for p in ref.parameters():
        p.requires_grad_(True)
    loss_of(x_ref, target)(ref).backward()
    reference = dict(ref.named_parameters())

    sd.prepare(net, sara())
    with torch.no_grad():  # non-zero values, so the gradient is taken at θ + Δ, not at θ
        for delta in deltas_of(net).values():
            delta.values.normal_(0, 0.05)
            reference_param = reference[_path_of(net, delta)]
            reference_param.data.view(-1)[delta.indices] += delta.values
    ref.zero_grad()
    x_ref.grad = None
    loss_of(x_ref, target)(ref).backward()
    loss_of(x, target)(net).backward()

    assert sorted(conv_calls) == sorted(tuple(m.weight.shape) for m in net.children())
    for name, delta in deltas_of(net).items():
        expected = reference[name].grad.reshape(-1)[delta.indices]
        torch.testing.assert_close(delta.values.grad, expected, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def _path_of(model, delta):
    return next(n for n, d in deltas_of(model).items() if d is delta)


def test_unbatched_input_and_reflect_padding_match_autograd():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, padding=1, padding_mode="reflect")).double()
    x = torch.randn(3, 9, 9, dtype=F64)  # (C, H, W): no batch dimension
    ref = copy.deepcopy(net)
    for p in ref.parameters():
        p.requires_grad_(True)
    ref(x).pow(2).sum().backward()
    sd.prepare(net, sara(0.3))
    net(x).pow(2).sum().backward()
    for name, delta in deltas_of(net).items():
        expected = dict(ref.named_parameters())[name].grad.reshape(-1)[delta.indices]
        torch.testing.assert_close(delta.values.grad, expected, rtol=1e-10, atol=1e-12, msg=name)


def trained(net, steps=3, seed=1):
    """SaRA through the public API: prepare, AdamW on the trainable values, a few steps."""
    sd.prepare(net, sara())
    opt = torch.optim.AdamW(sd.trainable_parameters(net), lr=1e-2)
    dtype = next(net.parameters()).dtype
    x, target = batch(seed, dtype=dtype), torch.randn(3, 72, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    for _ in range(steps):
        opt.zero_grad()
        loss_of(x, target)(net).backward()
        opt.step()
    sd.sync(net)
    return net, opt


def test_training_changes_only_the_selected_entries_and_keeps_no_dense_gradient():
    base = make_net()
    net, opt = trained(make_net())
    deltas = deltas_of(net)
    assert set(deltas) == {f"{m}.{p}" for m in ("c1", "c1_even", "c2", "c2_same", "c3") for p in ("weight", "bias")}
    for name, param in base.named_parameters():
        now = net.get_parameter(name)
        assert now.grad is None and not now.requires_grad, name  # the frozen kernel never holds a gradient
        changed = torch.nonzero((now.detach() != param.detach()).reshape(-1)).squeeze(1)
        assert changed.numel() > 0 and bool(torch.isin(changed, deltas[name].indices).all()), name
    for delta in deltas.values():  # optimizer state is k-sized
        state = opt.state[delta.values]
        assert state["exp_avg"].shape == state["exp_avg_sq"].shape == delta.values.shape


def test_merge_unmerge_round_trip_is_bit_exact():
    base = make_net()
    net, _ = trained(make_net())
    x = batch(5)
    with torch.no_grad():
        merged = net(x)
        sd.unmerge(net)
        for name, param in base.named_parameters():
            assert torch.equal(net.get_parameter(name), param), name
        assert torch.equal(net(x), base(x))
        sd.merge(net)
        assert torch.equal(net(x), merged)


def test_save_load_is_exact(tmp_path):
    net, _ = trained(make_net().float())  # files hold float32 values: a float32 delta round-trips bit-exact
    x = batch(6, dtype=torch.float32)
    with torch.no_grad():
        expected = net(x)
    sd.save(net, tmp_path / "delta")
    loaded = sd.load(make_net().float(), tmp_path / "delta")
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    plain = sd.merge_and_unload(loaded)
    with torch.no_grad():
        assert torch.equal(plain(x), expected)


def two_tasks():
    net = make_net()
    gen = torch.Generator().manual_seed(7)
    for name, seed in (("a", 1), ("b", 2)):
        config = sd.RandomConfig(density=0.3, per_tensor=True, parameter_kinds=KINDS, seed=seed)
        sd.add_delta(net, config, adapter_name=name, trainable=False)
        with torch.no_grad():  # float32-representable values: files keep them exactly
            for delta in deltas_of(net, name).values():
                delta.values.copy_((torch.randn(delta.values.shape, generator=gen) * 0.1).double())
    sd.sync(net)
    return net.eval()


def test_mixed_batch_over_two_conv_deltas_equals_each_task_alone():
    net = two_tasks()
    x = batch(8, rows=5)
    names = ["a", "b", sd.BASE, "a", "b"]
    with torch.no_grad():
        mixed = net(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == sd.BASE:
                with sd.disabled(net):
                    alone = net(x[i : i + 1])
            else:
                sd.set_adapter(net, name)
                alone = net(x[i : i + 1])
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-12, atol=1e-13, msg=name)
    sd.set_adapter(net, "b")  # the model is left as it was: b merged
    plain = make_net()
    with torch.no_grad():
        for delta_path, delta in deltas_of(net, "b").items():
            plain.get_parameter(delta_path).view(-1)[delta.indices] += delta.values
        assert torch.equal(net(x), plain(x))


def test_compose_sums_conv_deltas_exactly(tmp_path):
    net = two_tasks()
    for name in ("a", "b"):
        sd.save(net, tmp_path / name, adapter_name=name)
    sd.compose(make_net(), [tmp_path / "a", tmp_path / "b"], tmp_path / "sum")
    composed = sd.load(make_net(), tmp_path / "sum")
    expected = make_net()
    with torch.no_grad():
        for name in ("a", "b"):
            for path, delta in deltas_of(net, name).items():
                expected.get_parameter(path).view(-1)[delta.indices] += delta.values
        # the sum of two float32 values is stored in float32: one rounding
        torch.testing.assert_close(composed(batch(9)), expected(batch(9)), rtol=1e-6, atol=1e-7)


def test_bf16_conv_kernel_takes_the_corrected_generic_path(conv_calls):
    net, _ = trained(make_net())
    x = batch(4)
    conv_calls.clear()  # training went through the fast path
    with torch.no_grad():
        exact = net(x).float()
        net.bfloat16()
        out = net(x.bfloat16())
    assert conv_calls == []  # a bf16 kernel cannot hold θ + Δ: the module runs in float32 on it
    torch.testing.assert_close(out.float(), exact, rtol=0.05, atol=0.05)


def test_export_refuses_a_delta_on_a_conv_kernel_naming_it(tmp_path):
    net, _ = trained(make_net())
    sd.save(net, tmp_path / "delta")
    with pytest.raises(UsageError, match=r"c2\.weight \(a Conv2d weight: SHiRA adapts nn\.Linear weights only\)"):
        sd.export_shira(tmp_path / "delta", make_net(), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_autocast_bf16_gradient_follows_the_generic_path(monkeypatch):
    """Under CPU autocast the fast path's values gradient matches the generic path's (bf16 products)."""
    grads = {}
    for path in ("fast", "generic"):
        if path == "generic":
            for name in [n for n in patching.FAST_PATHS if ".conv.Conv" in n]:
                monkeypatch.delitem(patching.FAST_PATHS, name)
        net = make_net().float()
        sd.prepare(net, sara())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(batch(dtype=torch.float32))
        out.float().pow(2).mean().backward()
        grads[path] = {n: d.values.grad for n, d in deltas_of(net).items()}
    for name, grad in grads["fast"].items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, grads["generic"][name], rtol=2e-2, atol=1e-3, msg=name)


def test_conv_padding_normalises_same_and_valid():
    assert ops.conv_padding("valid", (3, 3), (1, 1)) == ((0, 0), None)
    assert ops.conv_padding("same", (3, 5), (2, 1)) == ((2, 2), None)
    assert ops.conv_padding("same", (4, 3), (1, 1)) == ((1, 1), [0, 0, 0, 1])  # F.pad: last dim first
    assert ops.conv_padding((1, 2), (3, 3), (1, 1)) == ((1, 2), None)
