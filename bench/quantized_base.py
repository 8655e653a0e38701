"""SaRA at 1% over a float32, bf16, int8 and 4-bit (nf4) SmolLM2-135M base (the quantized ones with the
rest of the model in float32, or in bf16 under bf16 autocast: "+bf16"): the base's weight bytes,
the peak of live tensors during one training step, and the step time, each against that base's
frozen floor (the same step with every weight frozen: input gradients only).

Every (base, method) pair runs in its own process (its memory is its own); pairs are interleaved over
rounds and the table gives medians. The LM loss on random token ids, batch 2 × 128 by default.

    .venv/bin/python bench/quantized_base.py                     # results: bench/results/quantized-base.json
    .venv/bin/python bench/quantized_base.py --quick             # a smoke run: batch 1 x 32, one round, 2 steps
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
BASES = ["float32", "bf16", "int8", "4bit", "int8+bf16", "4bit+bf16"]  # +bf16: the rest of the model in bf16
METHODS = ["floor", "sara@1%"]


def weight_bytes(model) -> dict:
    """Bytes the base holds in its linear layers (packed weights with their scales and bitsandbytes'
    quantization state) and in everything else."""
    from sparsedelta.core import quantized

    linear = other = 0
    for module in model.modules():
        scheme = quantized.scheme_of(module)
        for name, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is None:
                continue
            size = t.numel() * t.element_size()
            if scheme or (type(module).__name__ == "Linear" and name == "weight" and module is not model.get_output_embeddings()):
                linear += size
            else:
                other += size
        if scheme:
            linear += _state_bytes(module)
    return {"linear_bytes": linear, "other_bytes": other}


def _state_bytes(module) -> int:
    """Scales held outside the weight's data: 4-bit block scales (and their own scales), int8 row scales."""
    import torch

    state = getattr(module.weight, "quant_state", None)
    if state is None:
        scales = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return scales.numel() * scales.element_size()
    tensors = [state.absmax, state.code, *(getattr(state.state2, a) for a in ("absmax", "code") if state.nested)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def worker(args) -> dict:
    import torch
    from bench import autocast, peak_tensor_mib

    import sparsedelta as sd
    from sparsedelta.models.causal_lm import default_targets, load_causal_lm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = load_causal_lm(None).model
    if args.base.endswith("bf16"):
        model = model.bfloat16()
    if args.base.startswith(("int8", "4bit")):
        sd.quantize(model, args.base.split("+")[0])
    sizes = weight_bytes(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.seq), generator=gen)
    embed = model.get_input_embeddings()
    if args.method == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        params = []
    else:
        sd.prepare(model, sd.SaRAConfig(density=0.01, rank_penalty=0.0, **default_targets(model)))
        params = sd.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step():
        inputs = {"input_ids": ids}
        if opt is None:  # the floor: backward through every layer to the input embeddings
            inputs = {"inputs_embeds": embed(ids).detach().requires_grad_(True)}
        with autocast("bf16" if args.base.endswith("bf16") else "fp32"):
            loss = model(**inputs, labels=ids, use_cache=False).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return {"base": args.base, "method": args.method, "step_s": statistics.median(times), **sizes,
            "peak_tensor_mib": peak_tensor_mib(step)}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bases", nargs="+", choices=BASES, default=BASES)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("BASE", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--output", type=Path, default=HERE / "results" / "quantized-base.json")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.steps, args.rounds = 1, 32, 2, 1
    if args.worker:
        args.base, args.method = args.worker
        print(json.dumps(worker(args)))
        return
    runs = []
    for _ in range(args.rounds):
        for base in args.bases:
            for method in METHODS:
                cmd = [sys.executable, __file__, "--worker", base, method, "--batch", str(args.batch), "--seq",
                       str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
    table = {}
    for base in args.bases:
        row = {}
        for method in METHODS:
            mine = [r for r in runs if r["base"] == base and r["method"] == method]
            row[method] = {k: statistics.median(r[k] for r in mine) for k in ("step_s", "peak_tensor_mib", "linear_bytes", "other_bytes")}
        table[base] = row
    bf16 = table["bf16"]["floor"]["linear_bytes"] if "bf16" in table else None  # the × bf16 column needs that row
    print(f"SmolLM2-135M, batch {args.batch} x {args.seq}, {args.threads} thread(s), medians of {args.rounds} round(s)")
    print(f"{'base':<10}{'linear MiB':>11}{'× bf16':>8}{'floor s':>9}{'SaRA s':>8}{'× floor':>8}{'floor MiB':>10}{'SaRA MiB':>9}")
    for base, row in table.items():
        f, s = row["floor"], row["sara@1%"]
        ratio = f"{f['linear_bytes'] / bf16:>8.3f}" if bf16 else f"{'—':>8}"
        print(f"{base:<10}{f['linear_bytes'] / 2**20:>11.1f}{ratio}{f['step_s']:>9.3f}"
              f"{s['step_s']:>8.3f}{s['step_s'] / f['step_s']:>8.2f}{f['peak_tensor_mib']:>10.1f}{s['peak_tensor_mib']:>9.1f}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"settings": vars(args) | {"output": str(args.output)}, "runs": runs, "table": table},
                                      indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
