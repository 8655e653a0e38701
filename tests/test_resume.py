"""Checkpoints and --resume: a run killed with SIGKILL and resumed ends where an uninterrupted one does,
for every task and for methods that change their trainable tensors mid-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fixtures_cli import product_tensors, tiny_bert_fixture, topic_files_fixture  # noqa: F401
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: F401
from test_causal_lm import kjv, tokenizer  # noqa: F401  (fixtures)
from test_cli import SRC, tiny_args
from test_sft import sft_args, sft_files  # noqa: F401  (a fixture)

TORCHRUN = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")  # a `launch` of 2 CPU processes
ENV = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}


def launched(args, launch=()):
    """`python [launch] -m sparsedelta args` in a fresh process (launch: e.g. TORCHRUN)."""
    return subprocess.run([sys.executable, *launch, "-m", "sparsedelta", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=300)  # fmt: skip


def _state_and_parent(stat: Path) -> tuple[str, int]:
    try:
        state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        return state, int(ppid)
    except (OSError, ValueError):
        return "X", 0  # gone


def children(pid: int) -> list[int]:
    """The processes `pid` started (Linux): torchrun starts each worker in a session of its own, so
    killing its process group would leave them running."""
    return [int(s.parent.name) for s in Path("/proc").glob("[0-9]*/stat") if _state_and_parent(s)[1] == pid]


def dead(pid: int) -> bool:
    return _state_and_parent(Path(f"/proc/{pid}/stat"))[0] in ("X", "Z")


def kill_after_checkpoint(args, out, at_least: int, launch=()) -> int:
    """Start a run (under `launch`: the launcher and its workers) and SIGKILL every process of it
    once a checkpoint of step >= at_least exists."""
    proc = subprocess.Popen([sys.executable, *launch, "-m", "sparsedelta", *args], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint, killed_at, workers = out / "checkpoint.pt", None, []
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            step = torch.load(checkpoint, weights_only=False)["step"]
            if step >= at_least:
                workers = children(proc.pid)
                proc.send_signal(signal.SIGKILL)  # the launcher first: it would restart or stop its workers
                for pid in workers:
                    os.kill(pid, signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    while not all(dead(pid) for pid in workers) and time.time() < deadline + 60:
        time.sleep(0.02)
    assert proc.returncode == -signal.SIGKILL and killed_at is not None, "the run ended before it could be killed"
    assert not (out / "metrics.json").exists()
    # the run may have written a later checkpoint between our read and the signal's arrival
    return torch.load(checkpoint, weights_only=False)["step"]


def check_resume_matches(
    reference_args, killed_args, tmp_path, at_least: int, steps: int, launch=()
) -> tuple[dict, dict]:
    reference = launched(reference_args, launch)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    killed_at = kill_after_checkpoint(killed_args, out, at_least, launch)
    assert killed_at < steps
    resumed = launched(["train", "--resume", out, "--no-progress"], launch)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {out} at step {killed_at}" in resumed.stdout and not (out / "checkpoint.pt").exists()

    m_ref = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    ref, got = product_tensors(tmp_path / "reference" / m_ref["product"]), product_tensors(out / m["product"])
    assert ref.keys() == got.keys() and ref
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)
    assert [s["step"] for s in m["steps"]] == list(range(1, steps + 1))
    torch.testing.assert_close([s["loss"] for s in m["steps"]], [s["loss"] for s in m_ref["steps"]], rtol=1e-5, atol=1e-6)
    assert [e["step"] for e in m["events"]] == [e["step"] for e in m_ref["events"]]
    assert m["test"] == pytest.approx(m_ref["test"], rel=1e-6)
    assert m["budget"] == m_ref["budget"]  # the report survives too (Diff Pruning's eligible count)
    assert m["timings"]["segments"] == 2
    return m, m_ref


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_bert, topic_files, tmp_path):
    # re-selection at step 25 happens before the checkpoint the run is killed after, so resuming
    # must restore which entries were frozen, not just their values
    def args(out):
        return tiny_args(tiny_bert, topic_files, out, "--max-steps", 120, "--checkpoint-every", 10, "--eval-every", 30,
                         "--option", "reselect_step=25", "--threshold", 2e-3, "--seed", 3, "--threads", 1)  # fmt: skip

    m, _ = check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, 40, 120)
    assert [e["step"] for e in m["events"]] == [25]


@pytest.mark.slow
@pytest.mark.parametrize("phase", [1, 2])
def test_diff_pruning_resumes_in_either_phase_with_the_same_masks(tiny_bert, topic_files, tmp_path, phase):
    """Phase 1 draws a fresh Hard-Concrete mask per step from a counter that the checkpoint must keep;
    phase 2 must get back its projected positions and the selection report."""

    def args(out):
        return tiny_args(tiny_bert, topic_files, out, "--method", "diff-pruning", "--density", 0.02, "--max-steps", 40,
                         "--checkpoint-every", 4, "--eval-every", 40, "--seed", 1, "--threads", 1)  # fmt: skip

    at_least = 4 if phase == 1 else 16  # the projection is at step 12
    m, _ = check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, at_least, 40)
    assert [e["step"] for e in m["events"]] == [12]


@pytest.mark.slow
def test_causal_lm_resume_after_sigkill(tiny_llama_dir, kjv_text, tmp_path):
    def args(out):
        return lm_args(tiny_llama_dir, kjv_text, out, "--max-steps", 60, "--checkpoint-every", 5, "--eval-every", 30,
                       "--threshold", 2e-3, "--lr", 1e-2, "--threads", 1)  # fmt: skip

    m, m_ref = check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, 10, 60)
    assert m["samples"] == m_ref["samples"] and m["baseline"] == m_ref["baseline"]


@pytest.mark.slow
def test_sora_resumes_inside_a_later_stage(tiny_bert, topic_files, tmp_path):
    """The stage, its ξ and the records of the stages before come back with the gates."""

    def args(out):
        return tiny_args(tiny_bert, topic_files, out, "--method", "sora", "--option", "r=4", "--option",
                         "schedule=[0.5, 20]", "--max-steps", 30, "--checkpoint-every", 4, "--eval-every", 30,
                         "--lr", 5e-3, "--seed", 2, "--threads", 1)  # fmt: skip

    m, m_ref = check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, 16, 30)
    assert [e["step"] for e in m["events"]] == [15]
    assert m["method_report"] == m_ref["method_report"]


@pytest.mark.slow
def test_fsdp_resume_after_sigkill(tiny_bert, topic_files, tmp_path):
    """--fsdp on 2 processes, torchrun and both workers killed after a checkpoint (and after SaRA's
    re-selection), resumed under torchrun: the sharded base comes back from the model files, the
    replicated deltas, head and AdamW state from rank 0's checkpoint."""

    def args(out):
        return tiny_args(tiny_bert, topic_files, out, "--fsdp", "--max-steps", 30, "--checkpoint-every", 4,
                         "--eval-every", 15, "--option", "reselect_step=6", "--threshold", 2e-3, "--seed", 4,
                         "--threads", 1)  # fmt: skip

    m, _ = check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, 8, 30, TORCHRUN)
    assert [e["step"] for e in m["events"]] == [6]
    assert m["world_size"] == 2 and len(set(m["rank_fingerprints"])) == 1 and "sharding" in m


