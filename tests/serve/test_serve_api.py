"""The OpenAI-compatible server over HTTP: the official ``openai`` client and raw httpx against a
live server on a free localhost port (see conftest.py).

Greedy replies are checked token by token against the Python API on an engine of its own
(whole-prompt prefill, one request at a time); the server runs with a small prefill chunk so
that long prompts are prefilled over several steps, interleaved with the others' decoding.
"""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import numpy as np
import openai
import pytest

import mpt_relax

# The server's prefill chunk: prompts longer than this span several steps. Below 16 rows every
# prefill forward takes the CPU Matmul rule's GEMV branch, on both sides of the comparison: a
# prefill of 16+ rows takes the packed microkernel, whose fp32 sums differ by ~4e-6 from GEMV's,
# and that can flip a greedy near-tie of this random model (see the note on issue 13).
CHUNK = 15
MODEL, WINDOW = "tiny-chat", 512  # as made by conftest.py


@pytest.fixture(scope="module")
def live(start_server):
    return start_server(engine={"prefill_chunk_size": CHUNK}, app={"max_body_bytes": 64 * 1024})


@pytest.fixture(scope="module")
def alone(serve_artifact):
    """An engine of the test's own: the reference replies, each request run by itself."""
    return mpt_relax.Engine(serve_artifact, device="cpu", prefill_chunk_size=CHUNK)


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url, api_key="unused", max_retries=0, timeout=60)


def prompt_ids(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(2, 300, length).tolist()


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


# ----------------------------------------------------------------------------- the happy paths
def test_models_health_metrics(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(live.base + "/health").json()["status"] == "ok"
    text = httpx.get(live.base + "/metrics").text
    for name in ("requests_running", "requests_queued", "generation_tokens_total", "kv_pages_in_use",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket"):
        assert f"mpt_relax_{name}" in text


def test_completion_matches_the_python_api(client, alone):
    ids = prompt_ids(1, 50)
    ref = alone.generate(ids, max_new_tokens=20, ignore_eos=True)
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True}, logprobs=2)
    choice = out.choices[0]
    assert choice.text == ref.text and choice.finish_reason == "length"
    assert choice.logprobs.tokens == [alone.tokenizer.decode([t], skip_special_tokens=False) for t in ref.token_ids]
    assert all(len(top) >= 1 for top in choice.logprobs.top_logprobs)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (50, 20)


def test_text_completion_streamed_joins_to_the_unstreamed_text(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens and not chunks[-1].choices


def test_chat_renders_the_template_streamed_and_not(client, alone):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a café in Genève."}]
    ref = alone.chat(messages, max_new_tokens=12)
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == ref.prompt_tokens and out.usage.completion_tokens == len(ref.token_ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_chat_logprobs_and_stop_strings(client, alone):
    messages = [{"role": "user", "content": "one two three"}]
    full = alone.chat(messages, max_new_tokens=24, ignore_eos=True)
    stop = full.text[len(alone.tokenizer.decode(full.token_ids[:5])):][:2]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stop=[stop],
                                         logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content == full.text[:full.text.find(stop)]
    assert len(choice.logprobs.content) == out.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in choice.logprobs.content)


def test_batch_of_prompts_gives_one_choice_each(client, alone):
    prompts = [prompt_ids(2, 5), prompt_ids(3, 40)]
    out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [alone.generate(p, max_new_tokens=6).text for p in prompts]


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=MODEL, prompt="The quick brown", max_tokens=16, temperature=1.0, top_p=0.9)
    a, b = (client.completions.create(**kw, seed=5).choices[0].text for _ in range(2))
    assert a == b != client.completions.create(**kw, seed=6).choices[0].text


def test_16_concurrent_streams_each_get_their_single_run_tokens(live, alone):
    """Different prompt and output lengths, all at once: continuous batching must not change a token."""
    rng = random.Random(0)
    cases = [(prompt_ids(100 + i, rng.choice([3, 9, 31, 33, 70, 150])), rng.randint(4, 40)) for i in range(16)]
    refs = [alone.generate(p, max_new_tokens=n, ignore_eos=True) for p, n in cases]
    client = openai.OpenAI(base_url=live.url, api_key="unused", max_retries=0, timeout=120)
    results: list = [None] * len(cases)
    start = threading.Barrier(len(cases))

    def run(i: int) -> None:
        p, n = cases[i]
        start.wait()
        chunks = list(client.completions.create(model=MODEL, prompt=p, max_tokens=n, temperature=0, logprobs=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body={"ignore_eos": True}))
        tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        results[i] = (text, tokens, chunks[-1].usage.completion_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    peak, done = [0], threading.Event()

    def watch() -> None:  # how many run together
        while not done.is_set():
            peak[0] = max(peak[0], len(live.service.thread.scheduler.running))
            done.wait(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done.set()
    watcher.join()
    for (p, n), ref, got in zip(cases, refs, results):
        assert got is not None
        assert got == (ref.text, [alone.tokenizer.decode([t], skip_special_tokens=False) for t in ref.token_ids], n)
    assert peak[0] >= 8, "the requests should have been decoded together"
    live.wait_idle()


def test_cancelled_stream_frees_its_kv_pages(live):
    idle = live.wait_idle()
    body = {"model": MODEL, "prompt": prompt_ids(7, 60), "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", live.url + "/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: {") for line in got)
            assert live.service.stats["kv_pages_free"] < idle["kv_pages_free"]  # it holds pages now
    after = live.wait_idle()
    assert after["kv_pages_free"] == idle["kv_pages_free"] and after["sequences"] == 0
    assert 'outcome="cancelled"' in httpx.get(live.base + "/metrics").text


# ----------------------------------------------------------------------------- errors
BAD = [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "temperature": 3.5}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
    ({"prompt": "x", "logprobs": 9}, "logprobs"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "bogus_field": 1}, "bogus_field"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [5, 99999]}, "prompt"),
    ({}, "prompt"),
]


