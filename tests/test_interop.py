"""PEFT interop (export to SHiRA, import of SHiRA / Super-Tuning / LoRA / any sparse difference),
the model card beside a saved delta, and loading a delta by hub id from an offline cache."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import sparsedelta as sd
from conftest import TinyNet
from sparsedelta.core.card import fingerprint_digest
from sparsedelta.errors import UsageError

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")



def bert_config():
    return transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )


def bert(seed=0):
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(bert_config()).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def train_delta(model, config, ids, steps=3):
    sd.prepare(model, config)
    model.train()
    opt = torch.optim.AdamW(sd.trainable_parameters(model), lr=1e-2)
    for _ in range(steps):
        model(input_ids=ids, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


# -- export ------------------------------------------------------------------------------------------------
CHILD = """
import sys
import warnings
sys.modules["sparsedelta"] = None  # this process must do without sparsedelta
try:
    import sparsedelta  # noqa: F401
    raise SystemExit("sparsedelta was importable")
except ImportError:
    pass
import torch
from peft import PeftModel
from transformers import BertForSequenceClassification

base = BertForSequenceClassification.from_pretrained(sys.argv[1]).eval()
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[3])).logits, sys.argv[4])
"""


def test_exported_shira_adapter_gives_the_same_logits_in_peft_without_sparsedelta(tmp_path, ids):
    bert().save_pretrained(tmp_path / "base")
    load_base = lambda: transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()  # noqa: E731
    config = sd.RandomConfig(density=0.05, parameter_kinds=("weight", "norm", "embedding"), modules_to_save=["classifier"])
    model = train_delta(load_base(), config, ids)
    sd.save(model, tmp_path / "delta")
    expected = logits(sd.load(load_base(), tmp_path / "delta"), ids)

    base = load_base()
    report = sd.export_shira(tmp_path / "delta", base, tmp_path / "shira")
    assert not hasattr(base, "_sparsedelta")  # handed back as it came
    adapter = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "SHIRA" and adapter["r"] == report.r
    assert adapter["base_model_name_or_path"] == str(tmp_path / "base")
    assert adapter["task_type"] == "SEQ_CLS"  # what AutoPeftModelFor* reads
    auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(tmp_path / "shira").eval()
    torch.testing.assert_close(logits(auto, ids), expected)
    # norms and embeddings travel as merged dense modules, the head as itself
    assert "bert.embeddings.word_embeddings" in adapter["modules_to_save"] and "classifier" in adapter["modules_to_save"]
    assert "bert.encoder.layer.0.output.LayerNorm" in adapter["modules_to_save"]
    assert len(adapter["target_modules"]) == 13  # 12 encoder linears + the pooler

    torch.save(ids, tmp_path / "ids.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nor a path to our sources
    args = [tmp_path / "base", tmp_path / "shira", tmp_path / "ids.pt", tmp_path / "out.pt"]
    result = subprocess.run([sys.executable, tmp_path / "child.py", *map(str, args)], env=env, capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)

    # and back: the PEFT adapter imported gives the same logits (norms and embeddings as dense tensors)
    imported = sd.import_peft(tmp_path / "shira", load_base(), tmp_path / "back")
    assert set(imported.dense) >= {"classifier.weight", "bert.embeddings.LayerNorm.weight"}
    assert torch.equal(logits(sd.load(load_base(), tmp_path / "back"), ids), expected)


@pytest.mark.parametrize("storage", [{}, {"dtype": "bfloat16", "index_encoding": "elias-fano"}])
def test_export_pads_to_shiras_budget_and_import_gives_back_the_same_delta_bit_for_bit(tmp_path, ids, storage):
    model = bert()
    sd.prepare(model, sd.SaRAConfig(density=0.1, per_tensor=True, target_modules=["query", "intermediate.dense"],
                                    modules_to_save=["classifier"]))
    delta = sd.state_of(model).adapters["default"].deltas
    with torch.no_grad():
        for d in delta.values():
            d.values.copy_(torch.randn_like(d.values) * 0.05)
            d.values[::3] = 0  # entries that stayed at zero must survive the round trip
            d.values.copy_(d.values.to(torch.bfloat16))  # values bfloat16 stores exactly
    sd.save(model, tmp_path / "delta", **storage)
    report = sd.export_shira(tmp_path / "delta", bert(), tmp_path / "shira")

    # one r for all layers: the smallest that holds the fullest layer; each layer padded to r·(m+n)
    assert report.r == max(math.ceil(d.num_entries / sum(d.shape)) for d in delta.values()) > 1
    with safe_open(str(tmp_path / "shira" / "adapter_model.safetensors"), "pt") as f:
        for path, d in delta.items():
            name, (rows, cols) = path.removesuffix(".weight"), d.shape
            index = f.get_tensor(f"base_model.model.{name}.shira_indices")
            weight = f.get_tensor(f"base_model.model.{name}.shira_weight")
            assert index.dtype == torch.int32 and index.shape == (2, report.r * (rows + cols)) == (2, len(weight))
            flat, k = index[0].long() * cols + index[1].long(), d.num_entries
            assert report.entries[name] == k and report.padding[name] == len(flat) - k
            assert torch.equal(flat[:k], d.indices) and torch.equal(weight[:k], d.values.detach())  # its own first
            assert len(torch.unique(flat)) == len(flat) and not weight[k:].any()  # then zeros at unused positions
    pm = peft.PeftModel.from_pretrained(bert(), str(tmp_path / "shira")).eval()
    assert torch.equal(logits(pm, ids), logits(sd.load(bert(), tmp_path / "delta"), ids))
    with warnings.catch_warnings(record=True) as caught:  # training on in PEFT: our mask type needs no mask_fn
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(bert(), str(tmp_path / "shira"), is_trainable=True)
    assert not [w for w in caught if "mask" in str(w.message)]
    trainable = sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad and "shira_weight" in n)
    assert trainable == sum(report.r * sum(d.shape) for d in delta.values())

    sd.import_peft(tmp_path / "shira", bert(), tmp_path / "back")
    meta, tensors = sd.read(tmp_path / "delta")
    meta_back, tensors_back = sd.read(tmp_path / "back")
    assert tensors.keys() == tensors_back.keys()
    for key in tensors:
        assert tensors[key].dtype == tensors_back[key].dtype and torch.equal(tensors[key], tensors_back[key]), key
    assert meta_back["fingerprint"] == meta["fingerprint"] and meta_back["config"] == meta["config"]  # SaRA's config
    assert (meta_back["values_dtype"], meta_back["index_encoding"]) == (meta["values_dtype"], meta["index_encoding"])


def test_export_refuses_what_shira_cannot_hold_and_names_it(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    sd.prepare(model, sd.RandomConfig(density=0.1, parameter_kinds=("weight", "bias")))
    sd.save(model, tmp_path / "delta")
    base = TinyNet()
    base.load_state_dict(sd.unload(model).state_dict())
    with pytest.raises(UsageError) as err:
        sd.export_shira(tmp_path / "delta", base, tmp_path / "shira")
    assert "conv.weight (a Conv1d weight" in str(err.value) and "proj.bias (the bias of a Linear" in str(err.value)
    assert not hasattr(base, "_sparsedelta") and not (tmp_path / "shira").exists()

    torch.manual_seed(0)
    tied = TinyNet(tied=True)
    sd.prepare(tied, sd.RandomConfig(density=0.1, target_modules=["head", "proj"]))
    sd.save(tied, tmp_path / "tied")
    with pytest.raises(UsageError, match=r"embed.weight \(tied across embed, head"):
        sd.export_shira(tmp_path / "tied", sd.unload(tied), tmp_path / "shira")

    # one r for every layer: a 2x64 layer cannot take the r = 2 that the 64x64 one needs (2·66 > 128 entries)
    def two_layers():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"wide": torch.nn.Linear(64, 64), "thin": torch.nn.Linear(64, 2)})

    model = two_layers()
    sd.prepare(model, sd.RandomConfig(density=0.05, per_tensor=True))
    sd.save(model, tmp_path / "thin")
    with pytest.raises(UsageError, match=r"needs r=2 for its fullest layer, but thin \(2×64\) has only 128 entries"):
        sd.export_shira(tmp_path / "thin", two_layers(), tmp_path / "shira")

    # PEFT picks modules_to_save by name suffix: a saved "head" would also take "lm_head"
    def suffixes():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"lm_head": torch.nn.Linear(8, 8), "head": torch.nn.Linear(8, 2)})

    model = suffixes()
    sd.prepare(model, sd.RandomConfig(density=0.5, modules_to_save=["head"]))
    sd.save(model, tmp_path / "suffix")
    with pytest.raises(UsageError, match=r"module 'head' goes to PEFT's modules_to_save.*\['lm_head'\]"):
        sd.export_shira(tmp_path / "suffix", suffixes(), tmp_path / "shira")


# -- import --------------------------------------------------------------------------------------------------
def peft_adapter(config, path, ids, seed=1):
    """A PEFT adapter made by PEFT itself with non-zero weights, saved; and its logits."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(bert(), config).eval()
    model.save_pretrained(str(path))
    reloaded = peft.PeftModel.from_pretrained(bert(), str(path)).eval()
    return logits(reloaded, ids)


