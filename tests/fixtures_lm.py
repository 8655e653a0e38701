"""Fixtures for causal-LM runs through the loop: a tiny random Llama saved as a model folder (with a
small BPE tokenizer trained on the KJV) and a text file of KJV chapters."""

import pytest

from test_causal_lm import kjv, tiny_llama, tokenizer  # noqa: F401  (fixtures)


@pytest.fixture(scope="session", name="tiny_llama_dir")
def tiny_llama_dir_fixture(tmp_path_factory, tokenizer):  # noqa: F811
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session", name="kjv_text")
def kjv_text_fixture(tmp_path_factory, kjv):  # noqa: F811
    path = tmp_path_factory.mktemp("kjv") / "text.txt"
    path.write_text("\n".join(u.text for u in kjv[:60]))
    return path


def lm_args(model_dir, text, out, *extra):
    return [str(a) for a in [
        "train", "--task", "causal-lm", "--model", model_dir, "--train-file", text, "--max-length", 32,
        "--batch-size", 4, "--eval-blocks", 6, "--max-new-tokens", 6, "--output-dir", out, "--no-progress", *extra,
    ]]  # fmt: skip
