"""SpIEL: the schedule, drop and grow, k fixed, θ back at dropped positions, resume, bf16, CLI, Trainer."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import sparsedelta as sd
from fixtures_cli import product_tensors, tiny_bert_fixture, topic_files_fixture  # noqa: F401
from sparsedelta.core.adapters import state_of
from sparsedelta.core.delta import SparseDelta
from sparsedelta.errors import UsageError
from sparsedelta.methods import MethodSettings, make_runner
from sparsedelta.methods.spiel import CandidateScores, SpIELConfig, drop_and_grow
from test_cli import tiny_args

FAST = {"reselection_steps": 4, "accumulation_steps": 2}


def deltas_of(model) -> dict[str, SparseDelta]:
    return state_of(model).adapters["default"].deltas


def mlp(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(dtype)


def spiel(model, total, density=0.1, seed=0, **options):
    runner = make_runner(MethodSettings(method="spiel", density=density, seed=seed, options={**FAST, **options}))
    runner.prepare(model, [], total_steps=total)
    return runner


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(64, 16, generator=gen), torch.randint(0, 4, (64,), generator=gen)


def train(model, runner, optimizer, steps, start=0, autocast=False, check=None):
    """`steps` optimizer steps on one batch, the runner's schedule after each; `check(step, before)`
    runs after each step's schedule, given the positions before it."""
    x, y = batch()
    events = []
    for step in range(start + 1, start + steps + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x.to(next(model.parameters()).dtype))
        nn.functional.cross_entropy(out.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        before = {n: (d.indices.clone(), d.values.detach().clone()) for n, d in deltas_of(model).items()}
        event = runner.on_step(model, step, optimizer)
        if event:
            events.append(step)
        if check is not None:
            check(step, before)
    return events


# -- the schedule -------------------------------------------------------------------------------------
def test_schedule_is_the_official_formula():
    cfg = SpIELConfig(reselection_steps=20, accumulation_steps=5, initial_rate=0.2)
    assert [cfg.selection_after(s) for s in (0, 4, 5, 24, 25, 44)] == [5, 5, 25, 25, 45, 45]
    assert cfg.rate(5, 100) == 1.0  # the first re-selection replaces every initial entry (official)
    for t in (25, 45, 65, 85):
        assert cfg.rate(t, 100) == pytest.approx(0.2 * (1 - t / 100))
    assert cfg.rate(25, 200) == pytest.approx(0.2 * (1 - 25 / 200))
    half = SpIELConfig(selection_duration=0.5)
    assert half.horizon(100) == 50 and half.rate(45, 100) == pytest.approx(0.2 * (1 - 45 / 50))
    cosine = SpIELConfig(rate_policy="cosine", first_rate=0.5)
    assert cosine.rate(5, 100) == 0.5
    assert cosine.rate(45, 100) == pytest.approx(0.1 * (1 + math.cos(math.pi * 0.45)))


@pytest.mark.parametrize("options, message", [
    ({"accumulation_steps": 4}, "accumulation_steps must lie in [1, reselection_steps=4)"),
    ({"rate_policy": "step"}, "rate_policy must be 'linear' or 'cosine'"),
    ({"init": "fisher"}, "init must be one of"),
    ({"grown_state": "keep"}, "grown_state must be 'seeded' or 'zero'"),
])  # fmt: skip
def test_bad_settings_are_refused_in_words(options, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        spiel(mlp(), 10, **options)


def test_events_follow_the_schedule_and_replace_the_scheduled_counts():
    model = mlp()
    runner = spiel(model, 20, first_rate=0.5)
    ks = {n: len(d.indices) for n, d in deltas_of(model).items()}
    events = train(model, runner, torch.optim.AdamW(runner.param_groups(model), lr=1e-2), 20)
    assert events == [2, 6, 10, 14, 18]  # t = mR + A while t <= T
    replaced = [h["replaced"] for h in runner.report(model)["reselections"]]
    # every tensor has candidates enough (5 per slot), so each moves exactly ⌊k·p⌋ unless a dropped entry
    # beats every candidate; at first_rate 0.5 that is the count, less those grown back in place
    expected = [sum(int(k * runner.config.rate(t, 20)) for k in ks.values()) for t in events]
    assert all(0 < r <= e for r, e in zip(replaced[:1], expected[:1], strict=True))
    assert all(r <= e for r, e in zip(replaced, expected, strict=True)) and sum(replaced[1:]) > 0


# -- drop and grow ------------------------------------------------------------------------------------
def test_growth_takes_the_largest_summed_gradients_on_a_known_case():
    weight = torch.arange(16, dtype=torch.float32).reshape(4, 4) / 10
    delta = SparseDelta(weight, torch.tensor([0, 1, 2, 3]), torch.tensor([0.5, 0.01, 0.3, 0.02]))
    delta.merge()
    theta = weight.clone()
    theta.view(-1)[:4] = torch.tensor([0.0, 0.1, 0.2, 0.3])
    optimizer = torch.optim.AdamW([delta.values], lr=0.1)
    delta.values.grad = torch.ones(4)
    optimizer.step()  # AdamW state at step 1
    scores = CandidateScores(3, delta)
    g1, g2 = torch.zeros(16), torch.zeros(16)
    # outside the delta: 10 (|9|, then -9: sums to 0), 5 (-8, -8), 12 (0.5, 0.5), 7 (0.1: not a candidate)
    g1[[10, 5, 12, 7]] = torch.tensor([9.0, -8.0, 0.5, 0.1])
    g2[[10, 5, 12]] = torch.tensor([-9.0, -8.0, 0.5])
    g1[3], g2[3] = 6.0, 6.0  # an entry about to be dropped, with a large gradient: it stays
    g1[1], g2[1] = 0.2, 0.2
    for g in (g1, g2):
        scores(g.view(4, 4))
        scores.end_step()
    assert scores.positions.tolist() == [0, 1, 2, 3, 5, 10, 12]  # 3 candidates and the entries, sorted
    values_before = delta.values.detach().clone()
    moved = drop_and_grow(delta, scores, 2, optimizer)
    # dropped: slots of 1 (|0.01|) and 3 (|0.02|); pool by |Σg|: 5 (16), 3 (12), 12 (1), 1 (0.4), 10 (0)
    # grown: 5 and 3; 3 is dropped and grown back, so stays; 1 leaves for 5
    assert moved == 1
    assert delta.indices.tolist() == [0, 2, 3, 5]
    assert torch.equal(delta.values.detach(), torch.stack([values_before[0], values_before[2], values_before[3], torch.tensor(0.0)]))
    assert torch.equal(delta.base, theta.view(-1)[[0, 2, 3, 5]])
    assert weight.view(-1)[1] == theta.view(-1)[1]  # θ back, exactly
    assert torch.equal(weight.view(-1)[[0, 2, 3, 5]], delta.base + delta.values.detach())
    state = optimizer.state[delta.values]
    # seeded moments of the grown entry: mean gradient -8, mean square 64, times the bias correction at step 1
    assert state["exp_avg"][3] == pytest.approx(-8 * (1 - 0.9))
    assert state["exp_avg_sq"][3] == pytest.approx(64 * (1 - 0.999))
    assert state["exp_avg"][:3].tolist() == pytest.approx([0.1, 0.1, 0.1])  # the others kept, in place


def test_zero_grown_state_resets_the_moments():
    weight = torch.zeros(3, 3)
    delta = SparseDelta(weight, torch.tensor([4, 8]), torch.tensor([0.3, 0.0]))
    delta.merge()
    optimizer = torch.optim.AdamW([delta.values], lr=0.1)
    delta.values.grad = torch.ones(2)
    optimizer.step()
    scores = CandidateScores(1, delta)
    g = torch.zeros(9)
    g[0] = 1.0
    scores(g)
    scores.end_step()
    assert drop_and_grow(delta, scores, 1, optimizer, grown_state="zero") == 1
    assert delta.indices.tolist() == [0, 4]
    state = optimizer.state[delta.values]
    assert state["exp_avg"].tolist() == pytest.approx([0.0, 0.1]) and state["exp_avg_sq"][0] == 0


def test_k_is_constant_and_dropped_entries_return_to_theta_exactly():
    model = mlp()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = spiel(model, 20)
    ks = {n: len(d.indices) for n, d in deltas_of(model).items()}
    moved = []

    def check(step, before):
        for name, delta in deltas_of(model).items():
            old, _ = before[name]
            assert len(delta.indices) == ks[name] and bool((delta.indices[1:] > delta.indices[:-1]).all())
            weight = delta.weight.detach().reshape(-1)
            left = old[~torch.isin(old, delta.indices)]
            grown = delta.indices[~torch.isin(delta.indices, old)]
            moved.append(len(left))
            assert len(left) == len(grown)
            assert torch.equal(weight[left], theta[name].reshape(-1)[left])  # bit for bit
            assert torch.equal(delta.base, theta[name].reshape(-1)[delta.indices])
            if len(grown):
                slots = torch.isin(delta.indices, grown)
                assert torch.equal(delta.values.detach()[slots], torch.zeros(int(slots.sum())))
            outside = torch.ones_like(weight, dtype=torch.bool)
            outside[delta.indices] = False
            assert torch.equal(weight[outside], theta[name].reshape(-1)[outside])

    train(model, runner, torch.optim.AdamW(runner.param_groups(model), lr=1e-2), 20, check=check)
    assert sum(moved) > 0
    assert sd.count_parameters(model)[0] == sum(ks.values())


def test_the_observer_sees_each_paths_dense_gradient():
    """Linear (dense and sampled-eligible), Embedding, Conv2d and the generic path (a LayerNorm weight):
    the gradient the observer gets equals autograd's dense gradient of the plain module."""
    torch.manual_seed(0)
    modules = {"linear": (nn.Linear(8, 6), lambda: torch.randn(5, 8)),
               "embedding": (nn.Embedding(10, 4), lambda: torch.tensor([[1, 3, 3, 7]])),
               "conv": (nn.Conv2d(2, 3, 3, padding=1), lambda: torch.randn(2, 2, 5, 5)),
               "norm": (nn.LayerNorm(6), lambda: torch.randn(3, 6))}  # fmt: skip
    for kind, (module, make_input) in modules.items():
        x = make_input()
        reference = copy.deepcopy(module)
        reference(x).pow(2).sum().backward()
        kinds = ("norm",) if kind == "norm" else ("weight", "embedding")
        # 5% per tensor: a linear layer this sparse would take the sampled product without an observer
        sd.prepare(module, sd.SpIELConfig(density=0.05, per_tensor=True, parameter_kinds=kinds))
        delta = deltas_of(module)["weight"]
        seen = []
        delta.grad_observer = seen.append
        module(x).pow(2).sum().backward()
        assert len(seen) == 1, kind
        torch.testing.assert_close(seen[0].reshape(reference.weight.shape), reference.weight.grad, msg=kind)


def test_window_steps_after_the_first_take_the_sampled_product_at_the_candidates(monkeypatch):
    """The first backward of a window needs the dense gradient (to choose the candidates); later ones
    only the C + k positions, which a sparse linear layer takes from the sampled product: the same sums
    and the same values' gradients as from the dense product."""
    from sparsedelta.core import ops

    real, calls = ops._sampled_weight_grad, []
    monkeypatch.setattr(ops, "_sampled_weight_grad", lambda *a: calls.append(1) or real(*a))

    def window(sampled: bool):
        monkeypatch.setattr(ops, "SAMPLED_MAX_DENSITY", 0.1 if sampled else 0.0)
        calls.clear()
        torch.manual_seed(0)
        layer = nn.Linear(64, 48)
        sd.prepare(layer, sd.SpIELConfig(density=0.01))
        delta = deltas_of(layer)["weight"]
        delta.grad_observer = scores = CandidateScores(3 * len(delta.indices), delta)  # C + k = 4% of the layer
        gen, grads = torch.Generator().manual_seed(1), []
        for _ in range(3):
            layer(torch.randn(32, 64, generator=gen)).pow(2).sum().backward()
            grads.append(delta.values.grad.clone())
            delta.values.grad = None
            scores.end_step()
        return scores, grads, len(calls)

    sampled, sampled_grads, sampled_calls = window(True)
    dense, dense_grads, dense_calls = window(False)
    assert (sampled_calls, dense_calls) == (2, 0)
    assert torch.equal(sampled.positions, dense.positions)
    torch.testing.assert_close(sampled.total, dense.total, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sampled.squares, dense.squares, rtol=1e-5, atol=1e-5)
    for a, b in zip(sampled_grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# -- resume ---------------------------------------------------------------------------------------------
def test_a_checkpoint_inside_a_window_resumes_bitwise():
    """Stop after step 5 (inside the window of the re-selection at step 6, after those at 2), restore the
    runner and optimizer into a freshly prepared model, and train on: the same positions and values as an
    uninterrupted run."""
    model = mlp()
    runner = spiel(model, 16)
    optimizer = torch.optim.AdamW(runner.param_groups(model), lr=1e-2)
    train(model, runner, optimizer, 16)
    reference = {n: (d.indices.clone(), d.values.detach().clone()) for n, d in deltas_of(model).items()}

    model = mlp()
    runner = spiel(model, 16)
    optimizer = torch.optim.AdamW(runner.param_groups(model), lr=1e-2)
    train(model, runner, optimizer, 5)
    assert runner.window and any(d.grad_observer.steps == 1 for d in deltas_of(model).values() if d.grad_observer)
    saved = {"runner": runner.state_dict(model), "optimizer": optimizer.state_dict()}

    model = mlp()
    runner = spiel(model, 16)
    runner.load_state_dict(model, saved["runner"])
    optimizer = torch.optim.AdamW(runner.param_groups(model), lr=1e-2)
    optimizer.load_state_dict(saved["optimizer"])
    train(model, runner, optimizer, 11, start=5)
    for name, delta in deltas_of(model).items():
        assert torch.equal(delta.indices, reference[name][0]) and torch.equal(delta.values.detach(), reference[name][1])


# -- precision --------------------------------------------------------------------------------------------
def test_bf16_autocast_moves_entries_and_keeps_theta_exact():
    model = mlp()
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = spiel(model, 12)
    events = train(model, runner, torch.optim.AdamW(runner.param_groups(model), lr=1e-2), 12, autocast=True)
    assert events == [2, 6, 10]
    for name, delta in deltas_of(model).items():
        weight = delta.weight.detach().reshape(-1)
        outside = torch.ones_like(weight, dtype=torch.bool)
        outside[delta.indices] = False
        assert torch.equal(weight[outside], theta[name].reshape(-1)[outside])


def test_bf16_weights_take_the_delta_as_a_correction_and_still_move_it():
    model = mlp(dtype=torch.bfloat16)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    runner = spiel(model, 12)
    events = train(model, runner, torch.optim.AdamW(runner.param_groups(model), lr=1e-2), 12)
    assert events == [2, 6, 10] and sum(h["replaced"] for h in runner.report(model)["reselections"]) > 0
    for name, delta in deltas_of(model).items():
        assert not delta.holds_delta and delta.values.dtype == torch.float32
        assert torch.equal(delta.weight.detach(), theta[name])  # the bf16 weight is never written


def test_the_memory_model_adds_the_first_windows_sums_and_one_layers_gradient():
    from sparsedelta.train.memory import estimate, model_shape

    shape = model_shape(None, "classification")
    sara, spiel = estimate(shape, "sara", density=0.01), estimate(shape, "spiel", density=0.01)
    k = round(0.01 * shape.targeted)
    assert spiel.trainable == sara.trainable
    assert spiel.state - sara.state == 120 * k  # C = 5k candidates + k entries, 20 bytes each
    assert spiel.activations - sara.activations == 4 * shape.largest_targeted


def test_the_sums_are_unscaled_and_a_skipped_steps_gradients_are_forgotten():
    weight = torch.zeros(2, 3)
    delta = SparseDelta(weight, torch.tensor([0]))
    delta.merge()
    scores = CandidateScores(2, delta)
    g = torch.tensor([0.0, 3.0, -1.0, 0.5, 0.0, 0.0])
    scores.begin_step()
    scores(1024 * g)  # fp16's loss scale 1024 in this backward
    scores.end_step(1024.0)
    scores.begin_step()
    scores(torch.full((6,), 7.0))  # a step the loss scaler skipped: no end_step
    scores.begin_step()
    scores(512 * g)
    scores.end_step(512.0)
    assert scores.steps == 2 and scores.positions.tolist() == [0, 1, 2]
    assert scores.total.tolist() == [0.0, 6.0, -2.0] and scores.squares.tolist() == [0.0, 18.0, 2.0]


def test_a_loss_scale_changes_nothing_once_unscaled():
    """A loss scaled by 1024 (fp16's scaler, exactly: a power of two) with the gradients unscaled before
    the step, and the scale given to `before_step`: the run is bit for bit the unscaled one, seeded
    moments included."""

    def run(scale):
        model = mlp()
        runner = spiel(model, 12)
        optimizer = torch.optim.AdamW(runner.param_groups(model), lr=1e-2)
        x, y = batch()
        for step in range(1, 13):
            runner.before_step(model, step - 1, scale)
            (scale * nn.functional.cross_entropy(model(x), y)).backward()
            for p in runner.trainable(model):
                p.grad /= scale
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            runner.on_step(model, step, optimizer)
        return {n: (d.indices.clone(), d.values.detach().clone()) for n, d in deltas_of(model).items()}

    plain, scaled = run(1.0), run(1024.0)
    for name, (indices, values) in plain.items():
        assert torch.equal(scaled[name][0], indices) and torch.equal(scaled[name][1], values), name


def test_fp16_loss_scaling_leaves_growth_and_moments_as_in_fp32(tiny_bert, topic_files, tmp_path, monkeypatch):
    """`sparsedelta train --precision fp16` (GradScaler, scale 65536 on CPU): the same positions grow as in
    fp32 and the entries move as far (the exact check of the unscaling is the test above). A step the
    scaler skips at the due step moves the re-selection to the next step taken."""
    from sparsedelta.cli import main
    from test_precision import overflow_at

    def run(out, *extra):
        assert main(tiny_args(tiny_bert, topic_files, out, "--method", "spiel", "--density", 0.02, "--max-steps", 8,
                              "--eval-every", 8, "--threads", 1, "--option", "reselection_steps=4",
                              "--option", "accumulation_steps=2", *extra)) == 0  # fmt: skip
        metrics = json.loads((out / "metrics.json").read_text())
        return metrics, product_tensors(out / metrics["product"])

    (_, t32), (m16, t16) = run(tmp_path / "fp32"), run(tmp_path / "fp16", "--precision", "fp16")
    assert [e["step"] for e in m16["events"]] == [2, 6]
    for key in (k for k in t32 if k.endswith(".indices")):
        same = torch.isin(t16[key].long(), t32[key].long()).float().mean()
        assert same > 0.9, key
    values32 = torch.cat([v.abs().flatten() for k, v in t32.items() if k.endswith(".values")]).mean()
    values16 = torch.cat([v.abs().flatten() for k, v in t16.items() if k.endswith(".values")]).mean()
    assert 0.7 < float(values16 / values32) < 1.4
    overflow_at(monkeypatch, 2)
    skipped, _ = run(tmp_path / "skipped", "--precision", "fp16")
    assert [e["step"] for e in skipped["events"]] == [3, 6]


# -- end to end -----------------------------------------------------------------------------------------
def test_cli_trains_spiel_and_its_product_is_an_ordinary_delta(tiny_bert, topic_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from sparsedelta.cli import main

    out = tmp_path / "run"
    code = main(tiny_args(tiny_bert, topic_files, out, "--method", "spiel", "--density", 0.02, "--max-steps", 12,
                          "--option", "reselection_steps=4", "--option", "accumulation_steps=2", "--threads", 1,
                          "--eval-every", 12))  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["events"]] == [2, 6, 10]
    assert all(e["event"].startswith("SpIEL: moved") for e in metrics["events"])
    assert len(metrics["method_report"]["reselections"]) == 3
    k = metrics["budget"]["selected"]
    tensors = product_tensors(out / metrics["product"])
    assert sum(v.numel() for key, v in tensors.items() if key.endswith(".values")) == k
    config = json.loads((out / "config.json").read_text())
    assert config["method"]["config"]["reselection_steps"] == 4
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    loaded = sd.load(base, out / metrics["product"])
    assert sum(d.num_entries for d in deltas_of(loaded).values()) == k


def test_trainer_callback_runs_spiel(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

    from sparsedelta.train.hf import SparseDeltaCallback

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    runner = make_runner(MethodSettings(method="spiel", density=0.02, options=FAST))
    model = runner.prepare(model, head_modules=["classifier"], total_steps=8)
    k = sum(len(v) for v in sd.trainable_parameters(model)[: len(deltas_of(model))])
    gen = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(5, 100, (12,), generator=gen), "attention_mask": torch.ones(12, dtype=torch.long),
             "labels": int(i % 3)} for i in range(32)]  # fmt: skip
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=8, per_device_train_batch_size=8,
                             use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, bf16=True,
                             gradient_accumulation_steps=2)  # fmt: skip
    callback = SparseDeltaCallback(runner)
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    assert [step for step, _ in callback.events] == [2, 6]
    assert sum(h["replaced"] for h in runner.report(model)["reselections"]) > 0
    assert sum(len(d.indices) for d in deltas_of(model).values()) == k
    assert all(d.grad_observer is None for d in deltas_of(model).values())  # closed at the end


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_bert, topic_files, tmp_path):
    from test_resume import check_resume_matches

    def args(out):
        return tiny_args(tiny_bert, topic_files, out, "--method", "spiel", "--density", 0.02, "--max-steps", 30,
                         "--checkpoint-every", 4, "--eval-every", 30, "--option", "reselection_steps=6",
                         "--option", "accumulation_steps=3", "--seed", 3, "--threads", 1)  # fmt: skip

    # re-selections at 3, 9, 15, ...; the checkpoint at step 8 lies inside the window of step 9 (steps
    # 7-9), so the candidates and their sums of two steps must come back
    m, _ = check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, 8, 30)
    assert [e["step"] for e in m["events"]] == [3, 9, 15, 21, 27]


