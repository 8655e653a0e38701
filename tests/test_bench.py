"""The benchmark's measuring code, run in-process on a tiny batch (the timings themselves are not checked)."""

import pytest
import torch

from conftest import bench_worker_args as worker_args
from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench/bench.py", "bench")


def test_peak_tensor_memory_counts_what_a_step_holds(bench):
    weight = torch.zeros(1024, 1024)  # 4 MiB held throughout

    def step():
        first = torch.ones(2048, 1024)  # 8 MiB
        total = first.sum() + weight.sum()
        del first
        second = torch.ones(1024, 1024)  # 4 MiB, after the first was freed
        return total + second.sum()

    peak = bench.peak_tensor_mib(step)
    assert peak is not None
    assert 12 <= peak < 12.1, peak


def test_sara_worker_reports_its_k_and_files_and_less_memory_than_full(bench, minilm_path):
    sara = bench.worker(worker_args(minilm_path, "sara@1%"))
    full = bench.worker(worker_args(minilm_path, "full"))
    args = worker_args(minilm_path, "full")
    model = bench.load_model(args)
    assert full["trainable"] == sum(p.numel() for p in model.parameters())
    adapted = sum(m.weight.numel() for m in bench.adapted_linears(model, args.task))
    head = sum(p.numel() for p in model.classifier.parameters())  # trained densely
    assert 0.0099 < (sara["trainable"] - head) / adapted < 0.0101
    assert sara["peak_tensor_mib"] < full["peak_tensor_mib"]  # no dense gradient or AdamW moments
    assert sara["file_bytes_ef"] < sara["file_bytes"]
    assert sara["index_ef_bytes"] < 1.25 * sara["index_floor_bytes"]
    assert sara["step_s"] > 0 and sara["peak_rss_mib"] > 0


def test_switch_worker_times_every_density_against_lora(bench, minilm_path):
    result = bench.switch_worker(worker_args(minilm_path, "switch"))
    ks = [result[bench.switch_key(label) + "_k"] for label in ["", *bench.SWITCH_DENSITIES]]
    assert ks == sorted(ks, reverse=True) and ks[-1] > 0  # SHiRA's k, then 1%, then 0.1%
    assert all(result[key] > 0 for key in result if key.endswith("_s"))


def test_sora_worker_trains_loras_count_plus_gates_and_writes_a_peft_adapter(bench, minilm_path):
    sora = bench.worker(worker_args(minilm_path, "sora"))
    args = worker_args(minilm_path, "sora")
    model = bench.load_model(args)
    layers = bench.adapted_linears(model, args.task)
    head = sum(p.numel() for p in model.classifier.parameters())
    expected = sum(bench.LORA_RANK * (m.in_features + m.out_features + 1) for m in layers) + head  # A, B and g
    assert sora["trainable"] == expected
    assert sora["file_bytes"] > 4 * (expected - head - bench.LORA_RANK * len(layers))  # the A and B of rank 8
    assert sora["step_s"] > 0


def test_supertuning_worker_against_sara_at_the_same_density(bench, minilm_path, capsys):
    """PEFT Super-Tuning (select_top=False) on SaRA's layers at SaRA's density: the same k up to PEFT's
    per-layer rounding, a file of the same layout (int32 positions, float32 values, the head), and
    more memory than SaRA (its forward composes a dense copy of every adapted weight)."""
    st = bench.worker(worker_args(minilm_path, "supertuning@1%"))
    sara = bench.worker(worker_args(minilm_path, "sara-no-penalty@1%"))
    model = bench.load_model(worker_args(minilm_path, "full"))
    layers = bench.adapted_linears(model, "classification")
    head = sum(p.numel() for p in model.classifier.parameters())
    assert st["trainable"] - head == sum(int(m.weight.numel() * (1 - (1 - 0.01))) for m in layers)
    assert 0 <= sara["trainable"] - st["trainable"] < len(layers)
    assert abs(st["file_bytes"] - sara["file_bytes"]) < 0.02 * sara["file_bytes"]
    assert st["peak_tensor_mib"] > sara["peak_tensor_mib"]
    bench.print_supertuning(bench.summarise([st, sara]))
    assert "PEFT Super-Tuning (select_top=False) against SaRA at 1%" in capsys.readouterr().out


def test_bf16_worker_runs_under_autocast(bench, minilm_path):
    args = worker_args(minilm_path, "sara@1%")
    args.worker_precision = "bf16"
    result = bench.worker(args)
    assert result["precision"] == "bf16" and result["step_s"] > 0 and result["trainable"] > 0


@pytest.mark.slow
def test_quick_run_in_both_precisions_gives_ratios_within_each(bench, tmp_path, capsys):
    name = tmp_path / "quick"  # an absolute name: the results go there, not into bench/results
    bench.main(["--quick", "--precision", "fp32", "bf16", "--methods", "full", "sara@1%", "--no-switch",
                "--threads", "1", "--name", str(name)])  # fmt: skip
    out = capsys.readouterr().out
    assert "batch 4 x 32, fp32" in out and "batch 4 x 32, bf16" in out and "bf16 / fp32" in out
    record = __import__("json").loads(name.with_suffix(".json").read_text())
    assert set(record["summaries"]) == {"fp32", "bf16"}
    for summary in record["summaries"].values():
        assert set(summary) == {"full", "sara@1%"} and all(r["runs"] == 1 for r in summary.values())
    assert {r["precision"] for r in record["runs"]} == {"fp32", "bf16"}
    assert name.with_suffix(".png").exists() and (tmp_path / "quick-bf16.png").exists()