@pytest.mark.slow
def test_sft_resume_after_sigkill_with_packing(tiny_llama_dir, sft_files, tmp_path):  # noqa: F811
    def args(out):
        return sft_args(tiny_llama_dir, sft_files, out, "plain", "--packing", "--max-length", 160, "--max-steps", 60,
                        "--checkpoint-every", 5, "--eval-every", 30, "--batch-size", 2)  # fmt: skip

    m, m_ref = check_resume_matches(args(tmp_path / "reference"), args(tmp_path / "killed"), tmp_path, 10, 60)
    assert m["samples"] == m_ref["samples"] and m["baseline"] == m_ref["baseline"]


def test_a_damaged_or_hostile_checkpoint_is_refused_in_one_line(tiny_bert, topic_files, tmp_path, capsys, monkeypatch):
    """A checkpoint is read as tensors and plain containers only: a pickle that would run code when
    loaded (or a truncated file) ends in one line, and nothing runs."""
    import pickle

    from sparsedelta.cli import main
    from sparsedelta.train import runfolder
    from test_cli import cli_error

    monkeypatch.setattr(runfolder.RunFolder, "remove_checkpoint", lambda self: None)  # keep it, as after a kill
    out = tmp_path / "run"
    assert main(tiny_args(tiny_bert, topic_files, out, "--max-steps", 2, "--checkpoint-every", 1, "--threads", 1)) == 0
    (out / "metrics.json").unlink()  # as if killed before the end
    marker = tmp_path / "ran"

    class Hostile:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (out / "checkpoint.pt").write_bytes(pickle.dumps({"step": Hostile()}))
    assert "the checkpoint is damaged" in cli_error(capsys, "train", "--resume", out, "--no-progress")
    assert not marker.exists()
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04 not really a zip")
    assert "the checkpoint is damaged" in cli_error(capsys, "train", "--resume", out, "--no-progress")
