"""Delta algebra in index space (core/algebra.py), compose (core/compose.py) and compare (report/compare.py),
each against a dense float64 reference computed here."""

import json
import math

import pytest
import torch

import sparsedelta as sd
from conftest import TinyNet
from sparsedelta.core.algebra import (
    Entries,
    combine,
    dare,
    intersect,
    keep_largest,
    negate,
    subtract,
    tensor_seed,
    ties_merge,
    trim,
    weighted_sum,
)
from sparsedelta.core.io import CONFIG_FILE, DELTA_FILE
from sparsedelta.report.compare import compare, comparison_plot, format_comparison

F64 = torch.float64
NUMELS = {"a.weight": 60, "b.weight": 40}


def random_entries(numel, count, gen):
    positions = torch.randperm(numel, generator=gen)[:count].sort().values
    return Entries(positions, torch.randn(count, generator=gen, dtype=F64))


def random_delta(gen, fraction=0.3):
    return {n: random_entries(numel, int(fraction * numel), gen) for n, numel in NUMELS.items()}


def dense(item, numel):
    out = torch.zeros(numel, dtype=F64)
    out[item.positions] = item.values.to(F64)
    return out


def assert_entries(item, reference, positions=None):
    """`item` is sorted and unique, equals the dense `reference` to 1e-12, and sits at `positions`
    (default: where the reference is non-zero)."""
    assert item.positions.dtype == torch.int64
    assert torch.all(item.positions[1:] > item.positions[:-1])
    expected = torch.nonzero(reference).squeeze(1) if positions is None else positions
    assert torch.equal(item.positions, expected)
    torch.testing.assert_close(dense(item, len(reference)), reference, atol=1e-12, rtol=0)


# -- one tensor ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["overlapping", "disjoint", "one empty", "all empty"])
def test_weighted_sum_is_the_dense_sum_on_the_union(case):
    gen = torch.Generator().manual_seed(0)
    a, b = random_entries(50, 20, gen), random_entries(50, 25, gen)
    if case == "disjoint":
        a, b = Entries(torch.arange(0, 20), a.values), Entries(torch.arange(30, 50)[:20], b.values[:20])
    if case in ("one empty", "all empty"):
        b = Entries(b.positions[:0], b.values[:0])
    if case == "all empty":
        a = Entries(a.positions[:0], a.values[:0])
    union = torch.unique(torch.cat([a.positions, b.positions]))
    out = weighted_sum([a, b], [0.7, -1.3])
    assert_entries(out, 0.7 * dense(a, 50) - 1.3 * dense(b, 50), positions=union)
    assert_entries(weighted_sum([a, b]), dense(a, 50) + dense(b, 50), positions=union)
    if case == "overlapping":
        assert len(union) < len(a.positions) + len(b.positions)


def test_union_keeps_positions_that_cancel():
    a = Entries(torch.tensor([1, 4]), torch.tensor([2.0, 3.0], dtype=F64))
    out = subtract(a, a)
    assert torch.equal(out.positions, a.positions) and torch.equal(out.values, torch.zeros(2, dtype=F64))
    assert len(sd.algebra.drop_zeros(out).positions) == 0


def test_negate_and_subtract():
    gen = torch.Generator().manual_seed(1)
    a, b = random_entries(40, 15, gen), random_entries(40, 15, gen)
    assert_entries(negate(a), -dense(a, 40))
    union = torch.unique(torch.cat([a.positions, b.positions]))
    assert_entries(subtract(a, b), dense(a, 40) - dense(b, 40), positions=union)


@pytest.mark.parametrize("k", [0, 1, 7, 20, 99])
def test_keep_largest_is_the_dense_top_k(k):
    gen = torch.Generator().manual_seed(2)
    a = random_entries(60, 20, gen)
    reference = dense(a, 60)
    top = torch.topk(reference.abs(), min(k, 20)).indices
    expected = torch.zeros(60, dtype=F64)
    expected[top] = reference[top]
    assert_entries(keep_largest(a, k), expected)


def test_keep_largest_count_is_exact_with_ties():
    a = Entries(torch.tensor([3, 5, 8, 9]), torch.tensor([1.0, -2.0, 2.0, 2.0], dtype=F64))
    out = keep_largest(a, 2)
    assert torch.equal(out.positions, torch.tensor([5, 8]))  # the tie goes to the lower positions


