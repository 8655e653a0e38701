"""Instruction data for `--task sft`: chat conversations (`messages`: a list of {role, content}) or
prompt–completion pairs, tokenized with labels on the answers only.

The answers are found without `{% generation %}` markers in the chat template (SmolLM2's has none):
the template renders the conversation up to each assistant turn (with the generation prompt) and
through it; what the second adds to the first is that turn's answer, its end-of-turn token
included. Tokens whose characters fall in an answer carry labels, every other token -100. A template
that does not render a conversation's beginning as a prefix of the whole is refused: the answer's
place in the tokens would be a guess.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

IGNORE = -100  # the label cross-entropy skips
ROLES = ("system", "user", "assistant", "tool")
SHORT_ANSWER_TOKENS = 8  # answers up to this long (a label, a number) are also scored by exact match
BBC_SYSTEM = "You sort news articles by topic: {topics}. Answer with the topic word only."
BBC_WORDS = 100  # of each article: the start says what it is about and keeps prompts short


@dataclass
class Example:
    """One conversation; the answer the model should give is its last assistant turn."""

    messages: list[dict] | None = None  # chat: rendered with the chat template
    prompt: str | None = None  # or plain text: prompt, then completion and the end-of-sequence token
    completion: str | None = None

    @property
    def answer(self) -> str:
        if self.messages is not None:
            return self.messages[-1]["content"]
        return self.completion


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE except on answer tokens
    prompt_length: int  # tokens before the last answer: the prompt to generate it from
    answer: str

    def __len__(self) -> int:
        return len(self.input_ids)


# -- reading ---------------------------------------------------------------------------------------
def examples_from_table(table, messages_column: str | None, prompt_column: str | None,
                        completion_column: str | None, source: str) -> list[Example]:  # fmt: skip
    """A table's rows as examples: a messages column (chat), or prompt and completion columns (plain
    strings, or lists of messages for a conversational prompt and answer)."""
    columns = table.column_names
    messages = messages_column or ("messages" if "messages" in columns and not prompt_column else None)
    if messages is not None:
        if messages not in columns:
            raise UsageError(f"{source} has no column {messages!r} (it has {columns}); name it with --messages-column")
        return [_chat(row, number, source) for number, row in enumerate(table[messages], 1)]
    prompt, completion = prompt_column or "prompt", completion_column or "completion"
    missing = [c for c in (prompt, completion) if c not in columns]
    if missing:
        raise UsageError(
            f"{source} has no column {missing[0]!r} (it has {columns}): sft data needs a 'messages' column (chat) or "
            "'prompt' and 'completion' columns; name yours with --messages-column or --prompt-column/--completion-column"
        )
    out = []
    for number, (p, c) in enumerate(zip(table[prompt], table[completion], strict=True), 1):
        if isinstance(p, list) and isinstance(c, list):  # conversational prompt and completion
            out.append(_chat(p + c, number, source))
        elif isinstance(p, str) and isinstance(c, str) and c.strip():
            out.append(Example(prompt=p, completion=c))
        else:
            raise UsageError(
                f"{source}, row {number}: prompt and completion must both be text (the completion not empty) or both "
                f"lists of messages; got {type(p).__name__} and {type(c).__name__}"
            )
    return out


def _chat(messages, number: int, source: str) -> Example:
    if isinstance(messages, str):  # a csv cell holding JSON
        try:
            messages = json.loads(messages)
        except ValueError:
            messages = None
    fine = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages
    )
    if not fine:
        raise UsageError(
            f"{source}, row {number}: messages must be a list of {{role, content}} with roles among {list(ROLES)} and "
            "text content"
        )
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise UsageError(f"{source}, row {number}: the conversation must end with the assistant's (non-empty) answer")
    return Example(messages=[{"role": m["role"], "content": m["content"]} for m in messages])


def bbc_instructions(texts: list[tuple[str, ...]], labels: list[int], names: list[str]) -> list[Example]:
    """BBC News articles as chat questions whose answer is the topic word."""
    out, system = [], BBC_SYSTEM.format(topics=", ".join(names[:-1]) + " or " + names[-1])
    for (text,), label in zip(texts, labels, strict=True):
        article = " ".join(text.split()[:BBC_WORDS])
        out.append(Example(messages=[
            {"role": "system", "content": system},
            {"role": "user", "content": f"Which topic is this article about?\n\n{article}"},
            {"role": "assistant", "content": names[label]},
        ]))  # fmt: skip
    return out


def read_chat_template(path: str | os.PathLike) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"--chat-template {path}: no such file; pass a Jinja template file")
    text = path.read_text(encoding="utf-8", errors="replace")
    if "{%" not in text and "{{" not in text:
        raise UsageError(f"--chat-template {path}: not a Jinja chat template (no {{% or {{{{ in it)")
    return text


# -- tokenizing ------------------------------------------------------------------------------------
def encode(tokenizer, example: Example, max_length: int, truncation: str = "refuse", where: str = "an example") -> Encoded:
    """Token ids and labels (IGNORE but on the answers) of one example, at most max_length tokens."""
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(
            "sft needs a fast tokenizer (one with a tokenizer.json: it maps tokens back to characters, which finds "
            "the answers); save the model's tokenizer with transformers' AutoTokenizer(..., use_fast=True)"
        )
    text, spans, special = _text_and_answers(tokenizer, example)
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for i, (start, end) in enumerate(offsets):
        if end > start and any(start < b and end > a for a, b in spans):
            labels[i] = ids[i]
    answer_tokens = [i for i, label in enumerate(labels) if label != IGNORE]
    if not answer_tokens:
        raise UsageError(f"{where}: its answer became no token at all; check the data and the chat template")
    last = spans[-1][0]
    prompt_length = next(i for i in answer_tokens if offsets[i][1] > last)
    cut = len(ids) - max_length
    if cut > 0:
        if truncation != "left" or cut > answer_tokens[0]:
            fix = ("answers are never cut: raise --max-length" if truncation == "left" else
                   "raise --max-length, or cut prompts from the left with --truncation left (answers are never cut)")  # fmt: skip
            raise UsageError(
                f"{where} is {len(ids)} tokens, more than --max-length {max_length}, and its answer starts at token "
                f"{answer_tokens[0]}: {fix}"
            )
        ids, labels, prompt_length = ids[cut:], labels[cut:], prompt_length - cut
    return Encoded(ids, labels, prompt_length, example.answer)


def _text_and_answers(tokenizer, example: Example) -> tuple[str, list[tuple[int, int]], bool]:
    """The example's text, the character spans of its answers, and whether the tokenizer should add
    its special tokens (plain text: yes; a chat template writes its own)."""
    if example.messages is None:
        eos = tokenizer.eos_token or ""
        text = example.prompt + example.completion
        if eos and not text.endswith(eos):
            text += eos  # the answer ends: the model learns to stop
        return text, [(len(example.prompt), len(text))], True
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "this tokenizer has no chat template, so chat data cannot be formatted; give one with --chat-template FILE "
            "(a Jinja template as in tokenizer_config.json), or use prompt/completion columns (plain text)"
        )
    messages = example.messages
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i == 0:
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False).rstrip()
        if not (through.startswith(before) and text.startswith(through)):
            raise UsageError(
                "the chat template does not render a conversation's first turns as the beginning of the whole "
                "conversation, so the answer tokens cannot be found; pass a template that does with --chat-template"
            )
        spans.append((len(before), len(through)))
    if not spans:
        raise UsageError("a conversation has no assistant answer after a prompt")
    return text, spans, False


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as e:  # a Jinja error in the template: the user's file
        raise UsageError(f"the chat template fails on a conversation ({type(e).__name__}: {e})") from e


def short_answers(encoded: list[Encoded]) -> bool:
    """Whether every last answer is short enough (a label, a number) to score by exact match."""
    return bool(encoded) and all(
        sum(label != IGNORE for label in e.labels[e.prompt_length :]) <= SHORT_ANSWER_TOKENS for e in encoded
    )


# -- packing ---------------------------------------------------------------------------------------
@dataclass
class Packed:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]  # restart at 0 at each example: the attention keeps examples apart

    def __len__(self) -> int:
        return len(self.input_ids)


def pack(encoded: list[Encoded], max_length: int, seed: int) -> list[Packed]:
    """Whole examples, in a seeded order, laid end to end into rows of at most max_length tokens."""
    order = list(range(len(encoded)))
    random.Random(seed).shuffle(order)
    rows, row = [], Packed([], [], [])
    for i in order:
        e = encoded[i]
        if len(row) + len(e) > max_length and len(row):
            rows.append(row)
            row = Packed([], [], [])
        row.input_ids += e.input_ids
        row.labels += [IGNORE] + e.labels[1:]  # never predict an example's first token from the one before
        row.position_ids += list(range(len(e)))
    if len(row):
        rows.append(row)
    return rows