@pytest.mark.parametrize("fields, param", BAD, ids=[p for _, p in BAD])
def test_bad_completion_fields_are_400_naming_the_field(live, fields, param):
    r = httpx.post(live.url + "/completions", json={"model": MODEL, **fields})
    assert r.status_code == 400 and error_of(r)["param"] == param
    assert error_of(r)["type"] == "invalid_request_error"


@pytest.mark.parametrize("messages", [[], [{"role": "robot", "content": "x"}], [{"role": "user"}],
                                      [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]])
def test_bad_chat_messages_are_400(live, messages):
    r = httpx.post(live.url + "/chat/completions", json={"model": MODEL, "messages": messages})
    assert r.status_code == 400 and error_of(r)["param"].startswith("messages")


def test_malformed_bodies_unknown_models_paths_and_oversized_bodies(live):
    for raw in (b'{"model": ', b"\xff\xfe", b"[1, 2]", b"null"):
        r = httpx.post(live.url + "/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, raw
        error_of(r)
    r = httpx.post(live.url + "/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 400 and error_of(r)["code"] == "model_not_found"
    r = httpx.post(live.url + "/completions", json={"model": MODEL, "prompt": "x" * 100_000})
    assert r.status_code == 413 and error_of(r)
    r = httpx.get(live.url + "/nothing-here")
    assert r.status_code == 404 and error_of(r)


def test_too_long_prompts_are_400_before_any_work(live, client):
    steps = live.service.stats["steps"]
    for body in ({"prompt": prompt_ids(1, WINDOW + 1)}, {"prompt": prompt_ids(1, WINDOW - 10), "max_tokens": 20},
                 {"prompt": "one two " * 400}):
        r = httpx.post(live.url + "/completions", json={"model": MODEL, **body})
        assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    r = httpx.post(live.url + "/chat/completions",
                   json={"model": MODEL, "messages": [{"role": "user", "content": "one two " * 400}]})
    assert r.status_code == 400 and error_of(r)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=prompt_ids(1, WINDOW + 1))
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    assert live.service.stats["steps"] == steps


def test_loading_is_503_and_the_api_key_is_required(start_server, serve_artifact):
    gate = threading.Event()

    def slow_load():
        gate.wait(60)
        return mpt_relax.Engine(serve_artifact, device="cpu", max_batch_size=4)

    live = start_server(factory=slow_load, service={"max_queue": 4}, app={"api_key": "sesame"}, wait_ready=False)
    key = {"Authorization": "Bearer sesame"}
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 3}
    r = httpx.get(live.base + "/health")
    assert r.status_code == 503
    r = httpx.post(live.url + "/completions", json=body, headers=key)
    assert r.status_code == 503 and error_of(r)["code"] == "model_not_ready" and r.headers["retry-after"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        r = httpx.post(live.url + "/completions", json=body, headers=headers)
        assert r.status_code == 401 and error_of(r)["code"] == "invalid_api_key"
    assert httpx.get(live.url + "/models").status_code == 401
    gate.set()
    assert live.service.thread.ready.wait(60)
    assert httpx.get(live.base + "/health").status_code == 200
    assert httpx.post(live.url + "/completions", json=body, headers=key).json()["usage"]["completion_tokens"] == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url, api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=live.url, api_key="sesame", max_retries=0).models.list().data[0].id == MODEL


