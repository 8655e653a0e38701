"""The peak tensor memory of a training step, per method, model, batch and precision: an estimate from
bytes per parameter (counted) and bytes per token of activations (measured), for
`sparsedelta estimate` and the table in docs/precision.md.

    peak = weights + state + max(activations, gradients + optimizer temporaries)

- weights: every base entry at the base's dtype (4 bytes, 2 for a bf16 base);
- state, per trainable entry: AdamW's two moments (8); a delta entry also keeps its value (4), its
  int64 position (8), θ there (the base's dtype), its CSR column (4) and the merged value (the
  base's dtype); a LoRA or dense-head entry its value (4);
- gradients: 4 per trainable entry, alive together at the optimizer step (sparse deltas: only k);
- optimizer temporaries: torch's AdamW on a CPU steps tensor by tensor (two temporaries the size of
  the largest trainable tensor), on a GPU all tensors at once (`foreach`: one copy of them all);
- activations: what the forward keeps for the backward, per token: per layer a multiple of the
  hidden and intermediate sizes, of heads x sequence length where the attention keeps its
  probabilities (eager attention, or attention dropout in training), and of the output's width
  (a causal LM's vocabulary: logits and their gradient). The multiples were fitted to measured
  steps of MiniLM-L6 and SmolLM2-135M (bench/memory_model.py, which also checks every estimate
  against its measurement), once per regime: float32, bf16/fp16 autocast over float32 weights, and
  a base stored in bf16/fp16 (its residual stream and norm inputs are 2-byte tensors where autocast
  over float32 weights keeps them in float32). Under autocast over float32 weights, layers that run
  as plain `F.linear` (all of them in full fine-tuning and LoRA; a delta method's untargeted ones,
  such as a causal LM's output head) also keep a 2-byte copy of each weight matrix for the
  backward; a delta's own linear function does not.

The estimate is of live tensors: what a GPU's allocator holds, to which CUDA adds its context
(~0.5 GiB) and fragmentation, and a CPU process its libraries (~0.5 GiB of RSS).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError

DELTA_METHODS = ("sara", "random", "magnitude", "diff-pruning-phase2", "spiel")
# SpIEL's first accumulation window (the largest): C = 5k candidates and the k entries, each an int64
# position and three float32 sums (methods/spiel/growth.py); and each layer's dense gradient in turn
SPIEL_WINDOW_BYTES_PER_ENTRY = 20 * (5 + 1)
METHODS = ("full", "lora", *DELTA_METHODS)
SHOWN = ("full", "lora", "sara")  # `estimate --method all`: every delta method costs what SaRA does at its k
PRECISIONS = ("fp32", "bf16", "fp16")
BASE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Bytes per entry of a linear weight quantized by `--base-quantization` (core/quantized.py): int8, one
# byte (its float32 row scale, 4 bytes per output row, is under 0.1% at these widths and left out); 4bit,
# half a byte of nf4 code, one 8-bit scale per block of 64 and one float32 scale per 256 blocks
# (QLoRA's double quantization).
QUANT_BYTES = {"int8": 1.0, "4bit": 0.5 + 1 / 64 + 4 / (64 * 256)}
# Activation bytes per token, fitted by bench/memory_model.py --fit (torch 2.13 CPU, transformers 5):
# per layer x hidden, per layer x intermediate, per layer x heads x seq (probabilities kept), per output width;
# by regime (`regime`).
ACTIVATION = {
    "fp32": (6.46, 17.56, 13.51, 17.66),
    "bf16": (4.81, 12.24, 13.76, 14.94),
    "bf16-base": (4.74, 12.1, 11.23, 14.64),
}


# Llama-architecture models by their public config.json: hidden, layers, intermediate, heads, kv heads,
# vocabulary, tied embeddings. `estimate(model="llama-3.1-8b")` needs no download.
REFERENCE = {
    "smollm2-135m": (576, 30, 1536, 9, 3, 49152, True),
    "smollm2-360m": (960, 32, 2560, 15, 5, 49152, True),
    "llama-3.2-1b": (2048, 16, 8192, 32, 8, 128256, True),
    "smollm2-1.7b": (2048, 24, 8192, 32, 32, 49152, True),
    "llama-3.2-3b": (3072, 28, 8192, 24, 8, 128256, True),
    "llama-3.1-8b": (4096, 32, 14336, 32, 8, 128256, False),
    "llama-2-13b": (5120, 40, 13824, 40, 40, 32000, False),
    "llama-3.1-70b": (8192, 80, 28672, 64, 8, 128256, False),
}


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: counts of entries and the sizes activations scale with."""

    name: str
    parameters: int  # every entry, tied tensors once
    largest: int  # entries of the largest tensor
    linear_weights: int  # entries of the weight matrices that run as linear layers (autocast copies)
    targeted: int  # entries a delta method targets by default
    lora_per_rank: int  # LoRA entries per unit of rank: sum of in + out over the adapted linear layers
    head: int  # entries of a new head trained densely (0 for a causal LM)
    largest_targeted: int  # entries of the largest targeted tensor
    widest_linear: int  # the largest in or out size of an adapted linear layer
    layers: int
    hidden: int
    intermediate: int
    heads: int
    output_width: int  # vocabulary (causal LM) or labels (classifier)
    keeps_attention_probs: bool
    untargeted_linear_weights: int = 0  # of linear_weights, those a delta method leaves as plain linear layers
    quantizable_linear_weights: int = 0  # of linear_weights, those --base-quantization quantizes (not the heads)


