"""The continuous-batching engine on the tiny model, in-process: results match
HF generate, requests join and leave mid-batch, sampling is per-request
reproducible, and queue / batch / KV limits hold."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import pytest
import torch

from services.common.checkpoints import Manifest
from services.common.config import load_settings
from services.common.errors import Status, StatusError
from services.common.hotswap import Loaded
from services.common.models import load_causal_lm, load_tokenizer, render_prompt
from services.policy.engine import Engine, shared_prefix
from services.policy.fused import FusedDecoder
from services.policy.kv import use_gqa_sdpa
from services.policy.params import validate
from services.policy.prompt_cache import Prefilled, PromptCache
from services.policy.request import EventQueue, Failed, Finished, GenRequest, SampleDone, Token, loop_sink

PROMPTS = ["Write a haiku about the sea.", "What is 2+2?", "Tell me a long story about a dragon and a knight.", "Hi"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The plain transformers model: what the engine's results are checked against."""
    return load_causal_lm(tiny_model_dir)


@pytest.fixture(scope="module", params=["transformers", "fused"])
def loaded(tiny_model_dir, request):
    """The model as LocalBackend serves it, with decode steps through transformers' modules
    or through the fused decode step (services/policy/fused.py): every test runs on both."""
    model = load_causal_lm(tiny_model_dir)
    use_gqa_sdpa(model)
    if request.param == "fused":
        model.rlhf_fused = FusedDecoder(model, rows=4)
    return Loaded(
        "tiny-v1", Manifest("tiny-v1", "base", "policy"), tiny_model_dir, model, load_tokenizer(tiny_model_dir)
    )


def make_engine(loaded, **env) -> Engine:
    engine = Engine(load_settings(env))
    engine.set_model(loaded)
    return engine


def request(loaded, prompt: str, stream=False, deadline=None, **p):
    settings = load_settings({})
    values = dict(
        max_new_tokens=12,
        temperature=0.0,
        top_p=None,
        top_k=0,
        repetition_penalty=None,
        stop=[],
        seed=None,
        num_samples=1,
        return_logprobs=False,
    )
    values.update(p)
    ids = loaded.tokenizer(render_prompt(loaded.tokenizer, prompt), add_special_tokens=False).input_ids
    events = EventQueue()
    return GenRequest(ids, validate(settings, **values), events, stream=stream, deadline=deadline), events


def collect(req, events):
    out = list(events.events(req))
    return out, [e.sample for e in out if isinstance(e, SampleDone)], out[-1]


def test_greedy_matches_hf_generate_while_requests_join_and_leave(loaded, reference):
    engine = make_engine(loaded)
    try:
        reqs = []
        for i, prompt in enumerate(PROMPTS):
            reqs.append(request(loaded, prompt, max_new_tokens=6 + 5 * i, num_samples=2))
            engine.submit(reqs[-1][0])
            time.sleep(0.01)  # arrive while others decode: joins at a later step
        for req, events in reqs:
            _, samples, last = collect(req, events)
            ids = torch.tensor([req.prompt_ids])
            ref = reference.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.params.max_new_tokens, do_sample=False
            )
            want = loaded.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
            assert [s.text for s in samples] == [want, want]
            assert isinstance(last, Finished) and last.version == "tiny-v1"
            assert last.completion_tokens == sum(s.generated_tokens for s in samples)
        assert engine.stats()["running"] == 0
    finally:
        engine.stop()


def test_prompt_logprobs_are_right_for_left_padded_prompts_in_one_batch(loaded, reference):
    engine = make_engine(loaded)
    try:
        scored = [
            request(loaded, PROMPTS[2], max_new_tokens=2, prompt_logprobs=True),
            request(loaded, PROMPTS[3], max_new_tokens=2, num_samples=2, prompt_logprobs=True),
        ]
        plain = request(loaded, PROMPTS[0], max_new_tokens=2)
        with engine._cv:  # hold the scheduler: all three join one prefill, the shorter prompts left-padded
            for req, _ in [*scored, plain]:
                engine.submit(req)
        for req, events in scored:
            *_, last = collect(req, events)
            ids = req.prompt_ids
            with torch.no_grad():
                logp = torch.log_softmax(reference(input_ids=torch.tensor([ids])).logits[0].float(), -1)
            assert [t.id for t in last.prefill] == ids and last.prefill[0].logprob is None
            assert [t.logprob for t in last.prefill[1:]] == pytest.approx(
                [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))], abs=1e-4
            )
        assert collect(*plain)[2].prefill == []
    finally:
        engine.stop()


