"""What a delta file must be: its metadata schema, its checksum, and the checks on its tensors.

Delta files come from other people and other tools, so nothing in one is trusted: every field is
type-checked, every tensor must be listed by the metadata with the dtype and shape the metadata
implies, positions must be sorted, distinct and in range, and values finite. A checksum over a
canonical form of the whole file (all metadata, every tensor's name, dtype, shape and bytes) catches
damage; the checks catch files that are consistent but wrong (another writer's bugs). Every failure is
a `DeltaFileError` naming the field or tensor. See docs/file-format.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass

import torch

from .config import DeltaConfig
from .encoding import decode, encoded_bytes

FORMAT = "sparsedelta"
FORMAT_VERSION = 2  # 2: the checksum covers metadata, dtypes and shapes (1: names and bytes only)
INDEX_ENCODINGS = ("int32", "elias-fano")
VALUE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHECKSUM_KEY = "content_sha256"
JSON_FIELDS = ("config", "fingerprint", "saved_tensors")

# The dtypes a delta file may hold, by their safetensors names: positions, values, dense tensors.
FILE_DTYPES = {
    "I32": torch.int32,
    "I64": torch.int64,
    "U8": torch.uint8,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
BASE_DTYPES = ("float16", "bfloat16", "float32", "float64", "int8", "nf4", "fp4")  # the last: quantized bases
MAX_NUMEL = 2**62  # positions are int64
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK_BYTES = 1 << 22


class DeltaFileError(ValueError):
    """A delta file that cannot be used: damaged, of another format, or for another base model."""


@dataclass(frozen=True)
class Fingerprint:
    """One delta tensor as the metadata describes it: the base tensor's shape and dtype, the number
    of entries, and the sha256 of θ's bytes at the stored positions."""

    shape: tuple[int, ...]
    dtype: str
    entries: int
    sha256: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Layout:
    """A delta file's parsed, checked metadata; no tensor has been read yet."""

    version: int
    config: DeltaConfig
    config_dict: dict  # as stored
    fingerprint: dict[str, Fingerprint]
    saved: list[str]  # densely trained tensors, by parameter path
    values_dtype: str
    index_encoding: str
    checksum: str
    metadata: dict[str, str]  # as stored
    header: dict[str, tuple[str, list[int]]]  # every stored tensor's safetensors dtype and shape

    def parsed_metadata(self) -> dict:
        """The metadata with its JSON fields parsed (what `read` returns)."""
        meta = dict(self.metadata)
        meta["config"] = self.config_dict
        meta["fingerprint"] = {
            n: {"shape": list(f.shape), "dtype": f.dtype, "entries": f.entries, "sha256": f.sha256}
            for n, f in self.fingerprint.items()
        }
        meta["saved_tensors"] = list(self.saved)
        meta["index_encoding"] = self.index_encoding
        return meta