@dataclass
class Estimate:
    """Bytes of each part of the peak, and the peak."""

    shape: Shape
    method: str
    trainable: int
    weights: int
    state: int
    gradients: int
    optimizer_temporaries: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.state + max(self.activations, self.gradients + self.optimizer_temporaries)

    def as_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "shape"}
        return {"model": self.shape.name, **out, "total": self.total}


def shape_of(model: nn.Module, task: str, name: str = "") -> Shape:
    """The counts of an instantiated model (it may live on the meta device: nothing is read)."""
    from ..core.config import DeltaConfig
    from ..core.targeting import find_targets

    config = model.config
    params = {id(p): p for p in model.parameters()}.values()
    head_names = [] if task == "causal-lm" else ["classifier"]
    head = sum(p.numel() for n in head_names if hasattr(model, n) for p in getattr(model, n).parameters())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    output = model.get_output_embeddings() if task == "causal-lm" else None
    adapted = [m for n, m in linears if m is not output and not any(n.startswith(h) for h in head_names)]
    if task == "causal-lm":
        from ..models.causal_lm import default_targets

        targets = DeltaConfig(**default_targets(model))
    else:
        targets = DeltaConfig(modules_to_save=head_names or None)
    found, _ = find_targets(model, targets)
    targeted_ids = {id(t.param) for t in found.values()}
    dropout = max(getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0, getattr(config, "attention_dropout", 0.0) or 0.0)
    eager = getattr(config, "_attn_implementation", None) == "eager"
    return Shape(
        name=name or getattr(config, "name_or_path", "") or type(model).__name__,
        parameters=sum(p.numel() for p in params),
        largest=max(p.numel() for p in params),
        linear_weights=sum(m.weight.numel() for _, m in linears),
        targeted=sum(t.param.numel() for t in found.values()),
        lora_per_rank=sum(m.in_features + m.out_features for m in adapted),
        head=head,
        largest_targeted=max((t.param.numel() for t in found.values()), default=0),
        widest_linear=max((max(m.in_features, m.out_features) for m in adapted), default=0),
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=getattr(config, "intermediate_size", 4 * config.hidden_size),
        heads=config.num_attention_heads,
        output_width=config.vocab_size if task == "causal-lm" else getattr(config, "num_labels", 2),
        keeps_attention_probs=eager or dropout > 0,
        untargeted_linear_weights=sum(m.weight.numel() for _, m in linears if id(m.weight) not in targeted_ids),
        quantizable_linear_weights=sum(m.weight.numel() for m in adapted),
    )


def model_shape(model: str | None = None, task: str = "classification", num_labels: int = 5) -> Shape:
    """The Shape of a model folder or hub id (None: the task's embedded default; a REFERENCE name: that
    Llama-architecture causal LM), built on the meta device from its config alone."""
    from ..models.classifier import quiet_transformers, resolve_model

    transformers = quiet_transformers()
    if model is not None and str(model).lower() in REFERENCE:
        hidden, layers, intermediate, heads, kv_heads, vocab, tied = REFERENCE[str(model).lower()]
        config = transformers.LlamaConfig(
            hidden_size=hidden, num_hidden_layers=layers, intermediate_size=intermediate, num_attention_heads=heads,
            num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=tied,
        )  # fmt: skip
        return shape_from_config(config, "causal-lm", name=str(model).lower())
    if model is None and task == "causal-lm":
        from ..models.causal_lm import convert_gguf, default_gguf_path

        path = str(convert_gguf(default_gguf_path()))
    elif model is not None and str(model).endswith(".gguf"):
        from ..models.causal_lm import convert_gguf

        path = str(convert_gguf(model))
    else:
        path = resolve_model(model)
    config = transformers.AutoConfig.from_pretrained(path)
    return shape_from_config(config, task, num_labels, name=str(model) if model else path.rstrip("/").split("/")[-1])


def shape_from_config(config, task: str = "classification", num_labels: int = 5, name: str = "") -> Shape:
    """The Shape of a transformers config's model, built on the meta device."""
    from ..models.classifier import quiet_transformers

    transformers = quiet_transformers()
    with torch.device("meta"):
        if task == "causal-lm":
            model = transformers.AutoModelForCausalLM.from_config(config)
        else:
            config.num_labels = num_labels
            model = transformers.AutoModelForSequenceClassification.from_config(config)
    return shape_of(model, task, name)


