"""Diffusion models from diffusers: loading a UNet with its noise scheduler (and, for a text-to-image
model, its text encoder, tokenizer and VAE), the noise-prediction loss, and sampling.

A model is a local folder or a hub id in either layout diffusers writes:
- a pipeline: `unet/`, `scheduler/` and, for text-to-image, `text_encoder/`, `tokenizer/` (and
  `vae/` for latent diffusion) side by side, as `DiffusionPipeline.save_pretrained` stores them;
- a bare UNet (`config.json` of a UNet2DModel or UNet2DConditionModel): the scheduler then is
  diffusers' DDPM default (1,000 steps, linear betas), unless a `scheduler/` folder sits beside it.
The training loss always uses a DDPMScheduler built from the stored scheduler's config (a pipeline
may store PNDM or another sampler; its betas and prediction type are what the loss needs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def _diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise UsageError("--task diffusion needs diffusers: pip install 'sparsedelta[diffusion]'") from e
    return diffusers


@dataclass
class DiffusionModel:
    unet: nn.Module
    scheduler: object  # a diffusers DDPMScheduler: the noise levels of training
    name: str
    text_encoder: nn.Module | None = None
    tokenizer: object | None = None
    vae: nn.Module | None = None

    @property
    def conditional(self) -> bool:
        return getattr(self.unet.config, "cross_attention_dim", None) is not None

    @property
    def sample_size(self) -> int:
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return size * self.vae_scale if self.vae is not None else size

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels if self.vae is not None else self.unet.config.in_channels


def load_diffusion(source: str) -> DiffusionModel:
    """The UNet (and its companions) of `source`: a local folder or a hub id, in a pipeline's layout
    or a bare UNet's."""
    d = _diffusers()
    local = Path(source)
    if local.exists() and not local.is_dir():
        raise UsageError(f"--model {source} is a file; give a folder holding a diffusers UNet (or pipeline) or a hub id")
    pipeline = (local / "unet").is_dir() if local.is_dir() else _hub_has(source, "unet")
    sub = "unet" if pipeline else None
    try:
        unet_config = _read_config(source, sub)
        kind = unet_config.get("_class_name")
        if kind not in UNET_CLASSES:
            raise UsageError(f"{source}: {'unet/' if sub else ''}config.json describes a {kind!r}, not one of "
                             f"{', '.join(UNET_CLASSES)}; give a diffusers UNet or pipeline folder")  # fmt: skip
        unet = getattr(d, kind).from_pretrained(source, subfolder=sub)
        has = (lambda part: (local / part).is_dir()) if local.is_dir() else (lambda part: _hub_has(source, part))
        scheduler = (d.DDPMScheduler.from_config(d.DDPMScheduler.load_config(source, subfolder="scheduler"))
                     if has("scheduler") else d.DDPMScheduler(num_train_timesteps=1000))  # fmt: skip
        model = DiffusionModel(unet, scheduler, str(source))
        if model.conditional:
            model.text_encoder, model.tokenizer = _text_encoder(source, has)
        if has("vae"):  # latent diffusion: the UNet denoises the frozen VAE's latents
            model.vae = d.AutoencoderKL.from_pretrained(source, subfolder="vae").eval().requires_grad_(False)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        if isinstance(e, UsageError):
            raise
        raise UsageError(
            f"cannot load the diffusion model {source} ({type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}); "
            "give a diffusers UNet folder or a pipeline folder (unet/, scheduler/, text_encoder/, tokenizer/), or a hub "
            "id (needs the internet or its cache)"
        ) from e
    return model


def _read_config(source: str, subfolder: str | None) -> dict:
    local = Path(source) / (subfolder or "") / "config.json"
    if local.is_file():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(source, "config.json", subfolder=subfolder)).read_text())


MARKERS = {"unet": "config.json", "scheduler": "scheduler_config.json", "text_encoder": "config.json",
           "tokenizer": "tokenizer_config.json", "vae": "config.json"}  # the file that says a pipeline part is there


def _hub_has(repo: str, part: str) -> bool:
    """Whether hub repo `repo` has the pipeline part `part` (unet, scheduler, ...): its file list when
    the hub answers, else its marker file in the local hub cache (offline)."""
    from huggingface_hub import hf_hub_download, list_repo_files

    marker = f"{part}/{MARKERS[part]}"
    try:
        return marker in list_repo_files(repo)
    except Exception:  # offline, or a private repo without a token: what the cache holds
        try:
            hf_hub_download(repo, MARKERS[part], subfolder=part, local_files_only=True)
            return True
        except Exception:
            return False


def _text_encoder(source: str, has):
    """The frozen text encoder and tokenizer a conditional UNet reads its captions through."""
    if not (has("text_encoder") and has("tokenizer")):
        raise UsageError(f"{source}: the UNet is conditional (cross-attention) but there is no text_encoder/ and "
                         "tokenizer/ beside it; give a pipeline folder that has both")  # fmt: skip
    from transformers import AutoModel, AutoTokenizer

    encoder = AutoModel.from_pretrained(source, subfolder="text_encoder").eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    return encoder, tokenizer


def check_text_width(model: DiffusionModel) -> None:
    width = model.unet.config.cross_attention_dim
    hidden = getattr(model.text_encoder.config, "hidden_size", None)
    if hidden is not None and hidden != width:
        raise UsageError(f"{model.name}: the text encoder's width {hidden} is not the UNet's cross_attention_dim {width}")


