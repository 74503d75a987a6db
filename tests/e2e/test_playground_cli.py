"""`rlhf-playground` in a pseudo-terminal against the real services: a
streamed chat turn, batch logging (idempotent on re-run), and working the
labeling queue, with an incomplete ranking refused first (nothing written);
events checked on the broker."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pexpect
from rlhf.v1 import feedback_pb2, feedback_pb2_grpc

from services.common.auth import bearer
from tests.integration.test_playground_api import LONG_ANSWER, read_events, wait_running

TIMEOUT_S = 60


def cli_env(stack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env.update(
        RLHF_POLICY_TARGET=stack.settings.policy_target,
        RLHF_FEEDBACK_TARGET=stack.settings.feedback_target,
        RLHF_LABELING_TARGET=stack.settings.labeling_target,
        RLHF_HOME=str(stack.settings.home),
        TERM="dumb",
        PYTHONUNBUFFERED="1",
    )
    return env


def spawn(stack, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "services.playground.cli", "--token", "tok-lab", *args],
        env=cli_env(stack),
        encoding="utf-8",
        timeout=TIMEOUT_S,
        dimensions=(50, 200),
    )
    return child


def test_chat_streams_and_logs(playground_stack):
    stack = playground_stack
    child = spawn(stack, "chat")
    child.expect_exact("you> ")
    child.sendline("Tell me a joke.")
    child.expect(r"\[prompt logged: (ev-\w+)\]")
    event_id = child.match.group(1)
    child.expect(r"\[model (\S+) · (eos|length|stop) · (\d+) tokens\]")
    assert child.match.group(1) == stack.policy.version
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    [logged] = [p for p in read_events(stack.settings, "prompts") if p.event_id == event_id]
    assert (logged.text, logged.user_id, logged.source) == ("Tell me a joke.", "lab1", "playground")


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(playground_stack):
    stack = playground_stack
    child = spawn(
        stack, "--max-new-tokens", str(LONG_ANSWER), "--temperature", "0", "chat"
    )  # greedy: runs to the limit
    child.expect_exact("you> ")
    child.sendline("Count to a thousand.")
    child.expect(r"\[prompt logged: ev-\w+\]")
    assert wait_running(stack, 1) == 1
    child.sendintr()
    child.expect_exact("[stopped]")
    assert wait_running(stack, 0) == 0  # the policy's slot is free again
    child.expect_exact("you> ")  # the session survives Ctrl-C
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_batch_logs_each_prompt_once(playground_stack, tmp_path):
    stack = playground_stack
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\nSummarise the news.\n\nTranslate 'cat' to French.\n")
    command = [sys.executable, "-m", "services.playground.cli", "--token", "tok-lab", "batch", str(prompts)]
    first = subprocess.run(command, env=cli_env(stack), capture_output=True, text=True, timeout=TIMEOUT_S)
    again = subprocess.run(command, env=cli_env(stack), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert "logged 2 prompt(s)" in first.stdout and "(0 already recorded)" in first.stdout
    assert "(2 already recorded)" in again.stdout
    texts = [p.text for p in read_events(stack.settings, "prompts") if p.metadata["mode"] == "batch"]
    assert texts == ["Summarise the news.", "Translate 'cat' to French."]

    denied = subprocess.run(
        [*command[:4], "nobody", *command[5:]], env=cli_env(stack), capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert (
        denied.returncode == 1
        and "error: prompts.txt:2: feedback service: UNAUTHENTICATED: unknown bearer token" in denied.stderr
    )


def test_label_a_queued_task_in_the_terminal(playground_stack):
    stack = playground_stack
    with grpc.insecure_channel(stack.settings.feedback_target) as channel:  # another user's logged prompt
        feedback_pb2_grpc.FeedbackServiceStub(channel).LogPrompt(
            feedback_pb2.LogPromptRequest(request_id="cli-fruit", text="Name a fruit."),
            metadata=bearer("tok-user"),
            timeout=30,
        )
    before = len(read_events(stack.settings, "comparisons"))
    child = spawn(stack, "label")
    child.expect(r"\[task (task-\w+) · comparison · lease \d+ min left\]")
    task_id = child.match.group(1)
    child.expect(r"prompt: ([^\r\n]+)")
    prompt = child.match.group(1)
    for letter in "ABCD":
        child.expect_exact(f"[{letter}] ")
    child.expect_exact("Likert scores")
    child.sendline("A=6 B=7 C=2 D=6")
    child.expect_exact("flags")
    child.sendline("C:harmful_advice")
    child.expect_exact("ranking, best first")
    child.sendline("B A")  # incomplete: refused whole, nothing written, asked again
    child.expect(r"error: labeling service: INVALID_ARGUMENT: (judgements\[2\]\.rank: is 0;[^\r\n]*)")
    assert len(read_events(stack.settings, "comparisons")) == before
    child.expect_exact("Likert scores")
    child.sendline("A=6 B=7 C=2 D=6")
    child.expect_exact("flags")
    child.sendline("C:harmful_advice")
    child.expect_exact("ranking, best first")
    child.sendline("B A=D C")
    child.expect(r"comparison recorded: event (ev-\w+)")
    event_id = child.match.group(1)
    # the queue serves the next task (the other tests' logged prompts), or says it is empty; Ctrl-D ends it
    if child.expect(["Likert scores", "demonstration:", "No task is queued now"], timeout=120) < 2:
        child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    [comparison] = [e for e in read_events(stack.settings, "comparisons") if e.event_id == event_id]
    assert (comparison.labeler_id, comparison.task_id, comparison.prompt_text) == ("lab1", task_id, prompt)
    # responses stay in sample order A..D; "B A=D C" gives B 1, A and D 2 (tie), C 3
    assert [(r.rank, r.likert, list(r.flags)) for r in comparison.responses] == [
        (2, 6, []),
        (1, 7, []),
        (3, 2, [8]),
        (2, 6, []),
    ]
    assert {r.policy_version for r in comparison.responses} == {stack.policy.version}
