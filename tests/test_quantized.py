"""Deltas over bitsandbytes int8 and 4-bit (nf4) bases: the packed weights never change, the delta
adds exactly x Δᵀ, gradients match the dense dequantized model's, files load back exactly onto the
same quantized base and are refused by others, and mixed-task batches match each task's own model.

Tolerances: on this CPU backend both kinds of layer multiply by the dequantized weight in float32 in
training mode (measured: a tiny Llama's logits over its quantized layers equal those of a float copy
holding the dequantized weights within 1e-7; in eval mode bitsandbytes' int8 layer quantizes its
input rows as well, 2e-3 off, unless deltas are attached: then it computes as in training mode), so a quantized model with a delta must equal the float model
holding θ_dequantized + Δ to float32 rounding: the two differ only in summation order (x θᵀ + x Δᵀ
against x (θ + Δ)ᵀ), a few ulps of the logits' scale; 1e-5 absolute on logits of size ~1 leaves
room for that and nothing else (the delta's own effect on the logits is > 1e-2).
"""

import copy

import pytest
import torch
from torch import nn

import sparsedelta as sd
from sparsedelta.core import quantized
from sparsedelta.core.adapters import state_of
from sparsedelta.errors import UsageError
from test_causal_lm import tiny_llama

pytest.importorskip("bitsandbytes")

SCHEMES = ("int8", "4bit")
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATOL = 1e-5


def llama(seed=0):
    return tiny_llama(400, seed=seed).eval()


def ids(seed=1, rows=3, tokens=12):
    return torch.randint(1, 400, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if quantized.scheme_of(m)}


def packed(model):
    """Every byte a quantized layer holds: its packed weight and its scales."""
    out = {}
    for name, m in quantized_layers(model).items():
        w = m.weight
        out[name] = w.data.clone()
        state = getattr(w, "quant_state", None)
        scales = state.absmax if state is not None else (w.SCB if w.SCB is not None else m.state.SCB)
        out[name + ".scales"] = scales.clone()
    return out