def estimate(
    model: str | Shape | None = None,
    method: str = "sara",
    batch: int = 8,
    seq: int = 128,
    precision: str = "fp32",
    base_dtype: str = "float32",
    density: float = 0.01,
    lora_rank: int = 8,
    device: str = "cpu",
    task: str = "classification",
    base_quantization: str | None = None,
) -> Estimate:
    """The peak tensor memory of one training step.

    Args:
        model: a model folder or hub id, a Shape, or None (the task's embedded default).
        method: full, lora, or a delta method (sara, random, magnitude, diff-pruning-phase2, spiel: SaRA's
            cost plus its first accumulation window's candidate sums and one layer's dense gradient).
        batch, seq: examples per step and tokens per example.
        precision: fp32, or bf16 / fp16 (autocast over float32 weights).
        base_dtype: the frozen base's storage (float32, or bfloat16 / float16 for delta methods and LoRA).
        density: the delta's share of the targeted entries (delta methods).
        lora_rank: LoRA's r.
        device: "cpu" (AdamW steps tensor by tensor) or "cuda" (AdamW's foreach step).
        task: classification (a new dense head) or causal-lm.
        base_quantization: int8 or 4bit: the linear layers but the heads stored quantized
            (`QUANT_BYTES`), the rest in `base_dtype`; a delta over them is a correction (no merged
            copy of its entries; θ at them kept in float32), and one layer's dequantized weight and
            dense Δ live during its forward and backward.
    Returns:
        An Estimate: bytes per part and `.total`."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: the memory model covers {', '.join(METHODS)}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision}: choose one of {', '.join(PRECISIONS)}")
    if base_dtype not in BASE_BYTES:
        raise UsageError(f"--base-dtype {base_dtype}: choose one of {', '.join(BASE_BYTES)}")
    if method == "full" and base_dtype != "float32":
        raise UsageError("full fine-tuning trains the base itself: its weights stay float32 (--base-dtype float32)")
    if base_quantization is not None and base_quantization not in QUANT_BYTES:
        raise UsageError(f"--base-quantization {base_quantization}: choose one of {', '.join(QUANT_BYTES)}")
    if base_quantization and method not in ("lora", *DELTA_METHODS):
        raise UsageError(f"--method {method} trains float weights: over a quantized base only LoRA and delta methods train")
    shape = model if isinstance(model, Shape) else model_shape(model, task)
    base = BASE_BYTES[base_dtype]
    weights = shape.parameters * base
    if base_quantization:
        packed = shape.quantizable_linear_weights
        weights = round((shape.parameters - packed) * base + packed * QUANT_BYTES[base_quantization])
    if method == "full":
        trainable, largest = shape.parameters, shape.largest
        state = 8 * trainable
    elif method == "lora":
        trainable = lora_rank * shape.lora_per_rank + shape.head
        largest = max(shape.head, lora_rank * shape.widest_linear)
        state = 12 * trainable
    else:
        k = round(density * shape.targeted)
        trainable, largest = k + shape.head, max(shape.head, round(density * shape.largest_targeted))
        per_entry = 4 + 8 + 8 + 4 + 4 if base_quantization else 4 + 8 + 8 + base + 4 + base  # no merged copy when quantized
        state = k * per_entry + shape.head * 12
    temporaries = (2 * 4 * largest) if device == "cpu" else 4 * trainable
    activations = activation_bytes(shape, batch, seq, precision, base_dtype)
    if method == "spiel":
        state += SPIEL_WINDOW_BYTES_PER_ENTRY * k
        activations += 4 * shape.largest_targeted  # the layer's dense gradient, shown to its observer and freed
    if base_quantization:  # one layer's dequantized weight and (a delta's) dense float32 Δ, during its call
        activations += 8 * shape.largest_targeted
    if precision != "fp32" and base_dtype == "float32":  # autocast's copies of float32 weights, kept for the backward
        activations += 2 * (shape.linear_weights if method in ("full", "lora") else shape.untargeted_linear_weights)
    return Estimate(shape, method, trainable, weights, state, 4 * trainable, temporaries, activations)


def regime(precision: str, base_dtype: str = "float32") -> str:
    """Which ACTIVATION row applies: on a 2-byte base the forward runs in 2 bytes (the row is measured under bf16 autocast)."""
    if base_dtype != "float32":
        return "bf16-base"
    return "fp32" if precision == "fp32" else "bf16"


def activation_bytes(shape: Shape, batch: int, seq: int, precision: str, base_dtype: str = "float32") -> int:
    """What the forward keeps for the backward: bytes per token times tokens."""
    per_hidden, per_intermediate, per_probability, per_output = ACTIVATION[regime(precision, base_dtype)]
    per_layer = per_hidden * shape.hidden + per_intermediate * shape.intermediate
    if shape.keeps_attention_probs:
        per_layer += per_probability * shape.heads * seq
    return round(batch * seq * (shape.layers * per_layer + per_output * shape.output_width))


def largest_fitting(budget_gib: float, names=tuple(REFERENCE), overhead_gib: float = 1.0, **settings) -> str | None:
    """The largest REFERENCE model whose estimated peak fits in `budget_gib` less `overhead_gib` (a GPU's
    CUDA context and fragmentation), with `settings` passed to `estimate` (method, batch, seq, ...)."""
    fitting = None
    for name in names:  # in increasing size
        if estimate(model_shape(name), task="causal-lm", **settings).total <= (budget_gib - overhead_gib) * 2**30:
            fitting = name
    return fitting
