"""The UNet benchmark (bench/unet.py) run in-process at its smoke size (timings not checked): every
method is measured; SaRA trains 1% of the targeted entries and keeps no gradient on a frozen tensor;
the floor trains nothing."""

import json

import pytest

from conftest import load_script

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def test_the_quick_run_measures_every_method(tmp_path):
    bench = load_script("bench/unet.py", "bench_unet")
    assert bench.main(["--quick", "--output", str(tmp_path / "u.json")]) == 0
    methods = json.loads((tmp_path / "u.json").read_text())["methods"]
    assert set(methods) == {"floor", "full", "lora", "sara"}
    assert all(r["median_s"] > 0 for r in methods.values())
    floor, full, sara, lora = methods["floor"], methods["full"], methods["sara"], methods["lora"]
    assert floor["trained_entries"] == floor["dense_grad_entries"] == 0
    targeted = sum(p.numel() for p in _targeted(bench))
    assert sara["trained_entries"] == round(0.01 * targeted)  # the k smallest |θ| of the targets, globally
    assert sara["dense_grad_entries"] == sara["trained_entries"]  # gradients on the values only
    assert 0 < lora["trained_entries"] < full["trained_entries"] == full["dense_grad_entries"]


def _targeted(bench):
    from sparsedelta.models.diffusion import layer_suffixes

    unet = bench.make_unet(bench.parse_args(["--quick"]))
    names = layer_suffixes(unet)
    return [m.weight for n, m in unet.named_modules() if any(n == s or n.endswith("." + s) for s in names)]
