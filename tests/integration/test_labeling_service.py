"""The LabelingService against the real policy and feedback services and the
broker: tasks drawn from logged prompts under the dataset rules, server-side
versions on every ranked response, leases, bad input that writes nothing,
and a SIGKILL mid-lease that loses nothing and assigns nothing twice.

`labeling_stack`, `log_prompts` and `start_labeling` are reused by the other
labeling tests.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass

import grpc
import pytest
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc, labeling_pb2, labeling_pb2_grpc

from services.common.auth import bearer
from services.common.bus import read_topic
from services.common.config import Settings, to_env
from services.common.grpc_server import wait_for_serving
from services.feedback import server as feedback_server
from services.labeling import server as labeling_server
from services.policy import server as policy_server
from tests.conftest import make_settings

LABELERS = {"la": "tok-la", "lb": "tok-lb", "lc": "tok-lc"}
TOKENS = ",".join(f"{t}={u}:labeler" for u, t in LABELERS.items()) + ",tok-u1=u1:user,tok-u2=u2:user"
PROMPTS = {  # user -> prompts, in order; the per-user cap is 2 in this module
    "tok-u1": [
        "Describe the ocean in at most 12 words.",
        "  describe the OCEAN   in at most 12 words.",  # the same prefix: a duplicate
        "Name a colour.",
        "List three fruits.",  # u1's third accepted prompt: over the cap
    ],
    "tok-u2": ["Write about rain in at most 10 words.", "Tell me something about the moon."],
}
ACCEPTED = {"Describe the ocean in at most 12 words.", "Name a colour.", PROMPTS["tok-u2"][0], PROMPTS["tok-u2"][1]}


@dataclass
class LabelingStack:
    settings: Settings  # targets point at the running policy and feedback services
    policy: object
    feedback: object


@pytest.fixture(scope="module")
def labeling_stack(tmp_path_factory, broker, tiny_model_dir):
    settings = make_settings(
        tmp_path_factory.mktemp("labeling"),
        broker,
        RLHF_TOKENS=TOKENS,
        RLHF_DEFAULT_MAX_NEW_TOKENS="8",
        RLHF_DATASET_MAX_PROMPTS_PER_USER="2",
        RLHF_LABELING_MAX_NEW_TOKENS="8",
    )
    policy = policy_server.start(settings, port=0, http_port=None, follow=False)
    feedback = feedback_server.start(settings, port=0)
    settings = settings.with_overrides(
        policy_target=f"127.0.0.1:{policy.port}", feedback_target=f"127.0.0.1:{feedback.port}"
    )
    log_prompts(settings, PROMPTS)
    yield LabelingStack(settings, policy, feedback)
    feedback.stop()
    policy.stop()


def log_prompts(settings: Settings, prompts: dict[str, list[str]]) -> None:
    with grpc.insecure_channel(settings.feedback_target) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        for token, texts in prompts.items():
            for i, text in enumerate(texts):
                request = feedback_pb2.LogPromptRequest(
                    request_id=f"{token}-{i}-{zlib.crc32(text.encode())}", text=text
                )
                stub.LogPrompt(request, metadata=bearer(token), timeout=30)


def start_labeling(stack: LabelingStack, home, **overrides):
    """A LabelingService with its own state folder over the module's topics."""
    settings = stack.settings.with_overrides(home=home, **overrides)
    handle = labeling_server.start(settings, port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    return handle, labeling_pb2_grpc.LabelingServiceStub(channel), channel


def wait_queued(stub, want: int, timeout: float = 60.0) -> labeling_pb2.LabelingStats:
    """Wait until the prompt feed has accepted `want` prompts (queued or made into tasks)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = stub.GetStats(labeling_pb2.GetStatsRequest(), metadata=bearer("tok-la"), timeout=10)
        if stats.queued_prompts >= want or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def next_task(stub, labeler: str) -> labeling_pb2.Task:
    return stub.NextTask(labeling_pb2.NextTaskRequest(), metadata=bearer(LABELERS[labeler]), timeout=120)


def judge(task: labeling_pb2.Task, ranks=None, likert=None) -> list[labeling_pb2.SampleJudgement]:
    ranks = ranks or [1, 2, 2, 3, 4, 5, 6, 7, 8][: len(task.samples)]
    likert = likert or [6, 4, 4, 2, 1, 1, 1, 1, 1][: len(task.samples)]
    return [
        labeling_pb2.SampleJudgement(sample_id=s.sample_id, likert=lk, rank=r)
        for s, r, lk in zip(task.samples, ranks, likert, strict=False)
    ]


def submit(stub, labeler: str, task_id: str, judgements=(), demonstration: str = ""):
    request = labeling_pb2.SubmitTaskRequest(task_id=task_id, judgements=judgements, demonstration=demonstration)
    return stub.SubmitTask(request, metadata=bearer(LABELERS[labeler]), timeout=60)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_tasks_come_from_logged_prompts_under_the_rules_with_server_versions(labeling_stack, tmp_path):
    handle, stub, channel = start_labeling(
        labeling_stack, tmp_path, labeling_demonstration_share=0.0, labeling_overlap_share=0.0
    )
    try:
        assert wait_queued(stub, len(ACCEPTED)).queued_prompts == len(ACCEPTED)
        first = next_task(stub, "la")
        assert first.kind == labeling_pb2.TASK_KIND_COMPARISON and len(first.samples) == 4
        assert first.lease_expires_unix_ms > time.time() * 1000 + 1700_000
        assert next_task(stub, "la").task_id == first.task_id  # one lease at a time
        judgements = judge(first)
        judgements[1].flags.extend([events_pb2.LABEL_FLAG_HALLUCINATION, events_pb2.LABEL_FLAG_SATISFIES_CONSTRAINT])
        reply = submit(stub, "la", first.task_id, judgements)
        again = submit(stub, "la", first.task_id, judgements)
        assert (again.event_id, again.duplicate) == (reply.event_id, True)

        texts = [first.prompt_text]
        while True:
            try:
                task = next_task(stub, "la")
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND
                break
            texts.append(task.prompt_text)
            submit(stub, "la", task.task_id, judge(task))
        assert sorted(texts) == sorted(ACCEPTED)  # no duplicate prefix, nobody over the cap, each prompt once

        events = {e.event_id: e for e in read_topic(labeling_stack.settings, "comparisons")}
        event = events[reply.event_id]
        assert (event.task_id, event.labeler_id, event.prompt_text) == (first.task_id, "la", first.prompt_text)
        assert [r.sample_id for r in event.responses] == [s.sample_id for s in first.samples]
        assert {r.policy_version for r in event.responses} == {labeling_stack.policy.version}
        assert [(r.rank, r.likert) for r in event.responses] == [(1, 6), (2, 4), (2, 4), (3, 2)]
        assert list(event.responses[1].flags) == [
            events_pb2.LABEL_FLAG_HALLUCINATION,
            events_pb2.LABEL_FLAG_SATISFIES_CONSTRAINT,
        ]
        stats = stub.GetStats(labeling_pb2.GetStatsRequest(), metadata=bearer("tok-lb"), timeout=10)
        assert sum(stats.submitted_per_split.values()) == len(ACCEPTED)
        [version] = stats.versions
        assert (version.policy_version, version.samples) == (labeling_stack.policy.version, 4 * len(ACCEPTED))
        assert version.flag_rates["hallucination"] == pytest.approx(1 / (4 * len(ACCEPTED)))
    finally:
        channel.close()
        handle.stop()


def test_bad_submissions_get_their_code_and_write_nothing(labeling_stack, tmp_path):
    handle, stub, channel = start_labeling(
        labeling_stack, tmp_path, labeling_demonstration_share=0.0, labeling_overlap_share=0.0
    )
    try:
        wait_queued(stub, len(ACCEPTED))
        before = len(read_topic(labeling_stack.settings, "comparisons"))
        task = next_task(stub, "la")
        good = judge(task)

        err = refused(lambda: submit(stub, "lb", task.task_id, good))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "not leased to lb" in err.details()

        bad = judge(task)
        bad[2].sample_id = "task-forged-s9"
        err = refused(lambda: submit(stub, "la", task.task_id, bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("judgements[2].sample_id")

        err = refused(lambda: submit(stub, "la", task.task_id, good[:3]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("judgements: ranks must cover every sample")

        bad = judge(task, likert=[6, 8, 4, 2])
        err = refused(lambda: submit(stub, "la", task.task_id, bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("judgements[1].likert")

        bad = judge(task, ranks=[1, 2, 0, 3])
        err = refused(lambda: submit(stub, "la", task.task_id, bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("judgements[2].rank")

        # an expired lease: the task goes back to the queue, to somebody else
        handle.servicer.settings = handle.servicer.settings.with_overrides(labeling_lease_s=1.0)
        short = next_task(stub, "lb")
        time.sleep(1.2)
        err = refused(lambda: submit(stub, "lb", short.task_id, judge(short)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "expired" in err.details()
        assert len(read_topic(labeling_stack.settings, "comparisons")) == before  # nothing written
        handle.servicer.settings = handle.servicer.settings.with_overrides(labeling_lease_s=1800.0)
        assert next_task(stub, "lc").task_id == short.task_id
        assert next_task(stub, "lb").task_id != short.task_id  # never the same prompt twice

        submit(stub, "la", task.task_id, good)  # the lease holder's good submission still goes through
        assert len(read_topic(labeling_stack.settings, "comparisons")) == before + 1
    finally:
        channel.close()
        handle.stop()


def test_demonstration_tasks(labeling_stack, tmp_path):
    handle, stub, channel = start_labeling(labeling_stack, tmp_path, labeling_demonstration_share=1.0)
    try:
        wait_queued(stub, len(ACCEPTED))
        task = next_task(stub, "lc")
        assert task.kind == labeling_pb2.TASK_KIND_DEMONSTRATION and not task.samples
        err = refused(lambda: submit(stub, "lc", task.task_id, demonstration="   "))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("demonstration")
        reply = submit(stub, "lc", task.task_id, demonstration="The ocean is vast, deep and blue.")
        [event] = [e for e in read_topic(labeling_stack.settings, "demonstrations") if e.event_id == reply.event_id]
        assert (event.task_id, event.prompt_text, event.labeler_id) == (task.task_id, task.prompt_text, "lc")
    finally:
        channel.close()
        handle.stop()


def test_sigkill_mid_lease_loses_nothing_and_assigns_nothing_twice(labeling_stack, tmp_path):
    settings = labeling_stack.settings.with_overrides(home=tmp_path, labeling_demonstration_share=0.0)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env.update(to_env(settings), RLHF_LABELING_PORT="0", PYTHONUNBUFFERED="1")

    def launch() -> tuple[subprocess.Popen, labeling_pb2_grpc.LabelingServiceStub, grpc.Channel]:
        port_file = tmp_path / "port"
        port_file.unlink(missing_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.labeling", "--port-file", str(port_file)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "labeling.log", "ab"),
        )
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "labeling.log").read_text()
            time.sleep(0.1)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        wait_for_serving(target, timeout=30, while_alive=proc)
        channel = grpc.insecure_channel(target)
        return proc, labeling_pb2_grpc.LabelingServiceStub(channel), channel

    proc, stub, channel = launch()
    try:
        wait_queued(stub, len(ACCEPTED))
        a, b = next_task(stub, "la"), next_task(stub, "lb")
        assert a.task_id != b.task_id
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        channel.close()

        proc, stub, channel = launch()
        again = next_task(stub, "la")  # the lease survived, with the same samples
        assert (again.task_id, [s.text for s in again.samples]) == (a.task_id, [s.text for s in a.samples])
        assert again.lease_expires_unix_ms == a.lease_expires_unix_ms
        assert next_task(stub, "lb").task_id == b.task_id
        c = next_task(stub, "lc")
        assert c.task_id not in (a.task_id, b.task_id) and c.prompt_text not in (a.prompt_text, b.prompt_text)
        reply = submit(stub, "la", a.task_id, judge(again))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        channel.close()

        proc, stub, channel = launch()
        stats = wait_queued(stub, len(ACCEPTED) - 3)
        assert stats.queued_prompts == len(ACCEPTED) - 3  # three tasks made, none twice, no prompt lost
        assert sum(stats.submitted_per_split.values()) == 1
        assert submit(stub, "la", a.task_id, judge(again)).event_id == reply.event_id  # recorded as submitted
    finally:
        channel.close()
        proc.kill()
        proc.wait(10)


def test_samples_come_from_the_configured_mix_of_policy_versions(labeling_stack, tmp_path, tiny_model_dir):
    """A second PolicyService serves an earlier version; half of each task's samples come from it."""
    from services.common.checkpoints import CheckpointStore

    earlier = "base-tiny-earlier"
    store = CheckpointStore(labeling_stack.settings.checkpoint_dir)
    if not store.exists(earlier):
        store.import_dir(tiny_model_dir, "base", version=earlier)
    archive = policy_server.start(
        labeling_stack.settings.with_overrides(serve_version=earlier), port=0, http_port=None, follow=False
    )
    handle, stub, channel = start_labeling(
        labeling_stack,
        tmp_path,
        labeling_demonstration_share=0.0,
        labeling_policy_targets={labeling_stack.settings.policy_target: 1.0, f"127.0.0.1:{archive.port}": 1.0},
    )
    try:
        wait_queued(stub, len(ACCEPTED))
        task = next_task(stub, "lb")
        versions = [s.policy_version for s in handle.servicer.store.task(task.task_id).samples]
        assert sorted(versions) == sorted([labeling_stack.policy.version] * 2 + [earlier] * 2)
        reply = submit(stub, "lb", task.task_id, judge(task))
        [event] = [e for e in read_topic(labeling_stack.settings, "comparisons") if e.event_id == reply.event_id]
        assert [r.policy_version for r in event.responses] == versions  # the server's record, sample by sample
        stats = stub.GetStats(labeling_pb2.GetStatsRequest(), metadata=bearer("tok-lb"), timeout=10)
        assert {v.policy_version: v.samples for v in stats.versions} == {labeling_stack.policy.version: 2, earlier: 2}
    finally:
        channel.close()
        handle.stop()
        archive.stop()
