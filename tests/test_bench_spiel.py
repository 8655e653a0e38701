"""bench/spiel.py: SpIEL's workers (outside and inside an accumulation window) in-process on a tiny batch,
and its schedule-weighted mean step (the timings themselves are not checked)."""

import pytest

from conftest import bench_worker_args as worker_args
from conftest import load_script


@pytest.fixture(scope="module")
def spiel_bench():
    return load_script("bench/spiel.py", "bench_spiel")


def test_window_step_holds_more_than_a_plain_one_and_a_reselection_is_timed(spiel_bench, minilm_path):
    bench = spiel_bench.bench
    outside = bench.worker(worker_args(minilm_path, "spiel@1%"))
    window = bench.worker(worker_args(minilm_path, "spiel-window@1%"))
    first = bench.worker(worker_args(minilm_path, "spiel-first@1%"))
    assert first["trainable"] == outside["trainable"] and "select_s" not in first
    model = bench.load_model(worker_args(minilm_path, "full"))
    adapted = sum(m.weight.numel() for m in bench.adapted_linears(model, "classification"))
    head = sum(p.numel() for p in model.classifier.parameters())
    assert outside["trainable"] == window["trainable"]  # k is the same; the window adds no trainable entry
    assert 0.0099 < (outside["trainable"] - head) / adapted < 0.0101
    assert window["select_s"] > 0 and "select_s" not in outside
    # the window keeps C + k positions and three sums per tensor, and each layer's dense gradient in turn
    assert window["peak_tensor_mib"] > outside["peak_tensor_mib"]
    assert window["file_bytes"] > 0


def test_the_table_weights_window_steps_and_reselections_by_the_schedule(spiel_bench):
    assert spiel_bench.mean_step(1.0, 3.0, 2.0, 0.5, 20, 5) == pytest.approx((15 * 1.0 + 3.0 + 4 * 2.0 + 0.5) / 20)
    row = {"step_s": 1.0, "peak_tensor_mib": 10.0, "trainable": 100}
    summary = {"full": {**row, "step_s": 2.0, "peak_tensor_mib": 20.0}, "lora": row, "sara@1%": row, "spiel@1%": row,
               "spiel-first@1%": {**row, "step_s": 1.8}, "spiel-window@1%": {**row, "step_s": 1.5, "select_s": 0.2}}  # fmt: skip
    lines = spiel_bench.table(summary, "1%")
    assert any(line.startswith("spiel-window@1%") and line.rstrip().endswith("0.200") for line in lines)
    mean = (15 * 1.0 + 1.8 + 4 * 1.5 + 0.2) / 20
    assert f"R = 20, A = 5: {mean:.3f} s = {mean / 2.0:.2f} × full" in lines[-2]
