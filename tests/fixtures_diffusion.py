"""Tiny diffusion fixtures: a randomly initialised 8-px UNet saved as a diffusers pipeline folder (unet/,
scheduler/), a text-conditioned one with the embedded MiniLM as its text encoder, and folders of
8x8 digit images (scikit-learn's, as PNG files) with and without captions."""

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")


def tiny_unet(conditional: bool = False, cross_attention_dim: int = 384):
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(0)
    if conditional:
        return UNet2DConditionModel(
            sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=4, attention_head_dim=4, cross_attention_dim=cross_attention_dim,
        )  # fmt: skip
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip


def save_pipeline(folder, unet, text_encoder_dir=None):
    from diffusers import DDPMScheduler

    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=1000).save_pretrained(folder / "scheduler")
    if text_encoder_dir is not None:
        from transformers import AutoModel, AutoTokenizer

        AutoModel.from_pretrained(text_encoder_dir).save_pretrained(folder / "text_encoder")
        AutoTokenizer.from_pretrained(text_encoder_dir).save_pretrained(folder / "tokenizer")
    return folder


def write_digits(folder, count=40, captions=None):
    """`count` of scikit-learn's 8x8 digits 5-9 as grey PNG files; captions: None, "jsonl" or "txt"."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    keep = [i for i in range(len(data.target)) if data.target[i] >= 5][:count]
    words = {5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
    rows = []
    for n, i in enumerate(keep):
        name = f"img{n:03d}.png"
        pixels = (data.images[i] * 255 / 16).round().astype("uint8")
        Image.fromarray(pixels, mode="L").save(folder / name)
        caption = f"a handwritten {words[int(data.target[i])]}"
        if captions == "txt":
            (folder / name).with_suffix(".txt").write_text(caption)
        rows.append({"file_name": name, "text": caption})
    if captions == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="session", name="tiny_unet_dir")
def tiny_unet_dir_fixture(tmp_path_factory):
    return save_pipeline(tmp_path_factory.mktemp("tiny-unet"), tiny_unet())


@pytest.fixture(scope="session", name="tiny_cond_dir")
def tiny_cond_dir_fixture(tmp_path_factory, minilm_path):
    return save_pipeline(tmp_path_factory.mktemp("tiny-cond-unet"), tiny_unet(conditional=True), minilm_path)


@pytest.fixture(scope="session", name="digit_images")
def digit_images_fixture(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits") / "images")


@pytest.fixture(scope="session", name="captioned_digits")
def captioned_digits_fixture(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits-captioned") / "images", captions="jsonl")


def diffusion_args(model_dir, images, out, *extra):
    args = ["train", "--task", "diffusion", "--model", model_dir, "--train-file", images, "--output-dir", out,
            "--no-progress", "--batch-size", 8, "--num-samples", 4, "--sample-steps", 4, "--threads", 1, *extra]
    return [str(a) for a in args]
