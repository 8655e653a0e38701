"""Delta files from anyone: format-1 files still load; damage and inconsistency are refused with a
DeltaFileError naming what is wrong, before the model is touched; memory stays proportional."""

import gc
import json
import re
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparsedelta as sd
from delta_fixtures import FIXTURES, POSITIONS, V1_FILES, FixtureNet, attach_fixture_delta
from sparsedelta.core import io
from sparsedelta.core.encoding import encode
from sparsedelta.core.fileformat import CHECKSUM_KEY, FORMAT_VERSION, checksum, tensor_hash


def bits(model):
    return {k: v.detach().clone().reshape(-1).view(torch.uint8) for k, v in model.state_dict().items()}


def same_bits(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def looks(model):
    """Everything a refused load must leave as it was."""
    state = getattr(model, "_sparsedelta", None)
    return (
        bits(model),
        {n: p.requires_grad for n, p in model.named_parameters()},
        sorted(n for n, m in model.named_modules() if "forward" in m.__dict__),
        None if state is None else (sorted(state.adapters), state.active),
    )


def same_looks(a, b):
    return same_bits(a[0], b[0]) and a[1:] == b[1:]


def rewrite(path, edit_tensors=None, edit_meta=None, rechecksum=True):
    """Edit a delta file's tensors or metadata; rechecksum as a writer that gets the checksum right."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if rechecksum:
        meta[CHECKSUM_KEY] = checksum(meta, tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


def edit_json(field, edit):
    def apply(meta):
        value = json.loads(meta[field])
        edit(value)  # in place
        meta[field] = json.dumps(value)

    return apply


@pytest.fixture
def saved(tmp_path):
    """A fixture delta (with head) in the current format, and the model it came from."""
    model = attach_fixture_delta(FixtureNet(), "int32")
    return sd.save(model, tmp_path / "delta"), model


# -- format 1 files still load -------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", list(V1_FILES))
def test_format_1_files_load_with_their_values(encoding):
    file = FIXTURES / V1_FILES[encoding]
    meta, tensors = sd.read(file)
    assert meta["format_version"] == "1" and meta["index_encoding"] == encoding
    for name, positions in POSITIONS.items():
        assert tensors[f"{name}.indices"].tolist() == positions
    loaded = sd.load(FixtureNet(), file)
    expected = attach_fixture_delta(FixtureNet(), encoding)
    assert same_bits(bits(loaded), bits(expected))
    assert torch.equal(loaded.head.weight, expected.head.weight) and loaded.head.weight.abs().sum() > 0
    ids = torch.tensor([[1, 4, 9]])
    assert torch.equal(loaded(ids), expected(ids))


def test_format_1_checksum_still_verified(tmp_path):
    data = bytearray((FIXTURES / V1_FILES["int32"]).read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    (tmp_path / "damaged.safetensors").write_bytes(bytes(data))
    with pytest.raises(sd.DeltaFileError, match="failed its checksum"):
        sd.load(FixtureNet(), tmp_path / "damaged.safetensors")


def test_current_format_round_trip(saved, tmp_path):
    file, model = saved
    meta, _ = sd.read(file)
    assert meta["format_version"] == str(FORMAT_VERSION) == "2"
    for encoding in ("int32", "elias-fano"):
        for dtype in ("float32", "bfloat16"):  # the fixture's values are exact in bfloat16
            folder = tmp_path / f"{encoding}-{dtype}"
            sd.save(model, folder, dtype=dtype, index_encoding=encoding)
            assert same_bits(bits(sd.load(FixtureNet(), folder)), bits(model))


# -- the checksum covers dtypes, shapes and all metadata --------------------------------------------
def test_checksum_covers_dtype_labels_and_metadata(saved):
    file, model = saved
    sd.save(model, file.parent, dtype="float16")
    original = file.read_bytes()
    n = int.from_bytes(original[:8], "little")
    header = json.loads(original[8 : 8 + n])
    for name in POSITIONS:  # the same bytes read as bfloat16: consistent, but not what was written
        header[f"{name}.values"]["dtype"] = "BF16"
    header["__metadata__"]["values_dtype"] = "bfloat16"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + original[8 + n :])
    with pytest.raises(sd.DeltaFileError, match="failed its checksum"):
        sd.read(file)
    file.write_bytes(original)
    rewrite(file, edit_meta=edit_json("config", lambda c: c.update(rank_penalty=0.5)), rechecksum=False)
    with pytest.raises(sd.DeltaFileError, match="failed its checksum"):
        sd.read(file)
    t = {"x": torch.arange(6, dtype=torch.int32)}
    sums = {checksum({}, t), checksum({}, {"x": t["x"].view(torch.float32)}), checksum({}, {"x": t["x"].reshape(2, 3)})}
    assert len(sums) == 3


def test_metadata_and_tensor_list_are_cross_checked(saved):
    file, _ = saved
    original = file.read_bytes()
    cases = {  # edits another writer could make, checksum and all: none may load silently
        "holds tensors its metadata does not list": edit_json("fingerprint", lambda f: f.pop("proj.bias")),
        r"modules_to_save=None names \[\]": edit_json("config", lambda c: c.update(modules_to_save=None)),
        r"holds tensors its metadata does not list: \['head.bias'\]": edit_json("saved_tensors", lambda s: s.remove("head.bias")),
        "embed.weight.values is stored as F32; its metadata implies BF16": lambda m: m.update(values_dtype="bfloat16"),
        r"fingerprint entry 'embed.weight' lacks \['sha256'\]": edit_json("fingerprint", lambda f: f["embed.weight"].pop("sha256")),
        r"embed.weight.indices has shape \[6\]; its metadata implies \[7\]": edit_json(
            "fingerprint", lambda f: f["embed.weight"].update(entries=7)
        ),
        "not one its config targets": edit_json("config", lambda c: c.update(parameter_kinds=["weight", "embedding"])),
    }
    for message, edit in cases.items():
        file.write_bytes(original)
        rewrite(file, edit_meta=edit)
        model = FixtureNet()
        before = looks(model)
        with pytest.raises(sd.DeltaFileError, match=message):
            sd.load(model, file)
        assert same_looks(looks(model), before), message


# -- positions ------------------------------------------------------------------------------------------
def test_unsorted_or_repeated_positions_are_refused_not_sorted(saved):
    file, _ = saved
    original = file.read_bytes()

    def swap_with_values(t):  # each position keeps its value, only the order changes
        for part in ("indices", "values"):
            t[f"embed.weight.{part}"][[0, 1]] = t[f"embed.weight.{part}"][[1, 0]].clone()

    def repeat(t):
        t["embed.weight.indices"][1] = t["embed.weight.indices"][0]

    for edit in (swap_with_values, repeat):
        file.write_bytes(original)
        rewrite(file, edit_tensors=edit)
        with pytest.raises(sd.DeltaFileError, match="positions of embed.weight are not sorted and distinct"):
            sd.load(FixtureNet(), file)


def test_elias_fano_payload_decoding_to_bad_positions_is_refused(tmp_path):
    model = attach_fixture_delta(FixtureNet(), "int32")
    file = sd.save(model, tmp_path, index_encoding="elias-fano")

    def unsorted(t):  # a valid-length code of positions out of order
        t["embed.weight.indices"] = encode(torch.tensor([1, 6, 5, 17, 33, 39]), 40)

    rewrite(file, edit_tensors=unsorted)
    with pytest.raises(sd.DeltaFileError, match="positions of embed.weight are damaged: .*not sorted, distinct"):
        sd.read(file)
    rewrite(file, edit_tensors=lambda t: t.update({"proj.weight.indices": t["proj.weight.indices"][:-1]}))
    with pytest.raises(sd.DeltaFileError, match=r"proj.weight.indices has shape \[\d+\]; its metadata implies"):
        sd.read(file)


def test_sparse_delta_keeps_values_with_their_positions():
    weight = torch.zeros(10)
    delta = sd.SparseDelta(weight, torch.tensor([7, 2, 5]), torch.tensor([0.7, 0.2, 0.5]))
    assert delta.indices.tolist() == [2, 5, 7] and delta.values.tolist() == pytest.approx([0.2, 0.5, 0.7])
    delta.merge()
    assert weight[[2, 5, 7]].tolist() == pytest.approx([0.2, 0.5, 0.7])
    with pytest.raises(ValueError, match="position 5 is given twice"):
        sd.SparseDelta(weight, torch.tensor([5, 2, 5]), torch.tensor([1.0, 2.0, 3.0]))
    assert sd.SparseDelta(weight, torch.tensor([5, 2, 5])).indices.tolist() == [2, 5]  # no values: a set


# -- a refused load changes nothing ---------------------------------------------------------------------
def test_refused_load_leaves_model_as_it_was(saved, tmp_path):
    file, _ = saved
    model = FixtureNet()
    sd.prepare(model, sd.RandomConfig(density=0.5, seed=3, parameter_kinds=("weight",)), adapter_name="other")
    with torch.no_grad():
        sd.trainable_parameters(model)[0].add_(0.5)
    model.proj.bias.requires_grad_(True)  # a flag set by hand survives too
    before = looks(model)
    # the last checks: a damaged saved head tensor, then the fingerprint of the last delta tensor
    rewrite(file, edit_tensors=lambda t: t["head.bias"].fill_(float("nan")))
    with pytest.raises(sd.DeltaFileError, match="head.bias holds 3 NaN"):
        sd.load(model, file, adapter_name="new")
    assert same_looks(looks(model), before)
    sd.save(attach_fixture_delta(FixtureNet(), "int32"), file.parent)
    with torch.no_grad():
        model.proj.bias[2] += 1  # the base differs where the delta's last tensor has its entry
    before = looks(model)
    with pytest.raises(sd.DeltaFileError, match="fingerprint mismatch at proj.bias"):
        sd.load(model, file, adapter_name="new")
    assert same_looks(looks(model), before)


def test_load_checks_fingerprints_under_another_merged_adapter(saved):
    file, reference = saved
    model = FixtureNet()
    sd.prepare(model, sd.RandomConfig(density=0.6, seed=0, parameter_kinds=("weight", "embedding")), adapter_name="a")
    with torch.no_grad():
        for p in sd.trainable_parameters(model):
            p.add_(1.0)  # merged over the positions the file's fingerprint covers
    sd.load(model, file, adapter_name="b")
    ids = torch.tensor([[0, 3, 7]])
    assert torch.equal(model(ids), reference(ids))


# -- clear errors for every kind of bad input -----------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (edit_json("config", lambda c: c.update(threshold="high")), r"config field threshold .*'high', not float \| None"),
        (edit_json("config", lambda c: c.update(parameter_kinds=5)), "config field parameter_kinds"),
        (edit_json("config", lambda c: c.update(target_modules="(")), "not a valid regular expression"),
        (edit_json("config", lambda c: c.update(method="nope")), "unknown method 'nope'"),
        (lambda m: m.update(config="[" * 50000 + "]" * 50000), "'config' is not valid JSON \\(RecursionError"),
        (lambda m: m.update(config='{"threshold": ' + "9" * 5000 + "}"), "'config' is not valid JSON \\(ValueError"),
        (lambda m: m.update(config='{"method": "sara", "threshold": NaN}'), "'config' is not valid JSON"),
        (lambda m: m.update(fingerprint=json.dumps("x" * 20000)), "'fingerprint' is a str, not an object"),
        (edit_json("fingerprint", lambda f: f["proj.weight"].update(shape=[6, 4.0])), "shape \\[6, 4.0\\], not a list"),
        (edit_json("fingerprint", lambda f: f["proj.weight"].update(dtype="int16")), "base dtype 'int16'"),
        (lambda m: m.update(index_encoding="zip"), "index encoding 'zip'"),
        (lambda m: m.pop("values_dtype"), r"lacks metadata fields \['values_dtype'\]"),
        (lambda m: m.update(format_version="3"), "format version 3, this sparsedelta reads versions 1 to 2"),
    ],
)
def test_bad_metadata_is_named(saved, edit, message):
    file, _ = saved
    rewrite(file, edit_meta=edit)
    with pytest.raises(sd.DeltaFileError, match=message):
        sd.load(FixtureNet(), file)


def test_not_a_file_and_empty_delta(saved, tmp_path):
    file, _ = saved
    (tmp_path / "folder" / "delta.safetensors").mkdir(parents=True)
    with pytest.raises(sd.DeltaFileError, match="not a regular file"):
        sd.load(FixtureNet(), tmp_path / "folder")
    with pytest.raises(sd.DeltaFileError, match="not a regular file"):
        sd.read("/dev/null")

    def empty(t):
        for name in POSITIONS:
            t[f"{name}.indices"], t[f"{name}.values"] = t[f"{name}.indices"][:0], t[f"{name}.values"][:0]

    rewrite(file, edit_tensors=empty, edit_meta=edit_json("fingerprint", lambda f: [e.update(entries=0) for e in f.values()]))
    with pytest.raises(sd.DeltaFileError, match="holds no delta entries: nothing to load"):
        sd.load(FixtureNet(), file)


def test_non_finite_values_refused_unless_allowed(saved):
    file, _ = saved
    rewrite(file, edit_tensors=lambda t: t["proj.weight.values"].__setitem__(1, float("inf")))
    with pytest.raises(sd.DeltaFileError, match=r"proj.weight.values holds 1 NaN or infinite .*allow_nonfinite=True"):
        sd.load(FixtureNet(), file)
    model = sd.load(FixtureNet(), file, allow_nonfinite=True)
    assert model.proj.weight.reshape(-1)[7].isinf()


# -- memory: proportional to what is loaded; refuse before reading -------------------------------------
def _peak_growth_mib(fn):
    def kib(field):
        return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = kib("VmRSS")
    fn()
    return (kib("VmHWM") - before) / 1024


def test_hashing_does_not_copy_large_tensors():
    big = torch.ones(64, 1 << 18)  # 64 MiB, pages touched
    digest = tensor_hash(big)
    assert _peak_growth_mib(lambda: tensor_hash(big)) < 16  # a copy would add 64 MiB (tobytes: 128)
    assert _peak_growth_mib(lambda: tensor_hash(big.t())) < 24  # strided: copied a chunk at a time
    import hashlib

    assert digest == hashlib.sha256(big.numpy().tobytes()).hexdigest()


def test_long_fingerprint_string_costs_little(saved):
    file, _ = saved
    rewrite(file, edit_meta=lambda m: m.update(fingerprint=json.dumps("x" * (4 << 20))))
    tracemalloc.start()
    with pytest.raises(sd.DeltaFileError, match="'fingerprint' is 4,194,306 characters, more than such a file needs"):
        sd.load(FixtureNet(), file)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * (4 << 20)  # the metadata string itself, not ~145x it


def test_refuses_before_reading_tensors_that_will_not_load(saved, monkeypatch):
    file, _ = saved

    def grow_head(t):
        t["head.weight"] = torch.zeros(1000, 1000)

    rewrite(file, edit_tensors=grow_head)
    monkeypatch.setattr(io._DeltaFile, "tensors", lambda *a, **k: pytest.fail("read tensors it will not load"))
    with pytest.raises(sd.DeltaFileError, match=r"head.weight \(1000, 1000\) has no match in this model \(\(3, 6\)\)"):
        sd.load(FixtureNet(), file)


# -- half-precision bases; training a loaded delta ------------------------------------------------------
def test_half_precision_base(tmp_path):
    float32_delta = sd.save(attach_fixture_delta(FixtureNet(), "int32"), tmp_path / "f32")
    with pytest.raises(sd.DeltaFileError, match="dtype mismatch for embed.weight: .*float32 base, this model holds bfloat16"):
        sd.load(FixtureNet().to(torch.bfloat16), float32_delta)
    for dtype in (torch.bfloat16, torch.float16):
        trained = attach_fixture_delta(FixtureNet().to(dtype), "int32")
        file = sd.save(trained, tmp_path / str(dtype))
        assert sd.read(file)[0]["fingerprint"]["proj.weight"]["dtype"] == str(dtype).removeprefix("torch.")
        loaded = sd.load(FixtureNet().to(dtype), file)
        assert same_bits(bits(loaded), bits(trained))
        assert loaded.proj.weight.dtype == dtype and sd.state_of(loaded).adapters["default"].deltas[
            "proj.weight"
        ].values.dtype == torch.float32  # trained in float32 over a half-precision base


def test_load_trainable_then_train(saved):
    file, _ = saved
    model = sd.load(FixtureNet(), file, trainable=True)
    params = sd.trainable_parameters(model)
    assert params and all(p.requires_grad for p in params)
    assert not model.proj.weight.requires_grad  # the base stays frozen
    ids, labels = torch.tensor([[1, 5, 6, 9], [2, 3, 4, 0]]), torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(params, lr=0.05)
    losses = []
    for _ in range(5):
        loss = loss_fn(model(ids).reshape(-1, 3), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    model(ids)  # the next forward writes the last step into the weights
    with torch.no_grad():  # the weights follow the trained values
        delta = sd.state_of(model).adapters["default"].deltas["proj.weight"]
        assert torch.equal(model.proj.weight.reshape(-1)[delta.indices], delta.base + delta.values)


@pytest.mark.parametrize(
    "config",
    [
        sd.DeltaConfig(target_modules=["proj"], modules_to_save=["head"]),
        sd.SaRAConfig(density=0.1, per_tensor=True, reselect_step=3, target_modules=r".*proj"),
        sd.DiffPruningConfig(count=5, structured=True, group_size=4, left=-2),
        sd.RandomConfig(density=1, seed=3, parameter_kinds=("bias", "norm")),
        sd.MagnitudeConfig(exclude_modules=["embed"]),
    ],
)
def test_every_method_config_round_trips_through_the_type_checks(config):
    again = sd.DeltaConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert type(again) is type(config) and again == config