@pytest.mark.parametrize("per_tensor", [False, True])
def test_trim_by_density_counts_targeted_entries(per_tensor):
    gen = torch.Generator().manual_seed(3)
    delta = random_delta(gen)
    out = trim(delta, NUMELS, density=0.1, per_tensor=per_tensor)
    if per_tensor:
        for name, numel in NUMELS.items():
            reference = dense(delta[name], numel)
            top = torch.topk(reference.abs(), round(0.1 * numel)).indices
            expected = torch.zeros(numel, dtype=F64)
            expected[top] = reference[top]
            assert_entries(out[name], expected)
    else:  # one threshold over both tensors: 10 of the 100 targeted entries
        flat = torch.cat([dense(delta[n], NUMELS[n]) for n in NUMELS])
        top = torch.topk(flat.abs(), 10).indices
        expected = torch.zeros(100, dtype=F64)
        expected[top] = flat[top]
        assert_entries(out["a.weight"], expected[:60])
        assert_entries(out["b.weight"], expected[60:])
    assert trim(delta, NUMELS, density=1.0) == delta  # fewer entries than the budget: all kept
    with pytest.raises(ValueError, match="exactly one of density"):
        trim(delta, NUMELS)
    with pytest.raises(ValueError, match="numels"):
        trim(delta, density=0.1)


def test_dare_is_seeded_and_rescales_survivors():
    gen = torch.Generator().manual_seed(4)
    a = random_entries(1000, 400, gen)
    first, again, other = dare(a, 0.7, seed=5), dare(a, 0.7, seed=5), dare(a, 0.7, seed=6)
    assert torch.equal(first.positions, again.positions) and torch.equal(first.values, again.values)
    assert not torch.equal(first.positions, other.positions)
    kept = torch.isin(a.positions, first.positions)
    torch.testing.assert_close(first.values, a.values[kept] / 0.3, atol=1e-12, rtol=0)
    assert abs(len(first.positions) / 400 - 0.3) < 0.1
    unchanged = dare(a, 0.0, seed=5)
    assert torch.equal(unchanged.positions, a.positions) and torch.equal(unchanged.values, a.values)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dare(a, 1.0, seed=0)


def test_dare_is_unbiased_over_seeds():
    gen = torch.Generator().manual_seed(5)
    a = random_entries(200, 50, gen)
    p, seeds = 0.5, 4000
    mean = sum(dense(dare(a, p, seed), 200) for seed in range(seeds)) / seeds
    # each entry's mean is v·(a Binomial(seeds, 1−p) count)/(seeds·(1−p)): std |v|·sqrt(p/((1−p)·seeds))
    sigma = a.values.abs() * math.sqrt(p / ((1 - p) * seeds))
    assert torch.all((mean[a.positions] - a.values).abs() < 5 * sigma)
    assert torch.equal(torch.nonzero(mean).squeeze(1), a.positions)


def dense_ties(deltas, weights, density):
    """TIES-merging's three steps (Yadav et al. 2023) on dense flattened task vectors."""
    total = sum(NUMELS.values())
    k = round(density * total)
    trimmed = []
    for delta, w in zip(deltas, weights, strict=True):
        tau = torch.cat([dense(delta[n], NUMELS[n]) for n in NUMELS])
        keep = torch.topk(tau.abs(), k).indices
        t = torch.zeros(total, dtype=F64)
        t[keep] = tau[keep]
        trimmed.append(w * t)  # step 1: trim
    stacked = torch.stack(trimmed)
    elected = torch.sign(stacked.sum(0))  # step 2: elect
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    counts = agree.sum(0)
    merged = (stacked * agree).sum(0) / counts.clamp(min=1)  # step 3: disjoint mean
    return merged, counts > 0


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0], [1.0, -1.0, 1.0]])
def test_ties_matches_the_papers_three_steps(weights):
    gen = torch.Generator().manual_seed(6)
    deltas = [random_delta(gen, fraction=0.5) for _ in range(3)]
    out = combine(deltas, "ties", weights, NUMELS, density=0.2)
    merged, support = dense_ties(deltas, weights or [1.0] * 3, 0.2)
    positions = torch.nonzero(support).squeeze(1)
    assert_entries(out["a.weight"], merged[:60], positions=positions[positions < 60])
    assert_entries(out["b.weight"], merged[60:], positions=positions[positions >= 60] - 60)