def test_identical_prompts_joining_together_are_prefilled_once_with_the_same_results(loaded):
    """Requests that send the same prompt in one join share one row of the prefill, as a
    prompt's K samples do; each gets the tokens, log-probs and prompt scores it gets alone."""

    def run(engine, reqs):
        with engine._cv:  # hold the scheduler: all join one prefill
            for req, _ in reqs:
                engine.submit(req)
        engine.run_until_idle()
        return [collect(req, events) for req, events in reqs]

    def outcome(collected):
        """(text, tokens, log-probs, prompt tokens, prompt scores) of a one-sample request"""
        _, (sample,), last = collected
        scores = [t.logprob for t in last.prefill[1:]]
        return sample.text, [t.id for t in sample.tokens], [t.logprob for t in sample.tokens], last.prefill, scores

    engine = Engine(load_settings({}), own_thread=False)
    engine.set_model(loaded)
    try:
        asks = [(PROMPTS[0], {}), (PROMPTS[1], {}), (PROMPTS[0], {"prompt_logprobs": True}), (PROMPTS[0], {})]
        together = run(engine, [request(loaded, p, return_logprobs=True, **extra) for p, extra in asks])
        assert engine.stats()["prefills"] == 1 and engine.stats()["deduplicated_prompts"] == 2
        for (prompt, extra), got in zip(asks, together, strict=True):
            text, ids, logprobs, prefill, scores = outcome(got)
            want = outcome(run(engine, [request(loaded, prompt, return_logprobs=True, **extra)])[0])
            assert (text, ids) == want[:2] and logprobs == pytest.approx(want[2], abs=1e-4)
            assert [t.id for t in prefill] == [t.id for t in want[3]] and scores == pytest.approx(want[4], abs=1e-4)
        assert outcome(together[2])[3] and not outcome(together[0])[3]
        assert engine.stats()["deduplicated_prompts"] == 2  # a prompt alone has nothing to share
    finally:
        engine.stop()


def test_a_prompt_that_comes_back_joins_from_the_prompt_cache_with_the_same_results(loaded):
    """A version keeps its prefilled prompts (RLHF_PROMPT_CACHE_TOKENS): the same prompts sent
    again join without a prefill forward, a join of kept and new prompts computes only the
    new ones, and prompt scores (which need hidden states) are computed again; every
    request gets the tokens and log-probs of the first time. A new version starts empty."""

    def run(engine, asks):
        reqs = [request(loaded, p, max_new_tokens=8, return_logprobs=True, **extra) for p, extra in asks]
        with engine._cv:  # hold the scheduler: all join one prefill
            for req, _ in reqs:
                engine.submit(req)
        engine.run_until_idle()
        out = []
        for req, events in reqs:
            _, (sample,), last = collect(req, events)
            out.append((sample.text, [t.id for t in sample.tokens], [t.logprob for t in sample.tokens], last.prefill))
        return out

    def same(got, want):
        for (text, ids, logprobs, _), (text2, ids2, logprobs2, _) in zip(got, want, strict=True):
            assert (text, ids) == (text2, ids2) and logprobs == pytest.approx(logprobs2, abs=1e-4)

    engine = Engine(load_settings({}), own_thread=False, keep_prefix=True)
    engine.set_model(loaded)
    try:
        sampled = {"temperature": 1.0, "seed": 11}
        first = run(engine, [(PROMPTS[0], {}), (PROMPTS[1], sampled), (PROMPTS[2], {})])
        assert engine.stats()["prefills"] == 1 and engine.stats()["cached_prompts"] == 0
        assert len(engine._current.prompts) == 3
        again = run(engine, [(PROMPTS[2], {}), (PROMPTS[0], {}), (PROMPTS[1], sampled)])
        assert engine.stats()["prefills"] == 1 and engine.stats()["cached_prompts"] == 3  # no forward at all
        same(again, [first[2], first[0], first[1]])
        # Kept and new prompts together; a kept prompt whose scores are asked for is computed again.
        mixed = run(engine, [(PROMPTS[1], sampled), (PROMPTS[3], {}), (PROMPTS[0], {"prompt_logprobs": True})])
        assert engine.stats()["prefills"] == 2 and engine.stats()["cached_prompts"] == 4
        same([mixed[0], mixed[2]], [first[1], first[0]])
        assert mixed[2][3] and not mixed[0][3]
        engine.set_model(dataclasses.replace(loaded, version="tiny-v2"))
        assert len(engine._current.prompts) == 0
        run(engine, [(PROMPTS[0], {})])
        assert engine.stats()["prefills"] == 3 and engine.stats()["cached_prompts"] == 4
    finally:
        engine.stop()


