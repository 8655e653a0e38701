"""`sparsedelta serve` end to end: the real server in a subprocess over a tiny Llama and three deltas,
driven by the openai client and httpx; every greedy answer in a crowd of concurrent requests equals
that model's answer alone (and `generate` on the loaded delta)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import sparsedelta as sd
from fixtures_lm import kjv_text_fixture, lm_args, tiny_llama_dir_fixture  # noqa: F401
from sparsedelta.cli import main
from test_causal_lm import kjv, tiny_llama, tokenizer  # noqa: F401  (fixtures)

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

SRC = Path(__file__).resolve().parents[1] / "src"
ADAPTERS = ("a", "b", "c")
PROMPTS = ("In the beginning God", "And the earth was", "And God said, Let", "the waters")
TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
KEY = "sk-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_random_delta(model, name: str, seed: int) -> None:
    """Random positions (10%) and values large enough to change the greedy answers."""
    from sparsedelta.models.causal_lm import default_targets

    gen = torch.Generator().manual_seed(seed)
    positions, values = {}, {}
    for path, p in model.named_parameters():
        if path.endswith("proj.weight"):
            positions[path] = torch.randperm(p.numel(), generator=gen)[: p.numel() // 10]
            values[path] = torch.randn(len(positions[path]), generator=gen) * 0.5
    sd.add_delta(model, sd.RandomConfig(density=0.1, **default_targets(model)), positions, adapter_name=name, values=values)


class Server:
    def __init__(self, args: list[str], env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        environment.pop("SPARSEDELTA_API_KEY", None)
        environment.update(env or {})
        cmd = [sys.executable, "-m", "sparsedelta", "serve", *map(str, args), "--port", str(self.port)]
        self.process = subprocess.Popen(cmd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        start = time.monotonic()
        for _ in range(600):  # bounded in tries and in time
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() - start > 90:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not answer /health in 90 s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):  # noqa: F811
    """A tiny Llama folder (with a chat template), three deltas over it saved as delta folders, and
    two servers: an open one, and one with an API key and a queue of one."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve")
    base = root / "base"
    tiny_llama(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(base)
    model = tiny_llama(len(tokenizer))
    deltas = {}
    for seed, name in enumerate(ADAPTERS):
        add_random_delta(model, name, seed)
        deltas[name] = sd.save(model, root / name, adapter_name=name).parent
    adapters = [f"--adapter={n}={p}" for n, p in deltas.items()]
    servers = []
    try:
        servers.append(Server(["--model", base, *adapters, "--max-batch", 8, "--max-wait-ms", 20, "--max-tokens", 64]))
        servers.append(Server(["--model", base, *adapters, "--max-batch", 1, "--queue-size", 1, "--max-tokens", 200],
                              env={"SPARSEDELTA_API_KEY": KEY}))  # fmt: skip
        yield {"open": servers[0], "locked": servers[1], "base": base, "deltas": deltas, "tokenizer": tok}
    finally:
        for server in servers:
            server.stop()


def complete(client, model: str, prompt: str, **kw):
    return client.completions.create(model=model, prompt=prompt, max_tokens=kw.pop("max_tokens", 12), temperature=0, **kw)


def test_models_lists_the_base_and_every_adapter(served):
    ids = [m.id for m in served["open"].client().models.list().data]
    assert ids == ["base", *ADAPTERS]


def test_concurrent_greedy_answers_equal_each_answer_alone(served):
    client = served["open"].client()
    # 32 requests of two lengths, so that rows finish at different steps and waiting ones join the batch
    jobs = [(m, p, n) for m in ("base", *ADAPTERS) for p in PROMPTS for n in (5, 12)]
    alone = {job: complete(client, job[0], job[1], max_tokens=job[2]) for job in jobs}
    texts = {job: r.choices[0].text for job, r in alone.items()}
    assert len({texts[(m, PROMPTS[0], 12)] for m in ("base", *ADAPTERS)}) == 4  # the deltas answer differently
    crowd_jobs = jobs[::-1]  # lengths alternate: short rows leave a batch while long ones run on
    with ThreadPoolExecutor(16) as pool:
        crowd = list(pool.map(lambda job: complete(client, job[0], job[1], max_tokens=job[2]), crowd_jobs))
    for job, r in zip(crowd_jobs, crowd):
        assert r.choices[0].text == texts[job], job
        assert r.usage.prompt_tokens == len(served["tokenizer"](job[1])["input_ids"])
        assert r.usage.completion_tokens == alone[job].usage.completion_tokens
    stats = httpx.get(served["open"].url + "/health").json()
    assert stats["most_rows"] > 1 and stats["joined"] > 0, stats  # batched, and rows joined running batches


def test_greedy_answer_equals_generate_on_the_loaded_delta(served):
    from transformers import AutoModelForCausalLM

    tok = served["tokenizer"]
    model = AutoModelForCausalLM.from_pretrained(served["base"]).eval()
    sd.load(model, served["deltas"]["b"], adapter_name="b")
    ids = tok(PROMPTS[1], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert complete(served["open"].client(), "b", PROMPTS[1]).choices[0].text == expected


def test_streaming_chunks_concatenate_to_the_answer(served):
    client = served["open"].client()
    plain = complete(client, "c", PROMPTS[0], max_tokens=20)
    chunks = list(complete(client, "c", PROMPTS[0], max_tokens=20, stream=True))
    assert len(chunks) > 3 and "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    messages = [{"role": "user", "content": "Who made the earth?"}]
    chat = client.chat.completions.create(model="a", messages=messages, max_tokens=16, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="a", messages=messages, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    prompt = served["tokenizer"].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.usage.prompt_tokens == len(served["tokenizer"](prompt, add_special_tokens=False)["input_ids"])


def test_stop_strings_and_seeded_sampling(served):
    client = served["open"].client()
    full = complete(client, "a", PROMPTS[2], max_tokens=20).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = complete(client, "a", PROMPTS[2], max_tokens=20, stop=[stop]).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"

    def sample(seed):
        r = client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        return r.choices[0].text

    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(4)}) > 1


def test_errors_have_openai_shape(served):
    url = served["open"].url
    r = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert set(r.json()["error"]) == {"message", "type", "code"}
    for bad in ({"max_tokens": -1}, {"temperature": 5}, {"top_p": 0}, {"max_tokens": 10_000}, {"stop": 3}, {"n": 0}):
        r = httpx.post(url + "/v1/completions", json={"model": "a", "prompt": "x", **bad})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", bad
    r = httpx.post(url + "/v1/chat/completions", json={"model": "a", "messages": "hi"})
    assert r.status_code == 400
    r = httpx.post(url + "/v1/completions", content=b"{not json")
    assert r.status_code == 400
    r = httpx.post(url + "/v1/classify", json={"model": "a", "input": ["x"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "wrong_endpoint"
    with pytest.raises(openai.NotFoundError):
        served["open"].client().completions.create(model="nope", prompt="x", max_tokens=2)


def test_api_key(served):
    locked = served["locked"]
    assert httpx.get(locked.url + "/health").status_code == 200  # open to load balancers
    r = httpx.get(locked.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(locked.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(locked.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert complete(locked.client(KEY), "a", PROMPTS[0], max_tokens=3).choices[0].text is not None
    with pytest.raises(openai.AuthenticationError):
        locked.client("wrong").models.list()
    assert httpx.get(served["open"].url + "/v1/models").status_code == 200  # no key: open


def test_a_full_queue_answers_429(served):
    locked = served["locked"]
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}

    def post(_):
        return httpx.post(locked.url + "/v1/completions", json=body, headers=headers, timeout=120)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    codes = [r.status_code for r in answers]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
    refused = next(r for r in answers if r.status_code == 429)
    assert refused.headers["retry-after"] and refused.json()["error"]["code"] == "queue_full"


def test_bad_flags_end_with_one_line(capsys):
    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err


def engine_over(served, **kw):
    from transformers import AutoModelForCausalLM

    from sparsedelta.serve.engine import Engine

    model = AutoModelForCausalLM.from_pretrained(served["base"]).eval()
    for name, path in served["deltas"].items():
        sd.load(model, path, adapter_name=name)
    return Engine(model, served["tokenizer"], list(ADAPTERS), **kw).start()


def test_a_cancelled_or_late_row_leaves_the_batch(served):
    import asyncio

    from sparsedelta.serve.engine import Request

    engine = engine_over(served, timeout=30)

    async def run():
        loop = asyncio.get_running_loop()
        ids = engine.encode(PROMPTS[0])
        gone = Request("a", ids, 240, loop=loop, events=asyncio.Queue())
        late = Request("b", ids, 240, timeout=0.0, loop=loop, events=asyncio.Queue())
        kept = Request("c", ids, 20, loop=loop, events=asyncio.Queue())
        engine.submit(gone)
        assert (await asyncio.wait_for(gone.events.get(), 30))[0] == "text"
        gone.cancelled = True  # the client went away
        engine.submit(late)
        engine.submit(kept)
        events = []
        while not events or events[-1][0] == "text":
            events.append(await asyncio.wait_for(kept.events.get(), 30))
        assert events[-1] == ("done", "length")
        assert await asyncio.wait_for(late.events.get(), 30) == ("done", "timeout")
        return gone

    try:
        gone = asyncio.run(run())
        assert gone.finish == "cancelled" and len(gone.tokens) < 240 and engine.stats["dropped"] == 1
    finally:
        engine.close()


def test_the_cli_imports_no_web_framework():
    code = "import sys, sparsedelta.cli; print(sorted(m for m in ('fastapi', 'uvicorn', 'httpx', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_a_run_folder_brings_its_base(tiny_llama_dir, kjv_text, tmp_path):  # noqa: F811
    import asyncio

    from sparsedelta.serve.engine import Engine, Request
    from sparsedelta.serve.loading import load_served

    run = tmp_path / "run"
    assert main(lm_args(tiny_llama_dir, kjv_text, run, "--max-steps", 2, "--lr", "0.05")) == 0
    served = load_served({"kjv": str(run)})
    assert served.names == ["kjv"] and served.templates == {} and served.base_name == tiny_llama_dir.name and served.generates
    model, tok, names = served.groups[0].task.model, served.groups[0].task.tokenizer, served.names
    ids = tok(PROMPTS[0], return_tensors="pt")
    out = model.generate(**ids, adapter_names=["kjv"], max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    engine = Engine(model, tok, names).start()

    async def ask():
        job = Request("kjv", ids["input_ids"][0].tolist(), 8, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        engine.submit(job)
        while (await asyncio.wait_for(job.events.get(), 30))[0] == "text":
            pass
        return job.text

    try:
        assert asyncio.run(ask()) == expected
    finally:
        engine.close()


def test_a_client_that_leaves_has_its_row_dropped(served):
    locked = served["locked"]
    headers = {"Authorization": f"Bearer {KEY}"}
    health = lambda: httpx.get(locked.url + "/health").json()  # noqa: E731
    body = {"model": "c", "prompt": PROMPTS[3], "max_tokens": 200, "temperature": 0, "stream": True}
    for _ in range(3):  # a slow client may see the row finish before it leaves: then try again
        before = health()["dropped"]
        with httpx.stream("POST", locked.url + "/v1/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # the first chunk came: the row is decoding; now leave
        start = time.monotonic()
        for _ in range(50):  # bounded in tries and in time
            if health()["dropped"] > before or time.monotonic() - start > 5:
                break
            time.sleep(0.1)
        if health()["dropped"] > before:
            break
    assert health()["dropped"] == before + 1


def test_a_failing_batch_is_reported_and_the_engine_serves_on(served):
    import asyncio

    from sparsedelta.serve.engine import Request

    engine = engine_over(served)

    async def ask(adapter):
        job = Request(adapter, engine.encode(PROMPTS[0]), 4, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        engine.submit(job)
        while (event := await asyncio.wait_for(job.events.get(), 30))[0] == "text":
            pass
        return event

    forward = engine._forward
    engine._forward = lambda *args: 1 / 0  # a bug in one batch
    try:
        kind, message = asyncio.run(ask("a"))
        assert kind == "error" and "ZeroDivisionError" in message and not engine.inflight
        engine._forward = forward
        assert asyncio.run(ask("a")) == ("done", "length")
        with pytest.raises(KeyError, match="no adapter 'nope' is served"):  # the engine itself refuses unknown names
            asyncio.run(ask("nope"))
    finally:
        engine.close()


def chat_or_complete_alone(client, model, prompt, max_tokens):
    return complete(client, model, prompt, max_tokens=max_tokens).choices[0].text


def test_several_prompts_and_choices_in_one_request(served):
    client = served["open"].client()
    alone = [chat_or_complete_alone(client, "b", p, 8) for p in PROMPTS[:2]]
    r = client.completions.create(model="b", prompt=list(PROMPTS[:2]), n=2, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]  # prompt by prompt, n each
    assert r.usage.prompt_tokens == sum(len(served["tokenizer"](p)["input_ids"]) for p in PROMPTS[:2])
    assert r.usage.completion_tokens == 32
    ids = served["tokenizer"](PROMPTS[0])["input_ids"]
    assert client.completions.create(model="b", prompt=ids, max_tokens=8, temperature=0).choices[0].text == alone[0]

    def sampled():
        r = client.completions.create(model="a", prompt=PROMPTS[0], n=3, max_tokens=12, temperature=1.0, seed=11)
        return [c.text for c in r.choices]

    first = sampled()
    assert first == sampled() and len(set(first)) > 1  # repeatable, and the choices differ
    stream = client.completions.create(model="b", prompt=list(PROMPTS[:2]), n=2, max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    texts, usage = ["", "", "", ""], None
    for c in stream:
        for choice in c.choices:
            texts[choice.index] += choice.text
        usage = c.usage or usage
    assert texts == [alone[0], alone[0], alone[1], alone[1]] and usage.completion_tokens == 32
    for bad in ({"n": 17}, {"prompt": []}, {"prompt": [[1, 2], 5]}, {"prompt": [10**9]}, {"prompt": ["x"] * 65}):
        r = httpx.post(served["open"].url + "/v1/completions", json={"model": "a", "prompt": "x", **bad})
        assert r.status_code == 400, bad


def test_metrics_count_requests_steps_and_tokens(served):
    server = served["open"]
    client = server.client()
    complete(client, "c", PROMPTS[1], max_tokens=6)
    complete(client, "base", PROMPTS[1], max_tokens=6)
    with pytest.raises(openai.NotFoundError):
        complete(client, "nope", PROMPTS[1])
    text = httpx.get(server.url + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            values[key] = float(value)
    assert values['sparsedelta_requests_total{model="c",outcome="ok"}'] >= 1
    assert values['sparsedelta_requests_total{model="base",outcome="ok"}'] >= 1
    assert values["sparsedelta_generated_tokens_total"] >= 12
    assert values["sparsedelta_batch_rows_count"] >= 12 and values["sparsedelta_batch_rows_sum"] >= values["sparsedelta_batch_rows_count"]
    assert values["sparsedelta_queue_depth"] == 0 and values["sparsedelta_adapters"] == 3
    assert values["sparsedelta_tokens_per_second"] > 0  # tokens came in the last 10 s
    assert values['sparsedelta_request_seconds_count{model="c"}'] >= 1


@pytest.fixture(scope="module")
def admin_server(served, tmp_path_factory):
    """A server with an API key, a folder it may load deltas from (with traps in it) and a 1 KiB body limit."""
    import shutil

    root = tmp_path_factory.mktemp("adapters")
    model = AutoModelForCausalLM_from(served["base"])
    add_random_delta(model, "d", 7)
    sd.save(model, root / "fresh", adapter_name="d")
    outside = served["deltas"]["a"]
    (root / "escape").symlink_to(outside, target_is_directory=True)  # a link leading out of the folder
    (root / "inner").mkdir()
    (root / "inner" / "delta.safetensors").symlink_to(outside / "delta.safetensors")
    (root / "damaged").mkdir()
    data = (root / "fresh" / "delta.safetensors").read_bytes()
    (root / "damaged" / "delta.safetensors").write_bytes(data[: len(data) // 2])
    shutil.copytree(served["deltas"]["a"], root / "other_base")  # rewritten below for another base
    other = tiny_llama_other(served)
    add_random_delta(other, "o", 3)
    sd.save(other, root / "other_base", adapter_name="o")
    server = Server(["--model", served["base"], "--adapter", f"a={served['deltas']['a']}", "--adapters-dir", root,
                     "--max-body-kib", 1, "--max-tokens", 80], env={"SPARSEDELTA_API_KEY": KEY, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    yield server
    server.stop()


def AutoModelForCausalLM_from(path):  # noqa: N802
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def tiny_llama_other(served):
    """The same architecture with other weights: a delta for it must be refused by the served base."""
    model = AutoModelForCausalLM_from(served["base"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model


def admin(server, method: str, path: str = "", **kw):
    return httpx.request(method, server.url + "/v1/adapters" + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)


def test_loading_adapters_is_checked_before_anything_changes(served, admin_server):
    assert httpx.post(served["open"].url + "/v1/adapters", json={"name": "x", "path": "fresh"}).status_code == 403  # no key: no admin
    refused = {
        "../fresh": 400, "/etc": 400, "escape": 400, "inner": 400, "missing": 400, "damaged": 400, "other_base": 400,
        "fresh/../fresh": 400,
    }  # fmt: skip
    for path, code in refused.items():
        r = admin(admin_server, "POST", json={"name": "x", "path": path})
        assert r.status_code == code and r.json()["error"]["message"], (path, r.text)
    assert "outside --adapters-dir" in admin(admin_server, "POST", json={"name": "x", "path": "escape"}).json()["error"]["message"]
    assert "base" in admin(admin_server, "POST", json={"name": "x", "path": "other_base"}).json()["error"]["message"]
    hub = admin(admin_server, "POST", json={"name": "x", "path": "someone/a-delta"})  # a hub id, offline here
    assert hub.status_code == 400 and "hub" in hub.json()["error"]["message"].lower()
    assert admin(admin_server, "POST", json={"name": "a", "path": "fresh"}).status_code == 409
    assert admin(admin_server, "POST", json={"name": "bad name!", "path": "fresh"}).status_code == 400
    client = admin_server.client(KEY)
    assert [m.id for m in client.models.list().data] == ["base", "a"]  # nothing changed
    assert complete(client, "a", PROMPTS[0]).choices[0].text == complete(served["open"].client(), "a", PROMPTS[0]).choices[0].text


def test_load_and_unload_while_serving(served, admin_server):
    client = admin_server.client(KEY)
    base_answer = complete(client, "base", PROMPTS[2], max_tokens=12).choices[0].text
    r = admin(admin_server, "POST", json={"name": "d", "path": "fresh"})
    assert r.status_code == 201 and r.json()["id"] == "d"
    assert [m.id for m in client.models.list().data] == ["base", "a", "d"]
    model = AutoModelForCausalLM_from(served["base"])
    add_random_delta(model, "d", 7)  # the same delta, built again in this process
    tok = served["tokenizer"]
    ids = tok(PROMPTS[2], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert complete(client, "d", PROMPTS[2], max_tokens=12).choices[0].text == expected != base_answer

    # a long answer is streaming when the unload comes: it finishes whole, then the adapter goes
    stream = client.completions.create(model="d", prompt=PROMPTS[0], max_tokens=80, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    with ThreadPoolExecutor(1) as pool:
        unloading = pool.submit(admin, admin_server, "DELETE", "/d")
        start = time.monotonic()
        while "d" in [m.id for m in client.models.list().data] and time.monotonic() - start < 10:
            time.sleep(0.05)
        assert "d" not in [m.id for m in client.models.list().data]  # refused to newcomers at once
        with pytest.raises(openai.NotFoundError):
            complete(client, "d", PROMPTS[0])
        assert not unloading.done()  # the streaming row is still running
        rest = list(chunks)
        assert unloading.result(timeout=30).json() == {"id": "d", "object": "model", "deleted": True}
    tokens = first.choices[0].text + "".join(c.choices[0].text for c in rest)
    assert rest[-1].choices[0].finish_reason in ("length", "stop") and tokens
    assert admin(admin_server, "DELETE", "/d").status_code == 404
    assert complete(client, "base", PROMPTS[2], max_tokens=12).choices[0].text == base_answer
    assert admin(admin_server, "POST", json={"name": "d", "path": "fresh"}).status_code == 201  # the name is free again
    assert complete(client, "d", PROMPTS[2], max_tokens=12).choices[0].text == expected


def test_a_body_over_the_limit_answers_413(admin_server):
    headers = {"Authorization": f"Bearer {KEY}"}
    big = {"model": "a", "prompt": "x" * 2000, "max_tokens": 2}
    r = httpx.post(admin_server.url + "/v1/completions", json=big, headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

    def chunked():  # no Content-Length: the limit holds while reading
        yield b'{"model": "a", "prompt": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    r = httpx.post(admin_server.url + "/v1/completions", content=chunked(), headers=headers)
    assert r.status_code == 413
    assert complete(admin_server.client(KEY), "a", "x", max_tokens=2).choices[0].text is not None


def test_sigterm_lets_requests_in_flight_finish(served):
    server = Server(["--model", served["base"], "--adapter", f"b={served['deltas']['b']}", "--max-tokens", 200])
    try:
        client = server.client()
        expected = complete(client, "b", PROMPTS[1], max_tokens=200)
        stream = client.completions.create(model="b", prompt=PROMPTS[1], max_tokens=200, temperature=0, stream=True)
        chunks = iter(stream)
        first = next(chunks)
        server.process.send_signal(signal.SIGTERM)
        text = first.choices[0].text + "".join(c.choices[0].text for c in chunks)
        assert text == expected.choices[0].text
        assert server.process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url + "/health", timeout=2)
    finally:
        server.stop()


def test_causal_lm_and_sft_runs_of_one_base_are_served_together(tiny_llama_dir, kjv_text, tmp_path):  # noqa: F811
    from sparsedelta.serve.loading import load_served
    from test_sft import TEMPLATE as SFT_TEMPLATE
    from test_sft import sft_args

    root = tmp_path / "sft"
    root.mkdir()
    template = root / "template.jinja"
    template.write_text(SFT_TEMPLATE)
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(12)]
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {"chat": {"train": data, "validation": data, "test": data}, "template": template}
    assert main(sft_args(tiny_llama_dir, files, tmp_path / "qa", "chat", "--max-steps", 1)) == 0
    assert main(lm_args(tiny_llama_dir, kjv_text, tmp_path / "kjv", "--max-steps", 1)) == 0
    served = load_served({"kjv": str(tmp_path / "kjv"), "qa": str(tmp_path / "qa")})
    assert served.names == ["kjv", "qa"] and len(served.groups) == 1 and served.generates
    assert served.templates == {"qa": SFT_TEMPLATE}  # each run's own way of prompting


def test_a_request_past_its_timeout_answers_504(served):
    server = Server(["--model", served["base"], "--adapter", f"b={served['deltas']['b']}", "--max-tokens", 200, "--timeout", 0.2])
    try:
        body = {"model": "b", "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0, "n": 16}  # 16 rows × 200 steps
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        start = time.monotonic()
        while httpx.get(server.url + "/health").json()["rows"] and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health").json()["rows"] == 0  # the rows left the batch
        metrics = httpx.get(server.url + "/metrics").text
        assert 'sparsedelta_requests_total{model="b",outcome="timeout"} 1.0' in metrics
    finally:
        server.stop()


def test_ignore_eos_generates_max_tokens(served):
    import asyncio

    from sparsedelta.serve.engine import Request

    body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 9, "temperature": 0, "ignore_eos": True}
    r = httpx.post(served["open"].url + "/v1/completions", json=body, timeout=60).json()
    assert r["usage"]["completion_tokens"] == 9 and r["choices"][0]["finish_reason"] == "length"
    r = httpx.post(served["open"].url + "/v1/completions", json={**body, "ignore_eos": "yes"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter"

    engine = engine_over(served)

    async def ask(ignore_eos):
        job = Request("a", engine.encode(PROMPTS[0]), 6, ignore_eos=ignore_eos, loop=asyncio.get_running_loop(), events=asyncio.Queue())
        engine.submit(job)
        while (event := await asyncio.wait_for(job.events.get(), 30))[0] == "text":
            pass
        return event, job.tokens

    try:
        _, tokens = asyncio.run(ask(False))
        engine.eos = {tokens[0]}  # the first greedy token is now an end of sequence
        assert asyncio.run(ask(False)) == (("done", "stop"), [])
        event, kept = asyncio.run(ask(True))
        assert event == ("done", "length") and kept == tokens
    finally:
        engine.close()


def test_the_worker_computes_on_the_threads_it_was_given(served, capsys):
    engine = engine_over(served, threads=1)
    try:
        assert engine.call(torch.get_num_threads).result(timeout=30) == 1  # set on the worker thread itself
    finally:
        engine.close()
    assert main(["serve", "--threads", "0"]) == 2
    assert "--threads must be at least 1" in capsys.readouterr().err