def test_import_shira_made_by_peft(tmp_path, ids):
    config = peft.ShiraConfig(r=2, target_modules=["query", "key"], init_weights=False, random_seed=3,
                              modules_to_save=["classifier"])
    expected = peft_adapter(config, tmp_path / "shira", ids)
    base = bert()
    report = sd.import_peft(tmp_path / "shira", base, tmp_path / "delta")
    assert report.entries == {f"bert.encoder.layer.{i}.attention.self.{m}.weight": 2 * 64 for i in (0, 1)
                              for m in ("query", "key")}
    assert report.dense == ["classifier.bias", "classifier.weight"]
    assert not hasattr(base, "_sparsedelta") and torch.equal(base.state_dict()["classifier.weight"],
                                                              bert().state_dict()["classifier.weight"])
    assert torch.equal(logits(sd.load(bert(), tmp_path / "delta"), ids), expected)


@pytest.mark.parametrize("saved_indices", [True, False])
def test_import_supertuning(tmp_path, ids, saved_indices):
    config = peft.SupertuningConfig(target_modules=["query", "value", "output.dense"], sparsity=0.9, select_top=False,
                                    init_weights=False, save_precomputed_indices=saved_indices)
    expected = peft_adapter(config, tmp_path / "st", ids)
    report = sd.import_peft(tmp_path / "st", bert(), tmp_path / "delta")
    assert len(report.entries) == 8  # query, value, attention.output.dense, output.dense in 2 layers
    assert report.entries["bert.encoder.layer.0.output.dense.weight"] == int(32 * 64 * (1 - 0.9))  # PEFT's count
    assert set(report.ties) == (set() if saved_indices else {p.removesuffix(".weight") for p in report.entries})
    assert not any(report.ties.values())  # random weights: no tie at the boundary
    assert torch.equal(logits(sd.load(bert(), tmp_path / "delta"), ids), expected)


