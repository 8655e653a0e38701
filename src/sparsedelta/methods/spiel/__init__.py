"""SpIEL (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models", arXiv 2401.16405):
a sparse delta of k entries whose positions move during training.

- Positions: k at the budget (`--density`, or SaRA's threshold's density, as the baselines), random
  at first (official; `init` 'small'/'large' ranks by |θ| instead).
- Every R = `reselection_steps` optimizer steps (first at A = `accumulation_steps`), in each tensor
  holding k_t entries, n = ⌊k_t·p(t)⌋ entries are replaced: the n with the smallest |δ| (the entries
  that moved least) are dropped, their positions return to θ exactly, and the n candidates with the
  largest |Σ gradient| over the last A steps grow, at value 0 (RigL's rule, "SpIEL-AG"). p(t) decays
  (config.py); k stays constant in every tensor.
- Candidates: the C largest |gradient| positions of the window's first step, then their gradients
  summed over the window (growth.py: memory); no dense gradient of the model is kept.
- Grown entries' AdamW moments: seeded from the window's mean gradient and mean squared gradient
  (official code), or zero (`grown_state=zero`).

Where we differ from the official code (AlanAnsell/peft, tuners/sft) and why:
- the first re-selection's full replacement applies under both rate policies and windows sum exactly
  A steps (config.py);
- the official optimizer keeps a step count per entry; torch's AdamW has one per tensor, so seeded
  moments are pre-multiplied by the bias correction at the current step (growth.py);
- the SM3-based growth ("SpIEL-MA") needs the official SM3 optimizer and is not built: any optimizer
  works here, and the accumulated-gradient rule is the one the paper recommends where memory allows;
- under fp16 loss scaling the observed gradients carry the loss scale: each step's sums are divided by
  the scale of that step's backward (the runner's `before_step` gets it from the loop or the Trainer
  callback), and what a skipped step left is dropped at the next step's start.
"""

from .config import SpIELConfig, replacements
from .growth import CandidateScores, drop_and_grow
from .runner import SpIELRunner  # registers the method

__all__ = ["CandidateScores", "SpIELConfig", "SpIELRunner", "drop_and_grow", "replacements"]
