"""Seeded mutation fuzzing of delta files.

Valid delta files of a tiny model (both index encodings, float32/float16/bfloat16 values, with and
without a saved head) are damaged or edited: truncations, bit flips, header edits, metadata JSON
edits, reordered, repeated or unsorted positions, non-finite values; half of the edits are then
re-checksummed, as another writer would produce them. Each case loads the result onto a fresh base
(half of them with another adapter attached and active). A case passes if the load raises
`DeltaFileError` and leaves the model exactly as it was (weights and buffers bit for bit, adapters,
requires_grad, forwards), or loads exactly what the original file loads. Anything else (another
exception, a changed model after a refusal, other weights) is a failure.

    python bench/fuzz_delta_files.py --cases 50000 [--seed 0]

Prints the count of each outcome per mutation family; exits 1 if any case failed. The test suite runs
2,000 cases of the same loop (tests/test_fuzz_delta_files.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

import sparsedelta as sd
from sparsedelta.core.encoding import decode, encode
from sparsedelta.core.fileformat import CHECKSUM_KEY, checksum

VARIANTS = [(enc, dtype, head) for enc in ("int32", "elias-fano") for dtype in ("float32", "float16", "bfloat16")
            for head in (False, True)]
REFUSED, LOADED = "refused", "loaded the original delta"


class FuzzNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 4)
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)


def base_model() -> nn.Module:
    torch.manual_seed(0)
    return FuzzNet()


def _randomize(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sd.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def fresh_model(with_other: bool, other_saves_head: bool) -> nn.Module:
    """The base, optionally with another trained adapter attached, merged and active (training the
    head densely where the file does too: a delta cannot go on a tensor another adapter trains densely)."""
    model = base_model()
    if with_other:
        config = sd.RandomConfig(
            density=0.25, seed=7, parameter_kinds=("weight", "bias"), modules_to_save=["head"] if other_saves_head else None
        )
        sd.prepare(model, config, adapter_name="other")
        _randomize(model, 8)
    return model


def make_file(encoding: str, dtype: str, head: bool, folder: Path) -> bytes:
    model = base_model()
    config = sd.RandomConfig(
        density=0.3, seed=1, parameter_kinds=("weight", "bias", "embedding"), modules_to_save=["head"] if head else None
    )
    sd.prepare(model, config)
    _randomize(model, 2)
    return sd.save(model, folder, dtype=dtype, index_encoding=encoding).read_bytes()


# -- what a model looks like, bit for bit -----------------------------------------------------------
def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def snapshot(model: nn.Module):
    state = getattr(model, "_sparsedelta", None)
    return (
        {k: (v.dtype, tuple(v.shape), _bits(v).clone()) for k, v in model.state_dict().items()},
        {k: p.requires_grad for k, p in model.named_parameters(remove_duplicate=False)},
        sorted(n for n, m in model.named_modules() if "forward" in m.__dict__),
        None if state is None else (sorted(state.adapters), state.active, state.merged),
    )


def same(a, b) -> bool:
    tensors_a, *rest_a = a
    tensors_b, *rest_b = b
    if rest_a != rest_b or tensors_a.keys() != tensors_b.keys():
        return False
    return all(
        x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2])
        for x, y in ((tensors_a[k], tensors_b[k]) for k in tensors_a)
    )


# -- the file's parts ---------------------------------------------------------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def rechecksum(data: bytes) -> bytes:
    """What a writer that computes the checksum correctly would store for this content; the bytes
    unchanged where safetensors cannot parse them."""
    try:
        header, _ = split(data)
        metadata = dict(header["__metadata__"])
        tensors = st_load(data)
        metadata[CHECKSUM_KEY] = checksum(metadata, tensors)
        return st_save(tensors, metadata)
    except Exception:
        return data


def _tensors(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    return dict(split(data)[0]["__metadata__"]), st_load(data)


# -- mutations: each returns new bytes, or None where it does not apply -------------------------------
def truncate(rng: random.Random, data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    cut = rng.choice([rng.randrange(0, 8 + n), rng.randrange(8 + n, len(data)), len(data) - rng.randint(1, 8)])
    return data[:cut]


def bitflip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def bitflip_body(rng: random.Random, data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(8 + n, len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def header_bytes(rng: random.Random, data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    out = bytearray(data)
    if rng.random() < 0.2:  # the length prefix
        out[:8] = rng.choice([0, 1, n - 1, n + 8, len(data), 2**63 - 1, 2**64 - 1]).to_bytes(8, "little")
        return bytes(out)
    for _ in range(rng.randint(1, 3)):
        out[8 + rng.randrange(n)] = rng.choice(b'{}[]",:0123456789.-eE tfnaxyz\\')
    return bytes(out)


SWAPS = {"F16": "BF16", "BF16": "F16", "F32": "I32", "I32": "F32", "I64": "F64", "F64": "I64", "U8": "I8"}


def header_dtype(rng: random.Random, data: bytes) -> bytes:
    header, body = split(data)
    name = rng.choice([k for k in header if k != "__metadata__"])
    header[name]["dtype"] = SWAPS.get(header[name]["dtype"], "F32")
    return join(header, body)


def header_shape(rng: random.Random, data: bytes) -> bytes:
    header, body = split(data)
    name = rng.choice([k for k in header if k != "__metadata__"])
    shape = header[name]["shape"]
    numel = 1
    for s in shape:
        numel *= s
    options = [[numel, 1], [1, numel], [], [numel], [numel * 2], [max(0, numel - 1)]]
    options += [[numel // d, d] for d in (2, 3, 4) if numel % d == 0]
    header[name]["shape"] = rng.choice([o for o in options if o != shape] or [[numel + 1]])
    return join(header, body)


def header_names(rng: random.Random, data: bytes) -> bytes:
    header, body = split(data)
    names = [k for k in header if k != "__metadata__"]
    a, b = rng.sample(names, 2)
    kind = lambda n: (header[n]["dtype"], header[n]["shape"])  # noqa: E731
    if rng.random() < 0.5:  # swap two tensors' names (two alike would be another valid delta, not damage)
        if kind(a) == kind(b):
            return None
        header[a], header[b] = header[b], header[a]
    else:  # rename one
        header[a + rng.choice(["x", ".values", ".indices"]) if rng.random() < 0.5 else b.upper()] = header.pop(a)
    return join(header, body)


# metadata JSON edits: walk into a field's JSON, pick a node, change it
ODD_VALUES = [None, 0, -1, 1, 2**40, 1.5, -0.0, "", "x", "float16", "I32", [], {}, [1, 2], {"a": 1}, True, False]
RAW_TEXT = ["1" * 5000, "[" * 100000 + "]" * 100000, "1e999", "NaN", "-Infinity", '"' + "a" * 2_000_000 + '"',
            "[" + ",".join(["1"] * 200_000) + "]", "9" * 300]
PLACEHOLDER = "\u0000placeholder\u0000"


def _nodes(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _nodes(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _nodes(v, (*path, i))


def _edit_metadata(rng: random.Random, data: bytes, edit) -> bytes | None:
    header, body = split(data)
    meta = header["__metadata__"]
    key = rng.choice(sorted(meta))
    try:
        value = json.loads(meta[key])
        is_json = True
    except ValueError:
        value, is_json = meta[key], False
    paths = list(_nodes(value))
    path = rng.choice(paths)
    result = edit(rng, value, path)
    if result is None:
        return None
    new_value, raw = result
    if path == () and not is_json and not raw:
        text = new_value if isinstance(new_value, str) else json.dumps(new_value)
    else:
        text = json.dumps(new_value)
        if raw is not None:
            text = text.replace(json.dumps(PLACEHOLDER), raw)
    if text == meta[key]:
        return None
    meta[key] = text
    return join(header, body)


def _set(value, path, new):
    if not path:
        return new
    target = value
    for p in path[:-1]:
        target = target[p]
    target[path[-1]] = new
    return value


def meta_delete(rng: random.Random, data: bytes) -> bytes | None:
    if rng.random() < 0.3:  # a whole metadata field
        header, body = split(data)
        del header["__metadata__"][rng.choice(sorted(header["__metadata__"]))]
        return join(header, body)

    def edit(rng, value, path):
        if not path:
            return None
        target = value
        for p in path[:-1]:
            target = target[p]
        del target[path[-1]]
        return value, None

    return _edit_metadata(rng, data, edit)


def meta_retype(rng: random.Random, data: bytes) -> bytes | None:
    def edit(rng, value, path):
        if rng.random() < 0.25:
            return _set(value, path, PLACEHOLDER), rng.choice(RAW_TEXT)
        return _set(value, path, rng.choice(ODD_VALUES)), None

    return _edit_metadata(rng, data, edit)


STRINGS = ["1", "2", "3", "float32", "float16", "bfloat16", "int32", "elias-fano", "sara", "random", "diff-pruning",
           "magnitude", "custom", "weight", "bias", "embedding", "norm", "head", "proj", "embed", "proj.weight",
           "embed.weight", "head.weight", "head.bias", "proj.bias"]


def meta_renumber(rng: random.Random, data: bytes) -> bytes | None:
    def edit(rng, value, path):
        old = value
        for p in path:
            old = old[p]
        if isinstance(old, bool):
            new = not old
        elif isinstance(old, int):
            new = rng.choice([old + 1, old - 1, old * 2, 0, -old])
        elif isinstance(old, float):
            new = rng.choice([old * 2, -old, 0.0, old + 1])
        elif isinstance(old, str):
            if len(old) == 64:  # a hash: change one hex digit
                i = rng.randrange(64)
                new = old[:i] + ("0" if old[i] != "0" else "1") + old[i + 1 :]
            else:
                new = rng.choice(STRINGS)
        elif isinstance(old, list):
            new = rng.choice([old[::-1], old[1:], [*old, *old[:1]], [*old, "head"]]) if old else ["head"]
        elif isinstance(old, dict) and old:  # rename a key
            k = rng.choice(list(old))
            new = {(rng.choice(STRINGS) if kk == k else kk): vv for kk, vv in old.items()}
        else:
            return None
        return _set(value, path, new), None

    return _edit_metadata(rng, data, edit)


def _delta_names(meta: dict) -> list[str]:
    return list(json.loads(meta["fingerprint"]))


def _positions(meta: dict, tensors: dict, name: str) -> torch.Tensor:
    fp = json.loads(meta["fingerprint"])[name]
    stored = tensors[f"{name}.indices"]
    if meta["index_encoding"] == "elias-fano":
        n = 1
        for s in fp["shape"]:
            n *= s
        return decode(stored, n, fp["entries"])
    return stored.long()


def _store_positions(meta: dict, tensors: dict, name: str, positions: torch.Tensor) -> None:
    fp = json.loads(meta["fingerprint"])[name]
    if meta["index_encoding"] == "elias-fano":
        n = 1
        for s in fp["shape"]:
            n *= s
        tensors[f"{name}.indices"] = encode(positions, n)  # whatever code this gives for bad positions
    else:
        tensors[f"{name}.indices"] = positions.to(tensors[f"{name}.indices"].dtype)


def _edit_positions(rng: random.Random, data: bytes, edit) -> bytes | None:
    meta, tensors = _tensors(data)
    names = [n for n in _delta_names(meta) if len(tensors[f"{n}.values"]) >= 2]
    name = rng.choice(names)
    positions, values = _positions(meta, tensors, name).clone(), tensors[f"{name}.values"].clone()
    original = positions.clone()
    if edit(rng, positions, values) is None or torch.equal(positions, original):
        return None
    try:
        _store_positions(meta, tensors, name, positions)
    except (IndexError, ValueError):  # the encoder cannot write such positions
        return None
    tensors[f"{name}.values"] = values
    return st_save(tensors, meta)


def positions_reorder(rng: random.Random, data: bytes) -> bytes | None:
    def edit(rng, positions, values):  # two entries swapped, each keeping its value
        i, j = rng.sample(range(len(positions)), 2)
        positions[[i, j]] = positions[[j, i]]
        values[[i, j]] = values[[j, i]]
        return True

    return _edit_positions(rng, data, edit)


def positions_duplicate(rng: random.Random, data: bytes) -> bytes | None:
    def edit(rng, positions, values):
        i = rng.randrange(len(positions) - 1)
        positions[i + 1] = positions[i]
        return True

    return _edit_positions(rng, data, edit)


def positions_unsorted(rng: random.Random, data: bytes) -> bytes | None:
    def edit(rng, positions, values):  # positions moved, values left where they were
        order = torch.randperm(len(positions), generator=torch.Generator().manual_seed(rng.randrange(2**31)))
        if torch.equal(order, torch.arange(len(positions))):
            return None
        positions[:] = positions[order].clone()
        return True

    return _edit_positions(rng, data, edit)


def positions_shift(rng: random.Random, data: bytes) -> bytes | None:
    def edit(rng, positions, values):  # one position moved to another, possibly still sorted
        i = rng.randrange(len(positions))
        positions[i] = rng.choice([positions[i] + 1, positions[i] - 1, -1, 0, 10**6, 2**31 - 1])
        return True

    return _edit_positions(rng, data, edit)


def ef_payload(rng: random.Random, data: bytes) -> bytes | None:
    meta, tensors = _tensors(data)
    names = [f"{n}.indices" for n in _delta_names(meta)]
    name = rng.choice(names)
    t = tensors[name].clone()
    flat = t.view(torch.uint8)
    i = rng.randrange(len(flat))
    flat[i] ^= 1 << rng.randrange(8)
    tensors[name] = t
    return st_save(tensors, meta)


def values_nonfinite(rng: random.Random, data: bytes) -> bytes | None:
    meta, tensors = _tensors(data)
    name = rng.choice([k for k, t in tensors.items() if t.is_floating_point() and t.numel()])
    t = tensors[name].clone()
    t.view(-1)[rng.randrange(t.numel())] = rng.choice([float("nan"), float("inf"), float("-inf")])
    tensors[name] = t
    return st_save(tensors, meta)


# family -> (mutation, whether re-checksummed variants are made too)
FAMILIES = {
    "truncate": (truncate, False),
    "bit flips": (bitflip, False),
    "bit flips in tensor data": (bitflip_body, False),
    "header bytes": (header_bytes, False),
    "header dtype swap": (header_dtype, True),
    "header shape": (header_shape, True),
    "header tensor names": (header_names, True),
    "metadata delete": (meta_delete, True),
    "metadata retype": (meta_retype, True),
    "metadata renumber": (meta_renumber, True),
    "positions reordered with values": (positions_reorder, True),
    "positions duplicated": (positions_duplicate, True),
    "positions unsorted": (positions_unsorted, True),
    "position moved": (positions_shift, True),
    "index payload bit flip": (ef_payload, True),
    "non-finite values": (values_nonfinite, True),
}


@dataclass
class Fuzzer:
    folder: Path
    files: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)
    counts: collections.Counter = field(default_factory=collections.Counter)
    failures: list = field(default_factory=list)

    def __post_init__(self):
        for i, variant in enumerate(VARIANTS):
            self.files[variant] = make_file(*variant, self.folder / f"v{i}")
            for with_other in (False, True):
                model = fresh_model(with_other, variant[2])
                sd.load(model, self.folder / f"v{i}", adapter_name="loaded")
                self.references[variant, with_other] = snapshot(model)
        self.case_file = self.folder / "case.safetensors"

    def mutate(self, rng: random.Random, data: bytes) -> tuple[str, bytes]:
        while True:
            family = rng.choice(list(FAMILIES))
            mutation, can_rechecksum = FAMILIES[family]
            out = mutation(rng, data)
            if out is None or out == data:
                continue
            if can_rechecksum and rng.random() < 0.5:
                out, family = rechecksum(out), f"{family} (re-checksummed)"
            return family, out

    def run_case(self, rng: random.Random) -> None:
        variant = rng.choice(VARIANTS)
        with_other = rng.random() < 0.5
        family, data = self.mutate(rng, self.files[variant])
        self.case_file.write_bytes(data)
        model = fresh_model(with_other, variant[2])
        before = snapshot(model)
        detail = ""
        try:
            sd.load(model, self.case_file, adapter_name="loaded")
        except sd.DeltaFileError:
            outcome = REFUSED if same(snapshot(model), before) else "FAIL: model changed by a refused load"
        except Exception as e:  # noqa: BLE001 - any other exception is what the fuzzer looks for
            outcome, detail = f"FAIL: {type(e).__name__}", str(e)[:300]
        else:
            outcome = LOADED if same(snapshot(model), self.references[variant, with_other]) else "FAIL: other weights"
        if outcome.startswith("FAIL") and len(self.failures) < 100:
            self.failures.append((family, variant, f"{outcome} {detail}", data))
        self.counts[family, outcome] += 1

    def run(self, cases: int, seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(cases):
            self.run_case(rng)

    def table(self) -> str:
        families = sorted({f for f, _ in self.counts}, key=lambda f: (f.replace(" (re-checksummed)", ""), f))
        outcomes = sorted({o for _, o in self.counts}, key=lambda o: (o.startswith("FAIL"), o != REFUSED, o))
        width = max(len(f) for f in families)
        lines = [f"{'mutation family':<{width}}  " + "  ".join(f"{o:>12}" for o in outcomes)]
        for f in families:
            lines.append(f"{f:<{width}}  " + "  ".join(f"{self.counts[f, o]:>12,}" for o in outcomes))
        lines.append(f"{'all':<{width}}  " + "  ".join(f"{sum(self.counts[f, o] for f in families):>12,}" for o in outcomes))
        return "\n".join(lines)

    @property
    def failed(self) -> int:
        return sum(n for (_, o), n in self.counts.items() if o.startswith("FAIL"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        fuzzer = Fuzzer(Path(tmp))
        fuzzer.run(args.cases, args.seed)
    print(fuzzer.table())
    print(f"\n{args.cases:,} cases (seed {args.seed}) in {time.perf_counter() - start:.0f} s; {fuzzer.failed} failed")
    for family, variant, what, _ in fuzzer.failures[:10]:
        print(f"  {family} on {variant}: {what}")
    return 1 if fuzzer.failed else 0


if __name__ == "__main__":
    sys.exit(main())
