"""Mixed-task batches (core/mixed.py): every row of a batch equals, to rounding, the output of its
own task's merged model, for every kind of tensor, on a classifier, a causal LM (with generate)
and GPT-2's Conv1D; the model is left exactly as it was; bad use is refused clearly."""

import pytest
import torch
from torch import nn

import sparsedelta as sd
from conftest import TinyNet
from sparsedelta.core import mixed, rowwise
from sparsedelta.core.mixed import BASE
from sparsedelta.errors import UsageError

F64 = torch.float64
ALL_KINDS = ("weight", "bias", "embedding", "norm")


def attach(model, names, density=0.3, kinds=ALL_KINDS, heads=None, scale=0.3, seed=0):
    """Random deltas (and heads) with random non-zero values under each name."""
    gen = torch.Generator().manual_seed(seed)
    for name in names:
        config = sd.RandomConfig(density=density, parameter_kinds=kinds, modules_to_save=heads, seed=sum(map(ord, name)) + seed)
        sd.add_delta(model, config, adapter_name=name, trainable=False)
        adapter = sd.state_of(model).adapters[name]
        with torch.no_grad():
            for delta in adapter.deltas.values():
                delta.values.copy_(torch.randn(delta.values.shape, generator=gen, dtype=delta.values.dtype) * scale)
            for p in adapter.saved.values():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        sd.sync(model)  # the merged weights follow the new values now, not at the next forward
    return model


def reference(model, name, call):
    """The output of `name`'s merged model (the base for "__base__"), the model left as it was."""
    state = sd.state_of(model)
    previous = state.active
    if name == BASE:
        with sd.disabled(model):
            return call()
    sd.set_adapter(model, name)
    try:
        return call()
    finally:
        sd.set_adapter(model, previous)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


# -- every kind of tensor, float64 -----------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(
    "names",
    [["a"] * 5, ["a", "b", "a", "b", "b"], ["a", BASE, "c", "a", "b"], ["c", "c", BASE, "c", "a"], [BASE] * 5],
    ids=["one task", "two tasks", "many and base", "a task absent", "base only"],
)
@pytest.mark.parametrize(
    "rerun_at, block, table_at",
    [(0.0, rowwise.TOKEN_BLOCK, mixed.TABLE_AT), (float("inf"), rowwise.TOKEN_BLOCK, 64), (float("inf"), rowwise.TOKEN_BLOCK, 7),
     (float("inf"), rowwise.TOKEN_BLOCK, 0), (float("inf"), 3, 0)],
    ids=["linear rows run again", "linear rows from the table", "one-row tasks from the table, others per task",
         "linear rows corrected per task", "corrected in blocks of 3 tokens"],
)  # fmt: skip
def test_each_row_equals_its_tasks_merged_model(tied, names, rerun_at, block, table_at, monkeypatch):
    monkeypatch.setattr(mixed, "RERUN_AT", rerun_at)  # which of the ways a linear layer's rows take
    monkeypatch.setattr(mixed, "TABLE_AT", table_at)  # tokens of a task's rows up to which they take the table
    monkeypatch.setattr(rowwise, "TOKEN_BLOCK", block)  # 3: the blocks cut rows of 7 tokens mid-row
    torch.manual_seed(0)
    model = TinyNet(tied=tied).double().eval()
    attach(model, ["a", "b", "c"], heads=None if tied else ["head"])
    sd.set_adapter(model, "b")
    ids = torch.randint(1, 50, (5, 7))
    ids[1:, -3:] = 0  # padding rows (padding_idx 0; the delta may hold entries in that row)
    before = snapshot(model)
    with torch.no_grad():
        out = model(ids, adapter_names=names)
        for i, name in enumerate(names):
            expected = reference(model, name, lambda i=i: model(ids[i : i + 1]))[0]
            torch.testing.assert_close(out[i], expected, atol=1e-10, rtol=0)
    assert_same_state(model, before)
    assert sd.state_of(model).active == "b" and sd.state_of(model).merged