@pytest.mark.slow
def test_two_processes_grow_the_same_positions_as_one_with_the_global_batch(tiny_bert, topic_files, tmp_path):
    """torchrun, 2 CPU processes: the candidates and their sums are averaged across processes, so both
    ranks move the same entries, and as one process with the global batch does."""
    import os
    import subprocess
    import sys

    from sparsedelta.core.io import read
    from test_cli import SRC, run_cli

    common = ["--method", "spiel", "--density", 0.02, "--max-steps", 10, "--eval-every", 10, "--seed", 5,
              "--option", "reselection_steps=4", "--option", "accumulation_steps=2"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsedelta",
           *tiny_args(tiny_bert, topic_files, tmp_path / "ddp", "--batch-size", 8, *common)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert len(set(metrics["rank_fingerprints"])) == 1 and [e["step"] for e in metrics["events"]] == [2, 6, 10]
    single = run_cli(*tiny_args(tiny_bert, topic_files, tmp_path / "single", "--batch-size", 16, *common, "--threads", 1))
    assert single.returncode == 0, single.stderr[-3000:]
    (_, a), (_, b) = read(tmp_path / "ddp"), read(tmp_path / "single")
    assert a.keys() == b.keys()
    assert any(key.endswith(".indices") for key in a)
    for key in a:
        if key.endswith(".indices"):
            assert torch.equal(a[key], b[key]), key  # the same entries moved
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp_is_refused_in_words():
    """A grown entry's θ is read from the weight, which --fsdp shards across processes."""
    from sparsedelta.train import sharding
    from sparsedelta.train.distributed import World

    runner = make_runner(MethodSettings(method="spiel"))
    with pytest.raises(UsageError, match="moves its entries to new positions mid-run.*drop --fsdp"):
        sharding.check(runner, World(rank=0, size=2))


@pytest.mark.slow
def test_the_trainer_under_accelerate_moves_the_same_entries_on_both_processes(tiny_bert, topic_files, tmp_path):
    """The Trainer's DistributedDataParallel averages the values' gradients; the observers average the
    candidates' (a collective inside backward, beside DDP's own): both processes move the same entries,
    as one process with the global batch does."""
    import subprocess
    import sys

    from test_accelerate import TRAINER_SCRIPT, TWO_PROCESSES, assert_same_delta, environment

    env, args = environment(tmp_path), [tiny_bert, topic_files["train"]]
    # 4 steps: the first epoch, as test_accelerate's (later epochs draw another order under several processes)
    options = json.dumps({"reselection_steps": 2, "accumulation_steps": 1})
    launched = subprocess.run([*TWO_PROCESSES, TRAINER_SCRIPT, *map(str, args), tmp_path / "acc", "8", "4", options,
                               "spiel"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = subprocess.run([sys.executable, TRAINER_SCRIPT, *map(str, args), tmp_path / "one", "16", "4", options,
                             "spiel"], capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    log = json.loads((tmp_path / "acc" / "log.json").read_text())
    assert log["world_size"] == 2 and [step for step, _ in log["events"]] == [1, 3]
    assert log["events"] == json.loads((tmp_path / "one" / "log.json").read_text())["events"]
    assert_same_delta(tmp_path / "acc" / "delta-rank0", tmp_path / "acc" / "delta-rank1", rtol=0, atol=0)
    assert_same_delta(tmp_path / "acc" / "delta-rank0", tmp_path / "one" / "delta-rank0", rtol=1e-4, atol=1e-6)


def test_default_learning_rates_a_fifth_of_saras_for_causal_lms():
    """SaRA's causal-LM rate collapsed SpIEL in the SFT study; elsewhere SpIEL takes SaRA's rate."""
    from sparsedelta.methods import MethodSettings, make_runner

    def lr(method, task):
        return make_runner(MethodSettings(method=method, task=task)).lr

    assert lr("spiel", "sft") == lr("spiel", "causal-lm") == pytest.approx(lr("sara", "causal-lm") / 5)
    assert lr("spiel", "classification") == lr("sara", "classification")
    assert make_runner(MethodSettings(method="spiel", task="sft", lr=1e-2)).lr == 1e-2  # --lr still wins
