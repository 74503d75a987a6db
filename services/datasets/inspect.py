"""What is on the topics and in the snapshots: counts per topic, split and
user, and the histogram of K (responses per comparison)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from google.protobuf.message import DecodeError

from services.common import bus, feedback
from services.common.config import Settings
from services.common.datasets import KINDS, SPLITS, SnapshotStore

TOPIC_KEYS = (*KINDS, "deadletter")


def inspect_topics(settings: Settings, group_id: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
    """Read every feedback topic from the beginning (no group; nothing committed)."""
    from kafka import TopicPartition

    topics = bus.Topics.from_settings(settings)
    consumer = bus.make_consumer(settings, group_id)
    out: dict[str, Any] = {"topics": {}, "events_per_user": {}, "k_histogram": {}, "deadletter_reasons": {}}
    try:
        per_user: Counter = Counter()
        k_hist: Counter = Counter()
        reasons: Counter = Counter()
        for key in TOPIC_KEYS:
            name = topics.name(key)
            tps = [TopicPartition(name, p) for p in sorted(consumer.partitions_for_topic(name) or ())]
            entry: dict[str, Any] = {"name": name, "records": 0, "undecodable": 0, "partitions": {}}
            out["topics"][key] = entry
            if not tps:
                continue
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            committed = {tp: consumer.committed(tp) for tp in tps} if group_id else {}
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and any(consumer.position(tp) < end[tp] for tp in tps):
                for records in consumer.poll(timeout_ms=500).values():
                    for record in records:
                        entry["records"] += 1
                        try:
                            event = bus.decode(key, record.value)
                        except DecodeError:
                            entry["undecodable"] += 1
                            continue
                        if key == "deadletter":
                            reasons[event.reason.split(":")[0]] += 1
                            continue
                        per_user[event.labeler_id if feedback.KINDS[key].on_prompt else event.user_id] += 1
                        if key == "comparisons":
                            k_hist[len(event.responses)] += 1
            for tp in tps:
                part = {"end_offset": end[tp]}
                if group_id:
                    part["committed"] = committed[tp]
                    part["lag"] = end[tp] - (committed[tp] or 0)
                entry["partitions"][str(tp.partition)] = part
        out["events_per_user"] = dict(per_user.most_common())
        out["k_histogram"] = {str(k): n for k, n in sorted(k_hist.items())}
        out["deadletter_reasons"] = dict(reasons)
    finally:
        consumer.close()
    return out


def inspect_snapshot(settings: Settings, snapshot_id: str | None = None) -> dict[str, Any]:
    store = SnapshotStore(settings.dataset_dir)
    snapshot_id = snapshot_id or store.latest()
    if snapshot_id is None:
        raise FileNotFoundError(f"no dataset snapshot in {store.root}")
    manifest = store.manifest(snapshot_id)
    users: dict[str, Counter] = {}
    k_hist: Counter = Counter()
    ties = 0
    for split in SPLITS:
        users[split] = Counter(r["user_id"] for r in store.read(snapshot_id, split, "prompts"))
        for comparison in store.read(snapshot_id, split, "comparisons"):
            k_hist[len(comparison["responses"])] += 1
            ranks = [r["rank"] for r in comparison["responses"]]
            ties += len(ranks) != len(set(ranks))
    return {
        "snapshot_id": snapshot_id,
        "parent": manifest.get("parent", ""),
        "content_sha256": manifest["content_sha256"],
        "counts": manifest["counts"],
        "users_per_split": {split: len(users[split]) for split in SPLITS},
        "prompts_per_user": {split: dict(users[split].most_common()) for split in SPLITS},
        "k_histogram": {str(k): n for k, n in sorted(k_hist.items())},
        "comparisons_with_ties": ties,
        "rules": manifest.get("rules", {}),
        "source_offsets": manifest.get("source_offsets", {}),
    }


def format_topics(report: dict[str, Any]) -> str:
    lines = ["topic                       records  undecodable  partitions (end offset / lag)"]
    for entry in report["topics"].values():
        parts = ", ".join(
            f"{p}:{v['end_offset']}" + (f"/lag {v['lag']}" if "lag" in v else "")
            for p, v in entry["partitions"].items()
        )
        lines.append(f"{entry['name']:<27} {entry['records']:>7}  {entry['undecodable']:>11}  {parts}")
    lines.append("events per user (prompts by author, feedback by labeler):")
    lines += [f"  {user or '(none)'}: {n}" for user, n in report["events_per_user"].items()]
    lines.append("K histogram (responses per comparison): " + _hist(report["k_histogram"]))
    if report["deadletter_reasons"]:
        lines.append("dead-letter reasons: " + ", ".join(f"{r}: {n}" for r, n in report["deadletter_reasons"].items()))
    return "\n".join(lines)


def format_snapshot(report: dict[str, Any]) -> str:
    lines = [
        f"snapshot {report['snapshot_id']} (parent {report['parent'] or '-'})",
        "split       users  " + "  ".join(f"{k:>14}" for k in KINDS),
    ]
    for split in SPLITS:
        counts = report["counts"][split]
        lines.append(
            f"{split:<10} {report['users_per_split'][split]:>6}  " + "  ".join(f"{counts[k]:>14}" for k in KINDS)
        )
    lines.append("prompts per user:")
    for split in SPLITS:
        top = report["prompts_per_user"][split]
        lines.append(f"  {split}: " + (", ".join(f"{u}={n}" for u, n in top.items()) or "-"))
    lines.append(
        "K histogram: " + _hist(report["k_histogram"]) + f"  (comparisons with ties: {report['comparisons_with_ties']})"
    )
    rules = report["rules"]
    if rules:
        lines.append(
            f"dropped: {rules.get('dropped', {})}"
            f"  pending (prompt not yet seen): {rules.get('pending_unknown_prompt', {})}"
            f"  PII replacements in train: {rules.get('pii_replacements', 0)}"
        )
    return "\n".join(lines)


def _hist(hist: dict[str, int]) -> str:
    return "  ".join(f"K={k}: {n}" for k, n in hist.items()) or "-"