def test_the_prompt_cache_keeps_the_most_recently_used_prompts_within_its_columns():
    def entry(columns):
        mask = torch.ones(columns, dtype=torch.bool)
        return Prefilled([(torch.zeros(1, columns, 2), torch.zeros(1, columns, 2))], mask, torch.zeros(3))

    cache = PromptCache(10)
    cache.put((1,), entry(4))
    cache.put((2,), entry(4))
    assert cache.get((1,)) is not None  # now the most recently used
    cache.put((3,), entry(4))  # 12 columns > 10: the least recently used goes
    assert cache.get((2,)) is None and cache.get((1,)) is not None and cache.get((3,)) is not None
    assert cache.columns == 8
    cache.put((4,), entry(11))  # larger than the whole cache: not kept, nothing else dropped
    assert cache.get((4,)) is None and len(cache) == 2
    assert len(PromptCache(0)) == 0


def test_seeded_samples_are_reproducible_and_distinct(loaded):
    engine = make_engine(loaded)
    try:
        texts = []
        for _ in range(2):
            req, events = request(
                loaded, "Hi", temperature=1.0, top_k=50, top_p=0.9, seed=1234, num_samples=3, return_logprobs=True
            )
            engine.submit(req)
            _, samples, _ = collect(req, events)
            texts.append([s.text for s in samples])
            assert [s.seed for s in samples] == [1234, 1235, 1236]
            assert all(len(s.tokens) == s.generated_tokens and all(t.logprob <= 0 for t in s.tokens) for s in samples)
        assert texts[0] == texts[1]
        assert len(set(texts[0])) == 3
    finally:
        engine.stop()


def test_an_engine_without_its_own_thread_runs_in_the_callers(loaded):
    """A trainer's rollouts: the caller's thread runs the loop; same samples as the threaded engine."""
    sampled = dict(temperature=1.0, seed=77, num_samples=2, max_new_tokens=6)
    threaded = make_engine(loaded)
    try:
        with pytest.raises(RuntimeError, match="its own scheduler thread"):
            threaded.run_until_idle()
        req, events = request(loaded, "Hi", **sampled)
        threaded.submit(req)
        want = [s.text for s in collect(req, events)[1]]
    finally:
        threaded.stop()
    engine = Engine(load_settings({}), service="inline-probe", own_thread=False)
    engine.set_model(loaded)
    try:
        reqs = [request(loaded, "Hi", **sampled), request(loaded, PROMPTS[2], max_new_tokens=4)]
        for req, _ in reqs:
            engine.submit(req)
        assert not [t for t in threading.enumerate() if t.name.startswith("inline-probe")]
        engine.run_until_idle()  # returns once both are done: every event is already queued
        (_, first, last), (_, second, _) = (collect(req, events) for req, events in reqs)
        assert isinstance(last, Finished) and [s.text for s in first] == want and len(second) == 1
        assert engine.stats()["running"] == 0
    finally:
        engine.stop()