def test_ties_by_hand():
    t1 = Entries(torch.tensor([0, 1, 2, 3]), torch.tensor([2.0, -1.0, 3.0, 1.0], dtype=F64))
    t2 = Entries(torch.tensor([1, 2, 4]), torch.tensor([3.0, -1.0, 5.0], dtype=F64))
    t3 = Entries(torch.tensor([2, 3]), torch.tensor([1.0, -1.0], dtype=F64))
    out = ties_merge([t1, t2, t3])
    # 0: +2 alone; 1: sum +2 -> +, only t2 agrees: 3; 2: sum 3 -> +, t1 and t3 agree: (3+1)/2;
    # 3: sum 0 -> no elected sign, dropped; 4: 5 alone
    assert torch.equal(out.positions, torch.tensor([0, 1, 2, 4]))
    assert torch.equal(out.values, torch.tensor([2.0, 3.0, 2.0, 5.0], dtype=F64))


@pytest.mark.parametrize("how", ["sum", "mean", "magnitude", "dare"])
def test_combine_against_dense(how):
    gen = torch.Generator().manual_seed(7)
    deltas = [random_delta(gen) for _ in range(3)]
    weights = [0.5, 2.0, -1.0] if how != "mean" else [1.0, 2.0, 3.0]
    options = {"magnitude": {"density": 0.15}, "dare": {"drop": 0.4, "seed": 3}}.get(how, {})
    out = combine(deltas, how, weights, NUMELS, **options)
    if how == "dare":  # DARE per input and tensor with its own seed, then the weighted sum
        deltas = [{n: dare(e, 0.4, tensor_seed(3, i, n)) for n, e in d.items()} for i, d in enumerate(deltas)]
    flat = sum(w * torch.cat([dense(d[n], NUMELS[n]) for n in NUMELS]) for w, d in zip(weights, deltas, strict=True))
    if how == "mean":
        flat = flat / 6
    union = torch.unique(
        torch.cat([torch.cat([d["a.weight"].positions, d["b.weight"].positions + 60]) for d in deltas])
    )
    if how == "magnitude":
        top = torch.topk(flat.abs(), 15).indices
        flat, union = torch.zeros_like(flat).index_copy_(0, top, flat[top]), top.sort().values
    assert_entries(out["a.weight"], flat[:60], positions=union[union < 60])
    assert_entries(out["b.weight"], flat[60:], positions=union[union >= 60] - 60)


def test_a_tensor_missing_from_one_delta_counts_as_empty():
    gen = torch.Generator().manual_seed(8)
    a, b = random_delta(gen), random_delta(gen)
    del b["b.weight"]
    out = combine([a, b], "sum")
    assert torch.equal(out["b.weight"].positions, a["b.weight"].positions)


def test_nothing_of_a_weights_size_is_allocated():
    """Weights of 2^40 entries (8 TiB in float64): every operation runs on the entries alone."""
    numels = {"huge": 2**40}
    gen = torch.Generator().manual_seed(9)
    deltas = []
    for _ in range(3):
        positions = torch.unique(torch.randint(0, 2**40, (5000,), generator=gen))
        deltas.append({"huge": Entries(positions, torch.randn(len(positions), generator=gen, dtype=F64))})
    deltas[1]["huge"] = Entries(deltas[0]["huge"].positions[:2000], deltas[1]["huge"].values[:2000])  # overlap
    for how, options in [
        ("sum", {}),
        ("mean", {}),
        ("ties", {"density": 1e-9}),
        ("dare", {"drop": 0.5}),
        ("magnitude", {"k": 100}),
    ]:
        out = combine(deltas, how, None, numels, **options)["huge"]
        assert len(out.positions) and torch.all(out.positions[1:] > out.positions[:-1])
    assert len(combine(deltas, "magnitude", None, numels, k=100)["huge"].positions) == 100
    assert len(combine(deltas, "sum")["huge"].positions) == len(deltas[0]["huge"].positions) + len(
        deltas[2]["huge"].positions
    ) - int(torch.isin(deltas[2]["huge"].positions, deltas[0]["huge"].positions).sum())