class Gated:
    """An engine whose forward waits for ``gate``: the scheduler stalls mid-step, deterministically."""

    def __init__(self, engine):
        self._engine = engine
        self.gate = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def forward(self, seq_ids, tokens):
        assert self.gate.wait(60)
        return self._engine.forward(seq_ids, tokens)


def test_overload_gets_429_and_the_server_keeps_serving(start_server, serve_artifact):
    engines = []

    def load():
        engines.append(Gated(mpt_relax.Engine(serve_artifact, device="cpu", max_batch_size=2)))
        return engines[0]

    live = start_server(engine={"max_batch_size": 2}, service={"max_queue": 2}, factory=load)
    sched = live.service.thread.scheduler
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    http = httpx.Client(timeout=120)
    replies: list = []
    threads = [threading.Thread(target=lambda: replies.append(http.post(live.url + "/completions", json=body)))
               for _ in range(3)]

    def wait_for(condition) -> None:
        for _ in range(3000):
            if condition():
                return
            threading.Event().wait(0.01)
        raise AssertionError("timed out")

    threads[0].start()
    wait_for(lambda: len(sched.running) == 1)  # admitted; its step is now held in forward
    for t in threads[1:]:
        t.start()
    wait_for(lambda: sched.queued == 2)  # the queue is full
    r = http.post(live.url + "/completions", json=body)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert error_of(r)["type"] == "rate_limit_error" and error_of(r)["code"] == "queue_full"
    with pytest.raises(openai.RateLimitError):
        openai.OpenAI(base_url=live.url, api_key="x", max_retries=0).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    engines[0].gate.set()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in replies] == [200] * 3
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in replies)
    r = http.post(live.url + "/completions", json={**body, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    live.wait_idle()
    assert 'requests_rejected_total{status="429"} 2' in httpx.get(live.base + "/metrics").text


def test_200_requests_without_a_crash_or_a_leak(live):
    """Completions and chat, streamed and not, some abandoned mid-stream, some invalid."""
    idle = live.wait_idle()
    rng = random.Random(1)

    async def one(http: httpx.AsyncClient, i: int) -> str:
        chat = i % 2 == 1
        n = rng.randint(1, 12)
        body = {"model": MODEL, "max_tokens": n, "temperature": rng.choice([0, 0.8]), "seed": i}
        if chat:
            body["messages"] = [{"role": "user", "content": f"request {i}: one two three"}]
        else:
            body["prompt"] = prompt_ids(i, rng.randint(1, 90))
        url = live.url + ("/chat/completions" if chat else "/completions")
        if i % 17 == 0:
            body["temperature"] = -1
            r = await http.post(url, json=body)
            return "invalid" if r.status_code == 400 else f"bad {r.status_code}"
        if i % 3 == 0:
            streamed = {**body, "stream": True, "max_tokens": 40, "ignore_eos": True}
            async with http.stream("POST", url, json=streamed) as r:
                if r.status_code != 200:
                    return f"bad {r.status_code}"
                lines = [line async for line in _take(r.aiter_lines(), 4 if i % 9 == 0 else None)]
            return "abandoned" if i % 9 == 0 else ("streamed" if lines[-1] == "data: [DONE]" else "cut")
        r = await http.post(url, json=body)
        if r.status_code != 200:
            return f"bad {r.status_code}"
        return "ok" if r.json()["usage"]["completion_tokens"] <= n else "too long"

    async def main() -> list[str]:
        limit = asyncio.Semaphore(12)
        async with httpx.AsyncClient(timeout=120) as http:
            async def bounded(i):
                async with limit:
                    return await one(http, i)
            return await asyncio.gather(*(bounded(i) for i in range(200)))

    outcomes = asyncio.run(main())
    assert set(outcomes) <= {"ok", "streamed", "abandoned", "invalid"}, sorted(set(outcomes))
    assert outcomes.count("abandoned") > 5 and outcomes.count("invalid") > 5
    after = live.wait_idle()
    assert after["kv_pages_free"] == idle["kv_pages_free"] and after["sequences"] == 0
    assert httpx.get(live.base + "/health").status_code == 200


async def _take(lines, n: int | None):
    count = 0
    async for line in lines:
        if not line:
            continue
        yield line
        count += 1
        if n is not None and count >= n:
            return