def test_prompts_joining_together_share_their_common_prefix_with_the_same_results(loaded, reference):
    """The chat template's common start is prefilled once for the whole join, and kept for
    later prefills; greedy tokens and log-probs are those of separate prefills (sharing
    off), and of HF generate."""
    outs = {}
    for share in ("8", "0"):
        # No prompt cache: the prompt sent alone again must come from the kept prefix, not a kept prefill.
        settings = load_settings({"RLHF_PREFILL_SHARED_PREFIX": share, "RLHF_PROMPT_CACHE_TOKENS": "0"})
        engine = Engine(settings, own_thread=False, keep_prefix=True)
        engine.set_model(loaded)
        try:
            reqs = [request(loaded, p, max_new_tokens=8, return_logprobs=True) for p in PROMPTS]
            for req, _ in reqs:
                engine.submit(req)
            engine.run_until_idle()
            samples = [collect(req, events)[1][0] for req, events in reqs]
            outs[share] = ([s.text for s in samples], [[t.logprob for t in s.tokens] for s in samples])
            assert engine.stats()["prefills"] == 1  # one join
            shared = engine.stats()["shared_prefix_tokens"]
            # A later prompt, prefilled alone, reuses the prefix the engine kept (none of it is computed).
            alone, events = request(loaded, PROMPTS[1], max_new_tokens=8, return_logprobs=True)
            engine.submit(alone)
            engine.run_until_idle()
            sample = collect(alone, events)[1][0]
            outs[share + " alone"] = (sample.text, [t.logprob for t in sample.tokens])
            reused = engine.stats()["shared_prefix_tokens"] - shared
        finally:
            engine.stop()
        assert (shared > 0) == (share != "0")
        assert (reused >= 8) == (share != "0")
    assert outs["8 alone"][0] == outs["0 alone"][0] == outs["0"][0][1]
    assert outs["8 alone"][1] == pytest.approx(outs["0 alone"][1], abs=1e-4)
    assert outs["8"][0] == outs["0"][0]
    for a, b in zip(outs["8"][1], outs["0"][1], strict=True):
        assert a == pytest.approx(b, abs=1e-4)
    tok = loaded.tokenizer
    for prompt, text in zip(PROMPTS, outs["8"][0], strict=True):
        ids = tok(render_prompt(tok, prompt), add_special_tokens=False, return_tensors="pt").input_ids
        want = reference.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(want[0, ids.shape[1] :], skip_special_tokens=True)


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix([[1, 2], [3, 2]]) == 0
    assert shared_prefix([[7]]) == 0


def test_streamed_tokens_add_up_to_the_text_and_stop_sequences_end_it(loaded):
    engine = make_engine(loaded)
    try:
        req, events = request(loaded, "Hi", max_new_tokens=20, stream=True)
        engine.submit(req)
        out, samples, _ = collect(req, events)
        tokens = [e for e in out if isinstance(e, Token)]
        assert "".join(t.token.text for t in tokens if not t.token.special) == samples[0].text
        assert tokens[-1].final is not None and tokens[-1].final.finish_reason == "length"
        full = samples[0].text
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        req, events = request(loaded, "Hi", max_new_tokens=20, stop=[stop])
        engine.submit(req)
        _, samples, _ = collect(req, events)
        assert samples[0].finish_reason == "stop"
        assert samples[0].text == full[: full.index(stop) + len(stop)]
    finally:
        engine.stop()


def test_cancel_frees_the_slot_at_once_and_deadlines_are_honoured(loaded):
    engine = make_engine(loaded)
    try:
        req, events = request(loaded, "Hi", max_new_tokens=500, stream=True)
        engine.submit(req)
        first = next(iter(events.events(req)))
        assert isinstance(first, Token)
        req.cancel()
        deadline = time.monotonic() + 5
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.stats()["running"] == 0
        req, events = request(loaded, "Hi", max_new_tokens=500, deadline=time.monotonic() + 0.2)
        engine.submit(req)
        _, _, last = collect(req, events)
        assert isinstance(last, Failed) and last.error.status == Status.DEADLINE_EXCEEDED
    finally:
        engine.stop()


def test_queue_bound_and_batch_and_kv_limits_hold(loaded):
    # 2 rows at most, 1 waiting request, and a KV budget that fits only 2 rows of 128.
    engine = make_engine(
        loaded,
        RLHF_MAX_BATCH="2",
        RLHF_MAX_QUEUE="1",
        RLHF_MAX_PROMPT_TOKENS="64",
        RLHF_MAX_NEW_TOKENS_LIMIT="64",
        RLHF_KV_BUDGET_TOKENS="256",
    )
    try:
        engine._cv.acquire()  # hold the engine still while the queue fills
        try:
            reqs = [request(loaded, "Hi", max_new_tokens=40) for _ in range(2)]
            engine.submit(reqs[0][0])
            with pytest.raises(StatusError) as err:
                engine.submit(reqs[1][0])
            assert err.value.status == Status.RESOURCE_EXHAUSTED and "RLHF_MAX_QUEUE" in err.value.message
        finally:
            engine._cv.release()
        collect(*reqs[0])
    finally:
        engine.stop()
    engine = make_engine(
        loaded,
        RLHF_MAX_BATCH="4",
        RLHF_MAX_QUEUE="16",
        RLHF_MAX_PROMPT_TOKENS="64",
        RLHF_MAX_NEW_TOKENS_LIMIT="64",
        RLHF_KV_BUDGET_TOKENS="256",
    )
    try:
        reqs = [request(loaded, p, max_new_tokens=64) for p in PROMPTS * 2]
        for req, _ in reqs:
            engine.submit(req)
        peak_rows = 0
        while any(not r.closed for r, _ in reqs):
            peak_rows = max(peak_rows, engine.stats()["running"])
            time.sleep(0.002)
        for req, events in reqs:
            _, samples, last = collect(req, events)
            assert isinstance(last, Finished) and samples[0].generated_tokens >= 1
        # Prompts here are ~30-45 tokens, so each row is charged <= 109 columns: 2 rows fit 256, 3 do not.
        assert peak_rows <= 2
        assert 0 < engine.stats()["peak_cache_tokens"] <= 256
    finally:
        engine.stop()


