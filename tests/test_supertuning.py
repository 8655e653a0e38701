"""`--method supertuning`: PEFT's Super-Tuning with select_top=False at SaRA's budget, on SaRA's
targets with SaRA's learning rates; the k smallest |θ| of each layer, stored positions, merge, import."""

import json

import pytest
import torch
from safetensors.torch import load_file

import sparsedelta as sd
from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.methods.sara import default_lr
from sparsedelta.train.finished import load_run
from test_cli import cli_error, tiny_args

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def st_run(tiny_bert, topic_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("supertuning") / "run"
    assert main(tiny_args(tiny_bert, topic_files, out, "--method", "supertuning", "--max-steps", 3, "--threads", 1)) == 0
    return out


def linear_weights(tiny_bert) -> dict[str, torch.Tensor]:
    """SaRA's default targets on the classifier: every nn.Linear weight of the encoder and pooler."""
    encoder = transformers.BertModel.from_pretrained(tiny_bert)
    return {f"bert.{n}": m.weight.detach() for n, m in encoder.named_modules() if isinstance(m, torch.nn.Linear)}


def test_the_smallest_entries_of_each_layer_at_saras_budget_and_rates(st_run, tiny_bert):
    weights = linear_weights(tiny_bert)
    eligible = sum(w.numel() for w in weights.values())
    density = sum(int((w.abs() < 1e-3).sum()) for w in weights.values()) / eligible  # SaRA's default threshold
    config = json.loads((st_run / "config.json").read_text())
    method = config["method"]
    assert method["density"] == density and method["config"]["sparsity"] == 1 - density
    assert method["config"]["select_top"] is False and method["config"]["save_precomputed_indices"] is True
    assert method["lr"] == pytest.approx(default_lr(1e-3)) and method["head_lr"] == 5e-3  # SaRA's
    ks = {n: int(w.numel() * (1 - (1 - density))) for n, w in weights.items()}  # PEFT's own count
    assert config["budget"]["selected"] == sum(ks.values()) and config["budget"]["eligible"] == eligible
    assert config["budget"]["dense"] == 3 * 96 + 3  # the new head, trained densely

    stored = load_file(st_run / "adapter" / "adapter_model.safetensors")
    assert {k for k in stored if "supertuning_indices" in k} == {f"base_model.model.{n}.supertuning_indices" for n in weights}
    for name, w in weights.items():
        chosen = stored[f"base_model.model.{name}.supertuning_indices"].long()
        assert len(chosen) == len(torch.unique(chosen)) == ks[name]
        scores = w.abs().reshape(-1)
        others = torch.ones_like(scores, dtype=torch.bool)
        others[chosen] = False
        assert scores[chosen].max() <= scores[others].min()  # the bottom k by |θ|

    # trained: the merged model differs from the base at the stored positions only
    finished = load_run(st_run, splits=())
    merged = finished.runner.merged(finished.model)
    for name, w in weights.items():
        after = merged.get_submodule(name).weight.detach().reshape(-1)
        changed = torch.nonzero(after != w.reshape(-1)).reshape(-1)
        chosen = stored[f"base_model.model.{name}.supertuning_indices"].long()
        assert len(changed) > 0 and bool(torch.isin(changed, chosen).all()), name


def test_merge_and_import_give_the_runs_model(st_run, tiny_bert, tmp_path, capsys):
    ids = torch.randint(1, 1000, (3, 10), generator=torch.Generator().manual_seed(1))
    finished = load_run(st_run, splits=())
    with torch.no_grad():
        expected = finished.model(input_ids=ids).logits
    assert main(["merge", str(st_run), "--output", str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, expected)
    # a Super-Tuning run comes over as a delta exactly: the stored positions and values
    assert main(["import", str(st_run), "--output", str(tmp_path / "delta")]) == 0
    assert "imported a PEFT SUPERTUNING adapter" in capsys.readouterr().out
    base = load_run(st_run, splits=()).model.unload()
    with torch.no_grad():
        assert torch.equal(sd.load(base, tmp_path / "delta")(input_ids=ids).logits, expected)


def test_density_flag_and_refusals(tiny_bert, topic_files, tmp_path, capsys):
    out = tmp_path / "dense"
    assert main(tiny_args(tiny_bert, topic_files, out, "--method", "supertuning", "--density", 0.02, "--max-steps", 1,
                          "--threads", 1)) == 0  # fmt: skip
    budget = json.loads((out / "config.json").read_text())["budget"]
    weights = linear_weights(tiny_bert)
    assert budget["selected"] == sum(int(w.numel() * (1 - (1 - 0.02))) for w in weights.values())
    # PEFT floors k per layer: under SaRA's global round(D·n) by less than one entry per layer
    assert round(0.02 * budget["eligible"]) - len(weights) < budget["selected"] <= round(0.02 * budget["eligible"])

    err = cli_error(capsys, *tiny_args(tiny_bert, topic_files, tmp_path / "a", "--method", "supertuning",
                                       "--parameter-kinds", "weight", "norm"))  # fmt: skip
    assert "adapts nn.Linear weights only" in err and "LayerNorm.weight" in err
    err = cli_error(capsys, *tiny_args(tiny_bert, topic_files, tmp_path / "b", "--method", "supertuning",
                                       "--option", "sparsity=0.5"))  # fmt: skip
    assert "--option sparsity: not a setting of method 'supertuning'" in err
