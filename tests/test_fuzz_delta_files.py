"""2,000 seeded mutations of valid delta files: each is refused (model unchanged) or loads the
original delta exactly. The loop and the mutations live in bench/fuzz_delta_files.py, which runs more."""

import time

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def fuzz():
    return load_script("bench/fuzz_delta_files.py", "fuzz_delta_files")


def test_two_thousand_mutated_files_are_refused_or_load_the_original(fuzz, tmp_path):
    start = time.perf_counter()
    fuzzer = fuzz.Fuzzer(tmp_path)
    fuzzer.run(2000, seed=0)
    report = fuzzer.table()
    assert fuzzer.failed == 0, report + "\n" + "\n".join(str(f[:3]) for f in fuzzer.failures[:10])
    families = {f.replace(" (re-checksummed)", "") for f, _ in fuzzer.counts}
    assert families == set(fuzz.FAMILIES)  # every family ran
    assert any("re-checksummed" in f for f, _ in fuzzer.counts)
    refused = sum(n for (_, o), n in fuzzer.counts.items() if o == fuzz.REFUSED)
    loaded = sum(n for (_, o), n in fuzzer.counts.items() if o == fuzz.LOADED)
    assert refused + loaded == 2000 and refused > 1500 and loaded > 0
    assert time.perf_counter() - start < 60


def test_the_oracle_sees_a_silently_changed_delta(fuzz, tmp_path, monkeypatch):
    """The check itself: with the loader's finite-values check off (as before issue 13), a
    re-checksummed file with a NaN value loads, and the fuzzer sees other weights."""
    import random

    import sparsedelta as sd

    fuzzer = fuzz.Fuzzer(tmp_path)
    monkeypatch.setattr("sparsedelta.core.io.check_finite", lambda *args: None)
    variant = ("elias-fano", "bfloat16", True)
    data = fuzz.rechecksum(fuzz.values_nonfinite(random.Random(0), fuzzer.files[variant]))
    fuzzer.case_file.write_bytes(data)
    model = fuzz.fresh_model(False, True)
    sd.load(model, fuzzer.case_file, adapter_name="loaded")
    assert not fuzz.same(fuzz.snapshot(model), fuzzer.references[variant, False])
