"""Adding a method is one module: a config that chooses positions, a runner, `register_method`.
The command line, `sparsedelta methods`, eval and the option checks then know it."""

import json
from dataclasses import dataclass, field

import pytest
import torch

import sparsedelta as sd
from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.core.config import DeltaConfig, SelectionReport
from sparsedelta.core.selection import smallest_fraction
from sparsedelta.methods import DeltaRunner, method_names, register_method, registry
from test_cli import tiny_args


@dataclass
class RowStartConfig(DeltaConfig):
    """A toy rule: the first entries of every row of each matrix, up to the density."""

    method = "row-start"
    density: float = field(default=0.05, metadata={"help": "fraction of each tensor trained"})

    def select(self, tensors):
        scores = {n: torch.arange(t.shape[-1]).repeat(t.numel() // t.shape[-1]).float() for n, t in tensors.items()}
        positions = smallest_fraction(scores, self.density, per_tensor=True)
        per = {n: len(p) for n, p in positions.items()}
        return positions, SelectionReport("first entries of each row", sum(per.values()), sum(t.numel() for t in tensors.values()), per)


class RowStartRunner(DeltaRunner):
    name = "row-start"
    summary = "toy: the first entries of every row"
    config_class = RowStartConfig
    lrs = {"default": 2e-3}

    def budget_fields(self, model, targeting):
        return {"density": self.settings.density} if self.settings.density is not None else {}


@pytest.fixture
def row_start():
    register_method(RowStartRunner)
    yield
    registry._RUNNERS.remove("row-start")


def test_a_registered_method_is_known_everywhere(row_start, tiny_bert, topic_files, tmp_path, capsys):
    assert method_names()[-1] == "row-start"
    assert main(["methods", "row-start"]) == 0
    listing = capsys.readouterr().out
    assert "row-start: toy: the first entries of every row\n  budget: --threshold T or --density D" in listing
    out = tmp_path / "run"
    assert main(tiny_args(tiny_bert, topic_files, out, "--method", "row-start", "--density", 0.1, "--max-steps", 2)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget"]["selected"] > 0 and metrics["steps"][0]["lr"] == pytest.approx(2e-3)  # its default lr
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(metrics["test"])
    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "x", "--method", "row-start", "--option", "dens=1")) == 2
    assert "not a setting of method 'row-start'; its settings are none" in capsys.readouterr().err


def test_option_values_are_checked_against_the_field_types(tmp_path, capsys):
    args = ["train", "--output-dir", str(tmp_path / "o"), "--option"]
    assert main([*args, "rank_penalty=high"]) == 2
    assert "--option rank_penalty='high': expected float" in capsys.readouterr().err
    assert main([*args, "reselect_step=2.5"]) == 2
    assert "--option reselect_step=2.5: expected int or NoneType" in capsys.readouterr().err
    assert main([*args, "rank_penalty_scope=everything"]) == 2
    assert "rank_penalty_scope must be 'random' or 'all'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name in method_names():
        assert f"\n{name}: " in "\n" + listing
    assert "--option rank_penalty=0.0005" in listing and "--option phase1_fraction=0.3" in listing


def test_one_duplicate_rule_for_configs_and_runners():
    """A user class under a built-in's name is refused, not silently put in the built-in's place."""
    with pytest.raises(ValueError, match="a delta config method named 'sara' is registered already"):

        @dataclass
        class MySaRA(sd.SaRAConfig):
            method = "sara"

    assert type(DeltaConfig.from_dict({"method": "sara", "threshold": 1e-3})) is sd.SaRAConfig

    class MySaRARunner(RowStartRunner):
        name = "sara"

    with pytest.raises(ValueError, match="a method named 'sara' is registered already"):
        register_method(MySaRARunner)
    assert registry.runner_class("sara").__name__ == "SaRARunner"


@pytest.mark.parametrize(("method", "flag", "value"), [
    ("full", "--target-modules", "query"), ("full", "--exclude-modules", "query"), ("full", "--parameter-kinds", "bias"),
    ("full", "--modules-to-save", "classifier"), ("sora", "--parameter-kinds", "bias"),
    ("shira", "--exclude-modules", "query"), ("lora", "--parameter-kinds", "norm"),
])  # fmt: skip
def test_a_targeting_flag_a_method_cannot_honour_is_refused_before_loading(method, flag, value, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--method", method, flag, value, "--output-dir", str(out), "--model", str(tmp_path / "none")])
    err = capsys.readouterr().err
    assert code == 2 and f"--method {method} cannot honour {flag}" in err and err.count("\n") == 1, err
    assert not out.exists()


def test_lora_honours_exclude_modules(tiny_bert):
    from transformers import AutoModelForSequenceClassification

    from sparsedelta.methods import MethodSettings, make_runner

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    runner = make_runner(MethodSettings(method="lora", target_modules=["query", "value"], exclude_modules=["layer.0.attention.self.query"]))
    adapted = runner.prepare(model, head_modules=["classifier"], total_steps=1)
    lora = {n.rsplit(".lora_A", 1)[0] for n, _ in adapted.named_modules() if n.endswith("lora_A")}
    assert any("layer.1.attention.self.query" in n for n in lora) and any("layer.0.attention.self.value" in n for n in lora)
    assert not any("layer.0.attention.self.query" in n for n in lora)