def test_bfloat16_weights_serve_too(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir, dtype=torch.bfloat16)
    bf16 = Loaded(
        "tiny-bf16", Manifest("tiny-bf16", "base", "policy"), tiny_model_dir, model, load_tokenizer(tiny_model_dir)
    )
    engine = make_engine(bf16, RLHF_SERVE_DTYPE="bfloat16")
    try:
        req, events = request(
            bf16, "Hi", max_new_tokens=7, num_samples=2, temperature=0.7, seed=3, return_logprobs=True
        )
        engine.submit(req)
        _, samples, last = collect(req, events)
        assert isinstance(last, Finished) and [s.generated_tokens for s in samples] == [7, 7]
        assert all(t.logprob is not None and t.logprob <= 0 for t in samples[0].tokens)
    finally:
        engine.stop()


def test_one_requests_unsampleable_parameters_or_broken_prompt_fail_it_alone(loaded):
    """Parameters that make sampling overflow (validation refuses them; built directly here,
    as a trainer may) and a prompt the model cannot embed fail only their own request:
    a greedy stream decoding beside them finishes with exactly its solo result."""
    engine = make_engine(loaded)
    try:
        solo, events = request(loaded, PROMPTS[2], max_new_tokens=24, stream=True)
        engine.submit(solo)
        want = collect(solo, events)[1][0].text

        stream, stream_events = request(loaded, PROMPTS[2], max_new_tokens=24, stream=True)
        engine.submit(stream)
        first = next(iter(stream_events.events(stream)))  # the stream is in flight
        assert isinstance(first, Token)
        bad = []
        for overrides in (
            {"temperature": 1e-45},
            {"temperature": 1.0, "repetition_penalty": 1e-45},
            {"temperature": 1.0, "repetition_penalty": 1e-45, "num_samples": 3, "seed": 5},
        ):
            req, events = request(loaded, "Hi", max_new_tokens=8)
            req.params = dataclasses.replace(req.params, **overrides)  # past validation, as trainers build them
            bad.append((req, events))
        vocab = loaded.model.config.vocab_size
        broken, broken_events = request(loaded, "Hi", max_new_tokens=8)
        broken.prompt_ids = [vocab + 7, *broken.prompt_ids]  # no such token: the embedding lookup raises
        fine, fine_events = request(loaded, PROMPTS[1], max_new_tokens=6)
        with engine._cv:  # all join one prefill batch beside the running stream
            for req, _ in [*bad, (broken, broken_events), (fine, fine_events)]:
                engine.submit(req)
        for req, events in bad:
            *_, last = collect(req, events)
            assert isinstance(last, Failed) and last.error.status == Status.INTERNAL
            assert "not finite" in last.error.message
        *_, last = collect(broken, broken_events)
        assert isinstance(last, Failed) and last.error.status == Status.INTERNAL
        _, samples, last = collect(fine, fine_events)
        assert isinstance(last, Finished) and samples[0].generated_tokens == 6
        out = [first, *stream_events.events(stream)]
        assert isinstance(out[-1], Finished)
        assert [e.sample.text for e in out if isinstance(e, SampleDone)] == [want]
        deadline = time.monotonic() + 5
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.01)  # Finished is sent just before the row leaves the batch
        assert engine.stats()["running"] == 0
        # The engine keeps serving.
        again, events = request(loaded, PROMPTS[0], max_new_tokens=4)
        engine.submit(again)
        assert isinstance(collect(again, events)[2], Finished)
    finally:
        engine.stop()


