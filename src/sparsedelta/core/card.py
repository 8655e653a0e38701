"""A short README.md model card beside a saved delta, so a shared folder (or hub repository) says
what it is: the base model and its fingerprint, the method and its settings, its size, how to load
it, and any extra sections the caller gives (data, metrics, ...).

The card is written by `sparsedelta.save`; a README.md that sparsedelta did not write is left alone.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

from torch import nn

from .atomic import atomic_write
from .remote import HUB_ID

CARD_FILE = "README.md"
MARKER = "library_name: sparsedelta"  # in the front matter: the card is ours and may be rewritten


def fingerprint_digest(fingerprint: dict) -> str:
    """One sha256 over a delta's base fingerprint (shape, dtype, count and hash of θ at the stored
    positions, per tensor): equal digests mean the same positions on the same base values."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_card(
    directory: Path, metadata: dict[str, str], file_size: int, model: nn.Module | None = None, card: dict | None = None
):
    """Write `directory`/README.md for the delta whose safetensors `metadata` was just saved there.

    Args:
        directory: the delta's folder.
        metadata: the delta file's metadata (JSON strings for config and fingerprint).
        file_size: the delta file's size in bytes.
        model: the model the delta was saved from; its `name_or_path` (Hugging Face models) names the base.
        card: extra sections, title -> text, dict (a two-column table) or list (bullets). The key
            "base_model" instead overrides the base model's name.

    Returns:
        The card's path, or None when a README.md not written by sparsedelta is already there.
    """
    path = Path(directory) / CARD_FILE
    if path.exists() and MARKER not in path.read_text(errors="replace")[:500]:
        return None
    text = render_card(metadata, file_size, model, card, Path(directory).name)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def render_card(
    metadata: dict[str, str], file_size: int, model: nn.Module | None, card: dict | None, folder_name: str
) -> str:
    card = dict(card or {})
    config = json.loads(metadata["config"])
    fingerprint = json.loads(metadata["fingerprint"])
    saved = json.loads(metadata.get("saved_tensors", "[]"))
    base = card.pop("base_model", None) or (getattr(model, "name_or_path", None) if model is not None else None)
    method = config.get("method", "custom")
    entries = sum(fp["entries"] for fp in fingerprint.values())
    targeted = sum(math.prod(fp["shape"]) for fp in fingerprint.values())

    front = ["---", MARKER, "tags:", "- sparsedelta", f"- {method}"]
    if base and (match := HUB_ID.fullmatch(str(base))) and match["revision"] is None:
        front.append(f"base_model: {base}")
    lines = [*front, "---", "", f"# A sparse delta ({method}) over {base or 'its base model'}", ""]
    lines += _table(
        {
            "base model": f"`{base}`" if base else "not recorded (pass card={'base_model': ...} to save)",
            "base fingerprint (sha256)": f"`{fingerprint_digest(fingerprint)}`",
            "method": method,
            "delta entries": f"{entries:,} in {len(fingerprint)} tensors ({entries / max(targeted, 1):.3%} of their entries)",
            "densely trained tensors": ", ".join(f"`{n}`" for n in saved) or "none",
            "file": f"`delta.safetensors`, {_size(file_size)} ({metadata.get('values_dtype', 'float32')} "
            f"values, {metadata.get('index_encoding', 'int32')} positions)",
        }
    )
    settings = {k: v for k, v in config.items() if k != "method" and v is not None}
    lines += ["", "## Settings", "", *_table({k: f"`{json.dumps(v)}`" for k, v in settings.items()})]
    lines += ["", "## How to load it", "", "```python", *_load_snippet(model, base, folder_name), "```", ""]
    lines += [
        "The base fingerprint makes `sparsedelta.load` refuse any other base model. A PEFT user can export it "
        "as a SHiRA adapter: `sparsedelta export FOLDER --model BASE --output shira/` (or "
        "`sparsedelta.interop.export_shira`).",
        "",
    ]
    for title, body in card.items():
        lines += [f"## {title}", "", *_section(body), ""]
    return "\n".join(lines)


# PEFT's task_type by the head a transformers model class ends in: AutoPeftModelFor* needs it
PEFT_TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
                   "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
                   "ForSeq2SeqLM": "SEQ_2_SEQ_LM", "ForConditionalGeneration": "SEQ_2_SEQ_LM"}  # fmt: skip


def peft_task_type(model: nn.Module) -> str | None:
    """The task_type a PEFT adapter of `model` records (None for a bare encoder or a non-HF model)."""
    name = type(model).__name__
    return next((task for suffix, task in PEFT_TASK_TYPES.items() if name.endswith(suffix)), None)


def _load_snippet(model: nn.Module | None, base: str | None, folder_name: str) -> list[str]:
    kind = type(model) if model is not None else None
    name = repr(base or "BASE_MODEL")
    if kind is not None and kind.__module__.startswith("transformers"):
        labels = getattr(getattr(model, "config", None), "num_labels", None)
        extra = f", num_labels={labels}" if labels and kind.__name__.endswith("Classification") else ""
        first = f"model = transformers.{kind.__name__}.from_pretrained({name}{extra})"
        return ["import sparsedelta, transformers", first, f"sparsedelta.load(model, {folder_name!r})  # or its hub id"]
    return ["import sparsedelta", f"model = ...  # the base model {name}", f"sparsedelta.load(model, {folder_name!r})"]


def _section(body) -> list[str]:
    if isinstance(body, dict):
        return _table({str(k): _cell(v) for k, v in body.items()})
    if isinstance(body, list | tuple):
        return [f"- {_cell(item)}" for item in body]
    return [str(body)]


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: dict[str, str]) -> list[str]:
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows.items())]



def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
