"""The conv benchmark (bench/conv.py) run in-process at its smoke size (timings not checked): every
method is measured, and the SaRA paths train k entries and keep no gradient on a frozen kernel."""

import json

from conftest import load_script


def test_the_quick_run_measures_every_method(tmp_path):
    bench = load_script("bench/conv.py", "bench_conv")
    assert bench.main(["--quick", "--output", str(tmp_path / "c.json")]) == 0
    methods = json.loads((tmp_path / "c.json").read_text())["methods"]
    assert set(methods) == {"full", "sara", "generic"}
    assert all(r["median_s"] > 0 for r in methods.values())
    full, sara = methods["full"], methods["sara"]
    assert sara["trained_entries"] == methods["generic"]["trained_entries"] < 0.1 * full["trained_entries"]
    assert sara["dense_grad_entries"] == sara["trained_entries"]  # gradients on the trained tensors only
    assert bench.patching_untouched()
