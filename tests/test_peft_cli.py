"""PEFT interop through the command line: `sparsedelta export` (a run or a delta folder as a SHiRA
adapter that PEFT loads without sparsedelta), `sparsedelta import` (back, bit for bit; a LoRA run
with --sparsify), and the model card a run folder writes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import sparsedelta as sd
from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.train.finished import load_run
from test_causal_lm import kjv, tokenizer  # noqa: F401  (fixtures)
from test_cli import cli_error, tiny_args

peft = pytest.importorskip("peft")

# a process that cannot import sparsedelta: PEFT and transformers alone
CHILD = """
import sys
sys.modules["sparsedelta"] = None
try:
    import sparsedelta  # noqa: F401
    raise SystemExit("sparsedelta was importable")
except ImportError:
    pass
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

base = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], num_labels=int(sys.argv[2])).eval()
model = PeftModel.from_pretrained(base, sys.argv[3]).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(sys.argv[4])).logits, sys.argv[5])
"""


@pytest.fixture(scope="module")
def sara_run(tiny_bert, topic_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sara") / "run"
    assert main(tiny_args(tiny_bert, topic_files, out, "--max-steps", 3, "--eval-every", 3, "--threads", 1)) == 0
    return out


def ids():
    return torch.randint(1, 1000, (4, 12), generator=torch.Generator().manual_seed(0))


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def assert_same_adapter(a, b):
    """The same config, tensors (names, dtypes, values) and metadata; not the same bytes: safetensors
    writes the metadata's keys in a hash order that changes from process to process."""
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()
    with safe_open(str(a / "adapter_model.safetensors"), "pt") as fa, safe_open(str(b / "adapter_model.safetensors"), "pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for key in fa.keys():
            x, y = fa.get_tensor(key), fb.get_tensor(key)
            assert x.dtype == y.dtype and torch.equal(x, y), key


def test_a_run_exports_for_peft_without_sparsedelta_and_imports_back_bit_for_bit(sara_run, tiny_bert, tmp_path, capsys):
    assert main(["export", str(sara_run), "--to", "shira", "--output", str(tmp_path / "shira")]) == 0
    printed = capsys.readouterr().out
    assert "PEFT SHiRA adapter in" in printed and "num_labels=3" in printed and "PeftModel.from_pretrained" in printed
    adapter = json.loads((tmp_path / "shira" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "SHIRA" and adapter["base_model_name_or_path"] == str(tiny_bert)
    assert adapter["modules_to_save"] == ["classifier"]

    expected = logits(load_run(sara_run, splits=()).model, ids())
    torch.save(ids(), tmp_path / "ids.pt")
    (tmp_path / "child.py").write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    args = [tiny_bert, 3, tmp_path / "shira", tmp_path / "ids.pt", tmp_path / "out.pt"]
    child = subprocess.run([sys.executable, tmp_path / "child.py", *map(str, args)], env=env, capture_output=True,
                           text=True, cwd=tmp_path, timeout=300)  # fmt: skip
    assert child.returncode == 0, child.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), expected)

    # back: the base is --model, a classifier whose 3 labels come from the stored head
    assert main(["import", str(tmp_path / "shira"), "--output", str(tmp_path / "back"), "--model", str(tiny_bert)]) == 0
    assert "imported a PEFT SHIRA adapter" in capsys.readouterr().out
    meta, tensors = sd.read(sara_run)
    meta_back, tensors_back = sd.read(tmp_path / "back")
    assert tensors.keys() == tensors_back.keys()
    for key in tensors:
        assert tensors[key].dtype == tensors_back[key].dtype and torch.equal(tensors[key], tensors_back[key]), key
    assert meta_back["fingerprint"] == meta["fingerprint"] and meta_back["config"] == meta["config"]

    # the delta folder exports as the run did (base from --model): the same adapter
    assert main(["export", str(tmp_path / "back"), "--output", str(tmp_path / "again"), "--model", str(tiny_bert)]) == 0
    assert_same_adapter(tmp_path / "again", tmp_path / "shira")


def test_export_and_import_say_what_is_missing(sara_run, tiny_bert, topic_files, tmp_path, capsys):
    assert "is not a run folder: give its base model with --model" in cli_error(
        capsys, "export", sara_run / "delta.safetensors", "--output", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    assert "exists and is not empty" in cli_error(capsys, "export", sara_run, "--output", tmp_path / "full")
    assert "its delta is in sparsedelta's format already" in cli_error(capsys, "import", sara_run, "--output", tmp_path / "y")
    assert "no adapter_config.json" in cli_error(capsys, "import", tmp_path / "full", "--output", tmp_path / "z",
                                                 "--model", tiny_bert)  # fmt: skip

    # a LoRA run: already a PEFT adapter; imported only sparsified, with the error of ΔW printed
    lora = tmp_path / "lora"
    assert main(tiny_args(tiny_bert, topic_files, lora, "--method", "lora", "--max-steps", 2, "--threads", 1)) == 0
    assert "already is a PEFT adapter" in cli_error(capsys, "export", lora, "--output", tmp_path / "a")
    err = cli_error(capsys, "import", lora, "--output", tmp_path / "b")
    assert "not a sparse difference" in err and "pass --sparsify D" in err  # the flag, not only its Python name
    assert main(["import", str(lora), "--output", str(tmp_path / "c"), "--sparsify", "1.0"]) == 0
    assert "relative Frobenius error of ΔW: 0.000e+00 overall" in capsys.readouterr().out
    run = load_run(lora, splits=())
    base = load_run(lora, splits=()).model.unload()  # the run's base model, without its adapter
    imported = sd.load(base, tmp_path / "c")
    torch.testing.assert_close(logits(imported, ids()), logits(run.model, ids()), rtol=0, atol=1e-5)


def test_a_causal_lm_run_exports_and_its_delta_folder_finds_its_base(tiny_llama_dir, kjv_text, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(lm_args(tiny_llama_dir, kjv_text, run, "--max-steps", 2, "--threshold", 2e-3, "--threads", 1)) == 0
    assert main(["export", str(run), "--output", str(tmp_path / "shira")]) == 0
    assert "AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out
    card, metrics = (run / "README.md").read_text(), json.loads((run / "metrics.json").read_text())
    assert "| train blocks |" in card and "labels" not in card
    assert f"| test perplexity | {metrics['test']['perplexity']:.4g} |" in card
    assert f"| test perplexity of the base model | {metrics['baseline']['test']['perplexity']:.4g} |" in card
    finished = load_run(run, splits=())
    base = type(finished.model).from_pretrained(tiny_llama_dir).eval()
    pm = peft.PeftModel.from_pretrained(base, str(tmp_path / "shira")).eval()
    assert torch.equal(logits(pm, ids()[:, :8] % 200), logits(finished.model, ids()[:, :8] % 200))
    # a bare delta folder over a decoder: no classification head stored, so --model is a causal LM
    delta = tmp_path / "delta"
    delta.mkdir()
    for name in ("delta.safetensors", "delta_config.json"):
        (delta / name).write_bytes((run / name).read_bytes())
    assert main(["export", str(delta), "--output", str(tmp_path / "again"), "--model", str(tiny_llama_dir)]) == 0
    assert_same_adapter(tmp_path / "again", tmp_path / "shira")


def test_a_run_folder_writes_a_model_card_with_data_and_metrics(sara_run, tiny_bert, topic_files):
    text = (sara_run / "README.md").read_text()
    metrics = json.loads((sara_run / "metrics.json").read_text())
    assert text.startswith("---\nlibrary_name: sparsedelta\n") and "- sara" in text
    assert f"| base model | `{tiny_bert}` |" in text
    assert f"| source | {topic_files['train']} |" in text  # the data: its source, sizes and labels
    assert "| train examples | 72 |" in text and "| labels (in id order) | money, sport, tech |" in text
    assert f"| test accuracy | {metrics['test']['accuracy']:.4g} |" in text
    assert f"| test macro_f1 | {metrics['test']['macro_f1']:.4g} |" in text
    assert "| steps | 3 |" in text and "| seed | 0 |" in text
    assert f"`sparsedelta export {sara_run.name} --to shira --output shira/`" in text
    snippet = text.split("```python\n")[1].split("```")[0].splitlines()
    assert snippet[1] == f"model = transformers.BertForSequenceClassification.from_pretrained('{tiny_bert}', num_labels=3)"


def test_import_refuses_a_plain_model_folder_and_nonfinite_values_before_writing(sara_run, tiny_bert, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    err = cli_error(capsys, "import", tiny_bert, "--output", tmp_path / "m")
    assert "is not a PEFT adapter folder" in err and "is a run" not in err  # a model folder has config.json too
    assert main(["export", str(sara_run), "--output", str(tmp_path / "shira")]) == 0
    weights = tmp_path / "shira" / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = next(k for k in tensors if k.endswith("shira_weight"))
    tensors[name][0] = float("nan")
    save_file(tensors, weights)
    err = cli_error(capsys, "import", tmp_path / "shira", "--output", tmp_path / "out", "--model", tiny_bert)
    assert "holds NaN or infinite values" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def lora_adapter(tiny_bert, topic_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main(tiny_args(tiny_bert, topic_files, out, "--method", "lora", "--max-steps", 2, "--threads", 1)) == 0
    return out / "adapter"


def _edit_json(name, change):
    def edit(folder):
        path = folder / name
        path.write_text(change(path.read_text()))

    return edit


def _edit_config(change):
    return _edit_json("adapter_config.json", lambda text: json.dumps(change(json.loads(text))))


def _edit_tensors(change, metadata=None):
    from safetensors.torch import load_file, save_file

    def edit(folder):
        path = folder / "adapter_model.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata=metadata(meta) if metadata else meta)

    return edit


def _first(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _set(tensors, suffix, value):
    tensors[_first(tensors, suffix)] = value(tensors[_first(tensors, suffix)])


def _truncate(folder):
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


LORA_DAMAGE = {
    "rank doubled in the config": _edit_config(lambda c: {**c, "r": c["r"] * 2}),
    "a tensor of another shape": _edit_tensors(lambda t: _set(t, "lora_A.weight", lambda w: w[:, :-1].contiguous())),
    "no such target module": _edit_config(lambda c: {**c, "target_modules": ["no_such_layer"]}),
    "unknown peft_type": _edit_config(lambda c: {**c, "peft_type": "NOPE"}),
    "config not JSON": _edit_json("adapter_config.json", lambda text: text[: len(text) // 2]),
    "config a JSON list": _edit_config(lambda c: [c]),
    "config r a string": _edit_config(lambda c: {**c, "r": "eight"}),
    "truncated tensors": _truncate,
    "a tensor lost": _edit_tensors(lambda t: t.pop(_first(t, "lora_B.weight"))),
}

SHIRA_DAMAGE = {
    "positions out of range": _edit_tensors(lambda t: _set(t, "shira_indices", lambda i: i + 10_000)),
    "values a matrix": _edit_tensors(lambda t: _set(t, "shira_weight", lambda w: w[:, None].contiguous())),
    "positions lost": _edit_tensors(lambda t: t.pop(_first(t, "shira_indices"))),
    "export metadata not JSON": _edit_tensors(lambda t: None, lambda m: {**m, "sparsedelta": "{oops"}),
    "export entries not counts": _edit_tensors(
        lambda t: None, lambda m: {**m, "sparsedelta": json.dumps({**json.loads(m["sparsedelta"]), "entries": [1]})}
    ),
    "task_type a number": _edit_config(lambda c: {**c, "task_type": 3}),
}


@pytest.mark.parametrize("damage", sorted(LORA_DAMAGE) + sorted(SHIRA_DAMAGE))
def test_import_of_a_damaged_or_mismatched_adapter_is_one_line_and_writes_nothing(
    damage, lora_adapter, sara_run, tiny_bert, tmp_path, capsys
):
    import shutil

    adapter = tmp_path / "adapter"
    if damage in LORA_DAMAGE:
        shutil.copytree(lora_adapter, adapter)
        LORA_DAMAGE[damage](adapter)
    else:
        assert main(["export", str(sara_run), "--output", str(adapter)]) == 0
        capsys.readouterr()
        SHIRA_DAMAGE[damage](adapter)
    sparsify = ["--sparsify", 0.5] if damage in LORA_DAMAGE else []  # a SHiRA adapter is read from its file
    err = cli_error(capsys, "import", adapter, "--output", tmp_path / "out", "--model", tiny_bert, *sparsify)
    assert "adapter" in err or "--model" in err, err
    assert not (tmp_path / "out").exists()