def assert_same_bytes(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def attach(model, density=0.05, seed=0, name="default"):
    """SaRA at `density` over the linear layers, values set to random numbers of a size that changes
    the logits clearly."""
    sd.add_delta(model, sd.SaRAConfig(density=density, target_modules=LINEARS), adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for delta in state_of(model).adapters[name].deltas.values():
            delta.values.copy_(0.05 * torch.randn(len(delta.values), generator=g))
    return model


def dense_equivalent(qmodel, float_model, adapter="default"):
    """The float model holding θ_dequantized (+ Δ of `adapter`, None: θ only) in each quantized layer."""
    ref = copy.deepcopy(float_model)
    deltas = state_of(qmodel).adapters[adapter].deltas if adapter else {}
    for name, m in quantized_layers(qmodel).items():
        weight = sd.dequantize(m)
        delta = deltas.get(name + ".weight")
        if delta is not None:
            positions, values = delta.every_entry()
            weight.view(-1).index_add_(0, positions, values)
        ref.get_submodule(name).weight.data.copy_(weight)
    return ref


@pytest.fixture(params=["fused", "added"])
def path(request, monkeypatch):
    """Both forwards of a delta over a quantized layer: one product with θ dequantized + Δ, or the
    layer's own forward + x Δᵀ (taken under autocast or below other patches)."""
    from sparsedelta.core import adapters

    monkeypatch.setattr(adapters, "FUSE_QUANTIZED", request.param == "fused")
    return request.param


@pytest.mark.parametrize("scheme", SCHEMES)
def test_only_the_deltas_entries_change_the_output(scheme, path):
    base = llama().train()  # no dropout in these Llamas: training mode computes as eval mode does
    model = attach(sd.quantize(copy.deepcopy(base), scheme))
    x = ids()
    with torch.no_grad():
        got = model(x).logits
        expected = dense_equivalent(model, base)(x).logits
        without = dense_equivalent(model, base, adapter=None)(x).logits
    assert (expected - without).abs().max() > 1e-2  # the delta matters
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert {d.quantized for d in state_of(model).adapters["default"].deltas.values()} == {
        "int8" if scheme == "int8" else "nf4"
    }


@pytest.mark.parametrize("scheme", SCHEMES)
def test_training_never_writes_the_packed_weights(scheme, path):
    model = attach(sd.quantize(llama(), scheme))
    before = packed(model)
    values_before = [d.values.detach().clone() for d in state_of(model).adapters["default"].deltas.values()]
    opt = torch.optim.AdamW(sd.trainable_parameters(model), lr=1e-2)
    x = ids()
    for _ in range(3):
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert_same_bytes(before, packed(model))
    after = [d.values.detach() for d in state_of(model).adapters["default"].deltas.values()]
    assert all(not torch.equal(a, b) for a, b in zip(values_before, after, strict=True))  # it did train
    assert all(not p.requires_grad for n, p in model.named_parameters() if "sparse_delta" not in n)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_values_gradient_equals_the_dense_dequantized_models(scheme, path):
    base = llama().train()
    model = attach(sd.quantize(copy.deepcopy(base), scheme))
    deltas = state_of(model).adapters["default"].deltas
    x = ids()
    model(x, labels=x).loss.backward()

    # the dense model: θ_dequantized + scatter(values) built inside autograd, values as leaves
    ref = dense_equivalent(model, base, adapter=None)
    leaves = {n: d.values.detach().clone().requires_grad_(True) for n, d in deltas.items()}
    originals = {}
    for name, leaf in leaves.items():
        module_name = name.rpartition(".")[0]
        module = ref.get_submodule(module_name)
        theta = module.weight.detach()
        originals[module_name] = theta
        del module.weight
        module.weight = theta.reshape(-1).index_add(0, deltas[name].indices, leaf).view(theta.shape)
    ref(x, labels=x).loss.backward()
    for name, delta in deltas.items():
        torch.testing.assert_close(delta.values.grad, leaves[name].grad, atol=1e-6, rtol=1e-4)
    assert sum(float(d.values.grad.abs().sum()) for d in deltas.values()) > 0


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disabled_and_unload_give_the_quantized_base_exactly(scheme):
    """The base as it computes in training mode (a CPU's int8 layer in eval mode quantizes its
    input rows too, unless it carries deltas: they are evaluated as trained)."""
    base = sd.quantize(llama(), scheme)
    x = ids()
    with torch.no_grad():
        plain = base(x).logits  # eval mode, bitsandbytes' own forward
        as_trained = base.train()(x).logits
        base.eval()
    assert torch.equal(plain, as_trained) == (scheme == "4bit")
    before = packed(base)
    model = attach(base)
    with torch.no_grad():
        assert (model(x).logits - as_trained).abs().max() > 1e-2
        torch.testing.assert_close(model(x).logits, model.train()(x).logits, atol=ATOL, rtol=0)  # evaluated as trained
        model.eval()
        with sd.disabled(model):  # int8: our product with the dequantized weight, float32 rounding off bitsandbytes'
            torch.testing.assert_close(model(x).logits, as_trained, atol=ATOL, rtol=0)
        sd.unload(model)
        assert torch.equal(model(x).logits, plain)
    assert_same_bytes(before, packed(model))
    assert not any("sparse_delta" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_save_and_load_onto_the_same_quantized_base_is_exact(scheme, tmp_path):
    model = attach(sd.quantize(llama(), scheme))
    x = ids()
    with torch.no_grad():
        trained = model(x).logits
    sd.save(model, tmp_path / "delta")
    fresh = sd.quantize(llama(), scheme)  # the same checkpoint quantized again: the same bytes
    sd.load(fresh, tmp_path / "delta")
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, trained)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_load_onto_another_base_is_refused(scheme, tmp_path):
    model = attach(sd.quantize(llama(), scheme))
    sd.save(model, tmp_path / "delta")
    other = "4bit" if scheme == "int8" else "int8"
    with pytest.raises(sd.DeltaFileError, match="dtype mismatch.*--base-quantization"):
        sd.load(llama(), tmp_path / "delta")  # the float checkpoint
    with pytest.raises(sd.DeltaFileError, match="dtype mismatch"):
        sd.load(sd.quantize(llama(), other), tmp_path / "delta")
    with pytest.raises(sd.DeltaFileError, match="fingerprint mismatch"):
        sd.load(sd.quantize(llama(seed=5), scheme), tmp_path / "delta")  # another checkpoint, same scheme


@pytest.mark.parametrize("scheme", SCHEMES)
def test_mixed_batches_equal_each_tasks_own_model(scheme):
    model = sd.quantize(llama(), scheme)
    attach(model, seed=1, name="a")
    attach(model, seed=2, name="b", density=0.02)
    names = ["a", sd.BASE, "b", "a"]
    x = ids(rows=len(names), tokens=10)
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
        for row, name in enumerate(names):
            if name == sd.BASE:
                with sd.disabled(model):
                    own = model(x[row : row + 1]).logits
            else:
                sd.set_adapter(model, name)
                own = model(x[row : row + 1]).logits
            torch.testing.assert_close(mixed[row : row + 1], own, atol=ATOL, rtol=0)
        # decoding: one token a row takes every task's entries from one table
        step = model(x[:, :1], adapter_names=names).logits
        for row, name in enumerate(names):
            if name != sd.BASE:
                sd.set_adapter(model, name)
                torch.testing.assert_close(step[row], model(x[row : row + 1, :1]).logits[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_selection_reads_the_dequantized_weights(scheme):
    """SaRA at a density over a quantized base picks the smallest |θ_dequantized|: everything below
    the k-th value, and as many ties at it as the budget needs (spread: see the streamed test)."""
    base = llama()
    model = sd.quantize(copy.deepcopy(base), scheme)
    dense = dense_equivalent(model, base, adapter=None)
    config = sd.SaRAConfig(density=0.03, target_modules=LINEARS)
    sd.add_delta(model, config)
    sd.add_delta(dense, config)
    got = state_of(model).adapters["default"].deltas
    expected = state_of(dense).adapters["default"].deltas
    # the float model's rule takes ties in order: all into the first tensors; the spread ones reach every layer
    assert set(expected) <= set(got) and len(got) == len(LINEARS) * 2
    assert sum(len(d.indices) for d in got.values()) == sum(len(d.indices) for d in expected.values())
    kth = max(float(d.base.abs().max()) for d in expected.values())
    for name, delta in got.items():
        theta = dense.get_parameter(name).detach().reshape(-1)
        assert torch.equal(delta.base, theta[delta.indices])  # θ at the positions: the dequantized one
        assert float(delta.base.abs().max()) <= kth
        below = torch.nonzero(theta.abs() < kth).squeeze(1)
        assert bool(torch.isin(below, delta.indices).all())


@pytest.mark.parametrize("method", ["full", "diff-pruning", "sora", "spiel"])
def test_methods_that_train_dense_weights_are_refused(method):
    from sparsedelta.methods import make_runner
    from sparsedelta.methods.base import MethodSettings

    runner = make_runner(MethodSettings(method=method, task="causal-lm", density=0.05 if method == "diff-pruning" else None))
    with pytest.raises(UsageError, match="needs float weights.*--method sara.*--base-quantization"):
        runner.prepare(sd.quantize(llama(), "4bit"), [], 10, {"target_modules": LINEARS})


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merging_gives_the_dequantized_float_model_trained(scheme):
    model = attach(sd.quantize(llama().train(), scheme))  # the function trained: training mode's
    with pytest.raises(UsageError, match="dequantize=True"):
        sd.merge_and_unload(model)
    with pytest.raises(UsageError, match="quantized already"):
        sd.quantize(model, "int8")
    x = ids()
    with torch.no_grad():
        trained = model(x).logits
        merged = sd.merge_and_unload(model, dequantize=True)
        assert not quantized.is_quantized(merged) and not hasattr(merged, "_sparsedelta")
        assert all(type(m) is nn.Linear for n, m in merged.named_modules() if n.endswith(tuple(LINEARS)))
        torch.testing.assert_close(merged(x).logits, trained, atol=ATOL, rtol=0)


def test_quantize_keeps_the_head_and_named_modules_in_float():
    model = sd.quantize(llama(), "int8", skip=["down_proj"])
    assert type(model.lm_head) is nn.Linear
    layers = quantized_layers(model)
    assert layers and not any(n.endswith("down_proj") for n in layers)
    assert all(type(m).__name__ == "Linear8bitLt" for m in layers.values())


def test_a_model_loaded_with_a_bitsandbytes_config_takes_deltas(tmp_path):
    """A hub-style quantized load (transformers' BitsAndBytesConfig) is used as it is."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    llama().save_pretrained(tmp_path / "m")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=config, device_map="cpu").eval()
    before = packed(model)
    attach(model)
    x = ids()
    with torch.no_grad():
        with sd.disabled(model):
            plain = model(x).logits
        changed = model(x).logits
    assert (changed - plain).abs().max() > 1e-2
    assert_same_bytes(before, packed(model))  # an eval-mode forward did not repack the 4-bit weights


def test_eval_mode_forwards_keep_the_4bit_packing():
    model = sd.quantize(llama(), "4bit").eval()
    before = packed(model)
    with torch.no_grad():
        model(ids())
    assert_same_bytes(before, packed(model))


# -- the command line -------------------------------------------------------------------------------
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: E402, F401
from test_causal_lm import kjv, tokenizer  # noqa: E402, F401  (fixtures)


def test_cli_train_eval_predict_over_a_4bit_base(tiny_llama_dir, kjv_text, tmp_path):
    import json

    from sparsedelta.cli import main
    from sparsedelta.core.io import read_metadata

    out = tmp_path / "run"
    args = lm_args(tiny_llama_dir, kjv_text, out, "--max-steps", 4, "--base-quantization", "4bit", "--threshold", 2e-3,
                   "--lr", 1e-2, "--threads", 1)  # fmt: skip
    assert main(args) == 0
    assert json.loads((out / "config.json").read_text())["train"]["base_quantization"] == "4bit"
    assert {fp["dtype"] for fp in read_metadata(out / "delta.safetensors")["fingerprint"].values()} == {"nf4"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["perplexity"] != metrics["baseline"]["test"]["perplexity"]

    # eval rebuilds the quantized base from the run: the same test perplexity
    from sparsedelta.train.finished import load_run

    finished = load_run(out)
    assert quantized.is_quantized(finished.model)
    assert finished.task.evaluate(finished.model, "test")["perplexity"] == pytest.approx(metrics["test"]["perplexity"], rel=1e-9)

    # a bare delta brings its base's quantization: predict builds a 4-bit base from --model
    rows = tmp_path / "in.csv"
    rows.write_text("task,text\nq,And God said\n")
    # merge: the dequantized float model with the delta folded in, the function trained
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    x = ids(tokens=10)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, finished.model(x).logits, atol=ATOL, rtol=0)

    # serve loads the same base: from the run folder, and for the bare delta from --model
    from sparsedelta.serve.loading import load_served

    for adapters, model in (({"q": str(out)}, None), ({"q": str(out / "delta.safetensors")}, str(tiny_llama_dir))):
        served = load_served(adapters, model=model)
        assert quantized.is_quantized(served.groups[0].task.model) and served.names == ["q"]

    for source in (out, out / "delta.safetensors"):
        extra = ["--model", tiny_llama_dir] if source != out else []
        assert main([str(a) for a in ["predict", "--adapter", f"q={source}", "--input-file", rows, "--output",
                                      tmp_path / "o.csv", "--max-new-tokens", 3, "--no-progress", *extra]]) == 0  # fmt: skip


def test_cli_refuses_full_fine_tuning_over_a_quantized_base(tiny_llama_dir, kjv_text, tmp_path, capsys):
    from sparsedelta.cli import main

    args = lm_args(tiny_llama_dir, kjv_text, tmp_path / "run", "--max-steps", 2, "--base-quantization", "int8",
                   "--method", "full")  # fmt: skip
    assert main(args) == 2
    assert "full fine-tuning needs float weights" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_resume_after_sigkill_over_an_int8_base(tiny_llama_dir, kjv_text, tmp_path):
    from test_resume import check_resume_matches

    def args(out):
        return lm_args(tiny_llama_dir, kjv_text, out, "--max-steps", 40, "--checkpoint-every", 5, "--eval-every", 20,
                       "--threshold", 2e-3, "--lr", 1e-2, "--threads", 1, "--base-quantization", "int8")  # fmt: skip

    check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, 10, 40)


def test_streamed_selection_spreads_ties_over_tensors_and_positions():
    """Over a quantized base the k smallest scores are found one tensor at a time: every entry below
    the k-th value is taken, as the all-at-once form does, and the ties at it (nf4's zero code: many)
    are shared by the tensors in proportion to their own ties, evenly over positions, rather than
    given to the first tensor's first positions."""
    from sparsedelta.core.selection import LazyScores, smallest_k

    g = torch.Generator().manual_seed(0)
    sizes = [500, 70, 1300, 10, 640]
    tensors = {f"t{i}": torch.randint(0, 6, (n,), generator=g).float() for i, n in enumerate(sizes)}
    distinct = {f"t{i}": torch.rand(n, generator=g) for i, n in enumerate(sizes)}
    for k in (1, 37, 600, 1500, 2520):
        got = smallest_k(LazyScores(tensors, lambda t: t), k)
        assert sum(len(p) for p in got.values()) == k
        kth = torch.cat(list(tensors.values())).kthvalue(k).values
        tied = {n: int((t == kth).sum()) for n, t in tensors.items()}
        needed = k - sum(int((t < kth).sum()) for t in tensors.values())
        for name, t in tensors.items():
            chosen = t[got[name]]
            assert int((chosen < kth).sum()) == int((t < kth).sum())  # everything below
            share = len(got[name]) - int((t < kth).sum())
            assert abs(share - needed * tied[name] / sum(tied.values())) <= 1
            if share > 1:  # evenly over the tensor, not its first ties
                ties = torch.nonzero(t == kth).squeeze(1)
                assert int(got[name][chosen == kth][-1]) > int(ties[len(ties) // 2])
        # without ties: exactly the all-at-once positions
        expected = smallest_k(dict(distinct), k)
        plain = smallest_k(LazyScores(distinct, lambda t: t), k)
        assert all(torch.equal(plain[n], expected[n]) for n in expected)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_estimate_counts_a_quantized_bases_bytes(scheme):
    """The memory model's weights term against the bytes a quantized model holds (packed weights,
    block or row scales, float embeddings and norms), within 1%."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsedelta.train.memory import estimate, shape_of

    config = LlamaConfig(vocab_size=400, hidden_size=512, intermediate_size=1024, num_hidden_layers=1,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    predicted = estimate(shape_of(model, "causal-lm"), "sara", task="causal-lm", base_quantization=scheme).weights
    sd.quantize(model, scheme)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in quantized_layers(model).values():
        state = getattr(m.weight, "quant_state", None)
        scales = [m.weight.SCB] if state is None else [state.absmax, state.state2.absmax]
        held += sum(s.numel() * s.element_size() for s in scales)
    assert predicted == pytest.approx(held, rel=0.01)


def test_cli_estimate_with_a_quantized_base(capsys):
    import json

    from sparsedelta.cli import main

    common = ["estimate", "--model", "llama-3.1-8b", "--method", "sara", "--base-dtype", "bfloat16", "--json"]
    assert main(common) == 0
    bf16 = json.loads(capsys.readouterr().out)[0]
    assert main([*common, "--base-quantization", "4bit"]) == 0
    nf4 = json.loads(capsys.readouterr().out)[0]
    # the linear layers at 0.52 bytes an entry instead of 2; the embeddings and the LM head stay bf16
    assert 0.3 < nf4["weights"] / bf16["weights"] < 0.4
    assert nf4["total"] < bf16["total"] and nf4["state"] == bf16["state"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_bf16_autocast_step_over_a_quantized_base(scheme, path):
    """Under autocast, one bf16 product of θ + Δ (fused) or the layer's own output + x Δᵀ (added):
    either trains the values and leaves the packed bytes as they were."""
    base = llama()
    model = attach(sd.quantize(copy.deepcopy(base), scheme))
    before = packed(model)
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x).logits
        model(x, labels=x).loss.backward()
    with torch.no_grad():
        expected = dense_equivalent(model, base)(x).logits
        without = dense_equivalent(model, base, adapter=None)(x).logits
    # bf16 compute: within a few bf16 steps of the float result, while the delta moves it further
    error = (logits.float() - expected).abs().max()
    assert error < 0.25 * (expected - without).abs().max()
    grads = [d.values.grad for d in state_of(model).adapters["default"].deltas.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert_same_bytes(before, packed(model))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_under_autocast_the_fused_product_is_autocasts_product_of_theta_plus_delta(scheme):
    """The fused path under autocast computes what autocast computes for a float32 model holding
    θ_dequantized + Δ: the same bf16 product forward, and the values' gradient that model's weight
    gradient at the delta's positions (ours summed in float32, autocast's in bf16)."""
    base = llama()
    model = attach(sd.quantize(copy.deepcopy(base), scheme))
    dense = dense_equivalent(model, base)
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = model(x, labels=x), dense(x, labels=x)
    assert torch.equal(ours.logits, theirs.logits)  # the same bf16 operands, the same kernel
    ours.loss.backward()
    theirs.loss.backward()
    for name, delta in state_of(model).adapters["default"].deltas.items():
        if not name.endswith(".weight"):
            continue
        expected = dense.get_submodule(name.removesuffix(".weight")).weight.grad.view(-1)[delta.indices]
        scale = expected.abs().max()
        assert (delta.values.grad - expected).abs().max() <= 0.02 * scale, name


def test_relative_reselection_reads_the_dequantized_weights():
    """SaRA's relative re-selection compares trained entries with the whole current tensor: over a
    quantized base that is the dequantized θ, never the packed bytes."""
    from sparsedelta.methods import sara

    model = attach(sd.quantize(llama(), "4bit"), density=0.05)
    deltas = state_of(model).adapters["default"].deltas
    with torch.no_grad():
        for delta in deltas.values():
            delta.values[::2] += 1.0  # every other entry far above any |θ|: those leave
    before = {n: len(d.indices) for n, d in deltas.items()}
    report = sara.reselect_relative(model)
    for name, delta in deltas.items():
        assert len(delta.indices) + len(delta.frozen_indices) == before[name]
        assert len(delta.frozen_indices) >= before[name] // 2
    assert report.selected == sum(len(d.indices) for d in deltas.values())


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_delta_moves_between_quantize_and_a_bitsandbytes_config_load(scheme, tmp_path):
    """`quantize(model, "4bit")` is BitsAndBytesConfig(load_in_4bit, nf4, double quantization) and
    "int8" is load_in_8bit, byte for byte: a delta trained over one loads onto the other exactly; a
    4-bit load without double quantization has other θ and is refused."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    llama().save_pretrained(tmp_path / "m")
    model = attach(sd.quantize(AutoModelForCausalLM.from_pretrained(tmp_path / "m"), scheme))
    sd.save(model, tmp_path / "delta")
    x = ids()
    with torch.no_grad():
        trained = model(x).logits
    if scheme == "int8":
        configs = {True: BitsAndBytesConfig(load_in_8bit=True)}
    else:
        configs = {True: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                            bnb_4bit_compute_dtype=torch.float32),  # fmt: skip
                   False: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}
    for same, config in configs.items():
        hub = AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=config, device_map="cpu").eval()
        if not same:
            with pytest.raises(sd.DeltaFileError, match="fingerprint mismatch"):
                sd.load(hub, tmp_path / "delta")
            continue
        sd.load(hub, tmp_path / "delta")
        with torch.no_grad():
            torch.testing.assert_close(hub(x).logits, trained, atol=ATOL, rtol=0)


def test_export_to_peft_says_what_it_would_need(tmp_path):
    model = attach(sd.quantize(llama(), "4bit"))
    sd.save(model, tmp_path / "delta")
    with pytest.raises(UsageError, match="quantized base.*SHiRA.*dequantize=True"):
        sd.export_shira(tmp_path / "delta", sd.quantize(llama(), "4bit"), tmp_path / "shira")


# -- merging into the float checkpoint the base was quantized from ------------------------------------
def expected_float_merge(base, deltas):
    """θ_float + Δ at the delta's positions, θ_float elsewhere, computed here on a copy of `base`'s tensors."""
    out = {}
    for name, param in base.named_parameters():
        weight = param.detach().clone()
        if name in deltas:
            positions, values = deltas[name]
            flat = weight.view(-1)
            flat[positions] = flat[positions] + values
        out[name] = weight
    return out


def relative_errors(qmodel, float_model):
    """‖θ_float − θ_deq‖ / ‖θ_float‖ per quantized layer and over all of them, computed in float64."""
    layers, diff, size = {}, 0.0, 0.0
    for name, layer in quantized_layers(qmodel).items():
        theta = float_model.get_submodule(name).weight.detach().double()
        d = float(((theta - sd.dequantize(layer).double()) ** 2).sum())
        n = float((theta**2).sum())
        layers[name] = (d / n) ** 0.5
        diff, size = diff + d, size + n
    return layers, (diff / size) ** 0.5


@pytest.mark.parametrize("scheme", SCHEMES)
def test_merging_into_the_float_base_adds_the_delta_to_the_float_weights(scheme):
    base = llama()
    model = attach(sd.quantize(copy.deepcopy(base), scheme))
    deltas = {n: d.every_entry() for n, d in state_of(model).adapters["default"].deltas.items()}
    before = packed(model)
    x = ids()
    with torch.no_grad():
        exact = model(x).logits
    float_model = copy.deepcopy(base)
    error = sd.merge_into_float_base(model, float_model)

    merged = dict(float_model.named_parameters())
    for name, weight in expected_float_merge(base, deltas).items():
        assert torch.equal(merged[name], weight), name  # bit for bit, the delta's positions and everywhere else
    layers, overall = relative_errors(model, base)
    assert error.layers.keys() == layers.keys() and len(layers) == 2 * len(LINEARS)
    for name, value in layers.items():
        assert error.layers[name] == pytest.approx(value, rel=1e-5)
    assert error.overall == pytest.approx(overall, rel=1e-5)
    assert 0 < overall < (0.02 if scheme == "int8" else 0.3)  # the quantization error (another checkpoint: ~1.4)

    # the outputs: the float merge is not the function trained, and compare_outputs says by how much
    assert_same_bytes(before, packed(model))  # the quantized model is left as it was
    with torch.no_grad():
        assert torch.equal(model(x).logits, exact)
        got = float_model(x).logits
    from sparsedelta.core.float_merge import compare_outputs

    outputs = compare_outputs(model, float_model, [{"input_ids": x[:2]}, {"input_ids": x[2:]}])
    diff = (exact - got).abs()
    assert outputs.mean_abs == pytest.approx(float(diff.mean()), rel=1e-5)
    assert outputs.max_abs == pytest.approx(float(diff.max()), rel=1e-6)
    assert outputs.top1_agreement == int((exact.argmax(-1) == got.argmax(-1)).sum()) / x.numel()
    assert outputs.rows == x.numel() and outputs.mean_abs > 1e-4


def test_merging_a_classifiers_delta_into_the_float_base_copies_its_trained_head():
    """A new head trained densely beside the delta (kept float by quantize's skip) is copied as trained."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    base = BertForSequenceClassification(config).eval()
    model = sd.quantize(copy.deepcopy(base), "4bit", skip=["classifier"])
    sd.add_delta(model, sd.SaRAConfig(density=0.05, target_modules=["query", "value"], modules_to_save=["classifier"]))
    adapter = state_of(model).adapters["default"]
    with torch.no_grad():
        for delta in adapter.deltas.values():
            delta.values.normal_(0, 0.05)
        for head in adapter.saved.values():
            head.normal_(0, 0.5)
    float_model = copy.deepcopy(base)
    sd.merge_into_float_base(model, float_model)
    merged = dict(float_model.named_parameters())
    assert set(adapter.saved) == {"classifier.weight", "classifier.bias"}
    for path, head in adapter.saved.items():
        assert torch.equal(merged[path], head.detach())
    deltas = {n: d.every_entry() for n, d in adapter.deltas.items()}
    for name, weight in expected_float_merge(base, deltas).items():
        if name not in adapter.saved:
            assert torch.equal(merged[name], weight), name


def test_merging_into_a_float_base_refuses_what_is_not_that_base():
    base = llama()
    model = attach(sd.quantize(copy.deepcopy(base), "4bit"))
    other = llama(seed=5)
    untouched = copy.deepcopy(other)
    with pytest.raises(UsageError, match="does not quantize to the quantized base's codes.*--model"):
        sd.merge_into_float_base(model, other)  # another checkpoint: refused before anything is written
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), untouched.parameters(), strict=True))
    with pytest.raises(UsageError, match="Linear4bit.*unquantized model"):
        sd.merge_into_float_base(model, sd.quantize(copy.deepcopy(base), "4bit"))
    with pytest.raises(UsageError, match="not quantized.*merge_and_unload"):
        sd.merge_into_float_base(attach(copy.deepcopy(base)), copy.deepcopy(base))


def test_cli_merge_into_the_float_base_prints_what_it_costs(tiny_llama_dir, kjv_text, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from sparsedelta.cli import main
    from sparsedelta.cli.merge import ERROR_FILE
    from sparsedelta.train.finished import load_run

    out, merged_dir = tmp_path / "run", tmp_path / "merged"
    assert main(lm_args(tiny_llama_dir, kjv_text, out, "--max-steps", 3, "--base-quantization", "int8", "--density", 0.05,
                        "--lr", 1e-2, "--threads", 1)) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["merge", str(out), "--output", str(merged_dir), "--float-base"]) == 0
    printed = capsys.readouterr().out
    assert "not the function trained" in printed

    # the file: θ_float + Δ, bit for bit, θ_float elsewhere
    finished = load_run(out, splits=("validation",))
    state = state_of(finished.model)
    deltas = {n: d.every_entry() for n, d in state.adapters[state.active].deltas.items()}
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    got = dict(merged.named_parameters())
    for name, weight in expected_float_merge(original, deltas).items():
        assert torch.equal(got[name], weight), name

    # the numbers printed (and kept in the folder), recomputed here
    record = json.loads((merged_dir / ERROR_FILE).read_text())
    layers, overall = relative_errors(finished.model, original)
    assert record["relative_weight_difference"]["overall"] == pytest.approx(overall, rel=1e-5)
    assert record["relative_weight_difference"]["layers"] == pytest.approx(layers, rel=1e-5)
    assert f"‖θ_float − θ_deq‖ / ‖θ_float‖ = {record['relative_weight_difference']['overall']:.4g}" in printed
    blocks = finished.task.blocks["validation"][:8]
    with torch.no_grad():
        exact, floated = finished.model(blocks).logits, merged(blocks).logits
    diff = (exact - floated).abs()
    agreement = float((exact.argmax(-1) == floated.argmax(-1)).float().mean())
    assert record["outputs"]["rows"] == blocks.numel()
    assert record["outputs"]["mean_abs"] == pytest.approx(float(diff.mean()), rel=1e-5)
    assert record["outputs"]["top1_agreement"] == pytest.approx(agreement)
    assert f"mean |Δ logits| {float(diff.mean()):.4g}" in printed and f"top-1 agreement {agreement:.2%}" in printed
    perplexities = {"exact": finished.task.evaluate(finished.model, "validation")["perplexity"],
                    "float_base": finished.task.evaluate(merged, "validation")["perplexity"]}  # fmt: skip
    assert record["validation_perplexity"] == pytest.approx(perplexities, rel=1e-9)
    assert f"{perplexities['exact']:.6g} quantized base + delta" in printed and f"{perplexities['float_base']:.6g} this" in printed

    # the float checkpoint gone: refused by name, nothing written
    missing = tmp_path / "nowhere"
    assert main(["merge", str(out), "--output", str(tmp_path / "m2"), "--float-base", "--model", str(missing)]) == 2
    assert "--float-base needs the float checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m2").exists()
    # a run over a float base: nothing to choose between
    assert main(lm_args(tiny_llama_dir, kjv_text, tmp_path / "float", "--max-steps", 1, "--density", 0.05, "--threads", 1)) == 0
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "float"), "--output", str(tmp_path / "m3"), "--float-base"]) == 2
    assert "this run's base is not quantized" in capsys.readouterr().err


# -- compose: deltas of one quantized base ----------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES)
def test_compose_over_a_quantized_base_is_the_weighted_sum_over_the_dequantized_weights(scheme, tmp_path):
    """Two deltas trained over the same quantized base, composed: the result loads onto that base,
    leaves its packed bytes alone, and computes θ_deq + w₁Δ₁ + w₂Δ₂."""
    base = llama().train()  # training mode: an int8 layer then multiplies by its dequantized weight, as the float model
    inputs = [attach(sd.quantize(copy.deepcopy(base), scheme), seed=seed, density=density)
              for seed, density in ((1, 0.05), (2, 0.03))]  # fmt: skip
    for name, model in zip("ab", inputs, strict=True):
        sd.save(model, tmp_path / name)
    target = sd.quantize(copy.deepcopy(base), scheme)
    before = packed(target)
    weights = [0.7, -1.3]
    sd.compose(target, [tmp_path / "a", tmp_path / "b"], tmp_path / "c", weights=weights)
    assert_same_bytes(before, packed(target)) and getattr(target, "_sparsedelta", None) is None
    sd.load(target, tmp_path / "c")
    assert_same_bytes(before, packed(target))

    expected = dense_equivalent(inputs[0], base, adapter=None)  # θ_deq
    for w, model in zip(weights, inputs, strict=True):
        for name, delta in state_of(model).adapters["default"].deltas.items():
            positions, values = delta.every_entry()
            expected.get_parameter(name).data.view(-1).index_add_(0, positions, w * values)
    x = ids()
    with torch.no_grad():
        got = target(x).logits
        want = expected(x).logits
        alone = inputs[0](x).logits
    assert (want - alone).abs().max() > 1e-2  # the second delta matters
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_compose_refuses_deltas_of_differently_quantized_bases(tmp_path):
    base = llama()
    for name, scheme in (("int8", "int8"), ("4bit", "4bit"), ("float", None)):
        model = sd.quantize(copy.deepcopy(base), scheme) if scheme else copy.deepcopy(base)
        sd.save(attach(model), tmp_path / name)
    target = sd.quantize(copy.deepcopy(base), "int8")
    with pytest.raises(sd.DeltaFileError, match="over an int8 base and .*4bit over a 4-bit \\(nf4\\) base.*--base-quantization"):
        sd.compose(target, [tmp_path / "int8", tmp_path / "4bit"], tmp_path / "c")
    with pytest.raises(sd.DeltaFileError, match="over an int8 base and .*float over a float base"):
        sd.compose(target, [tmp_path / "int8", tmp_path / "float"], tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_cli_compose_over_a_4bit_base(tiny_llama_dir, tmp_path, capsys):
    """Bare deltas bring their base's quantization: compose builds a 4-bit base from --model, and the
    composed file loads onto it (refused by the float checkpoint)."""
    from transformers import AutoModelForCausalLM

    from sparsedelta.cli import main

    def quantized_base():
        return sd.quantize(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "4bit").train()

    inputs = [attach(quantized_base(), seed=seed) for seed in (1, 2)]
    for name, model in zip("ab", inputs, strict=True):
        sd.save(model, tmp_path / name)
    assert main(["compose", str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "c"),
                 "--model", str(tiny_llama_dir)]) == 0  # fmt: skip
    assert "composed 2 deltas (sum)" in capsys.readouterr().out
    target = sd.load(quantized_base(), tmp_path / "c")
    expected = dense_equivalent(inputs[0], AutoModelForCausalLM.from_pretrained(tiny_llama_dir).train(), adapter=None)
    for model in inputs:
        for name, delta in state_of(model).adapters["default"].deltas.items():
            positions, values = delta.every_entry()
            expected.get_parameter(name).data.view(-1).index_add_(0, positions, values)
    x = ids(tokens=10)
    with torch.no_grad():
        torch.testing.assert_close(target(x).logits, expected(x).logits, atol=ATOL, rtol=0)
    with pytest.raises(sd.DeltaFileError, match="dtype mismatch"):
        sd.load(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tmp_path / "c")


# -- transformers.Trainer over a model loaded with a BitsAndBytesConfig -------------------------------
def test_trainer_trains_a_delta_over_a_bitsandbytes_config_load(tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainingArguments

    from sparsedelta.methods import MethodSettings, make_runner
    from sparsedelta.train.hf import SparseDeltaCallback, accept_quantized_base

    llama().save_pretrained(tmp_path / "m")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "m", quantization_config=config, device_map="cpu")

    with pytest.raises(UsageError, match="no trainable sparse delta.*prepare"):
        with accept_quantized_base(load()):
            pass
    runner = make_runner(MethodSettings(method="sara", task="causal-lm", density=0.05, lr=1e-2))
    model = runner.prepare(load(), [], 4, {"target_modules": LINEARS})
    before = packed(model)
    deltas = state_of(model).adapters["default"].deltas
    values_before = {n: d.values.detach().clone() for n, d in deltas.items()}
    x = ids(rows=8)
    train_set = [{"input_ids": row, "labels": row} for row in x]
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="steps", save_steps=2,
                             disable_tqdm=True, seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="purely quantized"):  # the Trainer's own check, without the block
        Trainer(model=model, args=args, train_dataset=train_set)
    with accept_quantized_base(model):
        trainer = Trainer(model=model, args=args, train_dataset=train_set, callbacks=[SparseDeltaCallback(runner)])
    assert model.is_quantized  # the mark is back
    trainer.train()

    assert_same_bytes(before, packed(model))
    assert all(not torch.equal(d.values, values_before[n]) for n, d in deltas.items())
    for step in (2, 4):  # the Trainer's checkpoints, with the callback's delta in each
        assert (tmp_path / "trainer" / f"checkpoint-{step}" / "model.safetensors").is_file()
        assert (tmp_path / "trainer" / f"checkpoint-{step}" / "sparsedelta" / "delta.safetensors").is_file()
    sd.save(model, tmp_path / "delta")
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
        for source in (tmp_path / "delta", tmp_path / "trainer" / "checkpoint-4" / "sparsedelta"):
            fresh = sd.load(load(), source).eval()
            assert torch.equal(fresh(x).logits, trained)


# -- what bitsandbytes logs --------------------------------------------------------------------------
def test_only_the_known_bitsandbytes_noise_is_dropped(caplog, monkeypatch):
    import logging

    caplog.set_level(logging.WARNING)
    for name, starts in quantized.BITSANDBYTES_NOISE.items():
        logger = logging.getLogger(name)
        logger.warning(starts[0] + " (and the rest of it)")
        logger.warning("something else went wrong")  # anything else still reaches the user
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"] * len(quantized.BITSANDBYTES_NOISE)

    # the int8 layer's message, at an eval-mode forward without a delta: dropped, and it is there without the filter
    caplog.clear()
    model = sd.quantize(llama(), "int8").eval()
    with torch.no_grad():
        model(ids())
    assert not caplog.records
    monkeypatch.setattr(logging.getLogger("bitsandbytes.autograd._functions"), "filters", [])
    with torch.no_grad():
        model(ids())
    assert any(r.getMessage().startswith("MatMul8bitLt: inputs will be cast") for r in caplog.records)


def test_cli_over_a_quantized_base_prints_no_bitsandbytes_noise(tiny_llama_dir, kjv_text, tmp_path):
    """A training run over an int8 base in its own process (bitsandbytes' import-time message comes
    once per process): its baseline evaluates the int8 base in eval mode, which logged a line per
    layer and forward."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(sd.__file__).parents[1])}
    args = lm_args(tiny_llama_dir, kjv_text, tmp_path / "run", "--max-steps", 2, "--base-quantization", "int8",
                   "--threshold", 2e-3, "--threads", 1)  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "sparsedelta", *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = done.stdout + done.stderr
    assert "perplexity" in printed
    assert not [start for starts in quantized.BITSANDBYTES_NOISE.values() for start in starts if start in printed]
    assert "bitsandbytes" not in printed and "MatMul8bitLt" not in printed
