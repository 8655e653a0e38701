"""The ineffective-parameter analysis: the sweep zeroes exactly the targeted entries with |θ| < t and
puts every bit back; the encoder measures (cosine, fixed probe) and the causal-LM one (perplexity);
`sparsedelta analyze` end to end and its errors. Tiny random models, a few seconds each."""

import json

import pytest
import torch
from torch import nn

from fixtures_cli import make_rows, tiny_bert_fixture, topic_files_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.core.config import DeltaConfig
from sparsedelta.data.tables import load_data
from sparsedelta.models.causal_lm import default_targets
from sparsedelta.models.classifier import load_encoder, load_tokenizer
from sparsedelta.report.analysis import analyze_encoder, fit_probe, perplexity_measure, zeroing_sweep
from test_causal_lm import one_thread, tiny_llama  # noqa: F401  (one_thread: autouse)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def encoder(tiny_bert):
    return load_encoder(str(tiny_bert))


@pytest.fixture
def topics(topic_files):
    return load_data(str(topic_files["train"]), str(topic_files["validation"]), str(topic_files["test"]))


def bits(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter as raw int32 bits: tells -0.0 from 0.0 and compares NaN with itself."""
    return {name: p.detach().clone().view(torch.int32) for name, p in model.named_parameters()}


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    """The weight matrices of a bare BERT, found without the library's targeting."""
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


# -- the sweep ---------------------------------------------------------------------------------------
def test_zeroed_entries_are_the_hand_count_and_the_model_comes_back_bit_exact(encoder):
    model = encoder.model
    weights = linear_weights(model)
    with torch.no_grad():  # entries whose old value a careless restore would lose: -0.0 and NaN
        weights[0][0, 0] = -0.0
        weights[1][0, 0] = float("nan")
    before = bits(model)
    thresholds = [1e-4, 1e-2, 5e-2]
    hand = {t: sum(int((w.abs() < t).sum()) for w in weights) for t in thresholds}
    targeted = sum(w.numel() for w in weights)

    def zeros_seen(m):  # what the measure sees: the zeroed entries (and the one -0.0) are 0
        return {"zeros": sum(int((w == 0).sum()) for w in linear_weights(m))}

    rows = zeroing_sweep(model, thresholds, zeros_seen)
    assert [r["threshold"] for r in rows] == thresholds
    for row in rows:
        t = row["threshold"]
        assert row["zeroed"] == hand[t] > 0
        assert row["zeros"] == hand[t]
        assert row["fraction_of_targets"] == hand[t] / targeted
        assert row["fraction_of_model"] == hand[t] / sum(p.numel() for p in model.parameters())
    after = bits(model)
    assert after.keys() == before.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_restores_the_model_when_the_measure_fails(encoder):
    before = bits(encoder.model)

    def failing(model):
        raise RuntimeError("measure failed")

    with pytest.raises(RuntimeError, match="measure failed"):
        zeroing_sweep(encoder.model, [1e-2], failing)
    assert all(torch.equal(before[n], p) for n, p in bits(encoder.model).items())
    with pytest.raises(ValueError, match="finite and >= 0"):
        zeroing_sweep(encoder.model, [-1e-3], failing)


# -- an encoder --------------------------------------------------------------------------------------
def test_tiny_threshold_changes_nothing_and_a_large_one_moves_the_embeddings(encoder, topics):
    result = analyze_encoder(encoder.model, encoder.tokenizer, topics, [1e-12, 3e-2], max_length=16)
    reference, (tiny, large) = result["reference"], result["rows"]
    assert reference["threshold"] == 0 and reference["zeroed"] == 0
    assert reference["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert tiny["zeroed"] == 0 and tiny["cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert tiny["accuracy"] == reference["accuracy"]
    # the residual stream carries the embeddings past the zeroed matrices of a random BERT, so the
    # drop is small, but far above float noise (1e-6)
    assert large["fraction_of_targets"] > 0.8 and large["cosine_mean"] < 1 - 5e-4
    assert large["cosine_min"] <= large["cosine_mean"]
    assert result["targets"]["entries"] == sum(w.numel() for w in linear_weights(encoder.model))
    assert result["examples"] == {"probe_train": len(topics.train), "test": len(topics.test)}


def test_the_probe_is_deterministic():
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.nn.functional.normalize(torch.randn(60, 8, generator=gen), dim=-1)
    labels = (embeddings[:, 0] > 0).long().tolist()
    first, second = fit_probe(embeddings, labels, 2), fit_probe(embeddings, labels, 2)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    accuracy = (first(embeddings).argmax(-1) == torch.tensor(labels)).float().mean()
    assert accuracy > 0.95 and not first.weight.requires_grad


# -- a causal LM -------------------------------------------------------------------------------------
def test_perplexity_sweep_on_a_tiny_llama():
    model = tiny_llama(vocab_size=64)
    blocks = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    config = DeltaConfig(**default_targets(model))
    before = bits(model)
    rows = zeroing_sweep(model, [0.0, 1e-12, 5e-2], perplexity_measure(blocks), config)
    reference, tiny, large = rows
    assert reference["zeroed"] == tiny["zeroed"] == 0 and tiny["perplexity"] == reference["perplexity"]
    projections = [m.weight for n, m in model.named_modules() if n.endswith(("_proj",))]
    assert large["zeroed"] == sum(int((w.abs() < 5e-2).sum()) for w in projections)
    assert large["perplexity"] != pytest.approx(reference["perplexity"], rel=1e-3)
    assert all(torch.equal(before[n], p) for n, p in bits(model).items())


# -- the command line --------------------------------------------------------------------------------
def test_cli_writes_the_table_json_and_plot(tiny_bert, topic_files, tmp_path, capsys):
    out = tmp_path / "analysis"
    args = ["analyze", "--model", tiny_bert, "--train-file", topic_files["train"], "--test-file", topic_files["test"],
            "--max-length", 16, "--thresholds", 1e-2, 1e-4, "--output-dir", out, "--threads", 1, "--no-progress"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    assert "0 (none)" in printed and "probe accuracy" in printed and "analysis.png" in printed
    result = json.loads((out / "analysis.json").read_text())
    assert {"task", "model", "data", "targets", "model_parameters", "reference", "rows", "settings"} <= result.keys()
    assert [r["threshold"] for r in result["rows"]] == [1e-4, 1e-2]  # sorted
    for row in [result["reference"], *result["rows"]]:
        assert {"threshold", "zeroed", "fraction_of_targets", "fraction_of_model", "cosine_mean", "cosine_min",
                "accuracy"} <= row.keys()  # fmt: skip
    assert (out / "analysis.png").read_bytes()[:8] == PNG_MAGIC
    assert main([str(a) for a in args]) == 2
    assert "already holds an analysis" in capsys.readouterr().err


def test_cli_causal_lm(tiny_bert, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n".join(row["text"] for row in make_rows(40)))
    model_dir = tmp_path / "tiny"
    tokenizer = load_tokenizer(str(tiny_bert))  # any tokenizer will do for a random model
    tiny_llama(len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "analysis"
    args = ["analyze", "--task", "causal-lm", "--model", model_dir, "--train-file", text, "--max-length", 32,
            "--eval-blocks", 4, "--thresholds", 1e-3, 5e-2, "--output-dir", out, "--threads", 1, "--no-progress", "--json"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "causal-lm" and result["blocks"] == [4, 32]
    assert [set(r) >= {"perplexity", "zeroed"} for r in result["rows"]] == [True, True]
    assert result["rows"][1]["perplexity"] != pytest.approx(result["reference"]["perplexity"], rel=1e-3)
    assert (out / "analysis.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--thresholds", "0"], "--thresholds: 0 is not a positive threshold"),
        (["--thresholds", "1e-3", "-0.001"], "--thresholds: -0.001 is not a positive threshold"),
        (["--thresholds", "nan"], "--thresholds: nan is not a positive threshold"),
        (["--eval-blocks", "32"], "--eval-blocks: only for --task causal-lm"),
        (["--task", "causal-lm", "--max-train-samples", "5"], "--max-train-samples: only for --task classification"),
        (["--batch-size", "0"], "--batch-size must be at least 1"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line(tmp_path, capsys, extra, message):
    assert main(["analyze", "--output-dir", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparsedelta analyze: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