class _UnderAutocast(torch.nn.Module):
    """A model called under bf16 autocast, as the PPO trainer hands its live policy to the engine."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, *args, **kwargs):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_a_model_wrapped_to_run_under_autocast_is_served(tiny_model_dir):
    wrapped = _UnderAutocast(load_causal_lm(tiny_model_dir))
    loaded = Loaded("ppo", Manifest("ppo", "ppo", "policy"), None, wrapped, load_tokenizer(tiny_model_dir))
    engine = make_engine(loaded)
    try:
        reqs = [request(loaded, p, max_new_tokens=5, temperature=1.0, seed=3, num_samples=2) for p in PROMPTS[:2]]
        for req, _ in reqs:
            engine.submit(req)
        for req, events in reqs:
            _, samples, last = collect(req, events)
            assert isinstance(last, Finished) and [s.generated_tokens for s in samples] == [5, 5]
    finally:
        engine.stop()


def test_a_decode_step_that_breaks_on_one_row_fails_only_that_row(loaded):
    """A row whose state the model cannot run (here: a token id past the vocabulary, as a
    checkpoint whose unembedding outgrew its embedding would sample) makes the batched step
    raise; the step is retried row by row, that row's request fails, the other row continues."""
    engine = make_engine(loaded)
    try:
        solo, events = request(loaded, PROMPTS[0], max_new_tokens=16)
        engine.submit(solo)
        want = collect(solo, events)[1][0].text
        healthy, healthy_events = request(loaded, PROMPTS[0], max_new_tokens=16, stream=True)
        victim, victim_events = request(loaded, PROMPTS[1], max_new_tokens=16, stream=True)
        with engine._cv:
            engine.submit(healthy)
            engine.submit(victim)
        assert isinstance(next(iter(victim_events.events(victim))), Token)  # both joined and are decoding
        with engine._cv:  # the engine thread stops at its next iteration
            time.sleep(0.5)  # let the step in flight finish
            cohort = engine._current
            row = next(i for i, r in enumerate(cohort.rows) if r.req is victim)
            with torch.inference_mode():
                cohort.last[row] = loaded.model.config.vocab_size + 5
        *_, last = collect(victim, victim_events)
        assert isinstance(last, Failed) and last.error.status == Status.INTERNAL
        out, samples, last = collect(healthy, healthy_events)
        assert isinstance(last, Finished) and [s.text for s in samples] == [want]
        again, events = request(loaded, PROMPTS[3], max_new_tokens=3)
        engine.submit(again)
        assert isinstance(collect(again, events)[2], Finished)
    finally:
        engine.stop()


def test_a_burst_of_prompts_is_prefilled_within_the_prefill_token_budget(loaded, reference):
    """RLHF_MAX_PREFILL_TOKENS bounds one prefill (prompts x longest prompt): three prompts that
    together exceed it join over three steps, and each still gets generate's result."""
    engine = make_engine(loaded, RLHF_MAX_PREFILL_TOKENS="64")
    try:
        reqs = [request(loaded, p, max_new_tokens=4) for p in PROMPTS[:3]]
        assert all(32 < len(r.prompt_ids) <= 64 for r, _ in reqs)  # any two exceed 64 padded tokens
        with engine._cv:
            for req, _ in reqs:
                engine.submit(req)
        for req, events in reqs:
            _, samples, _ = collect(req, events)
            ids = torch.tensor([req.prompt_ids])
            ref = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
            assert samples[0].text == loaded.tokenizer.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
        assert engine.stats()["prefills"] == 3
    finally:
        engine.stop()


def test_loop_sink_delivers_from_another_thread_and_ignores_a_closed_loop():
    """The servers' sink: an engine thread's events reach the loop's queue; once the
    loop has closed (a server stopped past its grace), emitting raises nothing in the engine."""
    loop = asyncio.new_event_loop()
    events: asyncio.Queue = asyncio.Queue()

    async def make():
        return loop_sink(events)

    sink = loop.run_until_complete(make())
    sent = Finished("v", 1, 0)
    worker = threading.Thread(target=sink, args=(sent,))
    worker.start()
    worker.join()
    assert loop.run_until_complete(asyncio.wait_for(events.get(), 5)) is sent
    loop.close()
    sink(sent)  # no RuntimeError("Event loop is closed")
