"""torchrun with 2 processes on CPU (gloo): identical deltas on both ranks, one writer, and the same
result as one process with the global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fixtures_cli import product_tensors, tiny_bert_fixture, topic_files_fixture  # noqa: F401
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: F401
from sparsedelta.core.io import read
from test_causal_lm import kjv, tokenizer  # noqa: F401  (fixtures)
from test_cli import SRC, run_cli, tiny_args
from test_sft import sft_args, sft_files  # noqa: F401  (a fixture)


@pytest.mark.slow
def test_two_processes_agree_and_match_one_process_with_the_global_batch(tiny_bert, topic_files, tmp_path):
    common = ["--max-steps", 7, "--eval-every", 5, "--threshold", 2e-3, "--seed", 5]
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsedelta",
           *tiny_args(tiny_bert, topic_files, ddp_out, "--batch-size", 8, *common)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("test accuracy:") == 1  # only rank 0 prints
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp"]  # and only rank 0 writes
    metrics = json.loads((ddp_out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert len(metrics["rank_fingerprints"]) == 2 and len(set(metrics["rank_fingerprints"])) == 1
    assert len(metrics["memory"]["peak_rss_mib"]) == 2

    # one process with batch 16 sees the same examples per step (no dropout in the tiny model)
    single = run_cli(*tiny_args(tiny_bert, topic_files, tmp_path / "single", "--batch-size", 16, *common, "--threads", 1))
    assert single.returncode == 0, single.stderr[-3000:]
    (_, a), (_, b) = read(ddp_out), read(tmp_path / "single")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    reference = json.loads((tmp_path / "single" / "metrics.json").read_text())
    torch.testing.assert_close([s["loss"] for s in metrics["steps"]], [s["loss"] for s in reference["steps"]],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert metrics["test"]["examples"] == reference["test"]["examples"] == 18


@pytest.mark.slow
def test_causal_lm_two_processes_match_one_process_with_the_global_batch(tiny_llama_dir, kjv_text, tmp_path):
    common = ["--max-steps", 5, "--eval-every", 5, "--threshold", 2e-3, "--lr", 1e-2, "--seed", 2]
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsedelta",
           *lm_args(tiny_llama_dir, kjv_text, ddp_out, "--batch-size", 2, *common)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("test perplexity:") == 1
    metrics = json.loads((ddp_out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["rank_fingerprints"])) == 1

    single = run_cli(*lm_args(tiny_llama_dir, kjv_text, tmp_path / "single", "--batch-size", 4, *common, "--threads", 1))
    assert single.returncode == 0, single.stderr[-3000:]
    (_, a), (_, b) = read(ddp_out), read(tmp_path / "single")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    reference = json.loads((tmp_path / "single" / "metrics.json").read_text())
    torch.testing.assert_close([s["loss"] for s in metrics["steps"]], [s["loss"] for s in reference["steps"]],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    # ranks split the held-out blocks and add up: the same perplexity as one process
    assert metrics["test"]["perplexity"] == pytest.approx(reference["test"]["perplexity"], rel=1e-5)
    assert metrics["test"]["tokens"] == reference["test"]["tokens"]


@pytest.mark.slow
def test_sora_two_processes_match_one_process(tiny_bert, topic_files, tmp_path):
    """The proximal step is deterministic, so both ranks keep the same gates; and equal to one process."""
    common = ["--method", "sora", "--option", "r=4", "--option", "xi=20", "--max-steps", 5, "--eval-every", 5,
              "--lr", 5e-3, "--seed", 4]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsedelta",
           *tiny_args(tiny_bert, topic_files, tmp_path / "ddp", "--batch-size", 8, *common)]  # fmt: skip
    ddp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert len(set(metrics["rank_fingerprints"])) == 1
    single = run_cli(*tiny_args(tiny_bert, topic_files, tmp_path / "single", "--batch-size", 16, *common, "--threads", 1))
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = product_tensors(tmp_path / "ddp" / "sora"), product_tensors(tmp_path / "single" / "sora")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    reference = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert metrics["method_report"]["ranks"] == reference["method_report"]["ranks"]


@pytest.mark.slow
def test_sft_two_processes_match_one_process_with_the_global_batch(tiny_llama_dir, sft_files, tmp_path):  # noqa: F811
    """The processes' batches hold different numbers of answer tokens: each divides by the global
    count, so together they train as one process with the whole batch."""
    common = ["--max-steps", 4, "--eval-every", 4, "--lr", 1e-2, "--seed", 2]
    ddp_out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsedelta",
           *sft_args(tiny_llama_dir, sft_files, ddp_out, "chat", "--batch-size", 2, *common)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    metrics = json.loads((ddp_out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and len(set(metrics["rank_fingerprints"])) == 1
    single = run_cli(*sft_args(tiny_llama_dir, sft_files, tmp_path / "single", "chat", "--batch-size", 4, *common))
    assert single.returncode == 0, single.stderr[-3000:]
    (_, a), (_, b) = read(ddp_out), read(tmp_path / "single")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)
    reference = json.loads((tmp_path / "single" / "metrics.json").read_text())
    torch.testing.assert_close([s["loss"] for s in metrics["steps"]], [s["loss"] for s in reference["steps"]],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    assert metrics["test"] == pytest.approx(reference["test"], rel=1e-5)
