"""Sequence classification: labelled text (a file, a hub dataset or the embedded BBC News), a
classifier whose new head is trained densely, accuracy and macro-F1."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...data.batches import Encoded, batches, encode
from ...data.tables import TextData, limit, load_data, load_labelled_file
from ...models.classifier import load_classifier
from .. import distributed
from .base import Task, to_device

PROBE_EXAMPLES = 64  # probe_inputs: validation examples


class ClassificationTask(Task):
    name = "classification"
    metric = "accuracy"
    higher_is_better = True

    def load(self, log=print, model_override=None, labels=None, splits=("train", "validation", "test")):
        """The data (the splits asked for), then the classifier for its labels. `labels` (a finished
        run's) keeps the label order of training when only a test file is read."""
        cfg = self.cfg
        if labels is not None and (not splits or (splits == ("test",) and cfg.test_file)):
            self.data, self.label_names, self.source, self.splits = None, list(labels), cfg.test_file, {}
            if splits:
                test = load_labelled_file(cfg.test_file, labels, cfg.text_columns, cfg.label_column)
                self.splits["test"] = limit(test, cfg.max_eval_samples, cfg.split_seed)
        else:
            data = self.data = load_data(
                cfg.train_file, cfg.validation_file, cfg.test_file, cfg.dataset, cfg.dataset_config, cfg.text_columns,
                cfg.label_column, cfg.split_seed, cfg.validation_fraction, cfg.test_fraction, cfg.max_train_samples,
                cfg.max_eval_samples, cfg.max_validation_samples,
            )  # fmt: skip
            log(f"data: {data.source}: {data.sizes()}, {len(data.label_names)} labels {data.label_names}")
            for note in data.notes:
                log(f"      {note}")
            self.label_names, self.source = labels or data.label_names, data.source
            self.splits = {role: getattr(data, role) for role in splits}
        loaded = load_classifier(model_override or cfg.model, self.label_names, cfg.seed)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.head_modules, self.model_name = loaded.head_modules, loaded.name
        self.quantize_base()
        self.encoded = {role: encode(self.tokenizer, split, cfg.max_length) for role, split in self.splits.items()}

    @property
    def train_size(self) -> int:
        return len(self.encoded["train"])

    def batches(self, order, batch_size):
        return batches(self.encoded["train"], order, batch_size, self.tokenizer)

    def lengths(self):
        return [len(f["input_ids"]) for f in self.encoded["train"].features]

    def probe_inputs(self, split, examples=PROBE_EXAMPLES):
        if split not in self.encoded:
            return None
        order = list(range(min(examples, len(self.encoded[split]))))
        return [{k: v for k, v in b.items() if k != "labels"}
                for b in batches(self.encoded[split], order, self.cfg.eval_batch_size, self.tokenizer)] or None  # fmt: skip

    def evaluate(self, model, split):
        return evaluate_classifier(model, self.encoded[split], self.tokenizer, len(self.label_names),
                                   self.cfg.eval_batch_size, self.world)  # fmt: skip

    def describe(self):
        data: TextData | None = self.data
        return {
            "labels": self.label_names,
            "data": {
                "source": self.source,
                "sizes": data.sizes() if data else {},
                "notes": data.notes if data else [],
                "text_columns": data.text_columns if data else None,
                "label_column": data.label_column if data else None,
            },
        }

    def title(self):
        return self.cfg.train_file.rsplit("/", 1)[-1] if self.cfg.train_file else self.source.split(" (")[0]


def scores(confusion: torch.Tensor, loss_sum: float) -> dict:
    n = float(confusion.sum())
    tp = confusion.diagonal()
    precision = tp / confusion.sum(0).clamp(min=1)
    recall = tp / confusion.sum(1).clamp(min=1)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
    present = (confusion.sum(1) > 0) | (confusion.sum(0) > 0)
    return {
        "accuracy": float(tp.sum()) / max(n, 1),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "loss": loss_sum / max(n, 1),
        "examples": int(n),
    }


@torch.no_grad()
def evaluate_classifier(model, encoded: Encoded, tokenizer, num_labels: int, batch_size: int, world=None) -> dict:
    """Accuracy, macro-F1 and mean loss; ranks split the examples and add up their confusion matrices."""
    world = world or distributed.World()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    indices = list(range(world.rank, len(encoded), world.size))
    for batch in batches(encoded, indices, batch_size, tokenizer):
        batch = to_device(batch, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion.index_put_((labels, logits.argmax(-1)), torch.ones(len(labels), dtype=torch.float64), accumulate=True)
    distributed.all_sum(confusion, world)
    distributed.all_sum(loss_sum, world)
    model.train(was_training)
    return scores(confusion.cpu(), float(loss_sum))
