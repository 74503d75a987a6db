"""The labeling queue's SQLite store on its own: split shares, the kind and
overlap mix, leases that expire back to the queue, never the same prompt twice,
and state that a reopened store still holds."""

from __future__ import annotations

from collections import Counter

from services.labeling.store import LabelingStore, Policy, Sample

LEASE_MS = 60_000


def policy(**overrides) -> Policy:
    base = {
        "demonstration_share": 0.0,
        "overlap_share": 0.0,
        "overlap_labelers": 2,
        "split_shares": {"train": 0.5, "validation": 0.25, "test": 0.25},
    }
    return Policy(**{**base, **overrides})


def fill(store: LabelingStore, per_split: int = 8) -> None:
    rows = [
        (f"p-{split}-{i}", f"user-{split}-{i % 3}", split, f"{split} prompt {i}", f"{split} prompt {i}")
        for split in ("train", "validation", "test")
        for i in range(per_split)
    ]
    store.add_prompts(rows, {0: len(rows)}, max_per_user=100)


def test_prompts_respect_the_cap_and_the_prefix_and_resume_from_the_offsets(tmp_path):
    store = LabelingStore(tmp_path / "q.db")
    rows = [
        ("p1", "u1", "train", "Hello there", "hello there"),
        ("p2", "u1", "train", "HELLO  there", "hello there"),  # same normalised prefix
        ("p3", "u1", "train", "Third", "third"),
        ("p4", "u1", "train", "Fourth", "fourth"),  # u1 is over the cap of 2
        ("p5", "u2", "test", "Other", "other"),
    ]
    assert store.add_prompts(rows, {0: 5}, max_per_user=2) == 3
    assert store.add_prompts(rows, {0: 5}, max_per_user=2) == 0  # a replay adds nothing
    store.close()
    again = LabelingStore(tmp_path / "q.db")
    assert again.offsets() == {0: 5} and again.counts(0)["queued_prompts"] == 3


def test_splits_get_their_share_and_kinds_and_overlap_their_mix(tmp_path):
    store = LabelingStore(tmp_path / "q.db")
    fill(store)
    mix = policy(demonstration_share=0.25, overlap_share=0.5)
    made = []
    for _ in range(16):  # made ahead of time, leased to nobody
        task, new = store.lease(None, 0, LEASE_MS, mix)
        if new:
            task = store.complete(task.task_id, [Sample(f"{task.task_id}-s{i}", f"t{i}", "v1") for i in range(4)])
        made.append(task)
    assert Counter(t.split for t in made) == {"train": 8, "validation": 4, "test": 4}
    assert Counter(t.kind for t in made) == {"comparison": 12, "demonstration": 4}
    assert sum(t.target == 2 for t in made) == 8
    # labelers are given the made tasks, oldest first, each to as many labelers as it wants
    leased = Counter(store.lease(f"lab{i}", 0, LEASE_MS, mix)[0].task_id for i in range(24))
    assert leased == {t.task_id: t.target for t in made}


def test_a_lease_expires_back_to_the_queue_and_nobody_sees_a_prompt_twice(tmp_path):
    store = LabelingStore(tmp_path / "q.db")
    fill(store, per_split=1)
    only_train = policy(split_shares={"train": 1.0})
    first, new = store.lease("a", 0, LEASE_MS, only_train)
    assert new and first.state == "generating"
    store.complete(first.task_id, [Sample(f"{first.task_id}-s{i}", f"text {i}", "v1") for i in range(4)])
    assert store.lease("a", 1000, LEASE_MS, only_train)[0].task_id == first.task_id  # one open lease
    assert store.lease("b", 1000, LEASE_MS, only_train)[0] is None  # the only prompt is taken
    # a's lease expires: b gets the task, a never gets it again
    task, new = store.lease("b", LEASE_MS + 1, LEASE_MS, only_train)
    assert (
        task.task_id == first.task_id and not new and [s.text for s in task.samples] == [f"text {i}" for i in range(4)]
    )
    assert store.lease("a", LEASE_MS + 2, LEASE_MS, only_train)[0] is None


def test_a_task_still_generating_at_a_crash_goes_back_to_the_queue(tmp_path):
    store = LabelingStore(tmp_path / "q.db")
    fill(store, per_split=1)
    only_test = policy(split_shares={"test": 1.0})
    task, new = store.lease("a", 0, LEASE_MS, only_test)
    assert new
    store.close()  # the process died before the samples were stored
    reopened = LabelingStore(tmp_path / "q.db")
    again, new = reopened.lease("a", 0, LEASE_MS, only_test)
    assert new and again.prompt_id == task.prompt_id and again.task_id != task.task_id