def test_the_context_manager_serves_any_forward_and_frozen_entries_count():
    torch.manual_seed(1)
    model = TinyNet().double().eval()
    attach(model, ["a", "b"], heads=["head"])
    delta = next(iter(sd.state_of(model).adapters["a"].deltas.values()))
    keep = torch.arange(len(delta.indices)) % 2 == 0
    delta.freeze_entries(keep)  # SaRA's re-selection: half the entries stay merged but frozen
    ids = torch.randint(1, 50, (4, 6))
    names = ["a", "b", "b", "a"]
    with torch.no_grad(), sd.mixed_batch(model, names):
        out = model(ids)
        again = model(ids)  # several forwards inside one mixed batch
    torch.testing.assert_close(out, again, atol=0, rtol=0)
    with torch.no_grad():
        for i, name in enumerate(names):
            torch.testing.assert_close(out[i], reference(model, name, lambda i=i: model(ids[i : i + 1]))[0], atol=1e-10, rtol=0)


def test_a_delta_changed_between_batches_or_forwards_is_seen(monkeypatch):
    """The layers' tables (every task's linear entries) follow values written in place, entries
    frozen, an adapter deleted or added, between batches and between two forwards of one batch."""
    torch.manual_seed(3)
    model = TinyNet().double().eval()
    attach(model, ["a", "b", "c"], kinds=("weight",))
    ids = torch.randint(1, 50, (4, 3))
    names = ["a", "b", BASE, "c"]
    monkeypatch.setattr(mixed, "RERUN_AT", float("inf"))  # every linear row from the table
    monkeypatch.setattr(mixed, "TABLE_AT", 64)
    built = []
    real = rowwise.linear_table
    monkeypatch.setattr(rowwise, "linear_table", lambda *a: built.append(1) or real(*a))

    def check(names, out):
        for i, name in enumerate(names):
            torch.testing.assert_close(out[i], reference(model, name, lambda i=i: model(ids[i : i + 1]))[0], atol=1e-10, rtol=0)

    def values(name):
        return next(d for p, d in sd.state_of(model).adapters[name].deltas.items() if p == "proj.weight").values

    with torch.no_grad():
        check(names, model(ids, adapter_names=names))
        first = len(built)
        assert first > 0
        check(names, model(ids, adapter_names=names))
        assert len(built) == first  # nothing changed: the tables are kept
        values("b").mul_(-2.0)  # written in place, as an optimizer step does
        check(names, model(ids, adapter_names=names))
        with sd.mixed_batch(model, names):
            values("c").add_(0.5)
            inside = model(ids)
            values("c").add_(0.5)  # between two forwards of one batch
            again = model(ids)
        assert not torch.equal(inside[3], again[3])
        check(names, again)
        delta = next(d for p, d in sd.state_of(model).adapters["a"].deltas.items() if p == "proj.weight")
        delta.freeze_entries(torch.arange(len(delta.indices)) % 3 == 0)
        check(names, model(ids, adapter_names=names))
        sd.delete_adapter(model, "b")
        attach(model, ["b"], kinds=("weight",), seed=7)  # a new adapter under the old name
        check(names, model(ids, adapter_names=names))


def test_fast_paths_copy_no_weight(monkeypatch):
    """Linear, Conv1D and Embedding weights are corrected from the k entries, conv kernels run again
    with their entries written in place; only the generic path (norms) builds a transient θ + Δ."""
    calls = []
    real = rowwise.merged_tensor
    monkeypatch.setattr(rowwise, "merged_tensor", lambda delta, param: calls.append(param.shape) or real(delta, param))
    torch.manual_seed(2)
    model = TinyNet().double().eval()
    for name, seed in (("a", 1), ("b", 2)):
        config = sd.RandomConfig(density=0.3, target_modules=["embed", "proj", "head"], seed=seed,
                                 parameter_kinds=("weight", "bias", "embedding"))  # fmt: skip
        sd.add_delta(model, config, adapter_name=name)
    with torch.no_grad():
        model(torch.randint(1, 50, (2, 5)), adapter_names=["a", "b"])
    assert calls == []
    sd.add_delta(model, sd.RandomConfig(density=0.3, target_modules=["norm", "conv"],
                                        parameter_kinds=("weight", "norm")), adapter_name="c")  # fmt: skip
    with torch.no_grad():
        model(torch.randint(1, 50, (2, 5)), adapter_names=["a", "c"])
    targeted = sd.state_of(model).adapters["c"].deltas
    assert set(targeted) == {"norm.weight", "norm.bias", "conv.weight"}
    assert sorted(calls) == sorted(tuple(d.shape) for n, d in targeted.items() if n != "conv.weight")


