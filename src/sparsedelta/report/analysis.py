"""Ineffective-parameter analysis: zero every targeted weight with |θ| below a threshold and measure
what the model loses, for a sweep of thresholds.

SaRA trains the entries with |θ| < 1e-3 on the premise that they barely matter. This module tests
that premise directly: for each threshold it zeroes those entries in place, measures the model, and
puts the exact old values back (only the zeroed positions and their values are kept, never a copy
of the model).

    rows = zeroing_sweep(model, [1e-4, 1e-3], lambda m: {"ppl": perplexity(m, blocks)}, config)

Two measures come with it: for an encoder, the cosine similarity of its mean-pooled sentence
embeddings to the unmodified model's and the accuracy of a fixed logistic-regression probe fitted
once on the unmodified embeddings; for a causal LM, held-out perplexity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import DeltaConfig
from ..core.targeting import find_targets
from ..data.batches import Encoded, batches, encode
from ..data.tables import TextData
from ..errors import UsageError

DEFAULT_THRESHOLDS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
CLAIMED_RANGE = (5e-4, 1e-3)  # "zeroing below 5e-4 … 1e-3 barely changes the model"

Measure = Callable[[nn.Module], dict]


# -- the sweep ---------------------------------------------------------------------------------------
def targeted_tensors(model: nn.Module, config: DeltaConfig | None = None) -> dict[str, nn.Parameter]:
    """The tensors training would give a delta (default: every weight matrix), each once."""
    targets, _ = find_targets(model, config or DeltaConfig())
    return {name: target.param for name, target in targets.items()}


@contextmanager
def zeroed_below(tensors: Sequence[torch.Tensor], threshold: float) -> Iterator[int]:
    """Zero the entries with |θ| < threshold in place; yield how many; restore them bit-exactly on exit."""
    saved = []
    try:
        with torch.no_grad():
            for tensor in tensors:
                flat = tensor.view(-1)
                positions = (flat.abs() < threshold).nonzero().squeeze(1)
                saved.append((flat, positions, flat[positions].clone()))
                flat[positions] = 0
        yield sum(len(positions) for _, positions, _ in saved)
    finally:
        with torch.no_grad():
            for flat, positions, values in saved:
                flat[positions] = values


def zeroing_sweep(
    model: nn.Module,
    thresholds: Sequence[float],
    measure: Measure,
    config: DeltaConfig | None = None,
    progress: bool = False,
) -> list[dict]:
    """For each threshold: zero the targeted entries with |θ| below it, call `measure(model)`, restore.

    One row per threshold: the threshold, the zeroed entries, their fraction of the targeted entries
    and of all the model's parameters, the seconds taken, and the measure's metrics. A threshold of 0
    zeroes nothing: the unmodified model's row."""
    from tqdm.auto import tqdm

    for t in thresholds:
        if not (math.isfinite(t) and t >= 0):
            raise UsageError(f"thresholds must be finite and >= 0, got {t}")
    tensors = list(targeted_tensors(model, config).values())
    targeted = sum(p.numel() for p in tensors)
    total = sum(p.numel() for p in model.parameters())
    rows = []
    for threshold in tqdm(thresholds, desc="thresholds", unit="threshold", disable=not progress):
        start = time.perf_counter()
        with zeroed_below(tensors, threshold) as zeroed:
            metrics = measure(model)
        rows.append({
            "threshold": threshold,
            "zeroed": zeroed,
            "fraction_of_targets": zeroed / targeted,
            "fraction_of_model": zeroed / total,
            **metrics,
            "seconds": time.perf_counter() - start,
        })  # fmt: skip
    return rows


def sweep_report(
    model: nn.Module, thresholds: Sequence[float], measure: Measure, config: DeltaConfig | None, progress: bool
) -> dict:
    """The sweep with the unmodified model's row first, and what was targeted."""
    tensors = targeted_tensors(model, config)
    rows = zeroing_sweep(model, [0.0, *thresholds], measure, config, progress)
    return {
        "targets": {"tensors": len(tensors), "entries": sum(p.numel() for p in tensors.values())},
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "reference": rows[0],
        "rows": rows[1:],
    }


