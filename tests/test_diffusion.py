"""--task diffusion: the noise-prediction loss against a hand computation, a held-out loss that is the
same whatever the batching, sample grids, only SaRA's selected conv/linear entries changing, SaRA,
full fine-tuning and LoRA lowering the held-out loss, a text-conditioned UNet, a run resumed after a
kill, the embedded digits model and the image folder reader."""

import json

import pytest
import torch

from fixtures_diffusion import (  # noqa: F401  (fixtures)
    captioned_digits_fixture,
    diffusion_args,
    digit_images_fixture,
    save_pipeline,
    tiny_cond_dir_fixture,
    tiny_unet,
    tiny_unet_dir_fixture,
    write_digits,
)
from sparsedelta.cli import main
from sparsedelta.core.io import read as read_delta
from sparsedelta.data import images as img
from sparsedelta.methods import method_names
from sparsedelta.models import diffusion as dm
from sparsedelta.train.config import TrainConfig
from sparsedelta.train.tasks import make_task
from sparsedelta.train.tasks.diffusion import EVAL_TIMESTEPS


def alphas_bar(steps=1000):
    """DDPM's linear betas 1e-4 … 0.02 and their cumulative products, computed here in float64."""
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def task_on(model_dir, images, **settings):
    cfg = TrainConfig(task="diffusion", model=str(model_dir), train_file=str(images), **settings).resolved()
    task = make_task(cfg)
    task.load(log=lambda *a, **k: None)
    return task


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_the_loss_is_the_hand_computed_noise_prediction_mse(prediction):
    from diffusers import DDPMScheduler

    unet = tiny_unet().double()
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction)
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(3, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    a = alphas_bar()[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
    with torch.no_grad():
        expected = ((unet(noisy, t).sample - target) ** 2).mean()
        got = dm.noise_loss(unet, scheduler, x0, noise, t)
        per_example = dm.noise_loss(unet, scheduler, x0, noise, t, reduction="none")
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-9)
    assert per_example.shape == (3,) and float(per_example.mean()) == pytest.approx(float(got), rel=1e-6)


def test_the_task_loss_draws_its_noise_and_timesteps_from_the_seeded_generator(tiny_unet_dir, digit_images):
    task = task_on(tiny_unet_dir, digit_images, seed=3)
    batch = next(task.batches(list(range(5)), 5))
    torch.manual_seed(11)
    loss = task.loss(task.model, batch).detach()
    torch.manual_seed(11)  # the same draws, in the task's order: noise, then timesteps
    noise, t = torch.randn(batch["inputs"].shape), torch.randint(0, 1000, (5,))
    a = alphas_bar()[t].view(-1, 1, 1, 1).float()
    with torch.no_grad():
        expected = ((task.model(a.sqrt() * batch["inputs"] + (1 - a).sqrt() * noise, t).sample - noise) ** 2).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # pixels in [-1, 1]: the PNG's 0..255 grey levels, 8x8 as written
    assert batch["inputs"].shape == (5, 1, 8, 8) and batch["inputs"].min() >= -1 and batch["inputs"].max() <= 1


def test_the_held_out_loss_is_fixed_whatever_the_batching_and_leaves_the_generator_alone(tiny_unet_dir, digit_images):
    one = task_on(tiny_unet_dir, digit_images, eval_batch_size=3)
    other = task_on(tiny_unet_dir, digit_images, eval_batch_size=64, seed=5)  # another run seed: the same noise
    state = torch.get_rng_state()
    first = one.evaluate(one.model, "validation")
    assert torch.equal(torch.get_rng_state(), state)  # evaluation draws nothing: resumed runs stay exact
    again, batched = one.evaluate(one.model, "validation"), other.evaluate(other.model, "validation")
    assert first == again
    assert first["loss"] == pytest.approx(batched["loss"], rel=1e-6)
    assert first["images"] == 4 and len([k for k in first if k.startswith("loss_t")]) == EVAL_TIMESTEPS
    per_t = [first[f"loss_t{t}"] for t in (125, 375, 625, 875)]
    assert first["loss"] == pytest.approx(sum(per_t) / 4, rel=1e-9)
    # by hand for one image at t = 125: the task's fixed noise, the model's prediction
    noise, steps = one.fixed["validation"]
    x0 = one.inputs["validation"]
    a = alphas_bar()[steps[0]].float()
    with torch.no_grad():
        pred = one.model(a.sqrt() * x0 + (1 - a).sqrt() * noise[:, 0], steps[:1].expand(len(x0))).sample
    assert first["loss_t125"] == pytest.approx(float(((pred - noise[:, 0]) ** 2).mean()), rel=1e-5)


def test_a_run_writes_sample_grids_before_and_after(tiny_unet_dir, digit_images, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "run"
    assert main(diffusion_args(tiny_unet_dir, digit_images, out, "--method", "full", "--lr", 3e-3, "--max-steps", 4)) == 0
    printed = capsys.readouterr().out
    assert "test denoising loss" in printed and "samples_after.png" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"]["samples"]["grid"] == "samples_before.png"
    assert metrics["samples"] == {"samples": {"grid": "samples_after.png", "sample_steps": 4, "seed": 0}}
    before, after = Image.open(out / "samples_before.png"), Image.open(out / "samples_after.png")
    # 4 samples of 8 px: 2 x 2 with 1-px gaps = 19 px, each pixel drawn 8 x 8
    assert before.size == after.size == (152, 152) and before.mode == "L"
    assert before.tobytes() != after.tobytes()  # the trained UNet samples other images
    # the same seed and model give the same grid: a second baseline grid equals the first
    again = tmp_path / "again"
    assert main(diffusion_args(tiny_unet_dir, digit_images, again, "--method", "full", "--max-steps", 1)) == 0
    assert Image.open(again / "samples_before.png").tobytes() == before.tobytes()


def test_grid_pixels_places_each_image_in_row_order():
    from sparsedelta.report.grid import grid_pixels

    images = torch.stack([torch.full((1, 2, 2), v) for v in (-1.0, 1.0, 0.0)])
    grid = grid_pixels(images, columns=2)
    assert grid.shape == (2 * 3 + 1, 2 * 3 + 1, 1)
    assert grid[1:3, 1:3].unique().tolist() == [0] and grid[1:3, 4:6].unique().tolist() == [255]
    assert grid[4:6, 1:3].unique().tolist() == [128] and grid[4:6, 4:6].unique().tolist() == [0]  # the empty cell


@pytest.mark.parametrize("method", ["sara", "full", "lora"])
def test_sara_full_and_lora_lower_the_held_out_loss_and_eval_reproduces_it(method, tiny_unet_dir, digit_images, tmp_path, capsys):
    lr = {"sara": 2e-2, "full": 3e-3, "lora": 1e-2}[method]
    extra = ["--threshold", 5e-3] if method == "sara" else []
    out = tmp_path / "run"
    assert main(diffusion_args(tiny_unet_dir, digit_images, out, "--method", method, "--lr", lr, "--max-steps", 20,
                               "--eval-every", 10, *extra)) == 0  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    val = [e["loss"] for e in m["evals"]]
    assert [e["step"] for e in m["evals"]] == [0, 10, 20] and val[-1] < val[0]
    assert m["test"]["loss"] < m["baseline"]["test"]["loss"]
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(m["test"]["loss"], rel=1e-6)
    if method != "full":  # the base model under the adapter's disabled(): the loss measured before training
        assert result["base"]["loss"] == pytest.approx(m["baseline"]["test"]["loss"], rel=1e-6)
        # merged into a plain UNet, written as a pipeline folder: the run's test loss as a base model
        assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
        merged = task_on(tmp_path / "merged", digit_images)
        assert merged.evaluate(merged.model, "test")["loss"] == pytest.approx(m["test"]["loss"], rel=1e-5)


def test_sara_changes_only_its_selected_conv_and_linear_entries(tiny_unet_dir, digit_images, tmp_path):
    from diffusers import UNet2DModel

    from sparsedelta.train.finished import load_run

    out = tmp_path / "run"
    assert main(diffusion_args(tiny_unet_dir, digit_images, out, "--method", "sara", "--lr", 2e-2, "--threshold", 5e-3,
                               "--max-steps", 5)) == 0  # fmt: skip
    base = UNet2DModel.from_pretrained(tiny_unet_dir / "unet")
    trained = load_run(out).model
    _, delta = read_delta(out / "delta.safetensors")
    base_params, trained_params, kinds = dict(base.named_parameters()), dict(trained.named_parameters()), {}
    for name, module in base.named_modules():
        kinds[f"{name}.weight"] = type(module).__name__
    changed_kinds = set()
    with torch.no_grad():
        for name, param in ((n, trained_params[n]) for n in base_params):
            moved = (param != base_params[name]).flatten().nonzero().flatten()
            key = f"{name}.indices"
            if key not in delta:
                assert len(moved) == 0, f"{name} changed without a delta"
                continue
            positions = delta[key].long()
            assert set(moved.tolist()) <= set(positions.tolist()), name
            # the merged weight is θ + the stored values at the stored positions, exactly
            expect = base_params[name].flatten().clone()
            expect[positions] += delta[f"{name}.values"].to(expect.dtype)
            torch.testing.assert_close(param.flatten(), expect, rtol=0, atol=1e-7)
            # every selected entry had |θ| below the threshold
            assert bool((base_params[name].flatten()[positions].abs() < 5e-3).all()), name
            if len(moved):
                changed_kinds.add(kinds[name])
    assert {"Conv2d", "Linear"} <= changed_kinds


def test_a_text_conditioned_unet_trains_on_captions(tiny_cond_dir, captioned_digits, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(diffusion_args(tiny_cond_dir, captioned_digits, out, "--method", "sara", "--threshold", 5e-3,
                               "--lr", 2e-2, "--max-steps", 6, "--eval-every", 6, "--max-length", 8)) == 0  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["evals"][-1]["loss"] < m["evals"][0]["loss"]
    assert m["samples"]["samples"]["prompts"][0].startswith("a handwritten ")
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["captions"] is True
    # the captions reach the UNet: another caption gives another held-out loss
    task = task_on(tiny_cond_dir, captioned_digits, max_length=8)
    x0, (noise, steps) = task.inputs["validation"], task.fixed["validation"]
    with torch.no_grad():
        same = dm.noise_loss(task.model, task.diffusion.scheduler, x0, noise[:, 1], steps[1].expand(len(x0)), task.text["validation"])
        other_text = dm.encode_captions(task.diffusion, ["a photo of a cat"] * len(x0), 8)
        other = dm.noise_loss(task.model, task.diffusion.scheduler, x0, noise[:, 1], steps[1].expand(len(x0)), other_text)
    assert task.text["validation"].shape == (len(x0), 8, 384) and float(same) != pytest.approx(float(other), rel=1e-6)


def test_captions_from_text_files_and_the_errors_of_an_image_folder(tmp_path, tiny_cond_dir):
    folder = write_digits(tmp_path / "txt", count=6, captions="txt")
    read = img.read_image_folder(folder, 16, 3)
    assert read.images.shape == (6, 3, 16, 16) and read.captions[0].startswith("a handwritten ")
    (folder / "img000.txt").unlink()
    with pytest.raises(ValueError, match="have no caption.*img000.png"):
        img.read_image_folder(folder, 8, 1)
    plain = write_digits(tmp_path / "plain", count=6)
    assert img.read_image_folder(plain, 8, 1).captions is None
    with pytest.raises(ValueError, match="no captions"):
        task_on(tiny_cond_dir, plain, validation_fraction=0.2, test_fraction=0.2)
    with pytest.raises(ValueError, match="not a folder"):
        img.read_image_folder(plain / "img000.png", 8, 1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        img.read_image_folder(tmp_path / "bad", 8, 1)


def test_layer_suffixes_target_every_conv_and_linear_and_nothing_else():
    from torch import nn

    unet = tiny_unet()
    suffixes = dm.layer_suffixes(unet)
    assert {"conv1", "conv2", "conv_in", "conv_out", "to_q", "to_out.0", "time_emb_proj"} <= set(suffixes)
    hit = {n for n, _ in unet.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)}
    layers = {n for n, m in unet.named_modules() if type(m) in (nn.Linear, nn.Conv2d)}
    assert hit == layers


def test_the_embedded_model_builds_once_into_the_cache(tmp_path, monkeypatch):
    from sparsedelta.models import digits_unet

    monkeypatch.setenv("SPARSEDELTA_CACHE", str(tmp_path / "cache"))
    lines = []
    folder = digits_unet.embedded_model(lines.append, steps=2)
    assert (folder / "unet" / "config.json").is_file() and (folder / "scheduler" / "scheduler_config.json").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folder.name]  # no temporary folder left
    assert any("building" in line for line in lines)
    lines.clear()
    assert digits_unet.embedded_model(lines.append, steps=2) == folder and not lines  # cached: no rebuild
    model = dm.load_diffusion(str(folder))
    assert model.sample_size == 16 and model.image_channels == 1 and not model.conditional
    five_to_nine = img.digits(digits_unet.ADAPT_CLASSES)
    assert len(five_to_nine) == 896 and five_to_nine.images.shape[1:] == (1, 16, 16)


def test_loading_errors_name_the_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        dm.load_diffusion(str(tmp_path / "file"))
    (tmp_path / "notunet").mkdir()
    (tmp_path / "notunet" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not one of UNet2DModel"):
        dm.load_diffusion(str(tmp_path / "notunet"))
    lonely = save_pipeline(tmp_path / "lonely", tiny_unet(conditional=True))
    with pytest.raises(ValueError, match="no text_encoder/"):
        dm.load_diffusion(str(lonely))


@pytest.mark.slow
def test_a_diffusion_run_resumes_after_a_kill_where_an_uninterrupted_run_ends(tiny_unet_dir, digit_images, tmp_path):
    """SIGKILL after a checkpoint, then --resume: the same delta, step losses (the training noise comes
    back with the global generator), held-out and test losses as a run never stopped."""
    from test_resume import check_resume_matches

    def args(out):
        return diffusion_args(tiny_unet_dir, digit_images, out, "--method", "sara", "--threshold", 5e-3, "--lr", 2e-2,
                              "--max-steps", 80, "--checkpoint-every", 5, "--eval-every", 40, "--seed", 2)  # fmt: skip

    m, m_ref = check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, 10, 80)
    assert [e["loss"] for e in m["evals"]] == pytest.approx([e["loss"] for e in m_ref["evals"]], rel=1e-6)
    assert m["baseline"] == m_ref["baseline"]
    grids = [(tmp_path / run / "samples_after.png").read_bytes() for run in ("reference", "killed")]
    assert grids[0] == grids[1]


LINEAR_ONLY = {"shira": ["--option", "r=1"], "supertuning": []}  # PEFT's SHiRA and Super-Tuning adapt nn.Linear alone


@pytest.mark.parametrize("method", [m for m in method_names() if m not in ("sara", "full", "lora")])
def test_every_other_method_trains_a_unet_and_eval_reproduces_it(method, tiny_unet_dir, digit_images, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--target-modules", "to_q", "to_k", "to_v", "to_out.0", *LINEAR_ONLY[method]] if method in LINEAR_ONLY else []
    assert main(diffusion_args(tiny_unet_dir, digit_images, out, "--method", method, "--max-steps", 3, *extra)) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert [s["step"] for s in m["steps"]] == [1, 2, 3] and all(s["loss"] == s["loss"] for s in m["steps"])
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(m["test"]["loss"], rel=1e-6)


def test_linear_only_methods_refuse_the_default_conv_targets_by_name(tiny_unet_dir, digit_images, tmp_path, capsys):
    from test_cli import cli_error

    message = cli_error(capsys, *diffusion_args(tiny_unet_dir, digit_images, tmp_path / "run", "--method", "supertuning"))
    assert "nn.Linear weights only" in message and "Conv2d" in message
    message = cli_error(capsys, *diffusion_args(tiny_unet_dir, digit_images, tmp_path / "q", "--base-quantization", "4bit"))
    assert "--base-quantization is not supported with --task diffusion" in message
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def test_predict_refuses_a_diffusion_run_by_name(tiny_unet_dir, digit_images, tmp_path, capsys):
    from test_cli import cli_error

    out = tmp_path / "run"
    assert main(diffusion_args(tiny_unet_dir, digit_images, out, "--max-steps", 1)) == 0
    (tmp_path / "rows.csv").write_text("text\nhello\n")
    message = cli_error(capsys, "predict", "--adapter", f"digits={out}", "--input-file", tmp_path / "rows.csv",
                        "--output", tmp_path / "p.jsonl")  # fmt: skip
    assert "--adapter digits: a diffusion run" in message


def test_a_latent_diffusion_pipeline_trains_on_the_vae_latents(digit_images, tmp_path):
    """A pipeline folder with vae/: images are encoded once to scaled latent means, the UNet denoises
    4-channel 4x4 latents of the 8x8 grey images, and the sample grid is decoded back to pixels."""
    from diffusers import AutoencoderKL, UNet2DModel
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=8)  # fmt: skip
    unet = UNet2DModel(sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)  # fmt: skip
    folder = save_pipeline(tmp_path / "ldm", unet)
    vae.save_pretrained(folder / "vae")
    task = task_on(folder, digit_images)
    assert task.diffusion.sample_size == 8 and task.diffusion.image_channels == 1
    pixels = img.read_image_folder(digit_images, 8, 1).images
    rows = [int(name[3:6]) for name in task.sets["train"].names[:3]]  # img007.png is the folder's 8th image
    with torch.no_grad():
        expected = vae.encode(pixels[rows]).latent_dist.mean * vae.config.scaling_factor
    assert task.inputs["train"].shape[1:] == (4, 4, 4)
    torch.testing.assert_close(task.inputs["train"][:3], expected)
    out = tmp_path / "run"
    assert main(diffusion_args(folder, digit_images, out, "--method", "sara", "--max-steps", 2)) == 0
    assert Image.open(out / "samples_after.png").size == (152, 152)  # decoded: 8 px images, 2 x 2
    assert main(["merge", str(out), "--output", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "vae" / "config.json").is_file()


def test_a_hub_pipeline_loads_from_the_hub_cache_offline(tiny_unet_dir, tmp_path):
    """A hub id resolves through huggingface_hub: here a pipeline laid out in a hub cache (as a download
    leaves it), read offline in a fresh process; its stored scheduler (v-prediction here) is the one used."""
    import shutil
    import subprocess
    import sys

    from diffusers import DDPMScheduler

    from test_resume import ENV

    snapshot = tmp_path / "hub" / "models--someone--tiny-ddpm" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_unet_dir / "unet", snapshot / "unet")
    DDPMScheduler(num_train_timesteps=500, prediction_type="v_prediction").save_pretrained(snapshot / "scheduler")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    code = ("from sparsedelta.models.diffusion import load_diffusion; m = load_diffusion('someone/tiny-ddpm'); "
            "print(type(m.unet).__name__, m.scheduler.config.num_train_timesteps, m.scheduler.config.prediction_type)")  # fmt: skip
    env = {**ENV, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["UNet2DModel", "500", "v_prediction"]
    missing = subprocess.run([sys.executable, "-m", "sparsedelta", "train", "--task", "diffusion", "--model", "nobody/none",
                              "--output-dir", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "cannot load the diffusion model nobody/none" in missing.stderr


def test_the_digit_reader_of_the_diffusion_study_reads_real_digits():
    """study/diffusion_digits.py counts which digits samples are; on the real 16 px digits it must read 5-9 as 5-9."""
    from conftest import load_script

    study = load_script("study/diffusion_digits.py", "study_diffusion_digits")
    reader, accuracy = study.digit_reader()
    assert accuracy > 0.95
    high, low = study.read_samples(img.digits((5, 6, 7, 8, 9)).images, reader), study.read_samples(img.digits((0, 1)).images, reader)
    assert high["five_to_nine"] > 0.95 and low["five_to_nine"] < 0.05 and sum(high["counts"]) == 896
