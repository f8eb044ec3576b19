"""Many sequences at once: the continuous-batching scheduler against the single-sequence path and the
numpy reference. Every batched result must equal what the same request computes alone."""

import json
import random
import shutil
import threading

import numpy as np
import pytest

import bitcompile
from bitcompile.model.checkpoint import load_checkpoint
from bitcompile.reference import ReferenceModel
from bitcompile.runtime.engine import PromptError
from bitcompile.runtime.scheduler import QueueFullError


@pytest.fixture(scope="module")
def long_checkpoint(checkpoints, tmp_path_factory):
    """The tiny checkpoint with a 512-token context (prompts up to 300 tokens)."""
    path = tmp_path_factory.mktemp("long") / "tiny512"
    shutil.copytree(checkpoints["autobitlinear"], path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    return path


@pytest.fixture(scope="module")
def artifact(long_checkpoint, tmp_path_factory):
    return bitcompile.compile(long_checkpoint, output=tmp_path_factory.mktemp("art") / "t.bitc", progress=False)


@pytest.fixture(scope="module")
def batched(artifact):
    engine = bitcompile.load(artifact, max_batch=8, context_length=512)
    yield engine
    engine.close()


def greedy_alone(engine, ids, n):
    """Greedy tokens of one sequence through the single-sequence API (prefill, then step)."""
    out, logits = [], engine.prefill(ids)
    eos = engine.config.eos_token_ids
    for _ in range(n):
        token = int(np.argmax(logits))
        if token in eos:
            break
        out.append(token)
        if len(out) < n:
            logits = engine.step(token)
    return out


def random_prompts(engine, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n).tolist() for n in lengths]  # byte tokens: never eos


def test_requests_arriving_at_different_steps_equal_each_one_alone(batched):
    lengths = [1, 300, 17, 128, 129, 2, 64, 255, 40, 3, 200, 96, 7, 150]
    prompts = random_prompts(batched, lengths)
    want = [greedy_alone(batched, p, 24) for p in prompts]
    handles = []
    for wave in (prompts[:4], prompts[4:8], prompts[8:11], prompts[11:]):
        handles += [batched.submit(p, max_new_tokens=24, temperature=0) for p in wave]
        next(iter(handles[-1]), None)  # the next wave arrives once this one's last request has a token
    for h, w, p in zip(handles, want, prompts):
        h.result(timeout=120)
        assert h.output_ids == w, f"prompt of {len(p)} tokens"
        assert h.prompt_tokens == len(p) and h.completion_tokens == len(w)
    assert batched.generate(prompts[1], max_new_tokens=24, temperature=0) == handles[1].text


def test_a_seeded_sample_does_not_depend_on_its_batch(batched):
    prompt = random_prompts(batched, [30], seed=3)[0]
    kwargs = dict(max_new_tokens=20, temperature=1.5, top_k=50, seed=11)
    alone = batched.generate(prompt, **kwargs)
    crowd = [batched.submit(p, max_new_tokens=20, temperature=1.0, seed=i)
             for i, p in enumerate(random_prompts(batched, [5, 90, 12], seed=4))]
    mine = batched.submit(prompt, **kwargs)
    assert mine.result(timeout=60) == alone
    assert all(h.result(timeout=60) is not None for h in crowd)


def test_batched_logits_equal_the_reference(batched, long_checkpoint):
    """Three sequences prefilled in one ragged call, then two decode steps of all three in one call."""
    ref = ReferenceModel(load_checkpoint(long_checkpoint))
    prompts = random_prompts(batched, [9, 40, 3], seed=5)
    kv = batched.kv
    seqs = [1001, 1002, 1003]
    with batched._lock:
        for s in seqs:
            kv.add(s, 8)
        try:
            logits = batched.forward(seqs, prompts, [True, True, True])
            histories = [list(p) for p in prompts]
            for _ in range(2):
                for h, row in zip(histories, logits):
                    want = ref.logits(h)[-1]
                    assert np.abs(row - want).max() <= 1e-3 * np.abs(want).max()
                tokens = [int(np.argmax(row)) for row in logits]
                for h, t in zip(histories, tokens):
                    h.append(t)
                logits = batched.forward(seqs, [[t] for t in tokens], [True, True, True])
        finally:
            for s in seqs:
                kv.remove(s)


def test_random_submits_cancels_and_stops_lose_nothing(artifact):
    """Hundreds of requests on a cache with room for 3 (so most wait): random prompt lengths, token
    limits, stop strings and cancels at random moments. Each ends exactly once, with its own text."""
    engine = bitcompile.load(artifact, max_batch=3, context_length=64, prefill_chunk=16)
    rng = random.Random(0)
    prompts = random_prompts(engine, [rng.randint(1, 40) for _ in range(12)], seed=7)
    full_ids = {i: greedy_alone(engine, p, 16) for i, p in enumerate(prompts)}
    full = {i: engine.decode(ids) for i, ids in full_ids.items()}
    engine.release()  # the references' sequence: its slot and pages go to the scheduler
    jobs = []
    for n in range(240):
        i = rng.randrange(len(prompts))
        limit = rng.randint(1, 16)
        stop = full[i][rng.randrange(len(full[i])):][:2] if full[i] and rng.random() < 0.3 else None
        jobs.append((i, limit, stop, engine.submit(prompts[i], max_new_tokens=limit, temperature=0, stop=stop)))
        if rng.random() < 0.2:
            rng.choice(jobs)[3].cancel()
    pieces = {}

    def read(job):
        pieces[id(job)] = list(job[3])

    readers = [threading.Thread(target=read, args=(job,)) for job in jobs]
    for t in readers:
        t.start()
    for t in readers:
        t.join(timeout=120)
    for job in jobs:
        i, limit, stop, h = job
        assert h.done() and h.finish_reason in ("stop", "length", "cancelled")
        assert "".join(pieces[id(job)]) == h.text
        # the tokens its prompt gets alone, up to where this request ended
        assert h.output_ids == full_ids[i][: len(h.output_ids)]
        if h.finish_reason != "cancelled":
            alone = engine.decode(full_ids[i][:limit])
            assert h.text == (alone[: alone.index(stop)] if stop and stop in alone else alone)
    status = engine._scheduler.status()
    assert status["running"] == 0 and status["waiting"] == 0 and engine.kv.reserved == {}
    assert status["prefix_hits"] > 0  # the same prompts came again: their prefixes were forked
    engine.drop_prefixes()
    assert engine._scheduler.status()["kv_pages_used"] == 0
    engine.close()


