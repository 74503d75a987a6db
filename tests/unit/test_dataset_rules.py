"""The dataset rules (services/datasets/rules.py) on hand-built records."""

from __future__ import annotations

import random

from services.datasets.rules import RuleParams, apply_rules, scrub_pii, split_of

PARAMS = RuleParams(max_prompts_per_user=200, dedup_prefix_chars=40, validation_fraction=0.2, test_fraction=0.2)


def prompt(i: int, user: str, text: str | None = None, t: int | None = None) -> dict:
    return {
        "event_id": f"ev-{user}-{i}",
        "prompt_id": f"ev-{user}-{i}",
        "user_id": user,
        "text": text or f"Prompt number {i} from {user}: explain topic {i * 7919}",
        "source": "api",
        "created_unix_ms": t if t is not None else i,
    }


def demo(i: int, prompt_id: str, labeler: str = "lab1", user_id: str = "", prompt_text: str = "") -> dict:
    return {
        "event_id": f"ev-demo-{i}",
        "prompt_id": prompt_id,
        "user_id": user_id,
        "labeler_id": labeler,
        "prompt_text": prompt_text,
        "response": f"answer {i}",
        "created_unix_ms": 10_000 + i,
    }


def users_of(data: dict, split: str) -> set[str]:
    return {r["user_id"] for kind in data[split].values() for r in kind}


def test_splits_share_no_user_and_are_stable_as_data_grows():
    small = [prompt(i, f"u{i % 30}") for i in range(60)]
    grown = small + [prompt(i, f"u{i % 90}") for i in range(60, 400)]
    first, _ = apply_rules({"prompts": small}, PARAMS)
    second, report = apply_rules({"prompts": grown}, PARAMS)
    for data in (first, second):
        train, val, test = (users_of(data, s) for s in ("train", "validation", "test"))
        assert not train & val and not train & test and not val & test
    assert all(report["users"][s] > 0 for s in ("train", "validation", "test"))
    for split in ("train", "validation", "test"):
        assert users_of(first, split) <= users_of(second, split)  # nobody moved
        assert all(split_of(u, PARAMS) == split for u in users_of(second, split))


def test_user_cap_keeps_the_earliest_prompts():
    records = [prompt(i, "heavy") for i in range(205)] + [prompt(i, "light") for i in range(5)]
    random.Random(0).shuffle(records)
    data, report = apply_rules({"prompts": records}, PARAMS)
    kept = [r for s in data.values() for r in s["prompts"] if r["user_id"] == "heavy"]
    assert len(kept) == 200
    assert {r["event_id"] for r in kept} == {f"ev-heavy-{i}" for i in range(200)}
    assert report["dropped"]["prompts_over_user_cap"] == 5


def test_prefix_dedup_drops_later_prompts_sharing_a_long_prefix():
    base = "Write a detailed essay about the history of the printing press in Europe"
    records = [
        prompt(1, "a", base + ", focusing on Gutenberg."),
        prompt(2, "b", base.upper() + "   and its effect on literacy."),  # same prefix: case/space-insensitive
        prompt(3, "c", "Write a detailed essay on rail transport"),  # diverges within the prefix
        prompt(4, "d", "short one"),
        prompt(5, "e", "Short  one"),  # exact duplicate, short
    ]
    data, report = apply_rules({"prompts": records}, PARAMS)
    kept = {r["event_id"] for s in data.values() for r in s["prompts"]}
    assert kept == {"ev-a-1", "ev-c-3", "ev-d-4"}
    assert report["dropped"]["prompts_prefix_duplicate"] == 2


def test_feedback_inherits_its_prompts_user_and_follows_it():
    records = {
        "prompts": [prompt(1, "alice"), prompt(2, "bob")],
        "demonstrations": [
            demo(1, "ev-alice-1"),
            demo(2, "ev-bob-2", labeler="lab2"),
            demo(3, "ev-unknown"),  # prompt not seen yet: held back
            demo(4, "lp-x", user_id="lab1", prompt_text="A prompt written by the labeler"),
        ],
    }
    data, report = apply_rules(records, PARAMS)
    demos = {r["event_id"]: (split, r) for split in data for r in data[split]["demonstrations"]}
    assert demos["ev-demo-1"][1]["user_id"] == "alice" and demos["ev-demo-1"][0] == split_of("alice", PARAMS)
    assert demos["ev-demo-2"][1]["user_id"] == "bob"
    assert demos["ev-demo-1"][1]["prompt_text"] == records["prompts"][0]["text"]
    assert "ev-demo-3" not in demos and report["pending_unknown_prompt"] == {"demonstrations": 1}
    # a labeler-written prompt becomes a prompt of its labeler
    assert demos["ev-demo-4"][1]["user_id"] == "lab1"
    labeler_prompts = [r for s in data.values() for r in s["prompts"] if r["source"] == "labeler"]
    assert [r["prompt_id"] for r in labeler_prompts] == ["lp-x"]


def test_pii_is_scrubbed_in_train_only():
    pii = "Mail jane.doe@example.com or call (555) 123-4567, card 4111 1111 1111 1111, ssn 123-45-6789, host 10.0.0.12"
    users = [f"user{i}" for i in range(60)]
    records = [prompt(i, u, f"Request {i}: {pii}") for i, u in enumerate(users)]
    data, report = apply_rules({"prompts": records}, PARAMS)
    for record in data["train"]["prompts"]:
        assert "jane.doe" not in record["text"] and "123-4567" not in record["text"] and "4111" not in record["text"]
        assert "123-45-6789" not in record["text"] and "10.0.0.12" not in record["text"]
        assert record["text"].endswith(": Mail [EMAIL] or call [PHONE], card [CARD], ssn [SSN], host [IP]")
    assert data["validation"]["prompts"] and data["test"]["prompts"]
    for split in ("validation", "test"):
        assert all(r["text"].endswith(pii) for r in data[split]["prompts"])
    assert report["pii_replacements"] == 5 * len(data["train"]["prompts"])


def test_scrub_leaves_ordinary_numbers_alone():
    text = "In 2023, 1,234 people paid $19.99 for version 3.2.1; see chapter 12-14."
    assert scrub_pii(text) == (text, 0)
    assert scrub_pii("ring +44 20 7946 0958 now")[0] == "ring [PHONE] now"


def test_same_events_in_any_order_give_the_same_snapshot():
    records = {
        "prompts": [prompt(i, f"u{i % 7}") for i in range(50)],
        "demonstrations": [demo(i, f"ev-u{i % 7}-{i}") for i in range(50)],
    }
    shuffled = {k: random.Random(1).sample(v, len(v)) for k, v in records.items()}
    assert apply_rules(records, PARAMS)[0] == apply_rules(shuffled, PARAMS)[0]
