"""`sparsedelta serve` over classification runs: POST /v1/classify against a live server, concurrent
requests for tasks with different label sets, each text's probabilities equal to its own run's model."""

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from fixtures_cli import make_rows, tiny_bert_fixture, topic_files_fixture  # noqa: F401
from test_many_tasks import own_probabilities, runs_fixture  # noqa: F401  (fixtures)
from test_serve import KEY, Server

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def classifier(runs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifiers")
    shutil.copytree(runs["b"], folder / "b-again")
    server = Server([*(f"--adapter={n}={runs[n]}" for n in ("a", "two")), "--adapters-dir", folder, "--max-batch", 4],
                    env={"SPARSEDELTA_API_KEY": KEY})  # fmt: skip
    yield server
    server.stop()


def classify(server, model, texts):
    return httpx.post(server.url + "/v1/classify", json={"model": model, "input": texts},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60)  # fmt: skip


def test_concurrent_classify_requests_equal_each_tasks_own_model(classifier, runs):
    rows = make_rows(2, seed=5)
    jobs = [(name, [r["text"] for r in rows[i : i + 3]]) for i, name in zip(range(0, 6, 1), ["a", "two", "a", "two", "a", "two"])]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda job: classify(classifier, *job), jobs))
    for (name, texts), r in zip(jobs, answers, strict=True):
        assert r.status_code == 200, r.text
        body = r.json()
        assert [d["index"] for d in body["data"]] == list(range(len(texts))) and body["usage"]["prompt_tokens"] > 0
        for text, got in zip(texts, body["data"], strict=True):
            expected, labels = own_probabilities(runs[name], text)
            assert list(got["probabilities"]) == labels == body["labels"]  # "two" has a head of its own
            torch.testing.assert_close(torch.tensor(list(got["probabilities"].values())), expected, atol=1e-5, rtol=1e-5)
            assert got["label"] == labels[int(expected.argmax())]
    health = httpx.get(classifier.url + "/health").json()
    assert health["most_rows"] > 1  # texts of several requests in one forward


def test_classify_errors_and_run_time_loading(classifier, runs):
    headers = {"Authorization": f"Bearer {KEY}"}
    assert classify(classifier, "nope", ["x"]).status_code == 404
    for bad in ([], [""], [["a"]], [3], "", [["a", "b", "c"]]):
        assert classify(classifier, "a", bad).status_code == 400, bad
    r = httpx.post(classifier.url + "/v1/completions", json={"model": "a", "prompt": "x"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
    pair = classify(classifier, "a", [["match goal", "team coach"]])
    assert pair.status_code == 200 and len(pair.json()["data"]) == 1

    r = httpx.post(classifier.url + "/v1/adapters", json={"name": "b", "path": "b-again"}, headers=headers, timeout=60)
    assert r.status_code == 201, r.text
    text = make_rows(1, seed=9)[0]["text"]
    got = classify(classifier, "b", [text]).json()["data"][0]["probabilities"]
    expected, _ = own_probabilities(runs["b"], text)
    torch.testing.assert_close(torch.tensor(list(got.values())), expected, atol=1e-5, rtol=1e-5)
    assert httpx.delete(classifier.url + "/v1/adapters/b", headers=headers, timeout=60).status_code == 200
    assert classify(classifier, "b", [text]).status_code == 404