def test_intersect():
    a = Entries(torch.tensor([1, 3, 5, 9]), torch.zeros(4))
    b = Entries(torch.tensor([0, 3, 9, 10]), torch.zeros(4))
    ia, ib = intersect(a, b)
    assert ia.tolist() == [1, 3] and ib.tolist() == [1, 2]
    empty = Entries(a.positions[:0], a.values[:0])
    assert [len(t) for t in intersect(empty, b)] == [0, 0] and [len(t) for t in intersect(a, empty)] == [0, 0]


@pytest.mark.parametrize(
    "how, options, message",
    [
        ("median", {}, "how must be one of"),
        ("ties", {}, "give density"),
        ("magnitude", {"density": 0.1, "k": 3}, "give density"),
        ("sum", {"density": 0.1}, "density and k apply"),
        ("dare", {}, "needs drop"),
        ("dare", {"drop": 1.0}, "needs drop"),
        ("mean", {"drop": 0.1}, "drop applies"),
        ("ties", {"density": 1.5}, "density must lie"),
    ],
)
def test_combine_refuses_options_that_do_not_fit(how, options, message):
    gen = torch.Generator().manual_seed(10)
    with pytest.raises(ValueError, match=message):
        combine([random_delta(gen)], how, None, NUMELS, **options)


def test_combine_refuses_bad_weights():
    gen = torch.Generator().manual_seed(11)
    deltas = [random_delta(gen), random_delta(gen)]
    with pytest.raises(ValueError, match="1 weights for 2 deltas"):
        combine(deltas, "sum", [1.0])
    with pytest.raises(ValueError, match="sum of the weights, which is 0"):
        combine(deltas, "mean", [1.0, -1.0])


# -- compose: delta files of one base --------------------------------------------------------------
TARGETS = {"target_modules": ["embed", "proj", "conv"], "parameter_kinds": ("weight", "embedding", "bias")}


def base_model(vocab=50):
    torch.manual_seed(0)
    return TinyNet(vocab=vocab).double()


def make_delta(folder, seed, vocab=50, density=0.3, head=True, **targets):
    """A delta at random positions with random values (and a random dense head), saved to `folder`."""
    model = base_model(vocab)
    config = sd.RandomConfig(
        density=density, seed=seed, **(targets or TARGETS), modules_to_save=["head"] if head else None
    )
    sd.prepare(model, config)
    adapter = sd.state_of(model).adapters["default"]
    gen = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for d in adapter.deltas.values():
            d.values.copy_(torch.randn(len(d.values), generator=gen, dtype=F64))
        for p in adapter.saved.values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    sd.save(model, folder)
    return folder


@pytest.fixture
def two_deltas(tmp_path):
    return make_delta(tmp_path / "a", seed=1), make_delta(tmp_path / "b", seed=2)


def file_entries(folder):
    meta, tensors = sd.read(folder)
    delta = {n: Entries(tensors[f"{n}.indices"].long(), tensors[f"{n}.values"].to(F64)) for n in meta["fingerprint"]}
    return delta, {n: tensors[n].to(F64) for n in meta["saved_tensors"]}


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [p.requires_grad for p in model.parameters()]


def assert_unchanged(model, before):
    state, flags = snapshot(model)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], before[0][k]) for k in state)
    assert flags == before[1]