def test_a_shared_prefix_is_forked_not_prefilled_again(artifact):
    engine = bitcompile.load(artifact, max_batch=4, context_length=512)
    shared, first_rest, second_rest = random_prompts(engine, [200, 30, 50], seed=9)
    first, second = shared + first_rest, shared + second_rest
    want = greedy_alone(engine, second, 20)
    engine.release()
    engine.submit(first, max_new_tokens=5, temperature=0).result(timeout=60)
    before = engine._scheduler.status()
    h = engine.submit(second, max_new_tokens=20, temperature=0)
    assert h.result(timeout=60) == engine.decode(want) and h.output_ids == want
    after = engine._scheduler.status()
    assert h.prefix_reused == 200
    assert after["prefilled_tokens"] - before["prefilled_tokens"] == 50  # only the rest ran
    assert after["prefix_hits"] - before["prefix_hits"] == 1
    # a prompt that is all prefix still runs its last token (its logits start the generation)
    again = engine.submit(second, max_new_tokens=20, temperature=0)
    assert again.result(timeout=60) == h.text and again.prefix_reused == len(second) - 1
    engine.close()


def test_a_full_cache_makes_requests_wait_and_the_queue_is_bounded(artifact):
    engine = bitcompile.load(artifact, max_batch=1, context_length=64, max_queue=2)
    prompt = random_prompts(engine, [10])[0]
    first = engine.submit(prompt, max_new_tokens=40, temperature=0)
    next(iter(first))  # running: the one place in the cache is taken
    second = engine.submit(prompt, max_new_tokens=5, temperature=0)
    third = engine.submit(prompt, max_new_tokens=5, temperature=0)
    with pytest.raises(QueueFullError, match=r"2 requests are already waiting \(max_queue=2\)"):
        for _ in range(50):  # the first leaves the queue once it runs; keep the queue full
            engine.submit(prompt, max_new_tokens=5, temperature=0)
    assert [h.result(timeout=60) for h in (second, third)] == [engine.generate(prompt, max_new_tokens=5,
                                                                              temperature=0)] * 2
    assert first.result(timeout=60) == engine.generate(prompt, max_new_tokens=40, temperature=0)
    engine.close()


def test_a_closed_engine_refuses_and_ends_what_it_had(artifact):
    engine = bitcompile.load(artifact, max_batch=1, context_length=64)
    prompt = random_prompts(engine, [10])[0]
    running = engine.submit(prompt, max_new_tokens=60, temperature=0)
    waiting = engine.submit(prompt, max_new_tokens=60, temperature=0)
    engine.close()
    assert running.done() and waiting.done()
    assert {running.finish_reason, waiting.finish_reason} <= {"cancelled", "length"}
    with pytest.raises(RuntimeError, match="the engine is closed"):
        engine.submit(prompt)


def test_generate_batch_equals_generate(batched):
    prompts = ["to be", "or not", "x"]
    assert batched.generate_batch(prompts, max_new_tokens=12, temperature=0) == \
        [batched.generate(p, max_new_tokens=12, temperature=0) for p in prompts]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_batch": 0}, r"invalid max_batch=0: must be an integer in 1\.\.256"),
    ({"max_batch": True}, "invalid max_batch=True"),
    ({"max_batch": 1000}, "invalid max_batch=1000"),
    ({"context_length": 513}, r"invalid context_length=513: must be an integer in 1\.\.512 \(the model's limit\)"),
    ({"context_length": 0}, "invalid context_length=0"),
    ({"max_queue": -1}, "invalid max_queue=-1"),
])
def test_bad_engine_options_are_refused(artifact, kwargs, message):
    with pytest.raises(ValueError, match=message):
        bitcompile.load(artifact, **kwargs)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"temperature": -1}, ValueError, "invalid temperature=-1"),
    ({"top_p": float("nan")}, ValueError, "invalid top_p=nan"),
    ({"seed": 1.5}, ValueError, "invalid seed=1.5"),
    ({"max_new_tokens": -2}, ValueError, "invalid max_new_tokens=-2"),
    ({"max_new_tokens": True}, ValueError, "invalid max_new_tokens=True"),
    ({"stop": [""]}, ValueError, "invalid stop"),
])
def test_bad_request_values_are_refused_at_submit(batched, kwargs, error, message):
    with pytest.raises(error, match=message):
        batched.submit("hello", **kwargs)


def test_a_request_longer_than_the_context_is_refused(artifact):
    engine = bitcompile.load(artifact, max_batch=2, context_length=32)
    with pytest.raises(PromptError, match="the prompt is 40 tokens, but the context holds 32"):
        engine.submit(list(range(40)))
    with pytest.raises(PromptError, match="the prompt is empty"):
        engine.submit([])
    engine.close()
