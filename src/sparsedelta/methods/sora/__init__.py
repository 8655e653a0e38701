"""SoRA (Ding et al., EMNLP 2023, arXiv 2311.11696): a LoRA whose rank sparsifies itself through a gate.

Not SaRA (`methods/sara.py`, Hu et al., arXiv 2409.06633): SoRA adds a low-rank branch per linear
layer; it is not a sparse delta and does not use the core's delta machinery, only its targeting
rules and atomic writes.

Every formula, in one place each:
- the layer (`SoRALinear.forward`): Δy = ((dropout(x) Aᵀ) ⊙ g) Bᵀ · α/r with A [r, in]
  kaiming-uniform(a=√5), B [out, r] = 0 (the model is unchanged at start) and the gate g [r]
  drawn N(0, 1) as the official code does (`gate_init="normal"`) or set to 1 (`"ones"`);
- the soft threshold (`soft_threshold`): T_t(g) = sign(g)·max(|g| − t, 0);
- the proximal step (`proximal_step`, run after every optimizer step by `proximal_hook`):
  g ← T_t(g) with t = η_t·ξ, η_t the gate group's current learning rate (`threshold="proximal"`,
  the paper), or t = ξ whatever the learning rate (`threshold="official"`, the official code);
- the L1 term in the loss (`l1_penalty`): l1_in_loss · Σ|g| / (number of gate entries), the official
  code's second mechanism; 0 by default in "proximal" mode, where the proximal step is the L1 term;
- rank pruning (`pruned_factors`): keep = (g ≠ 0), A′ = A[keep], B′ = B[:, keep]·g[keep], scaling α/r
  unchanged; the result is an ordinary LoRA of rank nnz(g);
- the ξ grids of the sparsifying scheduler (`xi_schedule`) and its stages (`sparsify`).

Why a layer of our own rather than PEFT's LoRA layer with a gate: PEFT is an optional dependency of
sparsedelta, and its `lora.Linear.forward` carries DoRA, mixed-batch and multi-adapter paths that a
gate would have to be threaded through. The wrapper below is a few lines (base layer frozen, forward =
base(x) + the gated term, the same operation order as PEFT's forward); what users need from PEFT is
its file format, which `export_peft` writes directly, and which PEFT alone loads (tested).

Where we differ from the official code (TsinghuaC3I/SoRA) and why:
- The threshold. The official `SparseAdamW` applies three in-place masks one after the other
  (g > ξ → g − ξ; g < −ξ → g + ξ; |g| < ξ → 0), so a gate in (ξ, 2ξ) is first shrunk and then
  zeroed: its operator is not T_ξ. We apply T exactly, in both modes.
- Stages. The official scheduler reuses one optimizer and its linear schedule across stages; the
  schedule is exhausted after the first stage, so later stages train at lr 0 and only the threshold
  acts. `sparsify` asks the caller for a new optimizer and schedule every stage and refuses the old one.
- The gate's optimizer. Officially it is a second optimizer that never steps under DeepSpeed; here the
  gates are one parameter group of the single optimizer (`param_groups`: own lr, no weight decay), and
  `proximal_step` refuses gates the optimizer does not hold.
- fp16. The official code steps the gate optimizer after `scaler.update()`; here the threshold is a
  step post-hook of the one optimizer, so it runs exactly when `GradScaler.step` really stepped (not on
  a skipped, overflowing step) and before `update()`.
- Rank pruning and export are not in the official code (it only counts zero gates, assuming square
  layers). A layer whose gates all died keeps a rank-0 branch (adds exactly 0); `export_peft` leaves it
  out of the adapter and `merge` leaves its weight untouched.
- The official configuration also unfreezes every LayerNorm; here only `modules_to_save` are trained
  densely (name them, e.g. modules_to_save=["LayerNorm", "classifier"]).
- Adapter weights of a float16/bfloat16 base are kept in float32 (as PEFT does); inputs are cast.
"""

from .config import CONFIG_FILE, GATE_GROUP, GRIDS, STATE_FILE, SoRAConfig, check_schedule
from .export import export_peft, merge, prune, pruned_factors
from .files import load, save
from .gates import gate_counts, l1_penalty, param_groups, proximal_hook, proximal_step, ranks, soft_threshold
from .layer import SoRALinear, attach, config_of, disabled, layers, set_xi
from .runner import SoRARunner  # registers the method
from .stages import Stage, sparsify, xi_schedule

__all__ = [
    "CONFIG_FILE", "GATE_GROUP", "GRIDS", "STATE_FILE", "SoRAConfig", "SoRALinear", "SoRARunner", "Stage", "attach", "check_schedule", "config_of", "disabled", "export_peft", "gate_counts",
    "l1_penalty", "layers", "load", "merge", "param_groups", "proximal_hook", "proximal_step", "prune",
    "pruned_factors", "ranks", "save", "set_xi", "soft_threshold", "sparsify", "xi_schedule",
]  # fmt: skip
