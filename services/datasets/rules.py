"""InstructGPT's data rules, as pure functions over the records the builder
has accumulated (no Kafka, no files), so they are easy to test and the same
input always gives the same snapshot.

1. Prompts given only as text by a labeler become labeler-written prompts
   (their author, and split key, is the labeler).
2. Prompts that share a long common prefix are duplicates: the earliest wins.
3. At most `max_prompts_per_user` prompts per user ID (the earliest).
4. Demonstrations, comparisons and labels follow their prompt: they inherit
   its user ID and text, and are dropped with it. A record whose prompt id is
   not (yet) known is held back ("pending") until the prompt arrives; it
   enters the first snapshot built after that.
5. Split by a hash of the user ID, so a user never moves between splits as
   data grows, and validation/test hold no user of train.
6. PII (emails, phone numbers, card numbers, SSNs, IP addresses) is scrubbed
   from every text of the train split only; validation and test stay verbatim.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from services.common.config import Settings
from services.common.datasets import KINDS, SPLITS
from services.common.feedback import ON_PROMPT

Record = dict[str, Any]


@dataclass(frozen=True)
class RuleParams:
    max_prompts_per_user: int = 200
    dedup_prefix_chars: int = 100
    validation_fraction: float = 0.1
    test_fraction: float = 0.1

    @classmethod
    def from_settings(cls, settings: Settings) -> RuleParams:
        return cls(
            settings.dataset_max_prompts_per_user,
            settings.dataset_dedup_prefix_chars,
            settings.dataset_validation_fraction,
            settings.dataset_test_fraction,
        )


# --- split --------------------------------------------------------------------


def split_of(user_id: str, params: RuleParams) -> str:
    """The split of a user: a pure function of the user ID and the fractions."""
    digest = hashlib.sha256(f"rlhf-split\x00{user_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < params.test_fraction:
        return "test"
    if u < params.test_fraction + params.validation_fraction:
        return "validation"
    return "train"


# --- prefix de-duplication -------------------------------------------------------

_SPACE = re.compile(r"\s+")


def dedup_key(text: str, prefix_chars: int) -> str:
    """Case and whitespace do not make a prompt new; only its first `prefix_chars` count."""
    return _SPACE.sub(" ", text).strip().casefold()[:prefix_chars]


# --- PII ----------------------------------------------------------------------------

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_SSN = re.compile(r"(?<![\d-])\d{3}-\d{2}-\d{4}(?![\d-])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[\s.-]?\(?\d{1,4}\)?){2,5}"  # international: +44 20 7946 0958
    r"|(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}"  # North American: (555) 123-4567
    r")(?!\w)"
)
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)(?![\d.])")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def scrub_pii(text: str) -> tuple[str, int]:
    """Replace PII with typed placeholders; return (text, replacements)."""
    count = 0

    def sub(pattern: re.Pattern, placeholder: str, text: str, check=None) -> str:
        nonlocal count

        def repl(m: re.Match) -> str:
            nonlocal count
            if check and not check(m.group(0)):
                return m.group(0)
            count += 1
            return placeholder

        return pattern.sub(repl, text)

    text = sub(_EMAIL, "[EMAIL]", text)
    text = sub(_CARD, "[CARD]", text, check=lambda s: _luhn(re.sub(r"\D", "", s)))
    text = sub(_SSN, "[SSN]", text)
    text = sub(_PHONE, "[PHONE]", text, check=lambda s: 8 <= len(re.sub(r"\D", "", s)) <= 15)
    text = sub(_IPV4, "[IP]", text)
    return text, count


def scrub_record(record: Record) -> tuple[Record, int]:
    """Scrub every text a record carries: its own, and those of its ranked responses."""
    out, total = dict(record), 0
    for key in ("text", "prompt_text", "response"):
        if key in out:
            out[key], n = scrub_pii(out[key])
            total += n
    if "responses" in record:
        out["responses"] = []
        for response in record["responses"]:
            text, n = scrub_pii(response["text"])
            out["responses"].append({**response, "text": text})
            total += n
    return out, total


# --- the whole pipeline -------------------------------------------------------------


def _order(record: Record) -> tuple:
    return (record.get("created_unix_ms", 0), record["event_id"])


def _public(record: Record) -> Record:
    """The snapshot's record shape (see services.common.datasets)."""
    return {k: v for k, v in record.items() if k != "created_unix_ms"}