# -- hashing, without copying what is hashed ---------------------------------------------------------
def _hash_into(h, t: torch.Tensor) -> None:
    """Feed a tensor's raw bytes to `h`: a contiguous CPU tensor is read in place, anything else
    (another device, a strided view) is copied a chunk at a time."""
    t = t.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    if t.device.type == "cpu" and t.is_contiguous():
        parts = [t]
    else:
        row_bytes = max(1, t[0].numel() * t.element_size()) if len(t) else 1
        parts = t.split(max(1, _CHUNK_BYTES // row_bytes))
    for part in parts:
        h.update(part.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def tensor_hash(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (in memory order); the base fingerprint of a delta tensor."""
    h = hashlib.sha256()
    _hash_into(h, t)
    return h.hexdigest()


def checksum(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """Format 2's checksum: sha256 of a canonical JSON of all metadata (but the checksum) and of each
    tensor's name, dtype and shape, followed by every tensor's bytes in name order."""
    described = {
        "metadata": {k: v for k, v in metadata.items() if k != CHECKSUM_KEY},
        "tensors": {n: [str(t.dtype).removeprefix("torch."), list(t.shape)] for n, t in tensors.items()},
    }
    text = json.dumps(described, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    h = hashlib.sha256(len(text).to_bytes(8, "little") + text)
    for name in sorted(tensors):
        _hash_into(h, tensors[name])
    return h.hexdigest()


def checksum_v1(tensors: dict[str, torch.Tensor]) -> str:
    """Format 1's checksum: names and bytes only."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensor_hash(tensors[name]).encode())
    return h.hexdigest()


# -- the metadata ------------------------------------------------------------------------------------
def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _parse_json(key: str, text: str, limit: int):
    if len(text) > limit:
        raise DeltaFileError(f"metadata field {key!r} is {len(text):,} characters, more than such a file needs ({limit:,})")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:  # bad JSON, NaN, integers beyond Python's digit limit, deep nesting
        raise DeltaFileError(f"metadata field {key!r} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _is_int(v, low: int = 0, high: int = MAX_NUMEL) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _fingerprint_entry(name, entry) -> Fingerprint:
    where = f"fingerprint entry {name!r}"
    if not isinstance(entry, dict):
        raise DeltaFileError(f"{where} is a {type(entry).__name__}, not an object with shape, dtype, entries, sha256")
    missing = [k for k in ("shape", "dtype", "entries", "sha256") if k not in entry]
    if missing:
        raise DeltaFileError(f"{where} lacks {missing}")
    shape, dtype, entries, sha = entry["shape"], entry["dtype"], entry["entries"], entry["sha256"]
    if not isinstance(shape, list) or len(shape) > 16 or not all(_is_int(s) for s in shape):
        raise DeltaFileError(f"{where} has shape {str(shape)[:100]}, not a list of at most 16 sizes")
    if math.prod(shape) > MAX_NUMEL:
        raise DeltaFileError(f"{where} has shape {shape}, too many entries for one tensor")
    if dtype not in BASE_DTYPES:
        raise DeltaFileError(f"{where} has base dtype {str(dtype)[:40]!r}; a base tensor is one of {list(BASE_DTYPES)}")
    if not _is_int(entries, 0, math.prod(shape)):
        raise DeltaFileError(f"{where} has {str(entries)[:40]} entries, not a count in [0, {math.prod(shape)}]")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise DeltaFileError(f"{where} has sha256 {str(sha)[:80]!r}, not 64 lowercase hex digits")
    return Fingerprint(tuple(shape), dtype, entries, sha)


def parse_layout(metadata: dict[str, str] | None, header: dict[str, tuple[str, list[int]]], source: str) -> Layout:
    """Check a delta file's metadata against itself and against its tensors' header entries
    (name -> (safetensors dtype, shape)), before any tensor is read.

    Args:
        metadata: the safetensors metadata (strings only).
        header: every stored tensor's dtype name and shape.
        source: the file, for messages.
    Returns:
        The parsed Layout. Raises DeltaFileError naming the field or tensor that is wrong."""
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        raise DeltaFileError(f"{source} is not a sparsedelta file (format={str(metadata.get('format'))[:40]!r})")
    version = metadata.get("format_version")
    if version not in ("1", str(FORMAT_VERSION)):
        raise DeltaFileError(
            f"{source} has format version {str(version)[:20]}, this sparsedelta reads versions 1 to {FORMAT_VERSION}; "
            "upgrade sparsedelta (or re-save the delta with this version)"
        )
    if version == "1":
        metadata = {"index_encoding": "int32", **metadata}  # format 1 readers took a missing encoding as int32
    missing = [k for k in (*JSON_FIELDS, "values_dtype", "index_encoding", CHECKSUM_KEY) if k not in metadata]
    if missing:
        raise DeltaFileError(f"{source} lacks metadata fields {missing}; the file is incomplete")
    limit = (1 << 16) + 2048 * len(header)  # generous for any real file, bounded for a hostile one
    config = _parse_json("config", metadata["config"], 1 << 20)
    fingerprint = _parse_json("fingerprint", metadata["fingerprint"], limit)
    saved = _parse_json("saved_tensors", metadata["saved_tensors"], limit)
    try:
        config_dict, config = config, DeltaConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise DeltaFileError(f"{source} has an unusable method config: {e}") from None
    if not isinstance(fingerprint, dict):
        raise DeltaFileError(f"{source}: metadata field 'fingerprint' is a {type(fingerprint).__name__}, not an object")
    fingerprint = {name: _fingerprint_entry(name, entry) for name, entry in fingerprint.items()}
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved) or len(set(saved)) != len(saved):
        raise DeltaFileError(f"{source}: metadata field 'saved_tensors' is not a list of distinct tensor names")
    values_dtype, encoding, check = metadata["values_dtype"], metadata["index_encoding"], metadata[CHECKSUM_KEY]
    if values_dtype not in VALUE_DTYPES:
        raise DeltaFileError(f"{source} has values dtype {values_dtype[:40]!r}; this sparsedelta reads {list(VALUE_DTYPES)}")
    if encoding not in INDEX_ENCODINGS:
        raise DeltaFileError(f"{source} uses index encoding {encoding[:40]!r}; this sparsedelta reads {list(INDEX_ENCODINGS)}")
    if not _SHA256.fullmatch(check):
        raise DeltaFileError(f"{source} has checksum {check[:80]!r}, not 64 lowercase hex digits")
    layout = Layout(int(version), config, config_dict, fingerprint, saved, values_dtype, encoding, check, dict(metadata), header)
    _check_header(layout, header, source)
    return layout


def _expected(layout: Layout) -> dict[str, tuple[tuple[str, ...], list[int] | None]]:
    """Each tensor the metadata implies: name -> (allowed safetensors dtypes, shape or None for any)."""
    value_dtype = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[layout.values_dtype]
    out: dict[str, tuple[tuple[str, ...], list[int] | None]] = {}
    for name, fp in layout.fingerprint.items():
        if layout.index_encoding == "elias-fano":
            out[f"{name}.indices"] = (("U8",), [encoded_bytes(fp.numel, fp.entries)])
        else:
            out[f"{name}.indices"] = (("I32", "I64") if fp.numel <= 2**31 else ("I64",), [fp.entries])
        out[f"{name}.values"] = ((value_dtype,), [fp.entries])
    for name in layout.saved:
        out[name] = (("F16", "BF16", "F32", "F64"), None)
    return out


def _check_header(layout: Layout, header: dict[str, tuple[str, list[int]]], source: str) -> None:
    expected = _expected(layout)
    if len(expected) != 2 * len(layout.fingerprint) + len(layout.saved):
        raise DeltaFileError(f"{source} names a tensor twice (a densely trained tensor named like a delta's part)")
    missing = sorted(set(expected) - set(header))
    if missing:
        raise DeltaFileError(f"{source} lacks tensors {missing[:5]}{' …' if len(missing) > 5 else ''}; the file is incomplete")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise DeltaFileError(
            f"{source} holds tensors its metadata does not list: {extra[:5]}{' …' if len(extra) > 5 else ''}"
        )
    for name, (dtypes, shape) in expected.items():
        dtype, stored = header[name]
        if dtype not in dtypes:
            raise DeltaFileError(f"{source}: tensor {name} is stored as {dtype}; its metadata implies {' or '.join(dtypes)}")
        if shape is not None and list(stored) != shape:
            raise DeltaFileError(f"{source}: tensor {name} has shape {list(stored)}; its metadata implies {shape}")


# -- the tensors -------------------------------------------------------------------------------------
def verify_checksum(layout: Layout, tensors: dict[str, torch.Tensor], source: str) -> None:
    found = checksum(layout.metadata, tensors) if layout.version >= 2 else checksum_v1(tensors)
    if found != layout.checksum:
        raise DeltaFileError(f"{source} failed its checksum: its tensors or metadata were changed or damaged")


def positions_of(layout: Layout, name: str, stored: torch.Tensor, source: str) -> torch.Tensor:
    """The int64 positions of one delta tensor, refused unless sorted, distinct and in range."""
    fp = layout.fingerprint[name]
    if layout.index_encoding == "elias-fano":
        try:
            return decode(stored, fp.numel, fp.entries)
        except ValueError as e:
            raise DeltaFileError(f"{source}: positions of {name} are damaged: {e}") from None
    idx = stored.long()
    if len(idx) and (idx[0] < 0 or idx[-1] >= fp.numel):
        raise DeltaFileError(f"{source}: positions of {name} fall outside its {fp.numel} entries; the file is damaged")
    if len(idx) > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise DeltaFileError(
            f"{source}: positions of {name} are not sorted and distinct; a delta file stores each position once, "
            "in increasing order"
        )
    return idx


def check_finite(name: str, t: torch.Tensor, source: str) -> None:
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise DeltaFileError(
            f"{source}: tensor {name} holds {bad} NaN or infinite values; pass allow_nonfinite=True to load it anyway"
        )
