"""Delta files: round trip, fingerprint, damage, atomic writes."""

import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparsedelta as sd
from sparsedelta.core.io import CONFIG_FILE, DELTA_FILE, FORMAT_VERSION


def trained(model, batch, steps=2):
    opt = torch.optim.AdamW(sd.trainable_parameters(model), lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.fixture
def saved_minilm(minilm, minilm_batch, tmp_path):
    sd.prepare(
        minilm, sd.SaRAConfig(threshold=1e-3, parameter_kinds=("weight", "embedding"), modules_to_save=["classifier"])
    )
    trained(minilm, minilm_batch)
    sd.save(minilm, tmp_path / "delta")
    with torch.no_grad():
        logits = minilm(**minilm_batch).logits
    return tmp_path / "delta", logits


def fresh_minilm(path, num_labels=5):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(123)  # a different random head: the saved one must replace it
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels).eval()


def test_save_load_onto_fresh_base_gives_identical_logits(saved_minilm, minilm_path, minilm_batch):
    folder, logits = saved_minilm
    model = sd.load(fresh_minilm(minilm_path), folder)
    with torch.no_grad():
        assert torch.equal(model(**minilm_batch).logits, logits)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["config"]["method"] == "sara" and config["format_version"] == str(FORMAT_VERSION)
    with safe_open(str(folder / DELTA_FILE), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("bert.encoder.layer.0.attention.self.query.weight.indices").dtype == torch.int32
    assert "classifier.weight" in keys and "bert.embeddings.word_embeddings.weight.values" in keys
    assert not any(k.startswith("bert.") and not k.endswith((".indices", ".values")) for k in keys)


def test_half_precision_values(minilm, minilm_batch, minilm_path, tmp_path):
    sd.prepare(minilm, sd.SaRAConfig(threshold=1e-3, modules_to_save=["classifier"]))
    trained(minilm, minilm_batch)
    full = sd.save(minilm, tmp_path / "f32")
    half = sd.save(minilm, tmp_path / "bf16", dtype="bfloat16")
    assert half.stat().st_size < 0.8 * full.stat().st_size
    meta, tensors = sd.read(half)
    assert meta["values_dtype"] == "bfloat16"
    model = sd.load(fresh_minilm(minilm_path), tmp_path / "bf16")
    with torch.no_grad():
        torch.testing.assert_close(model(**minilm_batch).logits, minilm(**minilm_batch).logits, atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="values dtype"):
        sd.save(minilm, tmp_path / "x", dtype="int8")


def test_refuses_another_base(saved_minilm, minilm_path):
    folder, _ = saved_minilm
    other = fresh_minilm(minilm_path)
    with torch.no_grad():
        other.bert.encoder.layer[2].output.dense.weight.mul_(1.001)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(sd.DeltaFileError, match="fingerprint mismatch at bert.encoder.layer.2.output.dense.weight"):
        sd.load(other, folder)
    assert not hasattr(other, "_sparsedelta")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_refuses_other_shapes(saved_minilm, minilm_path):
    folder, _ = saved_minilm
    with pytest.raises(sd.DeltaFileError, match=r"classifier.(weight|bias) .*same num_labels"):
        sd.load(fresh_minilm(minilm_path, num_labels=3), folder)
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(sd.DeltaFileError, match="which this model lacks"):
        sd.load(lin, folder)


def test_shape_mismatch_message(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    sd.prepare(model, sd.RandomConfig(density=0.5))
    sd.save(model, tmp_path)
    with pytest.raises(sd.DeltaFileError, match=r"shape mismatch for 0.weight: delta was made for \(8, 8\)"):
        sd.load(torch.nn.Sequential(torch.nn.Linear(8, 6)), tmp_path)


def test_truncated_and_corrupted_files(saved_minilm, minilm_path):
    folder, _ = saved_minilm
    data = (folder / DELTA_FILE).read_bytes()
    (folder / DELTA_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(sd.DeltaFileError, match="truncated or corrupted"):
        sd.load(fresh_minilm(minilm_path), folder)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    (folder / DELTA_FILE).write_bytes(bytes(flipped))
    with pytest.raises(sd.DeltaFileError, match="checksum"):
        sd.load(fresh_minilm(minilm_path), folder)
    with pytest.raises(FileNotFoundError, match="no delta file"):
        sd.load(fresh_minilm(minilm_path), folder / "nowhere")


def rewrite(path, edit_tensors=None, edit_meta=None):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata=meta)


def test_missing_keys_and_unknown_version(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    sd.prepare(model, sd.RandomConfig(density=0.5))
    file = sd.save(model, tmp_path)
    rewrite(file, edit_tensors=lambda t: t.pop("0.weight.values"))
    with pytest.raises(sd.DeltaFileError, match=r"lacks tensors \['0.weight.values'\]"):
        sd.read(file)
    sd.save(model, tmp_path)
    rewrite(file, edit_meta=lambda m: m.update(format_version="99"))
    with pytest.raises(sd.DeltaFileError, match="format version 99.*upgrade sparsedelta"):
        sd.read(file)
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(sd.DeltaFileError, match="not a sparsedelta file"):
        sd.read(tmp_path / "other.safetensors")


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    sd.prepare(model, sd.RandomConfig(density=0.5))
    file = sd.save(model, tmp_path)
    good, names = file.read_bytes(), sorted(os.listdir(tmp_path))

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("sparsedelta.core.io.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        sd.save(model, tmp_path)
    assert file.read_bytes() == good
    assert sorted(os.listdir(tmp_path)) == names  # no temporary file left behind


def test_load_while_another_adapter_is_active(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    x = torch.randn(3, 8)
    sd.prepare(model, sd.RandomConfig(density=0.5, seed=1), adapter_name="a")
    with torch.no_grad():
        sd.trainable_parameters(model)[0].add_(0.1)
    sd.save(model, tmp_path / "a")
    out_a = model(x).detach()
    sd.prepare(model, sd.RandomConfig(density=0.5, seed=2), adapter_name="b")
    with torch.no_grad():
        sd.trainable_parameters(model)[0].add_(-0.2)
    sd.save(model, tmp_path / "b")
    out_b = model(x).detach()
    sd.delete_adapter(model, "a")
    sd.load(model, tmp_path / "a", adapter_name="a2")  # b is merged while a2's fingerprint is checked
    assert torch.equal(model(x), out_a)
    sd.set_adapter(model, "b")
    assert torch.equal(model(x), out_b)


def test_elias_fano_indices_round_trip_near_the_information_floor(saved_minilm, minilm_path, minilm_batch, tmp_path):
    from sparsedelta.core.encoding import information_floor_bits

    folder, logits = saved_minilm
    model = sd.load(fresh_minilm(minilm_path), folder)
    compact = sd.save(model, tmp_path / "ef", index_encoding="elias-fano")
    meta, tensors = sd.read(compact)
    raw_meta, raw = sd.read(folder)
    floor = sum(information_floor_bits(math.prod(fp["shape"]), fp["entries"]) for fp in meta["fingerprint"].values())
    with safe_open(str(compact), "pt") as f:
        stored_bits = 8 * sum(f.get_tensor(f"{n}.indices").numel() for n in meta["fingerprint"])
    assert stored_bits < 1.25 * floor
    for name in meta["fingerprint"]:
        assert torch.equal(tensors[f"{name}.indices"], raw[f"{name}.indices"].long())
    reloaded = sd.load(fresh_minilm(minilm_path), tmp_path / "ef")
    with torch.no_grad():
        assert torch.equal(reloaded(**minilm_batch).logits, logits)
    with pytest.raises(ValueError, match="index_encoding"):
        sd.save(model, tmp_path / "x", index_encoding="zip")
