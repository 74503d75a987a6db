"""Generation-parameter validation: every bad field is named with its limit."""

from __future__ import annotations

import pytest

from services.common.config import load_settings
from services.common.errors import Status, StatusError
from services.policy.params import check_prompt, validate

SETTINGS = load_settings(
    {
        "RLHF_MAX_PROMPT_TOKENS": "32",
        "RLHF_MAX_NEW_TOKENS_LIMIT": "64",
        "RLHF_DEFAULT_MAX_NEW_TOKENS": "16",
        "RLHF_KV_BUDGET_TOKENS": "400",
        "RLHF_MAX_SAMPLES": "16",
        "RLHF_MAX_BATCH": "16",
    }
)


def params(**overrides):
    values = dict(
        max_new_tokens=0,
        temperature=None,
        top_p=None,
        top_k=0,
        repetition_penalty=None,
        stop=[],
        seed=None,
        num_samples=None,
        return_logprobs=False,
    )
    values.update(overrides)
    return validate(SETTINGS, **values)


def test_defaults_fill_in_unset_fields():
    p = params()
    assert (p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.num_samples) == (
        16,
        1.0,
        1.0,
        0,
        1.0,
        1,
    )
    assert params(temperature=0.0).greedy
    # The floors allow for gRPC's float32 fields: float32(0.01) is a little below 0.01.
    assert params(temperature=0.009999999776482582, repetition_penalty=0.009999999776482582).temperature > 0


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("num_samples", 0, ["num_samples", "1 and 16", "RLHF_MAX_SAMPLES"]),
        ("num_samples", 17, ["num_samples", "1 and 16"]),
        ("temperature", -0.5, ["temperature", ">= 0"]),
        ("top_p", 0.0, ["top_p", "(0, 1]"]),
        ("top_p", 1.01, ["top_p", "(0, 1]"]),
        ("top_k", -1, ["top_k"]),
        ("repetition_penalty", 0.0, ["repetition_penalty", "> 0"]),
        # Unsampleable: logits / 1e-45 overflow to inf and softmax gives NaN for every token.
        ("temperature", 1e-45, ["temperature", "0 for greedy", "between 0.01 and 100"]),
        ("temperature", float("nan"), ["temperature"]),
        ("repetition_penalty", 1e-45, ["repetition_penalty", "between 0.01 and 100"]),
        ("repetition_penalty", float("inf"), ["repetition_penalty"]),
        ("top_k", 1 << 40, ["top_k", "4294967295"]),
        ("max_new_tokens", 65, ["max_new_tokens", "64", "RLHF_MAX_NEW_TOKENS_LIMIT"]),
        ("stop", [""], ["stop"]),
        ("stop", ["a"] * 9, ["stop", "limit is 8"]),
        ("seed", -1, ["seed"]),
    ],
)
def test_bad_fields_are_named_with_their_limit(field, value, words):
    with pytest.raises(StatusError) as err:
        params(**{field: value})
    assert err.value.status == Status.INVALID_ARGUMENT
    for word in words:
        assert word in err.value.message


def test_prompt_checks_name_the_limit():
    p = params(max_new_tokens=8)
    check_prompt(SETTINGS, [1] * 32, p)  # exactly at the limit is fine
    with pytest.raises(StatusError, match=r"prompt is empty"):
        check_prompt(SETTINGS, [], p)
    with pytest.raises(StatusError, match=r"prompt has 33 tokens; the limit is 32 \(RLHF_MAX_PROMPT_TOKENS\)"):
        check_prompt(SETTINGS, [1] * 33, p)
    # K samples that could never fit the KV budget together are refused up front.
    with pytest.raises(StatusError, match=r"RLHF_KV_BUDGET_TOKENS"):
        check_prompt(SETTINGS, [1] * 30, params(max_new_tokens=64, num_samples=5))


def test_sample_seeds_are_consecutive_from_the_request_seed():
    assert params(seed=7, num_samples=3).sample_seeds() == [7, 8, 9]
    assert params(seed=2**64 - 1, num_samples=2).sample_seeds() == [2**64 - 1, 0]
    assert len(set(params(num_samples=4).sample_seeds())) == 4
