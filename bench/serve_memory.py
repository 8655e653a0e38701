"""Resident memory of a server's deltas: RSS growth while loading N delta files onto the base, as
`sparsedelta serve` does (core.io.load), against the bytes the library holds for them.

    python bench/serve_memory.py            # SmolLM2-135M (the embedded GGUF), N = 0, 1, 16, 64
    python bench/serve_memory.py --quick    # a tiny Llama, N = 0, 1, 4

Each N runs in a fresh process. "held" is the nbytes of every tensor of every adapter's SparseDelta
objects; "trimmed" is RSS after glibc's malloc_trim(0) (what the allocator kept but nobody uses);
"serving" is the growth (trimmed) after a prefill and a few decoding steps with one row per delta in
mixed batches, as the engine runs them: the layers' tables of every delta's entries are built there."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def rss(field: str = "VmRSS") -> int:
    """Bytes of resident memory; RssAnon is the heap's part, RssFile the part mapped from files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def malloc_trim() -> None:
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def base_model(model: str | None):
    """SmolLM2 as the server loads it (None), or the tiny Llama's folder (it has no tokenizer)."""
    if model is None:
        from sparsedelta.models.causal_lm import load_causal_lm

        return load_causal_lm(None).model
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(model).eval()


def tiny_base(folder: Path, hidden: int = 256) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def make_deltas(model, folder: Path, count: int, density: float) -> list[str]:
    """`count` delta files with `density` of every adapted projection's entries at random positions."""
    import torch

    import sparsedelta as sd
    from sparsedelta.models.causal_lm import default_targets

    files = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        positions, values = {}, {}
        for path, p in model.named_parameters():
            if path.endswith("proj.weight"):
                positions[path] = torch.randperm(p.numel(), generator=gen)[: int(p.numel() * density)]
                values[path] = torch.randn(len(positions[path]), generator=gen) * 0.01
        name = f"t{i}"
        sd.add_delta(model, sd.RandomConfig(density=density, **default_targets(model)), positions, adapter_name=name,
                     values=values)
        sd.save(model, folder / name, adapter_name=name)
        sd.delete_adapter(model, name)
        files.append(str(folder / name))
    return files


def held_bytes(model) -> tuple[int, int]:
    """(entries, bytes) of every tensor the adapters' SparseDelta objects hold."""
    from sparsedelta.core.adapters import state_of

    entries = total = 0
    for adapter in state_of(model).adapters.values():
        for delta in adapter.deltas.values():
            entries += delta.values.numel()
            seen = [*delta.buffers(), *delta.parameters()]
            total += sum(t.nbytes for t in seen)
            if delta._merge.cache is not None:
                total += delta._merge.cache.nbytes
    return entries, total


def child(model: str | None, files: list[str]) -> dict:
    """Runs in its own process: the base, then the deltas, with RSS at each step."""
    import torch

    from sparsedelta.core.io import load

    base = base_model(model)
    with torch.no_grad():  # from_pretrained maps the weights from the file: page them in, as a first forward would
        for p in base.parameters():
            p.sum()
    malloc_trim()  # start from a trimmed heap, so that the growth is the deltas'
    before, anon_before = rss(), rss("RssAnon")
    for i, f in enumerate(files):
        load(base, f, adapter_name=f"t{i}")
    after, anon_after = rss(), rss("RssAnon")
    entries, held = held_bytes(base) if files else (0, 0)
    malloc_trim()
    trimmed = rss()
    serving = decode(base, len(files)) if files else trimmed
    return {"n": len(files), "entries": entries, "held": held, "rss_before": before, "rss_after": after,
            "rss_trimmed": trimmed, "anon_growth": anon_after - anon_before, "rss_serving": serving}


def decode(model, adapters: int, steps: int = 4) -> int:
    """RSS (trimmed) after a server's work: one row per adapter, a prompt of 8 tokens, then `steps`
    decoding steps in mixed batches, as the engine runs them (the layers' tables are built here)."""
    import torch

    from sparsedelta.core.adapters import set_adapter
    from sparsedelta.core.mixed import mixed_batch

    set_adapter(model, None)  # the engine keeps none merged between mixed steps
    names = [f"t{i}" for i in range(adapters)] if adapters > 1 else ["t0", "__base__"]
    ids = torch.randint(1, 100, (len(names), 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with mixed_batch(model, names):
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        for _ in range(steps):
            with mixed_batch(model, names):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True, logits_to_keep=1)
    del out, cache
    malloc_trim()
    return rss()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny Llama and N = 0, 1, 4")
    parser.add_argument("--counts", type=int, nargs="*", help="the N to measure (default 0 1 16 64; 0 1 4 with --quick)")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--out", default=str(HERE / "results" / "serve_memory.json"))
    parser.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.model, args.child)))
        return
    counts = args.counts or ([0, 1, 4] if args.quick else [0, 1, 16, 64])
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_base(Path(tmp) / "base") if args.quick else None
        files = make_deltas(base_model(model), Path(tmp), max(counts), args.density)
        rows = []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
        for n in counts:
            cmd = [sys.executable, __file__, *(["--model", model] if model else []), "--child", *files[:n]]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    mib = 2**20
    print(f"{'N':>3} | {'entries':>10} | {'held MiB':>8} | {'RSS growth MiB':>14} | {'growth/held':>11} | {'after trim MiB':>14} | "
          f"{'anon growth MiB':>15} | {'serving MiB':>11}")
    for r in rows:
        growth, trimmed = r["rss_after"] - r["rss_before"], r["rss_trimmed"] - r["rss_before"]
        ratio = f"{growth / r['held']:.2f}" if r["held"] else "-"
        print(f"{r['n']:>3} | {r['entries']:>10} | {r['held'] / mib:>8.1f} | {growth / mib:>14.1f} | {ratio:>11} | "
              f"{trimmed / mib:>14.1f} | {r['anon_growth'] / mib:>15.1f} | {(r['rss_serving'] - r['rss_before']) / mib:>11.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": "tiny-llama" if args.quick else "SmolLM2-135M-Instruct",
                                          "density": args.density, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
