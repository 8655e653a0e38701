"""The sections a run adds to its delta's model card (README.md, written by `sparsedelta.save`):
the data, the test metrics, how it was trained and the commands that use the run folder. The card
itself (base model, fingerprint, method, settings, size, a loading snippet) is `core/card.py`'s."""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig
from .tasks import Task


def run_card(cfg: TrainConfig, task: Task, metrics: dict, folder: Path) -> dict:
    """`card=` for `sparsedelta.save` at the end of a run.

    Args:
        cfg: the run's resolved settings.
        task: the run's task (its data description and model name).
        metrics: the run's metrics so far (test metrics, the baseline, the steps).
        folder: the run folder (its name goes into the commands).

    Returns:
        Sections title -> table, list or text; "base_model" names the base when the run was given one
        (else the card takes the model's own `name_or_path`).
    """
    data = task.describe().get("data", {})
    sizes = data.get("sizes") or data.get("blocks") or {}
    card: dict = {"base_model": cfg.model} if cfg.model else {}
    card["Data"] = {
        "source": data.get("source") or "?",
        **{f"{split} {'blocks' if 'blocks' in data else 'examples'}": f"{n:,}" for split, n in sizes.items()},
    }
    labels = task.describe().get("labels")
    if labels:
        card["Data"]["labels (in id order)"] = ", ".join(map(str, labels))
    card["Metrics"] = {f"test {k}": v for k, v in metrics.get("test", {}).items()}
    before = metrics.get("baseline", {}).get("test", {})
    if task.metric in before:
        card["Metrics"][f"test {task.metric} of the base model"] = before[task.metric]
    card["Training"] = {
        "model": task.model_name,
        "task": task.name,
        "steps": metrics["steps"][-1]["step"] if metrics.get("steps") else 0,
        "batch size (per process)": cfg.batch_size,
        "seed": cfg.seed,
    }
    template = getattr(task.tokenizer, "chat_template", None) if task.name == "sft" else None
    if isinstance(template, str):
        card["Prompt format"] = (
            "Trained on answers formatted with this chat template (kept in the run folder as chat_template.jinja; "
            "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)` makes a prompt):\n\n"
            f"```jinja\n{template}\n```"
        )
    name = Path(folder).name
    card["Using the run folder"] = [
        f"`sparsedelta eval {name}`: the test metrics again (`--test-file other.csv` for other data)",
        f"`sparsedelta export {name} --to shira --output shira/`: a PEFT SHiRA adapter, for PEFT without sparsedelta",
        f"`sparsedelta merge {name} --output merged/`: an ordinary model with the delta folded in",
    ]
    return card
