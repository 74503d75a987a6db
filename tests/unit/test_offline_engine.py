"""The engine run offline over a list of prompts (services/policy/offline.py), as the
gate job and the demo's evaluation sample: a response depends on its prompt and seed
only, never on the batch it was decoded in or on how many rows decode together."""

from __future__ import annotations

import pytest
import torch

from services.common.config import load_settings
from services.common.models import load_causal_lm, load_tokenizer, render_prompt
from services.policy.offline import OfflineEngine, sample_all

PROMPTS = ["Name a colour.", "Write one word about the sea.", "Count to three.", "Name a colour.", "Say hi."]


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def _run(model, tok, rows: int, chunk: int, seeds: list[int], temperature: float = 1.0):
    ids = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    engine = OfflineEngine(
        model, tok, load_settings({}), rows=rows, max_prompt_tokens=64, max_new_tokens=10, service="test"
    )
    try:
        out = []
        for b in range(0, len(ids), chunk):
            out += engine.generate(ids[b : b + chunk], seeds[b : b + chunk], temperature=temperature)
        assert engine.fused_reason is None and engine.fused_batches == -(-len(ids) // chunk)
        assert not hasattr(model, "rlhf_fused")  # the fused step's weight copies are not kept
        return out
    finally:
        engine.close()


def test_a_response_depends_on_its_prompt_and_seed_not_on_its_batch(model_and_tok):
    model, tok = model_and_tok
    seeds = [100 + i for i in range(len(PROMPTS))]
    together = _run(model, tok, rows=5, chunk=5, seeds=seeds)
    apart = _run(model, tok, rows=2, chunk=2, seeds=seeds)
    assert [s.text for s in together] == [s.text for s in apart]
    ids = [tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    in_threes = sample_all(
        model, tok, load_settings({}), ids, seeds, rows=3, max_new_tokens=10, temperature=1.0, service="test"
    )
    assert [s.text for s in in_threes] == [s.text for s in together]
    assert all(s.generated_tokens > 0 for s in together)
    # the same prompt with other seeds samples something else (the seed is used)
    other = _run(model, tok, rows=5, chunk=5, seeds=[900 + i for i in range(len(PROMPTS))])
    assert [s.text for s in other] != [s.text for s in together]


def test_greedy_decoding_matches_generate(model_and_tok):
    model, tok = model_and_tok
    out = _run(model, tok, rows=5, chunk=5, seeds=[0] * len(PROMPTS), temperature=0.0)
    for prompt, sample in zip(PROMPTS, out, strict=True):
        enc = tok(render_prompt(tok, prompt), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=False, max_new_tokens=10, pad_token_id=tok.pad_token_id)
        assert sample.text == tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_a_seed_list_of_the_wrong_length_is_refused(model_and_tok):
    model, tok = model_and_tok
    engine = OfflineEngine(model, tok, load_settings({}), rows=2, max_prompt_tokens=16, max_new_tokens=4, service="t")
    try:
        with pytest.raises(ValueError, match="1 seeds for 2 prompts"):
            engine.generate([[1, 2], [3]], [7], temperature=1.0)
    finally:
        engine.close()