def apply_rules(
    events: Mapping[str, Iterable[Record]], params: RuleParams
) -> tuple[dict[str, dict[str, list[Record]]], dict[str, Any]]:
    """Accumulated records per kind -> ({split: {kind: [records]}}, report).

    Input records carry `created_unix_ms`; feedback records carry the
    `user_id` of their event (set only for labeler-written prompts).
    """
    report: dict[str, Any] = {"dropped": Counter(), "pending_unknown_prompt": Counter(), "pii_replacements": 0}

    # 1. logged prompts, then labeler-written prompts implied by feedback records
    prompts: dict[str, Record] = {}
    for record in sorted(events.get("prompts", ()), key=_order):
        prompts.setdefault(record["prompt_id"], dict(record))
    feedback = {kind: sorted(events.get(kind, ()), key=_order) for kind in ON_PROMPT}
    for kind in ON_PROMPT:
        for record in feedback[kind]:
            if record["prompt_id"] not in prompts and record.get("user_id"):
                prompts[record["prompt_id"]] = {
                    "event_id": record["event_id"],
                    "prompt_id": record["prompt_id"],
                    "user_id": record["user_id"],
                    "text": record["prompt_text"],
                    "source": "labeler",
                    "created_unix_ms": record.get("created_unix_ms", 0),
                }

    # 2. prefix de-duplication, earliest first; 3. the per-user cap
    kept: dict[str, Record] = {}
    seen_prefixes: set[str] = set()
    per_user: Counter = Counter()
    for record in sorted(prompts.values(), key=_order):
        key = dedup_key(record["text"], params.dedup_prefix_chars)
        if key in seen_prefixes:
            report["dropped"]["prompts_prefix_duplicate"] += 1
            continue
        seen_prefixes.add(key)
        if per_user[record["user_id"]] >= params.max_prompts_per_user:
            report["dropped"]["prompts_over_user_cap"] += 1
            continue
        per_user[record["user_id"]] += 1
        kept[record["prompt_id"]] = record

    # 4. feedback follows its prompt; 5. split by user
    data: dict[str, dict[str, list[Record]]] = {split: {kind: [] for kind in KINDS} for split in SPLITS}
    for record in kept.values():
        data[split_of(record["user_id"], params)]["prompts"].append(record)
    for kind in ON_PROMPT:
        for record in feedback[kind]:
            prompt = kept.get(record["prompt_id"])
            if prompt is None:
                reason = "pending_unknown_prompt" if record["prompt_id"] not in prompts else None
                if reason:
                    report["pending_unknown_prompt"][kind] += 1
                else:
                    report["dropped"][f"{kind}_with_dropped_prompt"] += 1
                continue
            joined = {**record, "user_id": prompt["user_id"], "prompt_text": prompt["text"]}
            data[split_of(prompt["user_id"], params)][kind].append(joined)

    # 6. PII only in train; records in a fixed order so the content hash is stable
    for split in SPLITS:
        for kind in KINDS:
            records = [_public(r) for r in sorted(data[split][kind], key=_order)]
            if split == "train":
                scrubbed = []
                for record in records:
                    record, n = scrub_record(record)
                    report["pii_replacements"] += n
                    scrubbed.append(record)
                records = scrubbed
            data[split][kind] = records

    users = defaultdict(set)
    for split in SPLITS:
        for record in data[split]["prompts"]:
            users[split].add(record["user_id"])
    report["users"] = {split: len(users[split]) for split in SPLITS}
    report["dropped"] = dict(report["dropped"])
    report["pending_unknown_prompt"] = dict(report["pending_unknown_prompt"])
    report["params"] = asdict(params)
    return data, report
