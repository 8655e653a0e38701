"""Which digits do the default diffusion runs draw? A number for what the sample grids show.

For each run folder of the default `--task diffusion` job (digits 0-4 adapted to 5-9) and for its
base model, --count samples are drawn (DDIM, --steps steps, from --seed) and each is read by a
logistic-regression classifier of scikit-learn's digits (trained on all 1,797 of them, taken through
the same 16 px upscale and back to 8 px by 2 x 2 averaging as a sample is). Reported: the share of
samples read as 5-9, and the count of each digit.

    PYTHONPATH=src .venv/bin/python study/diffusion_digits.py runs/A runs/B ... [--count 256]

Writes study/results/diffusion_digits.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def digit_reader():
    """A function from samples (n, 1, 16, 16) in [-1, 1] to digit labels (n,), and its training accuracy."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from sparsedelta.data.images import digits

    def features(images: torch.Tensor):
        return (F.avg_pool2d((images.float() + 1) / 2, 2) * 16).flatten(1).numpy()

    everything = digits(tuple(range(10)), 16)
    labels = load_digits().target
    classifier = LogisticRegression(max_iter=2000).fit(features(everything.images), labels)
    accuracy = float(classifier.score(features(everything.images), labels))
    return (lambda images: classifier.predict(features(images))), accuracy


def read_samples(images, reader) -> dict:
    import numpy as np

    labels = reader(images)
    counts = np.bincount(labels, minlength=10).tolist()
    return {"five_to_nine": float((labels >= 5).mean()), "counts": counts}


def sample_run(folder: str, count: int, steps: int, seed: int, base: bool = False):
    """Samples of a finished run's trained model, or (base=True) of its base model."""
    from sparsedelta.models.diffusion import sample
    from sparsedelta.train.finished import load_base, load_run

    if base:
        _, task = load_base(folder)
        return sample(task.diffusion, task.model, count, steps, seed)
    run = load_run(folder, splits=())
    return sample(run.task.diffusion, run.model, count, steps, seed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders of --task diffusion on the embedded digits")
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "diffusion_digits.json")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    reader, accuracy = digit_reader()
    out = {"reader_training_accuracy": accuracy, "count": args.count, "steps": args.steps, "seed": args.seed, "runs": {}}
    # the default job's runs share their base: sampled once, from the first run's record of it
    out["base"] = read_samples(sample_run(args.runs[0], args.count, args.steps, args.seed, base=True), reader)
    for folder in args.runs:
        trained = sample_run(folder, args.count, args.steps, args.seed)
        out["runs"][folder] = {"after": read_samples(trained, reader)}
        print(f"{folder}: 5-9 in {out['runs'][folder]['after']['five_to_nine']:.1%} of {args.count} samples "
              f"(base model: {out['base']['five_to_nine']:.1%}); digits 0-9: {out['runs'][folder]['after']['counts']}")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
