"""transformers.Trainer with SparseDeltaCallback as a script, for test_accelerate.py to launch with
`accelerate launch` (several processes) or plain python (one): SaRA on a tiny BERT, the nuclear-norm
penalty on; every process writes its delta (delta-rank<N>) and the main process the logged losses.

    python trainer_script.py MODEL_DIR TRAIN_CSV OUT BATCH_PER_PROCESS STEPS OPTIONS_JSON [METHOD]

(METHOD: sara by default; any delta method at SaRA's threshold, e.g. spiel.)
"""

import csv
import json
import sys
from pathlib import Path

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import sparsedelta as sd
from sparsedelta.methods import MethodSettings, make_runner
from sparsedelta.train.hf import SparseDeltaCallback

model_dir, train_csv, out, batch, steps, options = sys.argv[1:7]
method = sys.argv[7] if len(sys.argv) > 7 else "sara"
torch.set_num_threads(1)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
with open(train_csv, newline="") as f:
    rows = list(csv.DictReader(f))
labels = sorted({r["label"] for r in rows})
train_set = [{**tokenizer(r["text"], truncation=True, max_length=16), "labels": labels.index(r["label"])} for r in rows]

torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
runner = make_runner(MethodSettings(method=method, threshold=2e-3, options=json.loads(options)))
model = runner.prepare(model, head_modules=["classifier"], total_steps=int(steps))
args = TrainingArguments(
    output_dir=out, max_steps=int(steps), per_device_train_batch_size=int(batch), use_cpu=True, report_to=[],
    save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0, learning_rate=1e-3,
    average_tokens_across_devices=False,  # see the test: else the loss is scaled by the number of processes
)  # fmt: skip
optimizer = torch.optim.AdamW(runner.param_groups(model))
callback = SparseDeltaCallback(runner)
trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=DataCollatorWithPadding(tokenizer),
                  optimizers=(optimizer, None), callbacks=[callback])  # fmt: skip
trainer.train()
sd.save(model, Path(out) / f"delta-rank{trainer.args.process_index}")
if trainer.is_world_process_zero():
    log = {
        "world_size": trainer.args.world_size,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "events": callback.events,
    }
    (Path(out) / "log.json").write_text(json.dumps(log))
