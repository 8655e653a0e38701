"""Tokenised examples and padded batches of a classification split."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .tables import Split


@dataclass
class Encoded:
    features: list[dict[str, list[int]]]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode(tokenizer, split: Split, max_length: int) -> Encoded:
    columns = list(zip(*split.texts, strict=True)) if len(split) else [[]]
    out = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length)
    keys = list(out.keys())
    features = [{k: out[k][i] for k in keys} for i in range(len(split))]
    return Encoded(features, list(split.labels))


def batches(encoded: Encoded, order: Sequence[int], batch_size: int, tokenizer) -> Iterator[dict[str, torch.Tensor]]:
    """Padded batches of `encoded` in the given order (labels under "labels")."""
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = tokenizer.pad([encoded.features[i] for i in chunk], return_tensors="pt")
        batch["labels"] = torch.tensor([encoded.labels[i] for i in chunk])
        yield dict(batch)


def group_by_length(order: Sequence[int], lengths: Sequence[int], batch_size: int, chunk: int = 50) -> list[int]:
    """`order` cut into chunks of `chunk` batches, each chunk sorted by length (longest first, stable):
    consecutive batches hold examples of similar length, so padding shrinks, while which examples meet
    stays random from chunk to chunk (the scheme of transformers' LengthGroupedSampler)."""
    size = chunk * batch_size
    out: list[int] = []
    for start in range(0, len(order), size):
        out.extend(sorted(order[start : start + size], key=lambda i: -lengths[i]))
    return out