def test_compose_sum_loads_as_theta_plus_weighted_deltas(two_deltas, tmp_path):
    base = base_model()
    before = snapshot(base)
    weights = [0.7, -1.3]
    out = sd.compose(base, two_deltas, tmp_path / "c", weights=weights, heads=1)
    assert out == tmp_path / "c" / DELTA_FILE
    assert_unchanged(base, before)
    assert getattr(base, "_sparsedelta", None) is None

    inputs = [file_entries(p) for p in two_deltas]
    model = sd.load(base_model(), tmp_path / "c")
    params, theta = dict(model.named_parameters()), dict(base.named_parameters())
    for name, fp in sd.read(tmp_path / "a")[0]["fingerprint"].items():
        numel = math.prod(fp["shape"])
        delta = sum(w * dense(d[name], numel) for w, (d, _) in zip(weights, inputs, strict=True))
        expected = theta[name].detach().reshape(-1) + delta.float().double()  # the file stores float32 values
        torch.testing.assert_close(params[name].detach().reshape(-1), expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(params["head.weight"].detach(), inputs[1][1]["head.weight"], atol=0, rtol=0)

    config = json.loads((tmp_path / "c" / CONFIG_FILE).read_text())["config"]
    assert config["method"] == "composed" and config["how"] == "sum" and config["weights"] == weights
    assert config["inputs"] == [str(p) for p in two_deltas] and config["heads"] == 1
    assert config["input_sha256"] == [sd.read(p)[0]["content_sha256"] for p in two_deltas]


def test_compose_reads_each_inputs_tensors_once_and_unlike_inputs_none(two_deltas, tmp_path, monkeypatch):
    from sparsedelta.core import io

    reads = []
    tensors = io._DeltaFile.tensors
    monkeypatch.setattr(io._DeltaFile, "tensors", lambda self, *a: reads.append(self.source) or tensors(self, *a))
    sd.compose(base_model(), two_deltas + two_deltas[:1], tmp_path / "c")
    assert sorted(reads) == sorted(str(p / DELTA_FILE) for p in two_deltas + two_deltas[:1])
    reads.clear()
    other = make_delta(tmp_path / "other", seed=2, vocab=60)
    with pytest.raises(sd.DeltaFileError, match="different base"):
        sd.compose(base_model(), [two_deltas[0], other], tmp_path / "d")
    assert reads == []  # refused from the headers


def test_compose_averages_heads_with_the_weights(two_deltas, tmp_path):
    sd.compose(base_model(), two_deltas, tmp_path / "c", weights=[1.0, 3.0], how="mean")
    model = sd.load(base_model(), tmp_path / "c")
    heads = [file_entries(p)[1]["head.weight"] for p in two_deltas]
    torch.testing.assert_close(model.head.weight.detach(), (heads[0] + 3 * heads[1]) / 4, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="must be positive.*heads=i"):
        sd.compose(base_model(), two_deltas, tmp_path / "d", weights=[1.0, -1.0])
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "how, options",
    [("mean", {}), ("ties", {"density": 0.1}), ("dare", {"drop": 0.5, "seed": 4}), ("magnitude", {"k": 40})],
)
def test_compose_writes_what_combine_computes(two_deltas, tmp_path, how, options):
    base = base_model()
    before = snapshot(base)
    sd.compose(base, two_deltas, tmp_path / "c", how=how, **options)
    assert_unchanged(base, before)
    inputs = [file_entries(p)[0] for p in two_deltas]
    numels = {n: p.numel() for n, p in base.named_parameters()}
    expected = combine(inputs, how, None, numels, **options)
    written, _ = file_entries(tmp_path / "c")
    assert written.keys() == {n for n, e in expected.items() if len(e.positions)}
    for name, e in written.items():
        assert torch.equal(e.positions, expected[name].positions)
        assert torch.equal(e.values, expected[name].values.float().double())
    sd.load(base_model(), tmp_path / "c")  # the fingerprint of the base at the new positions


def test_compose_leaves_a_model_with_adapters_as_it_was(two_deltas, tmp_path):
    base = sd.load(base_model(), two_deltas[0], adapter_name="a")
    before = snapshot(base)
    sd.compose(base, two_deltas, tmp_path / "c")
    assert_unchanged(base, before)
    state = sd.state_of(base)
    assert state.active == "a" and list(state.adapters) == ["a"]


