"""`sparsedelta merge`: the base model with a run's product folded in, as an ordinary checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError

NAME = "merge"


def add(sub) -> None:
    p = sub.add_parser(NAME, help="write the base model with the run's product merged in (save_pretrained)")
    p.add_argument("run", help="the run folder written by `sparsedelta train`")
    p.add_argument("--output", required=True, help="folder for the merged model (loadable with from_pretrained)")
    p.add_argument("--model", help="the base model (default: the one recorded in the run)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..train.finished import load_run
    from ..train.runfolder import RunFolder
    from ..train.tasks import GENERATIVE

    folder = RunFolder.existing(args.run)
    if folder.config["method"]["method"] == "full":
        raise UsageError(f"{folder.path} holds ordinary fine-tuning; its full model is already in {folder.path / 'model'}")
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise UsageError(f"--output {output} exists and is not empty; choose a new folder")
    finished = load_run(args.run, args.model, splits=())
    merged = finished.runner.merged(finished.model)
    if finished.task.name == "diffusion":  # the UNet beside its scheduler (and text encoder): a pipeline folder
        from ..models.diffusion import save_pipeline

        save_pipeline(finished.task.diffusion, merged, output)
        print(f"merged model written to {output} (unet/ + scheduler/: --model {output} of --task diffusion, or "
              f"{type(merged).__name__}.from_pretrained({str(output)!r}, subfolder='unet'))")  # fmt: skip
        return 0
    merged.save_pretrained(output)
    finished.task.tokenizer.save_pretrained(output)
    kind = "AutoModelForCausalLM" if finished.task.name in GENERATIVE else "AutoModelForSequenceClassification"
    print(f"merged model written to {output} (load it with {kind}.from_pretrained)")
    if finished.cfg.base_quantization:
        print(f"the run's base was quantized ({finished.cfg.base_quantization}): the merged model holds each quantized "
              "layer's dequantized θ plus the delta in float32, the function trained (4 bytes a weight); the original "
              "float checkpoint plus the delta would differ from it by the quantization error")  # fmt: skip
    return 0