def test_supertuning_positions_recomputed_with_ties_follow_peft_and_are_reported(tmp_path, ids):
    base = bert()
    with torch.no_grad():  # a coarse grid of weights: many entries tie at the selection boundary
        for layer in base.bert.encoder.layer:
            w = layer.attention.self.query.weight
            w.copy_(torch.round(w * 20) / 20)
    base.save_pretrained(tmp_path / "base")
    tied_base = lambda: transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()  # noqa: E731
    torch.manual_seed(1)
    config = peft.SupertuningConfig(target_modules=["query"], sparsity=0.9, select_top=False, init_weights=False,
                                    save_precomputed_indices=False)
    peft.get_peft_model(tied_base(), config).save_pretrained(str(tmp_path / "st"))
    pm = peft.PeftModel.from_pretrained(tied_base(), str(tmp_path / "st")).eval()
    report = sd.import_peft(tmp_path / "st", tied_base(), tmp_path / "delta")
    assert all(n > 0 for n in report.ties.values()) and "tie with the last selected" in str(report)
    _, tensors = sd.read(tmp_path / "delta")
    for i in (0, 1):
        peft_positions = pm.base_model.model.bert.encoder.layer[i].attention.self.query.supertuning_indices["default"]
        assert torch.equal(tensors[f"bert.encoder.layer.{i}.attention.self.query.weight.indices"].long(),
                           torch.sort(peft_positions.long()).values)
    assert torch.equal(logits(sd.load(tied_base(), tmp_path / "delta"), ids), logits(pm, ids))


def test_lora_imports_only_when_sparsified_and_reports_the_error_of_delta_w(tmp_path, ids):
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    expected = peft_adapter(config, tmp_path / "lora", ids)
    with pytest.raises(UsageError, match="not a sparse difference.*sparsify=D"):
        sd.import_peft(tmp_path / "lora", bert(), tmp_path / "delta")

    report = sd.import_peft(tmp_path / "lora", bert(), tmp_path / "delta", sparsify=0.1)
    pm = peft.PeftModel.from_pretrained(bert(), str(tmp_path / "lora"))
    lost = total = 0.0
    for i in (0, 1):
        for m in ("query", "value"):
            layer = getattr(pm.base_model.model.bert.encoder.layer[i].attention.self, m)
            dw = layer.get_delta_weight("default").double().reshape(-1)  # scaling·B·A
            kept = dw.abs().topk(round(0.1 * dw.numel())).values
            norm2, lost2 = float(dw.pow(2).sum()), float(dw.pow(2).sum() - kept.pow(2).sum())
            path = f"bert.encoder.layer.{i}.attention.self.{m}.weight"
            assert report.entries[path] == round(0.1 * 32 * 32)
            assert report.relative_error[path] == pytest.approx(math.sqrt(lost2 / norm2), rel=1e-4)
            lost, total = lost + lost2, total + norm2
    assert report.overall_error == pytest.approx(math.sqrt(lost / total), rel=1e-4)
    assert 0 < report.overall_error < 1

    full = sd.import_peft(tmp_path / "lora", bert(), tmp_path / "full", sparsify=1.0)
    assert full.overall_error == 0
    torch.testing.assert_close(logits(sd.load(bert(), tmp_path / "full"), ids), expected, rtol=0, atol=1e-6)


