"""--fsdp: the frozen base sharded across 2 CPU processes (torchrun, gloo, FSDP2's fully_shard), the
deltas replicated and applied as corrections; the same product as data-parallel training."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fixtures_cli import tiny_bert_fixture, topic_files_fixture  # noqa: F401
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: F401
from sparsedelta.cli import main
from sparsedelta.core.io import read
from sparsedelta.train import sharding
from test_causal_lm import kjv, tokenizer  # noqa: F401  (fixtures)
from test_cli import SRC, tiny_args


def torchrun(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsedelta",
           *map(str, args)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def check_same_as_data_parallel(make_args, tmp_path, steps):
    torchrun(make_args(tmp_path / "ddp"))
    sharded = torchrun([*make_args(tmp_path / "fsdp"), "--fsdp"])
    assert sharded.stdout.count("run folder:") == 1  # only rank 0 prints
    metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    reference = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert len(set(metrics["rank_fingerprints"])) == 1  # the replicated deltas agree bit for bit
    total = metrics["budget"]["total"]
    local = metrics["sharding"]["local_parameter_entries"]
    assert len(local) == 2 and all(n < 0.6 * total for n in local)  # each process holds about half
    (_, a), (_, b) = read(tmp_path / "ddp"), read(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    for key in a:  # θx + Δx instead of (θ + Δ)x: float32 rounding apart
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert [s["step"] for s in metrics["steps"]] == list(range(1, steps + 1))
    torch.testing.assert_close([s["loss"] for s in metrics["steps"]], [s["loss"] for s in reference["steps"]],
                               rtol=1e-4, atol=1e-6)  # fmt: skip
    return metrics, reference


@pytest.mark.slow
def test_fsdp_classifier_matches_data_parallel(tiny_bert, topic_files, tmp_path):
    common = ["--max-steps", 5, "--eval-every", 5, "--threshold", 2e-3, "--seed", 5, "--checkpoint-every", 0]
    metrics, reference = check_same_as_data_parallel(
        lambda out: tiny_args(tiny_bert, topic_files, out, *common), tmp_path, 5
    )
    assert metrics["test"] == pytest.approx(reference["test"], rel=1e-4)


@pytest.mark.slow
def test_fsdp_causal_lm_matches_data_parallel(tiny_llama_dir, kjv_text, tmp_path):
    common = ["--max-steps", 3, "--eval-every", 3, "--threshold", 2e-3, "--lr", 1e-2, "--batch-size", 2]
    metrics, reference = check_same_as_data_parallel(
        lambda out: lm_args(tiny_llama_dir, kjv_text, out, *common), tmp_path, 3
    )
    assert metrics["test"]["perplexity"] == pytest.approx(reference["test"]["perplexity"], rel=1e-4)
    assert metrics["samples"] == reference["samples"]  # greedy generation through the sharded model


def test_fsdp_needs_several_processes_and_a_sparse_delta(tiny_bert, topic_files, tmp_path, capsys):
    assert main(tiny_args(tiny_bert, topic_files, tmp_path / "one", "--fsdp")) == 2
    assert "launch with torchrun --nproc_per_node N" in capsys.readouterr().err
    runner_full = type("R", (), {"name": "full", "swaps_parameters": False})()
    with pytest.raises(Exception, match="--method full trains dense tensors"):
        sharding.check(runner_full, sharding.World(0, 2))


def test_blocks_are_the_repeated_layers():
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    stack = nn.Sequential(nn.Embedding(9, 4), nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]), nn.ModuleList())
    assert sharding.blocks(stack) == list(stack[1])  # no _no_split_modules: the longest ModuleList
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=37, vocab_size=100))  # fmt: skip
    assert sharding.blocks(llama) == list(llama.model.layers)  # its _no_split_modules: LlamaDecoderLayer
