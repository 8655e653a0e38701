"""Diffusion (`--task diffusion`): a diffusers UNet trained on the noise-prediction loss over a folder
of images (captions optional; a text-conditioned UNet reads them through its frozen text encoder),
held-out loss at fixed noise and timesteps, and a grid of samples before and after training.

Without --model and --train-file: the embedded UNet pre-trained on scikit-learn's digits 0-4
(`models/digits_unet.py`), adapted to the digits 5-9.

The training noise and timesteps are drawn from torch's global generator, seeded with --seed when
the training data loads and kept by checkpoints, so a resumed run draws what an uninterrupted one
would (several processes draw the same noise for their different images: a checkpoint keeps rank
0's generator, so this is what a resumed run can repeat). The held-out loss draws its own, once, from
a fixed seed: every image is noised at EVAL_TIMESTEPS evenly spaced timesteps with the same noise in
every run and every evaluation, so the numbers are comparable across steps, methods and runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...data import images as img
from ...errors import UsageError
from ...models import diffusion as dm
from .. import distributed
from .base import Task

HELD_OUT = ("validation", "test")
EVAL_TIMESTEPS = 4  # per held-out image: t = (j + ½)·T/4, j = 0..3
EVAL_SEED = 20251205  # the held-out noise: the same in every run
SAMPLES_BEFORE, SAMPLES_AFTER = "samples_before.png", "samples_after.png"


class DiffusionTask(Task):
    name = "diffusion"
    metric = "loss"
    higher_is_better = False
    base_is_meaningful = True

    def load(self, log=print, model_override=None, labels=None, splits=("train", "validation", "test")):
        cfg = self.cfg
        if cfg.base_quantization:  # bitsandbytes quantizes linear layers; a UNet is mostly convolutions
            raise UsageError("--base-quantization is not supported with --task diffusion (bitsandbytes quantizes linear "
                             "layers, a UNet is mostly convolutions): leave it out")
        source = model_override or cfg.model
        if source is None:
            from ...models.digits_unet import NAME, embedded_model

            self.model_name = f"{NAME} (embedded)"
            source = str(embedded_model(log))
        else:
            self.model_name = source
        self.diffusion = dm.load_diffusion(source)
        self.model, self.tokenizer = self.diffusion.unet, None  # the product is the UNet's alone
        self.model.name_or_path = self.model_name  # what a delta's model card names as its base (transformers' attribute)
        self.inputs, self.text, self.fixed, self.sets = {}, {}, {}, {}
        if not splits:
            return
        self.sets = self._images(splits)
        if "train" in splits:
            torch.manual_seed(cfg.seed)  # the training noise (seeds.py)
        conditional = self.diffusion.conditional
        for role, images in self.sets.items():
            if conditional and images.captions is None:
                raise UsageError(f"{self.model_name} is text-conditioned but the {role} images have no captions; "
                                 f"add {img.METADATA} or a .txt file per image (docs/cli.md)")  # fmt: skip
            self.inputs[role] = dm.encode_images(self.diffusion, images.images)
            if conditional:
                self.text[role] = dm.encode_captions(self.diffusion, images.captions, cfg.max_length)
            if role in HELD_OUT:
                self.fixed[role] = fixed_noise(self.inputs[role], self.diffusion.scheduler.config.num_train_timesteps)
        if not conditional and any(s.captions for s in self.sets.values()) and self.cfg.train_file:
            log("      the UNet is unconditional: the captions are not used")
        log(f"data: {self.source}: { {r: len(s) for r, s in self.sets.items()} } images of "
            f"{self.diffusion.sample_size}x{self.diffusion.sample_size}" + (", captioned" if conditional else ""))  # fmt: skip

    def _images(self, splits) -> dict[str, img.ImageSet]:
        cfg, model = self.cfg, self.diffusion

        def read(folder):
            column = (cfg.text_columns or [None])[0]
            return img.read_image_folder(folder, model.sample_size, model.image_channels, column)

        if cfg.dataset:
            raise UsageError("--task diffusion reads image folders (--train-file FOLDER), not hub datasets")
        if cfg.train_file is None:
            if cfg.validation_file or cfg.test_file:
                raise UsageError("--validation-file/--test-file need --train-file; without it the digits 5-9 are used")
            from ...models.digits_unet import ADAPT_CLASSES

            if model.sample_size != 16 or model.image_channels != 1:
                raise UsageError(f"{self.model_name} makes {model.image_channels}-channel {model.sample_size}px images; "
                                 "the embedded digits are 1-channel 16px: give --train-file with a folder of images")  # fmt: skip
            everything = img.digits(ADAPT_CLASSES, 16)
        else:
            everything = read(cfg.train_file)
        self.source = everything.source
        given = {role: getattr(cfg, f"{role}_file") for role in HELD_OUT}
        missing = {role: getattr(cfg, f"{role}_fraction") for role in HELD_OUT if not given[role]}
        parts = img.carve(everything, missing, cfg.split_seed) if missing else {"train": everything}
        for role, path in given.items():
            if path and role in splits:
                parts[role] = read(path)
        limits = {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_eval_samples}
        return {role: img.limit(parts[role], limits[role], cfg.split_seed) for role in splits if role in parts}

    def default_targets(self, model):
        return {"target_modules": dm.layer_suffixes(model)}

    @property
    def train_size(self) -> int:
        return len(self.inputs["train"])

    def batches(self, order, batch_size):
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = {"inputs": self.inputs["train"][rows]}
            if "train" in self.text:
                batch["text"] = self.text["train"][rows]
            yield batch

    def loss(self, model, batch):
        x0 = batch["inputs"]
        # drawn on the CPU from the global generator (checkpointed): the same numbers on any device
        noise = torch.randn(x0.shape).to(x0.device)
        steps = torch.randint(0, self.diffusion.scheduler.config.num_train_timesteps, (len(x0),)).to(x0.device)
        return dm.noise_loss(model, self.diffusion.scheduler, x0, noise, steps, batch.get("text"))

    # -- measuring ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, split):
        """The mean denoising loss over the split's images, each at the EVAL_TIMESTEPS fixed timesteps
        with fixed noise; per timestep too. Ranks measure every world-size-th image and add up."""
        if split not in self.fixed:
            raise UsageError(f"no {split} images to measure")
        noise, timesteps = self.fixed[split]
        x0, text = self.inputs[split], self.text.get(split)
        device = next(model.parameters()).device
        mine = torch.arange(self.world.rank, len(x0), self.world.size)
        pairs = [(i, j) for i in mine.tolist() for j in range(len(timesteps))]
        sums = torch.zeros(len(timesteps), dtype=torch.float64)
        was_training = model.training
        model.eval()
        for start in range(0, len(pairs), self.cfg.eval_batch_size):
            chunk = pairs[start : start + self.cfg.eval_batch_size]
            rows, cols = torch.tensor([i for i, _ in chunk]), torch.tensor([j for _, j in chunk])
            losses = dm.noise_loss(model, self.diffusion.scheduler, x0[rows].to(device), noise[rows, cols].to(device),
                                   timesteps[cols].to(device), text[rows].to(device) if text is not None else None,
                                   reduction="none")  # fmt: skip
            sums.index_add_(0, cols, losses.double().cpu())
        model.train(was_training)
        totals = distributed.all_sum(torch.cat([sums, torch.tensor([float(len(mine))], dtype=torch.float64)]), self.world)
        n = float(totals[-1])
        per_t = totals[:-1] / n
        return {"loss": float(per_t.mean()), "images": int(n),
                **{f"loss_t{int(t)}": float(v) for t, v in zip(timesteps, per_t, strict=True)}}  # fmt: skip

    def baseline(self, model):
        held = {role: self.evaluate(model, role) for role in HELD_OUT if role in self.fixed}
        return {**held, **self._grid(model, SAMPLES_BEFORE)}

    def samples(self, model):
        return self._grid(model, SAMPLES_AFTER)

    def _grid(self, model, name: str) -> dict:
        """Sample the grid (every rank: a conditional batch may need all of them) and write it (rank 0)."""
        cfg, prompts = self.cfg, None
        text = None
        if self.diffusion.conditional:
            captions = (self.sets.get("validation") or self.sets.get("test") or self.sets["train"]).captions
            prompts = [captions[i % len(captions)] for i in range(cfg.num_samples)]
            text = dm.encode_captions(self.diffusion, prompts, cfg.max_length)
        images = dm.sample(self.diffusion, model, cfg.num_samples, cfg.sample_steps, cfg.seed, text)
        out = {"grid": name, "sample_steps": cfg.sample_steps, "seed": cfg.seed}
        if prompts:
            out["prompts"] = prompts
        if cfg.output_dir and self.world.main:
            from ...report.grid import save_grid

            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)  # the baseline's grid comes before config.json
            save_grid(images, Path(cfg.output_dir) / name, scale=max(1, 64 // images.shape[-1]))
        return {"samples": out}

    def describe(self):
        scheduler = self.diffusion.scheduler.config
        return {
            "data": {
                "source": getattr(self, "source", None),
                "sizes": {role: len(s) for role, s in self.sets.items()},
                "captions": self.diffusion.conditional,
                "image_size": self.diffusion.sample_size,
                "channels": self.diffusion.image_channels,
            },
            "scheduler": {"num_train_timesteps": scheduler.num_train_timesteps, "beta_schedule": scheduler.beta_schedule,
                          "prediction_type": scheduler.prediction_type},  # fmt: skip
        }

    def title(self):
        return f"{getattr(self, 'source', self.model_name)} (diffusion)"


def fixed_noise(inputs: torch.Tensor, num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (n, EVAL_TIMESTEPS, *shape), timesteps (EVAL_TIMESTEPS,)) from EVAL_SEED."""
    steps = torch.tensor([int((j + 0.5) * num_train_timesteps / EVAL_TIMESTEPS) for j in range(EVAL_TIMESTEPS)])
    generator = torch.Generator().manual_seed(EVAL_SEED)
    noise = torch.randn(len(inputs), EVAL_TIMESTEPS, *inputs.shape[1:], generator=generator)
    return noise, steps
