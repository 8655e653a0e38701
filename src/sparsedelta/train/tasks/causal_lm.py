"""Causal language modelling: text (local files or the embedded KJV) packed into token blocks, a
causal LM (a GGUF file, a folder or a hub id; SmolLM2-135M by default), held-out perplexity, and a
greedy sample before and after training."""

from __future__ import annotations

import math

import torch

from ...data.text import TextSplits, evenly_spaced, kjv_splits, pack_blocks, text_file_splits
from ...errors import UsageError
from ...models.causal_lm import default_targets, generate_sample, load_causal_lm, nll_total
from .. import distributed
from .base import Task

HELD_OUT = ("validation", "test")
PROBE_BLOCKS = 8  # probe_inputs: blocks of max_length tokens


def load_splits(cfg) -> TextSplits:
    """The run's text: local files (a split without its own file is carved from the training file) or
    the KJV, split into whole chapters or books by `split_seed`."""
    if cfg.train_file is None:
        if cfg.validation_file or cfg.test_file:
            raise UsageError("--validation-file/--test-file need --train-file; without it the KJV is split")
        return kjv_splits(cfg.split_seed, cfg.validation_fraction, cfg.test_fraction, by=cfg.split_by)
    if cfg.text_columns and len(cfg.text_columns) > 1:
        raise UsageError("--task causal-lm takes one --text-column")
    column = cfg.text_columns[0] if cfg.text_columns else None
    return text_file_splits(
        cfg.train_file, cfg.validation_file, cfg.test_file, column, cfg.split_seed, cfg.validation_fraction,
        cfg.test_fraction,
    )  # fmt: skip


class CausalLMTask(Task):
    name = "causal-lm"
    metric = "perplexity"
    higher_is_better = False
    base_is_meaningful = True

    def load(self, log=print, model_override=None, labels=None, splits=("train", "validation", "test")):
        cfg = self.cfg
        lm = load_causal_lm(model_override or cfg.model)
        self.model, self.tokenizer, self.model_name = lm.model, lm.tokenizer, lm.name
        self.quantize_base()
        self.blocks = {}
        if not splits:
            return
        self.text = load_splits(cfg)
        if "train" in splits:
            # a fixed number of steps needs only the first blocks (the training text is in shuffled order)
            needed = cfg.max_steps * cfg.batch_size * self.world.size if cfg.max_steps else None
            self.blocks["train"] = pack_blocks(self.tokenizer, self.text.train, cfg.max_length, max_blocks=needed)
        for role in HELD_OUT:
            if role in splits and getattr(self.text, role):
                blocks = pack_blocks(self.tokenizer, getattr(self.text, role), cfg.max_length)
                self.blocks[role] = evenly_spaced(blocks, cfg.eval_blocks)
        if "validation" in splits and "validation" not in self.blocks:
            raise UsageError("no validation text: give --validation-file or let the training text be split")
        log(f"data: {self.text.source}: { {r: len(b) for r, b in self.blocks.items()} } blocks of {cfg.max_length} tokens")

    def default_targets(self, model):
        return default_targets(model, embeddings="embedding" in (self.cfg.parameter_kinds or ()))

    @property
    def train_size(self) -> int:
        return len(self.blocks["train"])

    def batches(self, order, batch_size):
        for start in range(0, len(order), batch_size):
            ids = self.blocks["train"][order[start : start + batch_size]]
            yield {"input_ids": ids, "labels": ids}

    def loss(self, model, batch):
        return model(**batch, use_cache=False).loss

    def evaluate(self, model, split):
        """Perplexity of the split's blocks; ranks measure every world-size-th block and add up."""
        if split not in self.blocks:
            raise UsageError(f"no {split} text to measure")
        blocks = self.blocks[split][self.world.rank :: self.world.size]
        total, count = nll_total(model, blocks, self.cfg.eval_batch_size) if len(blocks) else (0.0, 0)
        sums = distributed.all_sum(torch.tensor([total, count], dtype=torch.float64), self.world)
        nll = float(sums[0] / sums[1])
        return {"perplexity": math.exp(nll), "loss": nll, "tokens": int(sums[1])}

    def probe_inputs(self, split, blocks=PROBE_BLOCKS):
        chosen = self.blocks.get(split, [])[:blocks]
        step = self.cfg.eval_batch_size
        return [{"input_ids": chosen[i : i + step], "use_cache": False} for i in range(0, len(chosen), step)] or None

    def baseline(self, model):
        return {**{role: self.evaluate(model, role) for role in HELD_OUT if role in self.blocks}, **self.samples(model)}

    def samples(self, model):
        return {"sample": generate_sample(model, self.tokenizer, self.cfg.prompt, self.cfg.max_new_tokens)}

    def describe(self):
        return {
            "data": {
                "source": self.text.source,
                "characters": self.text.characters(),
                "blocks": {role: len(b) for role, b in self.blocks.items()},
            }
        }

    def title(self):
        return self.text.source