# -- text ------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_captions(model: DiffusionModel, captions: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """(n, max_length, width) hidden states of the frozen text encoder, computed once on the CPU: the
    encoder never trains, so each caption's states are the same at every step."""
    check_text_width(model)
    length = min(max_length, getattr(model.tokenizer, "model_max_length", max_length) or max_length)
    # as diffusers' pipelines: the attention mask only where the encoder's config asks for it
    use_mask = bool(getattr(model.text_encoder.config, "use_attention_mask", False))
    out = []
    for start in range(0, len(captions), batch_size):
        tokens = model.tokenizer(captions[start : start + batch_size], padding="max_length", truncation=True,
                                 max_length=length, return_tensors="pt")  # fmt: skip
        mask = tokens.get("attention_mask") if use_mask else None
        out.append(model.text_encoder(tokens["input_ids"], attention_mask=mask)[0].float())
    return torch.cat(out)


@torch.no_grad()
def encode_images(model: DiffusionModel, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """Pixels -> what the UNet denoises: the VAE's scaled latent means (latent diffusion), else the pixels."""
    if model.vae is None:
        return images
    scale = model.vae.config.scaling_factor
    return torch.cat([model.vae.encode(images[s : s + batch_size]).latent_dist.mean * scale
                      for s in range(0, len(images), batch_size)])  # fmt: skip


@torch.no_grad()
def decode_images(model: DiffusionModel, latents: torch.Tensor) -> torch.Tensor:
    if model.vae is None:
        return latents
    vae = model.vae.to(latents.device)
    return vae.decode(latents / model.vae.config.scaling_factor).sample


# -- the loss --------------------------------------------------------------------------------------
def predict(unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
    """The UNet's output; `text` (encoder hidden states) for a conditional UNet, else None."""
    if text is None:
        return unet(noisy, timesteps).sample
    return unet(noisy, timesteps, encoder_hidden_states=text).sample


def noise_loss(unet, scheduler, x0, noise, timesteps, text=None, reduction: str = "mean") -> torch.Tensor:
    """The denoising loss: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε and the MSE of the UNet's prediction against its
    target: ε (epsilon prediction, DDPM's), or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 for v-prediction models.
    reduction="none": one mean per example."""
    noisy = scheduler.add_noise(x0, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(x0, noise, timesteps)
    elif kind == "sample":
        target = x0
    else:
        raise UsageError(f"the scheduler's prediction_type {kind!r} is not epsilon, v_prediction or sample")
    error = F.mse_loss(predict(unet, noisy, timesteps, text).float(), target.float(), reduction="none")
    per_example = error.flatten(1).mean(1)
    return per_example if reduction == "none" else per_example.mean()


# -- sampling --------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: DiffusionModel, unet: nn.Module, count: int, steps: int, seed: int, text: torch.Tensor | None = None) -> torch.Tensor:
    """`count` images in [-1, 1], (count, C, H, W), by deterministic DDIM (η = 0) in `steps` steps from
    noise drawn with `seed` on the CPU (the same start on any device)."""
    d = _diffusers()
    sampler = d.DDIMScheduler.from_config(model.scheduler.config)
    sampler.set_timesteps(steps)
    device = next(unet.parameters()).device
    cfg = model.unet.config
    size = cfg.sample_size[0] if isinstance(cfg.sample_size, (list, tuple)) else cfg.sample_size
    x = torch.randn(count, cfg.in_channels, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
    text = text.to(device) if text is not None else None
    was_training = unet.training
    unet.eval()
    for t in sampler.timesteps:
        timesteps = torch.full((count,), int(t), device=device, dtype=torch.long)
        x = sampler.step(predict(unet, x, timesteps, text).float(), t, x).prev_sample
    unet.train(was_training)
    return decode_images(model, x).clamp(-1, 1).cpu()


# -- targets ---------------------------------------------------------------------------------------
def layer_suffixes(unet: nn.Module) -> list[str]:
    """The default targets of a UNet: every nn.Linear and nn.Conv2d, as the last part of their names
    ("conv1", "to_q", "to_out.0", ...): short in a config, and what PEFT's LoRA matches the same way.
    A suffix that would also match another kind of module is replaced by the full names it covers."""
    layers = {n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    others = [n for n, m in unet.named_modules() if n and n not in layers]
    suffixes: set[str] = set()
    for name in layers:
        parts = name.split(".")
        suffix = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        clash = any(o == suffix or o.endswith("." + suffix) for o in others)
        suffixes.add(name if clash else suffix)
    return sorted(suffixes)


def save_pipeline(model: DiffusionModel, unet: nn.Module, folder: str | Path) -> Path:
    """`unet` with `model`'s scheduler (and text encoder, tokenizer, VAE) as a pipeline folder that
    `load_diffusion` (and `--model` of a diffusion run) reads back: unet/, scheduler/, ..."""
    folder = Path(folder)
    unet.save_pretrained(folder / "unet")
    model.scheduler.save_pretrained(folder / "scheduler")
    for part in ("text_encoder", "tokenizer", "vae"):
        if getattr(model, part) is not None:
            getattr(model, part).save_pretrained(folder / part)
    return folder
