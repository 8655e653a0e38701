"""Checkpoints and --resume: a run killed with SIGKILL and resumed ends where an uninterrupted one does."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401
from sparsedelta.core.io import read
from test_cli import SRC, run_cli, tiny_args

STEPS = 120


def args_for(tiny_bert, topic_files, out):
    # re-selection at step 25 happens before the checkpoint the run is killed after, so resuming
    # must restore which entries were frozen, not just their values
    return tiny_args(tiny_bert, topic_files, out, "--max-steps", STEPS, "--checkpoint-every", 10, "--eval-every", 30,
                     "--option", "reselect_step=25", "--threshold", 2e-3, "--seed", 3, "--threads", 1)  # fmt: skip


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_bert, topic_files, tmp_path):
    reference = run_cli(*args_for(tiny_bert, topic_files, tmp_path / "reference"))
    assert reference.returncode == 0, reference.stderr[-2000:]

    out = tmp_path / "killed"
    env = {"PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sparsedelta", *args_for(tiny_bert, topic_files, out)],
                            env={**__import__("os").environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint, killed_at = out / "checkpoint.pt", None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if checkpoint.exists():
            step = torch.load(checkpoint, weights_only=False)["step"]
            if step >= 40:
                proc.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and killed_at is not None, "the run ended before it could be killed"
    assert not (out / "metrics.json").exists() and torch.load(checkpoint, weights_only=False)["step"] < STEPS

    resumed = run_cli("train", "--resume", out, "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed {out} at step" in resumed.stdout and not checkpoint.exists()

    (_, ref), (_, got) = read(tmp_path / "reference"), read(out)
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)
    m_ref = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    assert [s["step"] for s in m["steps"]] == list(range(1, STEPS + 1))
    torch.testing.assert_close([s["loss"] for s in m["steps"]], [s["loss"] for s in m_ref["steps"]], rtol=1e-5, atol=1e-6)
    assert [e["step"] for e in m["events"]] == [25] == [e["step"] for e in m_ref["events"]]
    assert m["test"]["accuracy"] == m_ref["test"]["accuracy"]
    assert m["timings"]["segments"] == 2