# -- transformers models, float32 ------------------------------------------------------------------
def tiny_bert_classifier(num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=num_labels)  # fmt: skip
    torch.manual_seed(0)
    return BertForSequenceClassification(config).eval()


def padded_batch(rows, length, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(rows):
        pad = i % 3
        if pad:
            ids[i, -pad:], mask[i, -pad:] = 0, 0
    return ids, mask


@pytest.mark.parametrize("tasks", [1, 2, 6])
def test_classifier_rows_match_float32(tasks):
    model = tiny_bert_classifier()
    names = [f"t{i}" for i in range(tasks)]
    attach(model, names, density=0.05, kinds=("weight", "bias", "embedding", "norm"), heads=["classifier"], scale=0.05)
    rows = [names[i % tasks] for i in range(7)] + [BASE]
    ids, mask = padded_batch(len(rows), 9, 120)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=rows).logits
        for i, name in enumerate(rows):
            call = lambda i=i: model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits[0]  # noqa: E731
            torch.testing.assert_close(logits[i], reference(model, name, call), atol=1e-5, rtol=1e-5)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(name="llama")
def llama_fixture():
    model = tiny_llama()
    return attach(model, ["a", "b", "c"], density=0.05, kinds=("weight", "embedding", "norm"), scale=0.05)


def left_padded(rows, length, seed=0):
    ids, mask = padded_batch(rows, length, 97, seed)
    return ids.flip(1), mask.flip(1)  # generation pads on the left


