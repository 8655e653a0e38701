"""A tiny deterministic model and delta for the committed format-version-1 files in tests/fixtures/.

Every weight and delta value is a small dyadic fraction, exact in float32 and bfloat16 and made without
a random generator, so the files stay valid across torch versions. The files were written by
`write_v1_fixtures` with the format-1 writer (sparsedelta at commit 81cbcd0); they must keep loading.
"""

from pathlib import Path

import torch
from torch import nn

import sparsedelta as sd

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V1_FILES = {"int32": "delta_v1_int32.safetensors", "elias-fano": "delta_v1_elias_fano.safetensors"}


class FixtureNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_((((torch.arange(p.numel()) * 37 + 11 * i) % 29 - 14) / 16).reshape(p.shape))

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.embed(ids))))


POSITIONS = {"embed.weight": [1, 5, 6, 17, 33, 39], "proj.weight": [0, 7, 23], "proj.bias": [2]}
HEAD = {"head.weight": lambda n: ((torch.arange(n) * 5) % 7 - 3) / 8, "head.bias": lambda n: torch.arange(n) / 4}


def attach_fixture_delta(model: nn.Module, encoding: str) -> nn.Module:
    """The delta the v1 files hold: known positions and values, and a trained head."""
    if encoding == "int32":
        config = sd.SaRAConfig(threshold=0.25, parameter_kinds=("weight", "bias", "embedding"), modules_to_save=["head"])
    else:
        config = sd.DiffPruningConfig(density=0.2, target_modules=["embed", "proj"], modules_to_save=["head"])
    positions = {n: torch.tensor(p) for n, p in POSITIONS.items()}
    values = {n: (torch.arange(len(p)) - 2.5) / 4 for n, p in POSITIONS.items()}
    sd.add_delta(model, config, positions, values=values)
    with torch.no_grad():
        for name, param in sd.state_of(model).adapters["default"].saved.items():
            param.copy_(HEAD[name](param.numel()).reshape(param.shape))
    return model


def write_v1_fixtures() -> None:  # run once with the format-1 writer; kept to document the files
    for encoding, file in V1_FILES.items():
        model = attach_fixture_delta(FixtureNet(), encoding)
        dtype = "float32" if encoding == "int32" else "bfloat16"
        written = sd.save(model, FIXTURES / "tmp", dtype=dtype, index_encoding=encoding)
        written.rename(FIXTURES / file)
        (FIXTURES / "tmp" / "delta_config.json").unlink()
        (FIXTURES / "tmp").rmdir()
