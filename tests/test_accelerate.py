"""`accelerate launch` with 2 CPU processes: `-m sparsedelta train` gives what one process with the
global batch gives (as under torchrun), and so does transformers.Trainer with SparseDeltaCallback;
the launchers' variables are read (MPI's, for accelerate's mpirun-based multi-CPU mode), and a
launch that started one process where several were asked for is refused.

accelerate's own multi-CPU mode (`--cpu --num_processes N`) needs mpirun and a hostfile, which this
machine lacks; without them it starts one process. Its `--multi_gpu` launcher is torchrun inside and
starts N CPU processes on a machine without GPUs, so the runs here use that."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.core.io import read
from sparsedelta.errors import UsageError
from sparsedelta.methods import MethodSettings, make_runner
from sparsedelta.train.distributed import World, world_from_env
from test_cli import SRC, tiny_args

pytest.importorskip("accelerate")
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no"]  # fmt: skip
TWO_PROCESSES = [*LAUNCH, "--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
TRAINER_SCRIPT = Path(__file__).with_name("trainer_script.py")


def environment(tmp_path):
    # no accelerate config file of this machine's user; one thread per process on the shared CPU
    return {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""}  # fmt: skip


def assert_same_delta(a_path, b_path, **tolerance):
    (_, a), (_, b) = read(a_path), read(b_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **tolerance)


@pytest.mark.slow
def test_sparsedelta_train_under_accelerate_matches_one_process_with_the_global_batch(tiny_bert, topic_files, tmp_path):
    # SaRA with its re-selection at step 4: the loop averages gradients by hand, so the trainable
    # vector may shrink under several processes
    common = ["--max-steps", 6, "--eval-every", 6, "--threshold", 2e-3, "--seed", 3, "--option", "reselect_step=4"]
    cmd = [*TWO_PROCESSES, "-m", "sparsedelta", *tiny_args(tiny_bert, topic_files, tmp_path / "acc", "--batch-size", 8, *common)]
    launched = subprocess.run(cmd, capture_output=True, text=True, env=environment(tmp_path), timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert launched.stdout.count("test accuracy:") == 1  # only rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "hf") == ["acc"]  # and only rank 0 writes
    metrics = json.loads((tmp_path / "acc" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["rank_fingerprints"])) == 1
    assert [e["step"] for e in metrics["events"]] == [4]

    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "one", "--batch-size", 16, *common, "--threads", 1)) == 0
    assert_same_delta(tmp_path / "acc", tmp_path / "one", rtol=1e-4, atol=1e-6)
    reference = json.loads((tmp_path / "one" / "metrics.json").read_text())
    torch.testing.assert_close([s["loss"] for s in metrics["steps"]], [s["loss"] for s in reference["steps"]],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert metrics["events"] == reference["events"]  # the same entries re-selected


@pytest.mark.slow
def test_the_trainer_with_the_callback_under_accelerate_matches_one_process(tiny_bert, topic_files, tmp_path):
    env = environment(tmp_path)
    args = [tiny_bert, topic_files["train"]]
    launched = subprocess.run([*TWO_PROCESSES, TRAINER_SCRIPT, *map(str, args), tmp_path / "acc", "8", "4", "{}"],
                              capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    single = subprocess.run([sys.executable, TRAINER_SCRIPT, *map(str, args), tmp_path / "one", "16", "4", "{}"],
                            capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]

    log, reference = (json.loads((tmp_path / d / "log.json").read_text()) for d in ("acc", "one"))
    assert (log["world_size"], reference["world_size"]) == (2, 1)
    # DDP averaged the delta's gradients; the penalty's gradient is the same on both: identical processes
    assert_same_delta(tmp_path / "acc" / "delta-rank0", tmp_path / "acc" / "delta-rank1", rtol=0, atol=0)
    assert_same_delta(tmp_path / "acc" / "delta-rank0", tmp_path / "one" / "delta-rank0", rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(log["losses"], reference["losses"], rtol=1e-4, atol=1e-6)


def test_a_launch_that_started_one_process_of_two_is_refused(tiny_bert, topic_files, tmp_path):
    cmd = [*LAUNCH, "--cpu", "--num_processes", "2", "-m", "sparsedelta", *tiny_args(tiny_bert, topic_files, tmp_path / "x")]
    launched = subprocess.run(cmd, capture_output=True, text=True, env=environment(tmp_path), timeout=300)
    assert launched.returncode != 0  # the launcher reports our status 2 as its own failure
    assert "accelerate launch --cpu started one process although more were asked for" in launched.stderr
    assert "--multi_gpu --num_processes N" in launched.stderr and not (tmp_path / "x").exists()


def test_the_launchers_variables():
    assert world_from_env({}) == World(0, 1)
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == World(1, 2)  # torchrun, --multi_gpu
    # mpirun under accelerate's multi-CPU mode: Open MPI, MPICH / Intel MPI, MVAPICH
    assert world_from_env({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4"}) == World(3, 4)
    assert world_from_env({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                           "ACCELERATE_USE_CPU": "True"}) == World(1, 2)  # fmt: skip
    assert world_from_env({"MV2_COMM_WORLD_RANK": "0", "MV2_COMM_WORLD_SIZE": "2"}) == World(0, 2)
    assert world_from_env({"ACCELERATE_USE_CPU": "True"}) == World(0, 1)  # one process asked for
    with pytest.raises(UsageError, match="started one process although more were asked for"):
        world_from_env({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})


def test_the_trainer_callback_refuses_reselection_under_several_processes():
    """Seen without the check: DDP fails at the first step after SaRA's re-selection ("Encountered
    gradient which is undefined, but still allreduced by DDP reducer"), its buckets keep the old sizes."""
    pytest.importorskip("transformers")
    from sparsedelta.train.hf import SparseDeltaCallback

    runner = make_runner(MethodSettings(method="sara", options={"reselect_step": 2}))
    runner.config = types.SimpleNamespace(reselect_step=2)  # as after prepare
    callback = SparseDeltaCallback(runner)
    callback.on_train_begin(types.SimpleNamespace(world_size=1), None, None)  # one process: fine
    with pytest.raises(UsageError, match="shrinks its trainable tensors mid-run.*with 2 processes"):
        callback.on_train_begin(types.SimpleNamespace(world_size=2), None, None)
