"""SaRA as in the paper: selection rules, the low-rank penalty, progressive re-selection, default lr."""

import copy
import math
import random

import pytest
import torch

import sparsedelta as sd
from sparsedelta.core.adapters import state_of
from sparsedelta.methods import sara


def big_linear_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(96, 80), torch.nn.Tanh(), torch.nn.Linear(80, 4))


def test_threshold_selects_exactly_the_small_weights(minilm):
    weights = {n: p.detach().clone() for n, p in minilm.named_parameters() if p.dim() == 2 and "embeddings" not in n}
    sd.prepare(minilm, sd.SaRAConfig(threshold=1e-3, modules_to_save=["classifier"]))
    adapter = state_of(minilm).adapters["default"]
    expected = sum(int((w.abs() < 1e-3).sum()) for n, w in weights.items() if not n.startswith("classifier"))
    assert adapter.report.selected == expected
    assert adapter.report.eligible == sum(w.numel() for n, w in weights.items() if not n.startswith("classifier"))
    for name, delta in adapter.deltas.items():
        assert torch.equal(delta.indices, torch.nonzero(weights[name].reshape(-1).abs() < 1e-3).squeeze(1))
    assert "selected" in str(adapter.report)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_density_selects_the_k_smallest(per_tensor):
    model = big_linear_model()
    w = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    sd.prepare(model, sd.SaRAConfig(density=0.05, per_tensor=per_tensor))
    deltas = state_of(model).adapters["default"].deltas
    if per_tensor:
        for name, delta in deltas.items():
            k = round(0.05 * w[name].numel())
            assert len(delta.indices) == k
            assert w[name].reshape(-1).abs()[delta.indices].max() <= w[name].reshape(-1).abs().kthvalue(k).values
    else:
        allw = torch.cat([t.reshape(-1).abs() for t in w.values()])
        k = round(0.05 * len(allw))
        assert sum(len(d.indices) for d in deltas.values()) == k
        largest_selected = max(float(w[n].reshape(-1).abs()[d.indices].max()) for n, d in deltas.items())
        assert largest_selected == float(allw.kthvalue(k).values)


def test_ties_still_give_the_exact_count():
    model = torch.nn.Linear(10, 10, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.weight[0, :3] = 0.1
    sd.prepare(model, sd.SaRAConfig(density=0.07))
    assert len(state_of(model).adapters["default"].deltas["weight"].indices) == 7


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 0.0}, "threshold must be > 0"),
        ({"threshold": -1e-3}, "threshold must be > 0"),
        ({"density": 0.0}, r"density must lie in \(0, 1\]"),
        ({"density": 1.5}, r"density must lie in \(0, 1\]"),
        ({"threshold": 1e-3, "density": 0.1}, "either a threshold or a density"),
        ({"rank_penalty": -1.0}, "rank_penalty must be >= 0"),
    ],
)
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd.SaRAConfig(**kwargs)


def test_threshold_selecting_nothing_is_refused():
    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(1.0)
    with pytest.raises(ValueError, match="selects no entry.*raise the threshold"):
        sd.prepare(model, sd.SaRAConfig(threshold=1e-6))
    assert not hasattr(model, "_sparsedelta")


def test_default_learning_rate_rule():
    assert sara.default_lr(2e-3) == pytest.approx(1e-3 * math.exp(-0.7))
    assert sd.SaRAConfig(threshold=1e-3).default_lr == pytest.approx(1e-3 * math.exp(-0.35))


def test_rank_penalty_gradient_equals_dense_nuclear_norm_autograd():
    model = big_linear_model().double()
    sd.prepare(model, sd.SaRAConfig(density=0.3))
    deltas = state_of(model).adapters["default"].deltas
    with torch.no_grad():
        for d in deltas.values():
            d.values.normal_(0, 1e-2)
    sd.sync(model)  # a hand edit of the values (optimizer steps and forwards sync by themselves)
    assert sara.penalty_matrices(model) == ["0.weight"]  # 80x96; the 4x80 head is too thin (min side <= 64)
    penalty = sara.rank_penalty(model, 0.5, scope="all")
    penalty.backward()
    delta = deltas["0.weight"]
    theta = model[0].weight.detach().clone().requires_grad_(True)  # merged current weights
    mask = torch.zeros(theta.numel(), dtype=torch.bool)
    mask[delta.indices] = True
    dense = 0.5 * torch.linalg.matrix_norm(theta * mask.view_as(theta), ord="nuc")
    dense.backward()
    torch.testing.assert_close(penalty, dense)
    torch.testing.assert_close(delta.values.grad, theta.grad.reshape(-1)[delta.indices])
    assert deltas["2.weight"].values.grad is None


def test_rank_penalty_random_scope_picks_one_matrix():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(70, 70), torch.nn.Linear(70, 70))
    sd.prepare(model, sd.SaRAConfig(density=0.2))
    rng = random.Random(0)
    sara.rank_penalty(model, 1.0, scope="random", rng=rng).backward()
    got = [d.values.grad is not None for d in state_of(model).adapters["default"].deltas.values()]
    assert sorted(got) == [False, True]


def test_rank_penalty_draws_from_the_models_own_generator():
    """Without rng= the matrix comes from the model's seeded generator: the global `random` stays
    untouched and two identical models draw the same matrices."""

    def draws():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(70, 70) for _ in range(4)])
        sd.prepare(model, sd.SaRAConfig(density=0.2))
        picked = []
        for _ in range(6):
            sara.rank_penalty(model, 1.0).backward()
            deltas = state_of(model).adapters["default"].deltas.values()
            picked.append([d.values.grad is not None for d in deltas].index(True))
            for d in deltas:
                d.values.grad = None
        return picked

    random.seed(123)
    state = random.getstate()
    first = draws()
    assert random.getstate() == state
    assert draws() == first and len(set(first)) > 1


