"""`sparsedelta estimate`: the peak memory of a training step, per method, from the memory model
(sparsedelta.train.memory; checked against measured steps by bench/memory_model.py)."""

from __future__ import annotations

import json

NAME = "estimate"


def add(sub) -> None:
    from ..train.memory import BASE_BYTES, METHODS, PRECISIONS, QUANT_BYTES, REFERENCE

    p = sub.add_parser(NAME, help="estimate the peak memory of training a model with each method")
    p.add_argument("--model", help="a model folder, hub id, .gguf file, or one of: " + ", ".join(REFERENCE)
                   + " (default: the task's embedded model)")  # fmt: skip
    p.add_argument("--task", choices=["classification", "causal-lm", "sft"], default=None,
                   help="default: causal-lm for the named Llama-style models, else classification; sft is a "
                   "causal LM's training")  # fmt: skip
    p.add_argument("--method", default="all",
                   help=f"{', '.join(METHODS)} or all (default: full, lora and sara, whose cost any delta method shares)")  # fmt: skip
    p.add_argument("--batch", type=int, default=8, help="examples per step (default 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per example (default 128)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="autocast precision (default fp32)")
    p.add_argument("--base-dtype", choices=list(BASE_BYTES), default="float32",
                   help="the frozen base's storage for delta methods and LoRA (default float32)")  # fmt: skip
    p.add_argument("--base-quantization", choices=list(QUANT_BYTES), default=None,
                   help="the base's linear layers stored quantized by bitsandbytes (int8: 1 byte an entry; 4bit: "
                   "nf4, 0.52 bytes), the rest in --base-dtype; full fine-tuning is left out")  # fmt: skip
    p.add_argument("--density", type=float, default=0.01, help="a delta's share of the targeted entries (default 0.01)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="AdamW's step: per tensor (cpu) or foreach (cuda)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import UsageError
    from ..train.memory import METHODS, REFERENCE, SHOWN, estimate, model_shape

    task = args.task or ("causal-lm" if args.model and args.model.lower() in REFERENCE else "classification")
    task = "causal-lm" if task == "sft" else task  # the same model and the same step; only the labels differ
    methods = SHOWN if args.method == "all" else [args.method]
    if args.method != "all" and args.method not in METHODS:
        raise UsageError(f"--method {args.method}: the memory model covers {', '.join(METHODS)} (or all)")
    if not 0 < args.density <= 1:
        raise UsageError(f"--density {args.density:g}: a delta's share of the targeted entries is in (0, 1], e.g. 0.01")
    for flag in ("batch", "seq", "lora_rank"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: give a positive whole number")
    shape = model_shape(args.model, task)
    rows = []
    for method in methods:
        if method == "full" and (args.base_dtype != "float32" or args.base_quantization):
            continue  # full fine-tuning trains the base itself, in float32
        rows.append(estimate(shape, method, batch=args.batch, seq=args.seq, precision=args.precision,
                             base_dtype=args.base_dtype, density=args.density, lora_rank=args.lora_rank,
                             device=args.device, task=task, base_quantization=args.base_quantization))  # fmt: skip
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    gib = 2**30
    print(f"{shape.name}: {shape.parameters:,} parameters; batch {args.batch} x {args.seq}, {args.precision}, "
          f"base {args.base_dtype}{f' with {args.base_quantization} linear layers' if args.base_quantization else ''}, "
          f"AdamW on {args.device}")  # fmt: skip
    print(f"{'method':<22}{'trainable':>14}{'weights':>9}{'state':>8}{'grads+opt':>11}{'activ.':>8}{'peak GiB':>10}")
    for r in rows:
        print(
            f"{r.method:<22}{r.trainable:>14,}{r.weights / gib:>9.2f}{r.state / gib:>8.2f}"
            f"{(r.gradients + r.optimizer_temporaries) / gib:>11.2f}{r.activations / gib:>8.2f}{r.total / gib:>10.2f}"
        )
    print("peak = weights + state + max(activations, gradients + optimizer temporaries); live tensors only "
          "(add ~0.5 GiB for a CUDA context or a CPU process's libraries)")  # fmt: skip
    return 0
