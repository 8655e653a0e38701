"""Checkpoints and --resume: a run killed with SIGKILL and resumed ends where an uninterrupted one does,
for every task and for methods that change their trainable tensors mid-run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fixtures_cli import product_tensors, tiny_bert_fixture, topic_files_fixture  # noqa: F401
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: F401
from test_causal_lm import kjv, tokenizer  # noqa: F401  (fixtures)
from test_cli import SRC, run_cli, tiny_args


def kill_after_checkpoint(args, out, at_least: int) -> int:
    """Start a run in its own process and SIGKILL it once a checkpoint of step >= at_least exists."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sparsedelta", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint, killed_at = out / "checkpoint.pt", None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            step = torch.load(checkpoint, weights_only=False)["step"]
            if step >= at_least:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and killed_at is not None, "the run ended before it could be killed"
    assert not (out / "metrics.json").exists()
    # the run may have written a later checkpoint between our read and the signal's arrival
    return torch.load(checkpoint, weights_only=False)["step"]


def check_resume_matches(reference_args, killed_args, tmp_path, at_least: int, steps: int) -> tuple[dict, dict]:
    reference = run_cli(*reference_args)
    assert reference.returncode == 0, reference.stderr[-2000:]
    out = tmp_path / "killed"
    killed_at = kill_after_checkpoint(killed_args, out, at_least)
    assert killed_at < steps
    resumed = run_cli("train", "--resume", out, "--no-progress")
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
