"""Every setting of a run, each field with its help text; the command line's flags are made from
these fields (`cli/flags.py`), so a setting is declared once.

Settings left None take the task's default (`TASK_DEFAULTS`): the classification defaults are the
embedded demo (MiniLM-L6 + BBC News, 2 epochs of 16), the causal-LM defaults the SmolLM2 + KJV job
(40 steps of 4 blocks of 128 tokens).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..core.quantized import SCHEMES
from ..errors import UsageError
from ..methods.base import MethodSettings

TASKS = ("classification", "causal-lm", "sft", "diffusion")
PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZATIONS = SCHEMES  # --base-quantization
SCHEDULES = ("cosine", "linear", "constant")
TASK_DEFAULTS = {
    "classification": {"epochs": 2.0, "batch_size": 16, "max_length": 128, "eval_batch_size": 64, "weight_decay": 0.01, "warmup_ratio": 0.06,
                       "validation_fraction": 0.1, "test_fraction": 0.2},
    "causal-lm": {"max_steps": 40, "batch_size": 4, "max_length": 128, "eval_batch_size": 8, "weight_decay": 0.0, "warmup_ratio": 0.1,
                  "validation_fraction": 0.05, "test_fraction": 0.05},
    "sft": {"max_steps": 60, "batch_size": 8, "eval_batch_size": 16, "weight_decay": 0.0, "warmup_ratio": 0.1,
            "validation_fraction": 0.1, "test_fraction": 0.2, "max_length": 256, "max_eval_samples": 120},
    # the embedded digits: 630 training images, 300 steps = about 15 epochs of 32 (max_length: caption tokens)
    "diffusion": {"max_steps": 300, "batch_size": 32, "eval_batch_size": 64, "weight_decay": 0.0, "warmup_ratio": 0.05,
                  "validation_fraction": 0.1, "test_fraction": 0.2, "max_length": 77, "eval_every": 50},
}  # fmt: skip


def _f(default, help: str, group: str, **extra):
    """A field with its help text, its flag group and, optionally, the tasks it applies to."""
    factory = {"default_factory": default} if callable(default) else {"default": default}
    return field(**factory, metadata={"help": help, "group": group, **extra})


CLASSIFICATION, CAUSAL_LM, SFT, DIFFUSION = ("classification",), ("causal-lm",), ("sft",), ("diffusion",)


@dataclass
class TrainConfig(MethodSettings):
    # data (no file and no dataset: the task's embedded default, BBC News or the KJV)
    train_file: str | None = _f(None, "csv, tsv, json, jsonl or parquet (causal-lm: also txt; diffusion: a folder of images)", "data")  # fmt: skip
    validation_file: str | None = _f(None, "(default: carved from the training file)", "data")
    test_file: str | None = _f(None, "(default: carved from the training file)", "data")
    dataset: str | None = _f(None, "a Hugging Face Hub dataset id (needs the internet or its cache)", "data", tasks=CLASSIFICATION + SFT)  # fmt: skip
    dataset_config: str | None = _f(None, "the hub dataset's configuration name", "data", tasks=CLASSIFICATION + SFT)
    text_columns: list[str] | None = _f(None, "the text column (default: guessed); twice for sentence pairs", "data",
                                        flag="--text-column")  # fmt: skip
    label_column: str | None = _f(None, "string or integer labels (default: label, labels, class, ...)", "data", tasks=CLASSIFICATION)  # fmt: skip
    split_seed: int = _f(0, "seed of the split of data that comes without one", "data")
    validation_fraction: float | None = _f(None, "share carved for validation (default 0.1; causal-lm 0.05 of the text)", "data")  # fmt: skip
    test_fraction: float | None = _f(None, "share carved for test (default 0.2; causal-lm 0.05 of the text)", "data")  # fmt: skip
    split_by: str = _f("chapter", "the KJV's split unit: chapter or book", "data", tasks=CAUSAL_LM)
    max_train_samples: int | None = _f(None, "use a seeded subset of the training data", "data", tasks=CLASSIFICATION + SFT + DIFFUSION)
    max_eval_samples: int | None = _f(None, "use a seeded subset of validation and test (sft default 120)", "data",
                                      tasks=CLASSIFICATION + SFT + DIFFUSION)  # fmt: skip
    max_validation_samples: int | None = _f(None, "a seeded subset of validation alone (overrides the above)", "data", tasks=CLASSIFICATION)  # fmt: skip
    eval_blocks: int = _f(24, "evenly spaced blocks of each held-out split", "data", tasks=CAUSAL_LM)
    messages_column: str | None = _f(None, "the chat column: a list of {role, content} (default: messages)", "data", tasks=SFT)  # fmt: skip
    prompt_column: str | None = _f(None, "the prompt column of prompt-completion data (default: prompt)", "data", tasks=SFT)  # fmt: skip
    completion_column: str | None = _f(None, "the answer column of prompt-completion data (default: completion)", "data", tasks=SFT)  # fmt: skip
    chat_template: str | None = _f(None, "a Jinja chat template file, instead of the tokenizer's", "data", tasks=SFT)
    truncation: str = _f("refuse", "an example longer than --max-length: refuse, or left (cut its prompt from the left; "
                         "answers are never cut)", "data", tasks=SFT)  # fmt: skip
    packing: bool = _f(False, "lay several examples end to end in one row (position ids restart per example, so "
                       "attention stays within each)", "data", tasks=SFT)  # fmt: skip
    # model
    model: str | None = _f(None, "local folder, hub id or (causal-lm) .gguf file (default: the embedded MiniLM-L6; SmolLM2-135M; diffusion: a UNet pre-trained on digits 0-4)", "model")  # fmt: skip
    base_quantization: str | None = _f(None, "int8 or 4bit (nf4): the base's linear layers quantized by bitsandbytes "
                                       "after loading (new heads and the LM head stay float); deltas are added as "
                                       "corrections, the packed weights never change; eval and predict rebuild the "
                                       "same base from the run (docs/precision.md)", "model")  # fmt: skip
    max_length: int | None = _f(None, "tokens per example (default 128; causal-lm: per block, 128; sft 256; diffusion: per caption, 77)", "model")
    # optimisation
    epochs: float | None = _f(None, "passes over the training data (default 2; causal-lm: --max-steps 40)", "optimisation")  # fmt: skip
    max_steps: int | None = _f(None, "stop after this many optimizer steps (overrides --epochs)", "optimisation")
    batch_size: int | None = _f(None, "examples per step and process (default 16; causal-lm 4)", "optimisation")
    eval_batch_size: int | None = _f(None, "(default 64; causal-lm 8)", "optimisation")
    weight_decay: float | None = _f(None, "AdamW's weight decay (default 0.01; causal-lm 0)", "optimisation")
    warmup_ratio: float | None = _f(None, "share of the steps of linear warm-up (default 0.06; causal-lm 0.1)", "optimisation")  # fmt: skip
    schedule: str = _f("cosine", "the decay after warm-up: " + " | ".join(SCHEDULES), "optimisation")
    max_grad_norm: float = _f(1.0, "gradient clipping; 0: none", "optimisation")
    group_by_length: bool = _f(False, "batch examples of similar length together, as transformers' group_by_length: "
                               "less padding, the same examples per epoch", "optimisation", tasks=CLASSIFICATION)  # fmt: skip
    precision: str = _f("fp32", "fp32, or bf16 / fp16: the forward (and so the backward) under autocast; delta values, "
                        "optimizer state and the new head stay float32; fp16 scales the loss (docs/precision.md)",
                        "optimisation")  # fmt: skip
    # samples (causal LM)
    prompt: str = _f("And God said unto Moses,", "the prompt of the greedy samples before and after", "run", tasks=CAUSAL_LM)  # fmt: skip
    max_new_tokens: int = _f(32, "tokens of each sample", "run", tasks=CAUSAL_LM + SFT)
    # samples (diffusion)
    num_samples: int = _f(16, "images in each sample grid (before and after training)", "run", tasks=DIFFUSION)
    sample_steps: int = _f(50, "denoising steps of each sample grid (DDIM, deterministic from --seed)", "run", tasks=DIFFUSION)  # fmt: skip
    # run
    output_dir: str | None = _f(None, "the run folder (default: runs/<time>-<method>)", "run")
    eval_every: int | None = _f(None, "validate every N steps (default: twice per epoch)", "run")
    checkpoint_every: int = _f(50, "checkpoint every N steps; 0: never", "run")
    threads: int | None = _f(None, "CPU threads (default: one per idle core)", "run")
    device: str | None = _f(None, "cpu, cuda or cuda:N (default: this process's GPU if any, else the CPU)", "run")
    fsdp: bool = _f(False, "under torchrun: shard the frozen base across the processes (FSDP2), the deltas replicated "
                    "(docs/distributed.md)", "run")  # fmt: skip

    def __post_init__(self):
        if self.task not in TASKS:
            raise UsageError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("batch_size", "eval_batch_size", "max_length", "max_steps", "eval_blocks", "max_new_tokens",
                     "num_samples", "sample_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.epochs is not None and not self.epochs > 0:
            raise UsageError(f"--epochs must be > 0, got {self.epochs}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision {self.precision}: choose one of {', '.join(PRECISIONS)}")
        if self.base_quantization is not None and self.base_quantization not in QUANTIZATIONS:
            raise UsageError(f"--base-quantization {self.base_quantization}: choose one of {', '.join(QUANTIZATIONS)}")
        if self.split_by not in ("chapter", "book"):
            raise UsageError(f"--split-by {self.split_by}: choose chapter or book")
        if self.truncation not in ("refuse", "left"):
            raise UsageError(f"--truncation {self.truncation}: choose refuse or left")

    def resolved(self) -> TrainConfig:
        """This config with every None left to the task filled in from TASK_DEFAULTS."""
        defaults = dict(TASK_DEFAULTS[self.task])
        if self.epochs is not None or self.max_steps is not None:  # a budget given: the task's one is not
            defaults.pop("epochs", None)
            defaults.pop("max_steps", None)
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
