"""`bitcompile serve` on loopback, driven by the official `openai` client (and raw HTTP for what the
client will not send). Every served result is checked against the engine called directly."""

import json
import shutil
import threading
import time

import httpx
import numpy as np
import openai
import pytest
import uvicorn

import bitcompile
from bitcompile.runtime.scheduler import log_softmax
from bitcompile.serve.app import Server
from bitcompile.serve.limits import RateLimiter
from bitcompile.tools.bench_http import free_port


class Running:
    """A server in a thread of this process, on a free loopback port; `.stop()` shuts it down."""

    def __init__(self, artifact, engine_options=None, **options):
        self.engine = bitcompile.load(artifact, **{"max_batch": 8, **(engine_options or {})})
        self.server = Server(self.engine, "tiny", **options)
        self.port = free_port()
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.server.app(), host="127.0.0.1", port=self.port,
                                                     log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)

    def post(self, path, body=None, content=None, headers=None):
        return httpx.post(self.url + path, json=body, content=content, headers=headers, timeout=30)

    def metric(self, name: str, **labels) -> float:
        text = httpx.get(self.url + "/metrics").text
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == want)

    def stop(self):
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(artifacts):
    running = Running(artifacts["autobitlinear"], max_tokens_limit=64, max_body_bytes=4096)
    yield running
    running.stop()


def test_models_and_health(served):
    assert [m.id for m in served.client().models.list().data] == ["tiny"]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"


def test_completion_equals_the_engine(served):
    want = served.engine.generate("hello", max_new_tokens=12, temperature=0)
    got = served.client().completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=0)
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason == "length"
    ids = served.engine.encode("hello")
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (len(ids), 12, len(ids) + 12)
    by_ids = served.client().completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want


def test_streamed_completion_joins_to_the_same_text(served):
    want = served.engine.generate("abc", max_new_tokens=16, temperature=0.9, seed=3, top_k=20)
    chunks = list(served.client().completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0.9,
                                                     seed=3, stream=True, extra_body={"top_k": 20},
                                                     stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_stop_strings_end_the_completion_before_them(served):
    full = served.engine.generate("abc", max_new_tokens=30, temperature=0)
    stop = full[8:11]
    got = served.client().completions.create(model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"


def test_chat_equals_the_engine_with_the_template(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    want = served.engine.chat(messages, max_new_tokens=10, temperature=0)
    got = served.client().chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    prompt = served.engine.tokenizer.encode("<|begin_of_text|>System: Be brief.<|eot_id|>User: Hi there<|eot_id|>"
                                            "Assistant: ", add_special_tokens=False).ids
    assert served.engine.chat_prompt(messages) == prompt  # BitNet-2B-4T's template, rendered
    assert got.usage.prompt_tokens == len(prompt)
    stream = served.client().chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                                     temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want


def test_echo_logprobs_are_the_log_softmax_of_the_prompt(served):
    ids = served.engine.encode("To be, or not")
    got = served.client().completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = got.choices[0].logprobs
    want = log_softmax(served.engine.logits(ids))
    assert lp.token_logprobs[0] is None
    np.testing.assert_allclose(lp.token_logprobs[1:], [want[i, t] for i, t in enumerate(ids[1:])], rtol=1e-5, atol=1e-6)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert got.choices[0].text == served.engine.decode(ids) and got.usage.completion_tokens == 0


def test_generated_logprobs_are_the_model_distribution(served):
    got = served.client().completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0, logprobs=3)
    lp = got.choices[0].logprobs
    assert len(lp.token_logprobs) == 4
    history = served.engine.encode("hello")
    for step, token_lp in enumerate(lp.token_logprobs):
        row = log_softmax(served.engine.logits(history))[-1]
        token = int(np.argmax(row))  # greedy: the top token
        assert token_lp == pytest.approx(row[token], abs=1e-5)
        assert max(lp.top_logprobs[step].values()) == pytest.approx(row[token], abs=1e-5)
        history.append(token)


def test_32_concurrent_streams_each_get_their_own_text(served):
    prompts = [f"prompt {i}: " + "x" * (i % 7) for i in range(32)]
    want = {p: served.engine.generate(p, max_new_tokens=10, temperature=0) for p in prompts}
    got = {}

    def stream(prompt):
        chunks = served.client().completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0,
                                                    stream=True)
        got[prompt] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=stream, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


BAD = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature: -1 is out of range"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature: must be a number"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p: 0 is out of range"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens: must be an integer"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 65}, 400, r"max_tokens: 65 is more than this server allows \(64"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n: 2 choices were asked for"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream: must be true or false"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, 400, "stop: must be a non-empty string"),
    ("/v1/completions", {"prompt": "x", "seed": -4}, 400, "seed: -4 is out of range"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 400, "model 'gpt-4' is not served here"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt: is empty"),
    ("/v1/completions", {"prompt": [1, 99999]}, 400, r"prompt: token ids \[99999\] are outside the vocabulary"),
    ("/v1/completions", {"prompt": {"text": "x"}}, 400, "prompt: must be a string or a list of token ids"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt: 2 prompts were sent"),
    ("/v1/completions", {"prompt": [5] * 300}, 400, "prompt: 300 tokens is more than this server takes"),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, "the request body is larger than this server takes"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages: must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, r"messages\[0\].role: 'robot'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, r"messages\[0\].content: must be"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages: must be a non-empty list"),
]


