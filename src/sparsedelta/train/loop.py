"""The one training loop: from a `TrainConfig` to a finished run folder, for every task and method.

`train` reads top to bottom: the task loads its model and data, the method's runner attaches
itself, AdamW runs over the runner's parameter groups with a warm-up + decay schedule, the task
evaluates, checkpoints are written, and the run folder gets the product, metrics and plots.
Resuming restores everything that decides the next step (the runner's state, optimizer and
scheduler state, random generators, the position in the data order), so a resumed run ends where
an uninterrupted one would. Launched by torchrun, every process runs it; gradients are averaged
across processes and only rank 0 writes or prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__, seeds
from ..data.batches import group_by_length
from ..errors import UsageError
from ..methods import Budget, MethodRunner, make_runner
from . import distributed, sharding
from .card import run_card
from .config import TrainConfig
from .precision import Precision
from .runfolder import CONFIG, METRICS, RUNS, RunFolder, new_run_path, peak_memory_mib
from .schedule import phased_lr_factor
from .tasks import Task, make_task, to_device
from .threads import pick_threads


@dataclass
class RunResult:
    folder: Path
    test: dict
    budget: Budget
    metrics: dict
    product: Path | None = None


def pick_device(requested: str | None, world: distributed.World) -> torch.device:
    if requested:
        try:
            return torch.device(requested)
        except RuntimeError as e:
            raise UsageError(f"--device {requested}: {e}; use cpu, cuda or cuda:N") from e
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if world.active else torch.cuda.current_device())
    return torch.device("cpu")


def epoch_order(
    n: int, epoch: int, seed: int, world: distributed.World, lengths: list[int] | None = None, batch_size: int = 1
) -> list[int]:
    """This rank's example indices for an epoch: one seeded permutation shared by all ranks (grouped by
    length when `lengths` are given), padded by wrapping around to a multiple of the world size (as
    DistributedSampler), dealt out round-robin."""
    perm = torch.randperm(n, generator=seeds.epoch_generator(seed, epoch)).tolist()
    if lengths is not None:
        perm = group_by_length(perm, lengths, batch_size * world.size)
    padded = perm + perm[: (-n) % world.size]
    return padded[world.rank :: world.size]


def steps_per_epoch(n: int, batch_size: int, world: distributed.World) -> int:
    return math.ceil(math.ceil(n / world.size) / batch_size)


def state_fingerprint(runner: MethodRunner, model) -> str:
    """A hash of everything trained, to check that ranks agree bit for bit."""
    h = hashlib.sha256()

    def walk(obj, prefix=""):
        if isinstance(obj, torch.Tensor):
            h.update(prefix.encode())
            h.update(obj.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj):
                walk(obj[k], f"{prefix}/{k}")

    walk({k: v for k, v in runner.state_dict(model).items() if k != "rng"})
    return h.hexdigest()


# -- the loop --------------------------------------------------------------------------------------
def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, log=print) -> RunResult:
    """Run `cfg` into a run folder (resume=True: continue the run in cfg.output_dir from its checkpoint)."""
    world = distributed.setup()
    created: list[Path] = []
    try:
        return _train(cfg.resolved(), world, resume, progress, log if world.main else (lambda *a, **k: None), created)
    except BaseException:
        for path in created:  # a run that failed before writing anything leaves no empty folders behind
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    finally:
        distributed.shutdown(world)


def _train(cfg: TrainConfig, world: distributed.World, resume: bool, progress: bool, log, created: list) -> RunResult:
    started = time.perf_counter()
    torch.set_num_threads(pick_threads(cfg.threads))
    runner = make_runner(cfg)  # an unknown method or option fails before anything is loaded
    if cfg.fsdp:
        sharding.check(runner, world)
    if resume:
        folder = RunFolder.existing(cfg.output_dir)
    else:
        if cfg.output_dir:
            folder = RunFolder(cfg.output_dir)
            folder.check_new()
        else:  # created by rank 0 alone, before the model loads
            fresh_root = not Path(RUNS).exists()
            folder = RunFolder(distributed.broadcast(str(new_run_path(cfg.method, RUNS)) if world.main else None, world))
            if world.main:  # removed again if the run fails before writing anything into them
                created.extend([folder.path, *([folder.path.parent] if fresh_root else [])])
        cfg = dataclasses.replace(cfg, output_dir=str(folder.path))

    task = make_task(cfg, world)
    task.load(log)
    device = pick_device(cfg.device, world)
    model = task.model if cfg.fsdp else task.model.to(device)  # --fsdp: only the shards go to the device
    precision = Precision(cfg.precision, device)
    per_epoch = steps_per_epoch(task.train_size, cfg.batch_size, world)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * per_epoch))
    eval_every = cfg.eval_every or max(1, per_epoch // 2)
    load_s = time.perf_counter() - started

    metrics = {
        "title": f"{cfg.method} on {task.title()}",
        "task": task.name,
        "metric": task.metric,
        "steps": [],
        "evals": [],
        "events": [],
        "timings": {"load_s": load_s, "select_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "segments": 1},
    }
    if not resume:
        t = time.perf_counter()
        with precision.autocast():
            baseline = task.baseline(model)  # before the method changes anything
        if baseline is not None:
            metrics["baseline"] = baseline
            if "validation" in baseline:
                metrics["evals"].append({"step": 0, "epoch": 0.0, "split": "validation", **baseline["validation"]})
        metrics["timings"]["eval_s"] += time.perf_counter() - t

    t = time.perf_counter()
    runner.folder = folder.path if world.main else None
    model = runner.prepare(model, task.head_modules, total_steps, task.default_targets(model))
    if cfg.fsdp:  # the frozen base split across the processes, which must now all run every forward
        model = sharding.shard(model, world, device)
        task.world = distributed.World()
        metrics["sharding"] = {"local_parameter_entries": distributed.gather(sharding.local_entries(model), world)}
    metrics["timings"]["select_s"] = time.perf_counter() - t
    budget = runner.budget(model)
    log(f"model: {task.model_name} ({budget.total:,} parameters); new head trained densely: {task.head_modules}")
    log(f"method: {cfg.method}: {budget.trainable:,} trainable entries, density {budget.density:.3%} of the targets")

    phase_starts = runner.phase_starts(total_steps)
    factor = phased_lr_factor(cfg.schedule, cfg.warmup_ratio, phase_starts, total_steps)

    def optimizer_at(step: int):
        """AdamW over the runner's groups and the schedule, positioned at `step`."""
        optimizer = torch.optim.AdamW(runner.param_groups(model), betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        factors = [(lambda _: 1.0) if g.get("constant_lr") else factor for g in optimizer.param_groups]  # e.g. Diff Pruning's α
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factors, last_epoch=step - 1)

    step, prior_total = 0, 0.0
    if resume:
        state = _restore(folder, runner, model, world)
        step, metrics = state["step"], _continued(state["metrics"], metrics)
        optimizer, scheduler = optimizer_at(step)  # after the runner's state: its groups may differ now
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.load_state_dict(state.get("loss_scaler"))
        prior_total = metrics["timings"].get("total_s", 0.0)
        log(f"resumed {folder.path} at step {step} of {total_steps}")
    else:
        optimizer, scheduler = optimizer_at(0)
        if world.main:
            folder.write_json(CONFIG, _resolved(cfg, task, runner, budget, total_steps, per_epoch, world))
            task.keep_files(folder.path)

    bar = tqdm(total=total_steps, initial=step, disable=not (progress and world.main), unit="step", dynamic_ncols=True,
               desc=f"{cfg.method} epoch {step // per_epoch + 1}")  # fmt: skip
    running = None
    lengths = task.lengths() if cfg.group_by_length else None
    model.train()
    while step < total_steps:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(task.train_size, epoch, cfg.seed, world, lengths, cfg.batch_size)[offset * cfg.batch_size :]
        bar.set_description(f"{cfg.method} epoch {epoch + 1}")
        for batch in task.batches(order, cfg.batch_size):
            t = time.perf_counter()
            runner.before_step(model, step, precision.scale())
            with precision.autocast():
                loss = task.loss(model, to_device(batch, device)).float()
            extra = runner.extra_loss(model, step)  # in float32: a penalty on the float32 values
            precision.backward(loss if extra is None else loss + extra)
            params = runner.trainable(model)  # may change at a schedule event (e.g. SaRA's re-selection)
            distributed.average_gradients(params, world)
            if cfg.max_grad_norm:
                precision.unscale(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            stepped = precision.step(optimizer)  # False: fp16 gradients overflowed, the step was skipped
            if stepped:
                runner.after_optimizer_step(model, optimizer)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            logged = runner.step_record(model)
            if runner.evaluates_before_phase and step in phase_starts[1:] and stepped:
                metrics["evals"].append({**_validate(task, model, precision, metrics), "step": step, "epoch": step / per_epoch,
                                         "before_phase": True})  # fmt: skip
            # only after a step taken; an event due at a skipped step fires at the next one taken (methods/base.py)
            event = runner.on_step(model, step, optimizer) if stepped else None
            if runner.params_changed:  # the method swapped its trainable tensors (e.g. a new phase)
                optimizer, scheduler = optimizer_at(step)
                runner.params_changed = False
            metrics["timings"]["train_s"] += time.perf_counter() - t

            loss_value = float(distributed.all_sum(loss.detach().double(), world)) / world.size
            record = {"step": step, "loss": loss_value, "lr": lr, **logged}
            if extra is not None:
                record["extra_loss"] = float(extra.detach())
            metrics["steps"].append(record)
            running = loss_value if running is None else 0.9 * running + 0.1 * loss_value
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            bar.update()
            if event:
                metrics["events"].append({"step": step, "event": event})
                if world.main and progress:
                    bar.write(f"step {step}: {event}")
            if step % eval_every == 0 or step == total_steps or step in phase_starts:
                val = _validate(task, model, precision, metrics)
                metrics["evals"].append({"step": step, "epoch": step / per_epoch, **val})
                bar.set_postfix(loss=f"{running:.4f}", **{f"val_{task.metric}": f"{val[task.metric]:.4f}"})
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total_steps:
                metrics["timings"]["total_s"] = prior_total + time.perf_counter() - started
                _checkpoint(folder, runner, model, optimizer, scheduler, precision, step, metrics, world)
            if step >= total_steps:
                break
    bar.close()
    runner.finish(model)

    t = time.perf_counter()
    with precision.autocast():
        test = task.evaluate(model, "test")
        samples = task.samples(model)
    metrics["timings"]["test_s"] = time.perf_counter() - t
    budget = runner.budget(model)
    metrics["test"] = test
    if (method_report := runner.report(model)) is not None:
        metrics["method_report"] = method_report
    if samples is not None:
        metrics["samples"] = samples
    metrics["budget"] = {**dataclasses.asdict(budget), "density": budget.density}
    metrics["world_size"] = world.size
    metrics["rank_fingerprints"] = distributed.gather(state_fingerprint(runner, model), world)
    metrics["memory"] = {"peak_rss_mib": distributed.gather(peak_memory_mib(), world)}
    metrics["timings"]["total_s"] = prior_total + time.perf_counter() - started
    metrics["timings"]["steps_per_s"] = step / max(metrics["timings"]["train_s"], 1e-9)
    product = None
    if world.main:
        from ..report import plots  # matplotlib only once a run has something to draw (~0.5 s)

        product = runner.save(model, task.tokenizer, folder.path, card=run_card(cfg, task, metrics, folder.path))
        metrics["product"] = str(Path(product).relative_to(folder.path))
        folder.write_json(METRICS, metrics)
        plots.training_plot(metrics, folder.path / "training.png")
        selection = runner.selection(model)
        if selection:
            plots.density_plot(selection, folder.path / "density.png", f"{cfg.method}: selected fraction per layer and tensor type")
        folder.remove_checkpoint()
    distributed.barrier(world)
    return RunResult(folder.path, test, budget, metrics, product)


def _resolved(cfg: TrainConfig, task: Task, runner, budget, total_steps, per_epoch, world) -> dict:
    return {
        "sparsedelta_version": __version__,
        "train": cfg.to_dict(),
        "task": task.name,
        "model": task.model_name,
        "head_modules": task.head_modules,
        "method": runner.describe(),
        **task.describe(),
        "budget": {**dataclasses.asdict(budget), "density": budget.density},
        "total_steps": total_steps,
        "steps_per_epoch": per_epoch,
        "world_size": world.size,
    }


def _validate(task, model, precision, metrics) -> dict:
    """The validation split's metrics, its time added to the eval timing."""
    t = time.perf_counter()
    with precision.autocast():
        val = task.evaluate(model, "validation")
    metrics["timings"]["eval_s"] += time.perf_counter() - t
    return {"split": "validation", **val}


def _checkpoint(folder, runner, model, optimizer, scheduler, precision, step, metrics, world) -> None:
    # Rank 0's state is the whole run's, under --fsdp too: nothing trained is sharded (the deltas, a
    # new head and their AdamW state are FSDP's ignored_params, replicated), and a resumed run shards
    # the frozen base again from the model's files.
    if world.main:
        folder.save_checkpoint(
            {
                "step": step,
                "world_size": world.size,
                "runner": runner.state_dict(model),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loss_scaler": precision.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "metrics": metrics,
            }
        )
    distributed.barrier(world)


def _restore(folder, runner, model, world) -> dict:
    state = folder.load_checkpoint()
    if state["world_size"] != world.size:
        raise UsageError(
            f"the checkpoint in {folder.path} was written by {state['world_size']} process(es); "
            f"resume it with the same number (now {world.size})"
        )
    runner.load_state_dict(model, state["runner"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def _continued(metrics: dict, fresh: dict) -> dict:
    metrics["timings"]["segments"] = metrics["timings"].get("segments", 1) + 1
    metrics["timings"]["load_s"] += fresh["timings"]["load_s"]
    return metrics