# -- an encoder: sentence embeddings and a fixed probe -----------------------------------------------
@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, encoded: Encoded, batch_size: int = 64) -> torch.Tensor:
    """Attention-mask mean pooling of the last hidden state, L2-normalised (all-MiniLM-L6-v2's recipe)."""
    was_training = model.training
    model.eval()
    pooled = []
    try:
        for batch in batches(encoded, range(len(encoded)), batch_size, tokenizer):
            batch.pop("labels")
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            pooled.append(F.normalize(mean.float(), dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(pooled)


def fit_probe(embeddings: torch.Tensor, labels: Sequence[int], num_labels: int, l2: float = 1e-4) -> nn.Linear:
    """Multinomial logistic regression on fixed embeddings: zero start, full-batch L-BFGS, so the same
    embeddings always give the same probe."""
    probe = nn.Linear(embeddings.shape[1], num_labels)
    nn.init.zeros_(probe.weight)
    nn.init.zeros_(probe.bias)
    targets = torch.as_tensor(labels)
    optimizer = torch.optim.LBFGS(probe.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(probe(embeddings), targets) + l2 * probe.weight.pow(2).sum()
        value.backward()
        return value

    with torch.enable_grad():
        optimizer.step(loss)
    return probe.requires_grad_(False)


def embedding_measure(tokenizer, test: Encoded, reference: torch.Tensor, probe: nn.Module, batch_size: int) -> Measure:
    """Cosine similarity of each test embedding to its unmodified one (mean and minimum), and the
    fixed probe's accuracy on the changed embeddings."""
    labels = torch.as_tensor(test.labels)

    def measure(model: nn.Module) -> dict:
        embeddings = sentence_embeddings(model, tokenizer, test, batch_size)
        cosine = (embeddings * reference).sum(-1)
        predicted = probe(embeddings).argmax(-1)
        return {
            "cosine_mean": float(cosine.mean()),
            "cosine_min": float(cosine.min()),
            "accuracy": float((predicted == labels).float().mean()),
        }

    return measure


def analyze_encoder(
    model: nn.Module,
    tokenizer,
    data: TextData,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    max_length: int = 128,
    batch_size: int = 64,
    progress: bool = False,
) -> dict:
    """Fit the probe on the unmodified model's embeddings of `data.train`, then sweep over `data.test`
    with every weight matrix targeted."""
    train = encode(tokenizer, data.train, max_length)
    test = encode(tokenizer, data.test, max_length)
    probe = fit_probe(sentence_embeddings(model, tokenizer, train, batch_size), train.labels, len(data.label_names))
    reference = sentence_embeddings(model, tokenizer, test, batch_size)
    measure = embedding_measure(tokenizer, test, reference, probe, batch_size)
    report = sweep_report(model, thresholds, measure, DeltaConfig(), progress)
    return {**report, "examples": {"probe_train": len(train), "test": len(test)}}


# -- a causal LM: perplexity -------------------------------------------------------------------------
def perplexity_measure(blocks: torch.Tensor, batch_size: int = 8) -> Measure:
    from ..models.causal_lm import perplexity

    return lambda model: {"perplexity": perplexity(model, blocks, batch_size)}


def analyze_causal_lm(
    model: nn.Module,
    blocks: torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    batch_size: int = 8,
    progress: bool = False,
) -> dict:
    """Held-out perplexity per threshold, with the targets training uses (`causal_lm.default_targets`)."""
    from ..models.causal_lm import default_targets

    config = DeltaConfig(**default_targets(model))
    report = sweep_report(model, thresholds, perplexity_measure(blocks, batch_size), config, progress)
    return {**report, "blocks": list(blocks.shape)}


# -- the printed table -------------------------------------------------------------------------------
METRIC_LABELS = {
    "cosine_mean": ("cosine (mean)", "{:.6f}"),
    "cosine_min": ("cosine (min)", "{:.6f}"),
    "accuracy": ("probe accuracy", "{:.4f}"),
    "perplexity": ("perplexity", "{:.3f}"),
}


def format_table(result: dict) -> str:
    """One line per threshold, the unmodified model first (threshold 0)."""
    rows = [result["reference"], *result["rows"]]
    metrics = [k for k in METRIC_LABELS if k in rows[0]]
    header = ["threshold", "zeroed", "of targets", "of model"] + [METRIC_LABELS[k][0] for k in metrics]
    lines = [header]
    for row in rows:
        threshold = f"{row['threshold']:g}" if row["threshold"] else "0 (none)"
        cells = [
            threshold,
            f"{row['zeroed']:,}",
            f"{row['fraction_of_targets']:.3%}",
            f"{row['fraction_of_model']:.3%}",
        ]
        lines.append(cells + [METRIC_LABELS[k][1].format(row[k]) for k in metrics])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)