@pytest.mark.parametrize("path, body, status, message", BAD)
def test_bad_requests_get_openai_errors(served, path, body, status, message):
    before = served.metric("bitcompile_requests_total", endpoint=path, status=str(status))
    r = served.post(path, body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    import re

    assert re.search(message, error["message"]), error["message"]
    assert served.metric("bitcompile_requests_total", endpoint=path, status=str(status)) == before + 1
    # the server is still fine
    assert served.client().completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].finish_reason


def test_malformed_json_and_non_objects_are_400(served):
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = served.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_the_client_sees_bad_request_errors(served):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        served.client().completions.create(model="tiny", prompt="x", temperature=5)


def test_a_disconnected_stream_leaves_the_batch_and_frees_its_pages(served):
    scheduler = served.engine.scheduler()
    with httpx.stream("POST", served.url + "/v1/completions", timeout=30,
                      json={"prompt": "abc", "max_tokens": 60, "temperature": 0, "stream": True}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
    deadline = time.monotonic() + 10
    while scheduler.status()["running"] or served.engine.kv.reserved:
        assert time.monotonic() < deadline, scheduler.status()
        time.sleep(0.01)
    assert served.engine.kv.reserved == {}


def test_a_model_without_a_chat_template_still_completes(checkpoints, tmp_path):
    ckpt = tmp_path / "plain"
    shutil.copytree(checkpoints["autobitlinear"], ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    running = Running(bitcompile.compile(ckpt, output=tmp_path / "plain.bitc", progress=False))
    try:
        with pytest.raises(openai.BadRequestError, match="the model has no chat template"):
            running.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        assert running.client().completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens == 3
    finally:
        running.stop()


def test_api_keys(artifacts, tmp_path):
    running = Running(artifacts["autobitlinear"], api_keys=["secret-1", "secret-2"])
    try:
        with pytest.raises(openai.AuthenticationError, match="missing or invalid API key"):
            running.client(api_key="wrong").completions.create(model="tiny", prompt="x", max_tokens=1)
        assert running.post("/v1/completions", {"prompt": "x"}).status_code == 401
        assert running.client(api_key="secret-2").completions.create(model="tiny", prompt="x", max_tokens=1).choices
    finally:
        running.stop()


def test_rate_limit_answers_429_with_retry_after_then_serves(artifacts):
    running = Running(artifacts["autobitlinear"], limiter=RateLimiter(2, None, window_s=1.0))
    try:
        body = {"prompt": "x", "max_tokens": 1}
        assert [running.post("/v1/completions", body).status_code for _ in range(2)] == [200, 200]
        refused = running.post("/v1/completions", body)
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 1
        assert "rate limit reached (2 requests per minute)" in refused.json()["error"]["message"]
        time.sleep(1.05)
        assert running.post("/v1/completions", body).status_code == 200
    finally:
        running.stop()


def test_token_limit_counts_prompt_and_generated_tokens(artifacts):
    running = Running(artifacts["autobitlinear"], limiter=RateLimiter(None, 20, window_s=60.0))
    try:
        assert running.post("/v1/completions", {"prompt": "hello", "max_tokens": 16}).status_code == 200
        refused = running.post("/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert refused.status_code == 429 and "20 tokens per minute" in refused.json()["error"]["message"]
    finally:
        running.stop()


def test_a_full_queue_answers_503_and_a_timeout_504(artifacts):
    """While the engine is held (the test takes its lock), requests wait: one fits the queue, the
    next is refused with 503, and the waiting one runs out of time (504)."""
    running = Running(artifacts["autobitlinear"], engine_options={"max_batch": 1, "max_queue": 1},
                      request_timeout_s=1.0)
    try:
        scheduler = running.engine.scheduler()
        waited = []
        with running.engine._lock:
            t = threading.Thread(target=lambda: waited.append(running.post("/v1/completions", {"prompt": "x"})))
            t.start()
            deadline = time.monotonic() + 10
            while scheduler.status()["waiting"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            refused = running.post("/v1/completions", {"prompt": "y"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full"
            t.join(timeout=30)
        assert waited[0].status_code == 504 and "--request-timeout" in waited[0].json()["error"]["message"]
        assert running.post("/v1/completions", {"prompt": "z", "max_tokens": 3}).status_code == 200
        assert running.metric("bitcompile_requests_total", endpoint="/v1/completions", status="503") == 1
    finally:
        running.stop()