def test_any_adapter_that_is_a_sparse_difference_imports_exactly(tmp_path, ids):
    config = peft.TrainableTokensConfig(target_modules=["word_embeddings"], token_indices=[1, 5, 7], init_weights=False)
    expected = peft_adapter(config, tmp_path / "tokens", ids)
    report = sd.import_peft(tmp_path / "tokens", bert(), tmp_path / "delta")
    assert report.entries == {"bert.embeddings.word_embeddings.weight": 3 * 32} and report.overall_error == 0
    _, tensors = sd.read(tmp_path / "delta")
    rows = tensors["bert.embeddings.word_embeddings.weight.indices"].long() // 32
    assert sorted(set(rows.tolist())) == [1, 5, 7]
    assert torch.equal(logits(sd.load(bert(), tmp_path / "delta"), ids), expected)


# -- a delta folder people can share ------------------------------------------------------------------------
def test_save_writes_a_model_card(tmp_path, ids, monkeypatch):
    bert().save_pretrained(tmp_path / "base")
    model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    sd.prepare(model, sd.SaRAConfig(threshold=2e-3, modules_to_save=["classifier"]))
    card = {"Data": "SST-2, 67,349 sentences", "Metrics": {"accuracy": 0.91234, "macro-F1": 0.9}, "Notes": ["a", "b"]}
    sd.save(model, tmp_path / "delta", card=card)
    text = (tmp_path / "delta" / "README.md").read_text()
    meta, _ = sd.read(tmp_path / "delta")
    assert text.startswith("---\nlibrary_name: sparsedelta\n")
    assert f"| base model | `{tmp_path / 'base'}` |" in text
    assert fingerprint_digest(meta["fingerprint"]) in text
    assert "| threshold | `0.002` |" in text and "| modules_to_save | `[\"classifier\"]` |" in text
    entries = sum(fp["entries"] for fp in meta["fingerprint"].values())
    assert f"| delta entries | {entries:,} in {len(meta['fingerprint'])} tensors" in text
    assert "KiB" in text or "MiB" in text
    snippet = text.split("```python\n")[1].split("```")[0].splitlines()
    assert snippet[1] == f"model = transformers.BertForSequenceClassification.from_pretrained('{tmp_path / 'base'}', num_labels=3)"
    assert snippet[2].startswith("sparsedelta.load(model, 'delta')")
    assert "## Data\n\nSST-2, 67,349 sentences" in text and "| accuracy | 0.9123 |" in text and "- b" in text
    # the snippet works
    namespace = {}
    monkeypatch.chdir(tmp_path)
    exec("\n".join(snippet), namespace)
    assert torch.equal(logits(namespace["model"], ids), logits(model, ids))

    # a README.md that is not ours is left alone; a hub-id base goes into the front matter
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my notes\n")
    sd.save(model, tmp_path / "mine", card={"base_model": "user/base-model"})
    assert (tmp_path / "mine" / "README.md").read_text() == "my notes\n"
    sd.save(model, tmp_path / "hub", card={"base_model": "user/base-model"})
    assert "base_model: user/base-model\n" in (tmp_path / "hub" / "README.md").read_text()


def fake_hub_cache(cache: Path, repo: str, folder: Path, revision="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub keeps: models--user--repo/{refs/main, snapshots/<commit>/...}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return revision


def test_load_by_hub_id_from_an_offline_cache(tmp_path, ids, monkeypatch):
    from huggingface_hub import constants

    model = bert()
    sd.prepare(model, sd.RandomConfig(density=0.05, modules_to_save=["classifier"]))
    with torch.no_grad():
        for p in sd.trainable_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    sd.save(model, tmp_path / "delta")
    revision = fake_hub_cache(tmp_path / "hub", "user/repo", tmp_path / "delta")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no folder named user/repo here

    assert torch.equal(logits(sd.load(bert(), "user/repo"), ids), logits(model, ids))
    assert torch.equal(logits(sd.load(bert(), f"user/repo@{revision}"), ids), logits(model, ids))
    with pytest.raises(UsageError, match=r"HF_HUB_OFFLINE is set\) and the local hub cache has no delta.safetensors"):
        sd.load(bert(), "user/other")
    with pytest.raises(FileNotFoundError, match="no delta file"):
        sd.load(bert(), "not/a/hub/id")  # neither a path nor an id: the reader's own message