def test_causal_lm_logits_and_generation_per_row(llama):
    names = ["a", BASE, "c", "a", "b"]
    ids, mask = left_padded(len(names), 8)
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = llama(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        generated = llama.generate(ids, attention_mask=mask, adapter_names=names, **options)
        beams = llama.generate(ids, attention_mask=mask, adapter_names=names, num_beams=2, **options)
        for i, name in enumerate(names):
            one = dict(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
            expected = reference(llama, name, lambda one=one: llama(**one).logits[0])
            keep = mask[i].bool()
            torch.testing.assert_close(logits[i][keep], expected[keep], atol=1e-5, rtol=1e-5)
            alone = reference(llama, name, lambda one=one: llama.generate(**one, **options))
            assert torch.equal(generated[i], alone[0])
            alone = reference(llama, name, lambda one=one: llama.generate(**one, num_beams=2, **options))
            assert torch.equal(beams[i], alone[0])
    tasks = {tuple(generated[i, -6:].tolist()) for i in range(len(names))}
    assert len(tasks) > 1  # the tasks do generate differently


def test_a_causal_lm_with_mixed_generate_pickles(llama, tmp_path):
    names = ["a", BASE, "b"]
    ids, mask = left_padded(len(names), 6)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, adapter_names=names)
    torch.save(llama, tmp_path / "model.pt")
    copied = torch.load(tmp_path / "model.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(copied.generate(ids, attention_mask=mask, **options), llama.generate(ids, attention_mask=mask, **options))
    sd.unload(copied)
    assert "generate" not in copied.__dict__  # the per-model generate (adapter_names=) goes with the last delta


@pytest.mark.parametrize("table_at", [64, 5], ids=["every row", "one-row tasks"])
def test_bfloat16_rows_from_the_table_match_the_merged_model(table_at, monkeypatch):
    monkeypatch.setattr(mixed, "RERUN_AT", float("inf"))
    monkeypatch.setattr(mixed, "TABLE_AT", table_at)
    tables = []
    real = rowwise.add_table
    monkeypatch.setattr(rowwise, "add_table", lambda *a: tables.append(1) or real(*a))
    model = tiny_llama().to(torch.bfloat16)
    attach(model, ["a", "b"], density=0.05, kinds=("weight",), scale=0.05)
    names = ["a", BASE, "b", "a"]
    ids, mask = left_padded(len(names), 5)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits.float()
        for i, name in enumerate(names):
            one = dict(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1])
            expected = reference(model, name, lambda one=one: model(**one).logits[0]).float()
            keep = mask[i].bool()
            torch.testing.assert_close(logits[i][keep], expected[keep], atol=0.05, rtol=0.02)
            if name != BASE:  # the tolerance is far below what a delta changes
                base = reference(model, BASE, lambda one=one: model(**one).logits[0]).float()
                assert (base[keep] - expected[keep]).abs().max() > 0.2
    assert tables


def test_a_copy_keeps_no_table_of_the_original(llama, monkeypatch):
    """What mixed batches keep (layers, tables) belongs to one model object: a deep copy builds its
    own, and changing the copy's delta leaves the original's rows as they were."""
    import copy

    monkeypatch.setattr(mixed, "RERUN_AT", float("inf"))
    monkeypatch.setattr(mixed, "TABLE_AT", 64)
    names = ["a", "b", BASE]
    ids, mask = left_padded(len(names), 4)
    with torch.no_grad():
        before = llama(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        twin = copy.deepcopy(llama)
        for delta in sd.state_of(twin).adapters["a"].deltas.values():
            delta.values.mul_(3.0)
        sd.sync(twin)
        changed = twin(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        after = llama(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    assert torch.equal(before, after)
    assert not torch.allclose(changed[0], before[0]) and torch.allclose(changed[1:], before[1:], atol=1e-6)
    assert mixed._LAYOUTS[twin] is not mixed._LAYOUTS[llama]


def test_gpt2_conv1d_and_broadcast_position_embeddings():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).double().eval()
    attach(model, ["a", "b"], density=0.05, kinds=("weight", "bias", "embedding"), scale=0.05)
    assert "transformer.wpe.weight" in sd.state_of(model).adapters["a"].deltas  # looked up with a (1, T) index
    names = ["b", "a", BASE, "b"]
    ids = torch.randint(1, 97, (4, 6))
    with torch.no_grad():
        logits = model(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            expected = reference(model, name, lambda i=i: model(input_ids=ids[i : i + 1]).logits[0])
            torch.testing.assert_close(logits[i], expected, atol=1e-10, rtol=0)


# -- refusals and state -------------------------------------------------------------------------------
@pytest.fixture(name="net")
def net_fixture():
    torch.manual_seed(0)
    return attach(TinyNet().eval(), ["a", "b"], heads=["head"])


def test_bad_names_are_refused_before_anything_changes(net):
    ids = torch.randint(1, 50, (3, 4))
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\].*\['a', 'b'\]"):
        net(ids, adapter_names=["a", "nope", "b"])
    with pytest.raises(TypeError, match="list of adapter names"):
        net(ids, adapter_names="a")
    with pytest.raises(ValueError, match="first dimension 3, but the batch has 2 rows"):
        net(ids, adapter_names=["a", "b"])
    net.train()
    with pytest.raises(ValueError, match="call model.eval"):
        net(ids, adapter_names=["a", "b", "a"])
    net.eval()
    assert_same_state(net, before)
    assert sd.state_of(net).active == "b" and sd.state_of(net).merged
    assert net(ids).shape == (3, 4, 50)  # no adapter_names: the ordinary forward


def test_heads_of_different_shapes_are_refused(net):
    sd.state_of(net).adapters["b"].saved["head.weight"] = nn.Parameter(torch.zeros(7, 16))  # another label count
    with pytest.raises(ValueError, match=r"heads of different shapes in head.weight .*split the batch by head"):
        net(torch.randint(1, 50, (2, 4)), adapter_names=["a", "b"])


def test_nesting_and_gradients_are_refused(net):
    ids = torch.randint(1, 50, (2, 4))
    with sd.mixed_batch(net, ["a", "b"]):
        with pytest.raises(RuntimeError, match="already running"), sd.mixed_batch(net, ["a", "b"]):
            pass
        with pytest.raises(ValueError, match="differs"):
            net(ids, adapter_names=["b", "a"])
        embeds = net.embed(ids).requires_grad_(True)
        with pytest.raises(RuntimeError, match="compute no gradient"):
            net.proj(embeds)
    assert sd.state_of(net).merged


def test_unload_removes_the_hooks():
    model = tiny_llama()
    generate = model.generate
    attach(model, ["a"], density=0.05, kinds=("weight",))
    assert model.generate != generate and model._forward_pre_hooks
    sd.unload(model)
    assert "generate" not in model.__dict__ and not model._forward_pre_hooks and not model._forward_hooks
    with pytest.raises(ValueError, match="not used by the model"):
        model.generate(torch.ones(1, 3, dtype=torch.long), adapter_names=["a"], max_new_tokens=1)


class SeqNet(nn.Module):
    """A model whose inner layers take (T, B, H) (batch_first=False, as nn.Transformer's default) or
    (B, T, H); its own input is batch-first ids (B, T)."""

    def __init__(self, batch_first, vocab=50, dim=16):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Embedding(vocab, dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        h = self.embed(ids) if self.batch_first else self.embed(ids.T)
        out = self.head(torch.tanh(self.proj(h)))
        return out if self.batch_first else out.transpose(0, 1)


def seq_net(batch_first):
    torch.manual_seed(0)
    return attach(SeqNet(batch_first).double().eval(), ["a", "b"], kinds=("weight", "bias", "embedding"))


SEQUENCE_FIRST = r"proj got an input of shape \(6, \.\.\.\) under a mixed batch of 3 rows: .*sequence axis.*sequence-first \(T, B, \.\.\.\).*batch_first=True.*separate batches"


def test_sequence_first_inputs_are_refused_not_misrouted():
    """(T, B, H) with T = 2·B looked like two copies of each row and was routed by the sequence axis."""
    model = seq_net(batch_first=False)
    ids = torch.randint(1, 50, (3, 6))  # B = 3 rows, T = 6 tokens: T is a multiple of B
    before = snapshot(model)
    with torch.no_grad():
        with pytest.raises(UsageError, match=SEQUENCE_FIRST):
            model(ids, adapter_names=["a", "b", BASE])
        with pytest.raises(ValueError, match=SEQUENCE_FIRST), sd.mixed_batch(model, ["a", "b", "a"]):
            model(ids)
        assert model(ids, adapter_names=["a", "a", "a"]).shape == (3, 6, 50)  # one task: no routing to get wrong
    assert_same_state(model, before)
    assert sd.state_of(model).merged


def test_batch_first_and_declared_repeats_are_routed_by_row():
    model = seq_net(batch_first=True)
    ids = torch.randint(1, 50, (3, 6))
    names = ["a", "b", BASE]
    with torch.no_grad():
        out = model(ids, adapter_names=names)
        for i, name in enumerate(names):
            torch.testing.assert_close(out[i], reference(model, name, lambda i=i: model(ids[i : i + 1]))[0], atol=1e-10, rtol=0)
        repeated = ids.repeat_interleave(2, dim=0)  # each row twice in a row, as a beam search of one's own does
        with pytest.raises(ValueError, match=r"repeats=2"), sd.mixed_batch(model, names):
            model(repeated)
        with sd.mixed_batch(model, names, repeats=2):
            twice = model(repeated)
    torch.testing.assert_close(twice, out.repeat_interleave(2, dim=0), atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="repeats must be a positive"), sd.mixed_batch(model, names, repeats=0):
        pass


# -- two threads on one model ----------------------------------------------------------------------
def test_two_threads_hammering_one_model_with_mixed_and_plain_calls():
    """Mixed batches write tasks' entries into shared weights: a plain or one-row forward on another
    thread must wait for the batch and still get the active task's output, never a routed one."""
    import threading
    import time

    torch.manual_seed(0)
    model = attach(TinyNet().double().eval(), ["a", "b"])
    sd.set_adapter(model, "a")
    ids = torch.randint(1, 50, (4, 7))
    names = ["a", "b", BASE, "b"]
    with torch.no_grad():
        expected_mixed = torch.cat([reference(model, n, lambda i=i: model(ids[i : i + 1])) for i, n in enumerate(names)])
        expected_plain, expected_row = model(ids), model(ids[:1])
    failures, deadline = [], time.monotonic() + 60

    def hammer(call, expected):
        for _ in range(40):  # bounded in count and in time
            if time.monotonic() > deadline:
                break
            with torch.no_grad():
                out = call()
            # float64 rounding only: a batch of 4 rows and 4 one-row calls may sum in other orders
            # (BLAS blocks by row count on some CPUs); a routing error moves outputs by a delta's size
            if out.shape != expected.shape or not torch.allclose(out, expected, rtol=0, atol=1e-12):
                failures.append(call)

    threads = [threading.Thread(target=hammer, args=(lambda: model(ids, adapter_names=names), expected_mixed)),
               threading.Thread(target=hammer, args=(lambda: model(ids), expected_plain)),
               threading.Thread(target=hammer, args=(lambda: model(ids[:1]), expected_row))]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads) and not failures
    with torch.no_grad():
        assert torch.equal(model(ids), expected_plain)  # the active task is merged again afterwards