def test_rank_penalty_changes_training():
    def train(weight):
        model = big_linear_model()
        sd.prepare(model, sd.SaRAConfig(density=0.2))
        opt = torch.optim.AdamW(sd.trainable_parameters(model), lr=1e-2)
        x, y = torch.randn(32, 96, generator=torch.Generator().manual_seed(1)), torch.arange(32) % 4
        for _ in range(5):
            loss = torch.nn.functional.cross_entropy(model(x), y) + sara.rank_penalty(model, weight, "all")
            loss.backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach() for p in sd.trainable_parameters(model)]), model

    plain, _ = train(0.0)
    penalised, model = train(0.05)
    assert not torch.allclose(plain, penalised)
    def nuc(m):
        return float(
            torch.linalg.matrix_norm(
                sara.masked_weight(state_of(m).adapters["default"].deltas["0.weight"]).detach(), ord="nuc"
            )
        )  # noqa: E731
    _, unpenalised_model = train(0.0)
    assert nuc(model) < nuc(unpenalised_model)


def test_reselection_keeps_a_subset_freezes_leavers_and_keeps_optimizer_state():
    model = big_linear_model()
    threshold = 2e-3
    sd.prepare(model, sd.SaRAConfig(threshold=threshold, rank_penalty=0.0))
    deltas = state_of(model).adapters["default"].deltas
    opt = torch.optim.AdamW(sd.trainable_parameters(model), lr=4e-4)
    x, y = torch.randn(16, 96), torch.arange(16) % 4
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    before = {n: (d.indices.clone(), d.current_values().detach().clone()) for n, d in deltas.items()}
    exp_avg = {n: opt.state[d.values]["exp_avg"].clone() for n, d in deltas.items()}
    report = sara.reselect(model, threshold, opt)
    assert 0 < report.selected < report.eligible
    for name, delta in deltas.items():
        idx, current = before[name]
        keep = current.abs() < threshold
        assert torch.equal(delta.indices, idx[keep])
        assert torch.equal(delta.frozen_indices, idx[~keep])
        assert torch.equal(opt.state[delta.values]["exp_avg"], exp_avg[name][keep])
    frozen_weights = {n: model.get_parameter(n).reshape(-1)[d.frozen_indices].clone() for n, d in deltas.items()}
    for _ in range(3):  # training goes on: frozen entries stay at their trained values
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    model(x)
    for name, delta in deltas.items():
        assert torch.equal(model.get_parameter(name).reshape(-1)[delta.frozen_indices], frozen_weights[name])
    # saving keeps both parts; a fresh base loads the same function
    fresh = big_linear_model()
    out = copy.deepcopy(model(x).detach())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sd.save(model, tmp)
        sd.load(fresh, tmp)
    assert torch.equal(fresh(x), out)


def test_sara_training_on_minilm_changes_only_selected_entries(minilm, minilm_batch):
    base = {k: v.clone() for k, v in minilm.state_dict().items()}
    config = sd.SaRAConfig(threshold=1e-3, parameter_kinds=("weight", "embedding"), modules_to_save=["classifier"])
    sd.prepare(minilm, config)
    opt = torch.optim.AdamW(sd.trainable_parameters(minilm), lr=1e-3)
    minilm.train()
    for _ in range(2):
        (minilm(**minilm_batch).loss + sara.rank_penalty(minilm, 5e-3)).backward()
        opt.step()
        opt.zero_grad()
    deltas = state_of(minilm).adapters["default"].deltas
    changed_total = 0
    for name, before in base.items():
        if name.startswith("classifier."):
            continue
        after = minilm.state_dict()[name]
        changed = torch.nonzero((after != before).reshape(-1)).squeeze(1)
        selected = deltas[name].indices if name in deltas else changed[:0]
        assert torch.isin(changed, selected).all(), f"{name}: a non-selected entry changed"
        changed_total += len(changed)
    assert changed_total > 0.5 * sum(len(d.indices) for n, d in deltas.items() if "embeddings" not in n)


@pytest.mark.parametrize("shape", [(90, 70), (70, 90)])
def test_nuclear_norm_matches_svd_autograd(shape):
    torch.manual_seed(0)
    a = (torch.randn(*shape, dtype=torch.float64) * (torch.rand(*shape) < 0.2)).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    sara.NuclearNorm.apply(a).backward()
    torch.linalg.matrix_norm(b, ord="nuc").backward()
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(sara.NuclearNorm.apply(a.detach()), torch.linalg.matrix_norm(b.detach(), ord="nuc"))


def test_the_nuclear_norm_leaves_every_threads_torch_thread_count_alone():
    """Its eigen-decomposition runs on a one-thread worker: no thread of the process, old or started
    later, sees another thread count than before."""
    import threading

    from sparsedelta.core import single_thread

    before = torch.get_num_threads()
    seen = []
    a = torch.randn(80, 60, dtype=torch.float64)
    value = sara.NuclearNorm.apply(a)
    worker_threads = single_thread.run(torch.get_num_threads)
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert torch.get_num_threads() == before and seen == [before]
    torch.testing.assert_close(value, torch.linalg.matrix_norm(a, ord="nuc"))
    if single_thread._worker() is not None:  # an OpenMP runtime to ask: the worker runs one thread
        assert worker_threads == 1
