"""Supervised instruction tuning (`--task sft`, as TRL calls it): chat or prompt–completion data, a
causal LM with its chat template, the loss on the answer tokens only; answer perplexity and, for
short answers, exact match of the greedy answer; a few answers before and after training.

Without data flags: BBC News as chat questions ("Which topic is this article about?") answered by
the topic word, on the embedded SmolLM2-135M-Instruct, split as the classification default."""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ...core.atomic import atomic_write
from ...data import instructions as ins
from ...data.tables import limit, load_bbc_news, load_hub_dataset, read_table, stratified_split
from ...errors import UsageError
from ...models.causal_lm import default_targets, load_causal_lm
from .. import distributed
from .base import Task, to_device

HELD_OUT = ("validation", "test")
SAMPLES = 3
CHAT_TEMPLATE = "chat_template.jinja"  # in the run folder


class SFTTask(Task):
    name = "sft"
    metric = "exact_match"  # "perplexity" (of the answers) when they are too long to match exactly
    higher_is_better = True
    base_is_meaningful = True

    def load(self, log=print, model_override=None, labels=None, splits=("train", "validation", "test")):
        cfg = self.cfg
        lm = load_causal_lm(model_override or cfg.model)
        self.model, self.tokenizer, self.model_name = lm.model, lm.tokenizer, lm.name
        self.quantize_base()
        if cfg.chat_template:
            self.tokenizer.chat_template = ins.read_chat_template(cfg.chat_template)
        self.encoded, self.rows, self.chat = {}, None, False
        if not splits:
            return
        examples, self.source = self._examples(splits)
        self.chat = any(e.messages is not None for items in examples.values() for e in items)
        for role, items in examples.items():
            self.encoded[role] = [
                ins.encode(self.tokenizer, e, cfg.max_length, cfg.truncation, f"{self.source} ({role}), example {i + 1}")
                for i, e in enumerate(items)
            ]
        if "train" in self.encoded and cfg.packing:
            self.rows = ins.pack(self.encoded["train"], cfg.max_length, cfg.split_seed)
        held = [e for role in HELD_OUT for e in self.encoded.get(role, [])]
        if not ins.short_answers(held):
            self.metric, self.higher_is_better = "perplexity", False
        sizes = {role: len(items) for role, items in self.encoded.items()}
        packed = f", packed into {len(self.rows)} rows" if self.rows is not None else ""
        log(f"data: {self.source}: {sizes} examples{packed}; the loss on the answers only")

    def _examples(self, splits) -> tuple[dict[str, list[ins.Example]], str]:
        cfg = self.cfg
        if cfg.train_file is None and cfg.dataset is None:
            if cfg.validation_file or cfg.test_file:
                raise UsageError("--validation-file/--test-file need --train-file; without it BBC News is used")
            split, names = load_bbc_news()
            parts = stratified_split(split.labels, [cfg.validation_fraction, cfg.test_fraction], cfg.split_seed)
            chosen = {"train": parts[0], "validation": parts[1], "test": parts[2]}
            out = {}
            for role in splits:
                subset = split.subset(chosen[role])
                subset = limit(subset, cfg.max_train_samples if role == "train" else cfg.max_eval_samples, cfg.split_seed)
                out[role] = ins.bbc_instructions(subset.texts, subset.labels, names)
            return out, "BBC News as topic questions"
        if cfg.dataset:  # a hub dataset's splits, as tables
            tables = load_hub_dataset(cfg.dataset, cfg.dataset_config)
            source = cfg.dataset
        else:
            files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
            tables = {role: read_table(path, role) for role, path in files.items() if path and (role in splits or role == "train")}
            source = str(cfg.train_file)
        read = {
            role: ins.examples_from_table(table, cfg.messages_column, cfg.prompt_column, cfg.completion_column,
                                          getattr(table, "source", role))
            for role, table in tables.items()
        }  # fmt: skip
        missing = [role for role in ("validation", "test") if role not in read]
        if missing:  # carved from the training file, seeded
            train = read["train"]
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
            fractions = {"validation": cfg.validation_fraction, "test": cfg.test_fraction}
            for role in missing:
                n = max(1, round(fractions[role] * len(train)))
                if n >= len(order):
                    raise UsageError(f"{cfg.train_file} has too few examples to carve a {role} split; give --{role}-file")
                read[role], order = [train[i] for i in order[:n]], order[n:]
            read["train"] = [train[i] for i in sorted(order)]
        for role, most in (("train", cfg.max_train_samples), ("validation", cfg.max_eval_samples), ("test", cfg.max_eval_samples)):
            if most and len(read[role]) > most:  # a seeded subset, in file order
                keep = torch.randperm(len(read[role]), generator=torch.Generator().manual_seed(cfg.split_seed))[:most]
                read[role] = [read[role][i] for i in sorted(keep.tolist())]
        return {role: read[role] for role in splits}, source

    def default_targets(self, model):
        return default_targets(model, embeddings="embedding" in (self.cfg.parameter_kinds or ()))

    @property
    def train_size(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.encoded["train"])

    def lengths(self):
        return None if self.rows is not None else [len(e) for e in self.encoded["train"]]

    def batches(self, order, batch_size):
        items = self.rows if self.rows is not None else self.encoded["train"]
        for start in range(0, len(order), batch_size):
            yield self._batch([items[i] for i in order[start : start + batch_size]])

    def _batch(self, items) -> dict[str, torch.Tensor]:
        width, pad = max(len(x) for x in items), self.tokenizer.pad_token_id
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        labels = torch.full((len(items), width), ins.IGNORE, dtype=torch.long)
        for r, x in enumerate(items):
            ids[r, : len(x)], labels[r, : len(x)] = torch.tensor(x.input_ids), torch.tensor(x.labels)
        if isinstance(items[0], ins.Packed):
            # no attention mask: the model keeps examples apart by their restarting position ids
            positions = torch.zeros_like(ids)
            for r, x in enumerate(items):
                positions[r, : len(x)] = torch.tensor(x.position_ids)
                positions[r, len(x) :] = torch.arange(width - len(x))
            return {"input_ids": ids, "labels": labels, "position_ids": positions}
        mask = torch.zeros_like(ids)
        for r, x in enumerate(items):
            mask[r, : len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model, batch):
        """The mean cross-entropy over the answer tokens of the global batch: each process divides its
        sum by the average count per process, so the averaged gradients are those of one process
        holding the whole batch (processes' batches hold different numbers of answer tokens)."""
        logits, targets = answer_logits(model, batch)
        total = F.cross_entropy(logits.float(), targets, reduction="sum")
        count = torch.tensor(float(len(targets)), dtype=total.dtype, device=total.device)
        if self.world.size > 1:
            count = distributed.all_sum(count, self.world) / self.world.size
        return total / count.clamp_min(1)

    # -- measuring ------------------------------------------------------------------------------------
    def evaluate(self, model, split):
        """Answer perplexity and exact match of the split's examples; each rank measures every
        world-size-th example and the sums are added up."""
        if split not in self.encoded:
            raise UsageError(f"no {split} data to measure")
        items = self.encoded[split][self.world.rank :: self.world.size]
        device = next(model.parameters()).device
        nll, tokens, correct = 0.0, 0, 0
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for start in range(0, len(items), self.cfg.eval_batch_size):
                chunk = items[start : start + self.cfg.eval_batch_size]
                logits, targets = answer_logits(model, to_device(self._batch(chunk), device))
                nll += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
                tokens += len(targets)
                if self.metric == "exact_match":
                    answers = self.generate(model, chunk)
                    correct += sum(_same(a, e.answer) for a, e in zip(answers, chunk, strict=True))
        model.train(was_training)
        sums = distributed.all_sum(torch.tensor([nll, tokens, correct, len(items)], dtype=torch.float64), self.world)
        loss = float(sums[0] / sums[1])
        out = {"perplexity": math.exp(loss), "loss": loss, "tokens": int(sums[1]), "examples": int(sums[3])}
        if self.metric == "exact_match":
            out["exact_match"] = float(sums[2] / sums[3])
        return out

    def generate(self, model, items: list[ins.Encoded], max_new_tokens: int | None = None) -> list[str]:
        """The greedy answers to the items' prompts (left-padded into one batch)."""
        device = next(model.parameters()).device
        prompts = [x.input_ids[: x.prompt_length] for x in items]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :], mask[r, width - len(p) :] = torch.tensor(p), 1
        limit_ = max_new_tokens or ins.SHORT_ANSWER_TOKENS + 2
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=limit_, do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
            )  # fmt: skip
        return [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]

    def baseline(self, model):
        return {**{role: self.evaluate(model, role) for role in HELD_OUT if role in self.encoded}, **self.samples(model)}

    def samples(self, model):
        items = self.encoded.get("validation") or self.encoded.get("test") or []
        if not items:
            return {}
        picked = [items[round(i * (len(items) - 1) / max(1, SAMPLES - 1))] for i in range(min(SAMPLES, len(items)))]
        answers = self.generate(model, picked, self.cfg.max_new_tokens)
        return {"answers": [{"expected": e.answer, "generated": a} for e, a in zip(picked, answers, strict=True)]}

    def keep_files(self, folder):
        """The chat template the run formatted its data with (chat data only): eval, predict and merge
        use it, and its presence tells predict to format inputs as chat."""
        template = self.tokenizer.chat_template
        if self.chat and isinstance(template, str):
            atomic_write(Path(folder) / CHAT_TEMPLATE, lambda tmp: tmp.write_text(template, encoding="utf-8"))

    def describe(self):
        return {
            "data": {
                "source": self.source,
                "sizes": {role: len(items) for role, items in self.encoded.items()},
                "packed_rows": len(self.rows) if self.rows is not None else None,
                "answer_tokens": {r: sum(sum(t != ins.IGNORE for t in e.labels) for e in v) for r, v in self.encoded.items()},
            }
        }

    def title(self):
        return f"{self.source} (sft)"


def answer_logits(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the positions that predict an answer token, those tokens): (n, vocab) and (n,).
    The output head runs at those positions only where the model can (transformers' logits_to_keep):
    over a 49,152-token vocabulary the logits of every position cost more than a second a step on a
    CPU and a gigabyte of memory, for the few positions the loss reads."""
    labels = batch["labels"]
    following = torch.full_like(labels, ins.IGNORE)
    following[:, :-1] = labels[:, 1:]  # the logits at t score the token at t + 1
    scored = following != ins.IGNORE
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        return model(**inputs, use_cache=False, logits_to_keep=scored).logits, following[scored]
    return model(**inputs, use_cache=False).logits[scored], following[scored]


def _same(generated: str, expected: str) -> bool:
    """Exact match up to surrounding whitespace and case."""
    return generated.strip().casefold() == expected.strip().casefold()