def test_compose_refuses_another_base_before_writing(two_deltas, tmp_path):
    other = base_model()
    name = "proj.weight"
    in_a, in_b = (sd.read(p)[1][f"{name}.indices"] for p in two_deltas)
    position = in_b[~torch.isin(in_b, in_a)][0]  # only b's fingerprint covers it
    with torch.no_grad():
        other.proj.weight.view(-1)[position] += 1e-3
    with pytest.raises(sd.DeltaFileError, match=f"{two_deltas[1]}.*fingerprint mismatch at {name}"):
        sd.compose(other, two_deltas, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_compose_refuses_other_shapes_before_writing(tmp_path):
    a, b = make_delta(tmp_path / "a", seed=1), make_delta(tmp_path / "b", seed=2, vocab=60)
    with pytest.raises(sd.DeltaFileError, match=r"embed.weight is float64 \(50, 16\) in .* \(60, 16\).*different base"):
        sd.compose(base_model(), [a, b], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_compose_refuses_other_tensor_sets_before_writing(tmp_path):
    a = make_delta(tmp_path / "a", seed=1)
    b = make_delta(tmp_path / "b", seed=2, target_modules=["proj", "conv"], parameter_kinds=("weight", "bias"))
    with pytest.raises(sd.DeltaFileError, match="has a delta for embed.weight and .* has none.*same target_modules"):
        sd.compose(base_model(), [a, b], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_compose_refuses_other_heads_unless_one_is_picked(tmp_path):
    a, b = make_delta(tmp_path / "a", seed=1), make_delta(tmp_path / "b", seed=2, head=False)
    with pytest.raises(ValueError, match="densely saved tensors differ.*heads=i"):
        sd.compose(base_model(), [a, b], tmp_path / "c")
    assert not (tmp_path / "c").exists()
    sd.compose(base_model(), [a, b], tmp_path / "c", heads=1)
    assert sd.read(tmp_path / "c")[0]["saved_tensors"] == []


def test_compose_refuses_a_result_with_no_entry(two_deltas, tmp_path):
    with pytest.raises(ValueError, match="left no entry"):
        sd.compose(
            base_model(), [two_deltas[0], two_deltas[0]], tmp_path / "c", weights=[1.0, -1.0], how="ties", k=10, heads=0
        )
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="2 weights for 1 deltas"):
        sd.compose(base_model(), two_deltas[:1], tmp_path / "c", weights=[1.0, 2.0])


# -- compare ---------------------------------------------------------------------------------------
def hand_made(folder, entries):
    model = base_model()
    config = sd.DeltaConfig(target_modules=["proj", "conv"])
    positions = {n: torch.tensor(p) for n, (p, _) in entries.items()}
    values = {n: torch.tensor(v, dtype=F64) for n, (_, v) in entries.items()}
    sd.add_delta(model, config, positions, values=values)
    sd.save(model, folder)
    return folder


def test_compare_counts_shared_positions_conflicts_and_cosines(tmp_path):
    a = hand_made(tmp_path / "a", {"proj.weight": ([0, 1, 2, 5], [1, 2, -1, 3]), "conv.weight": ([0], [1])})
    b = hand_made(tmp_path / "b", {"proj.weight": ([1, 2, 3, 5], [2, 1, 4, -3]), "conv.weight": ([1], [2])})
    c = hand_made(tmp_path / "c", {"proj.weight": ([5], [6])})
    result = compare([a, b, c])
    assert [p["a"] + p["b"] for p in result["pairs"]] == ["AB", "AC", "BC"]
    ab = result["pairs"][0]
    proj, conv, total = ab["tensors"]["proj.weight"], ab["tensors"]["conv.weight"], ab["total"]
    # shared 1, 2, 5: A (2, -1, 3), B (2, 1, -3); |A|² = 15, |B|² = 30
    assert (proj["shared"], proj["sign_conflicts"], proj["shared_fraction"], proj["jaccard"]) == (3, 2, 0.75, 0.6)
    assert proj["cosine_shared"] == pytest.approx(-6 / 14, abs=1e-12)
    assert proj["cosine"] == pytest.approx(-6 / math.sqrt(15 * 30), abs=1e-12)
    assert conv["shared"] == 0 and conv["cosine_shared"] is None and conv["cosine"] == 0.0
    assert (total["entries_a"], total["entries_b"], total["shared"], total["sign_conflicts"]) == (5, 5, 3, 2)
    assert total["cosine"] == pytest.approx(-6 / math.sqrt(16 * 34), abs=1e-12)
    ac = result["pairs"][1]["tensors"]
    assert ac["proj.weight"]["cosine_shared"] == pytest.approx(1.0) and ac["conv.weight"]["entries_b"] == 0

    text = format_comparison(result)
    assert "A vs B" in text and "B vs C" in text
    assert any(line.startswith("proj.weight") and "-0.429" in line for line in text.splitlines())
    png = comparison_plot(result, tmp_path / "compare.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_compare_refuses_other_shapes(tmp_path):
    a = make_delta(tmp_path / "a", seed=1)
    b = make_delta(tmp_path / "b", seed=2, vocab=60)
    with pytest.raises(sd.DeltaFileError, match="positions of different shapes"):
        compare([a, b])
    with pytest.raises(ValueError, match="at least two"):
        compare([a])
