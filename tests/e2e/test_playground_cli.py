"""`rlhf-playground` in a pseudo-terminal against the real services: a
streamed chat turn, batch logging (idempotent on re-run), and labeling K
samples with an incomplete ranking refused first; events checked on the broker."""

from __future__ import annotations

import os
import subprocess
import sys

import pexpect

from tests.integration.test_playground_api import LONG_ANSWER, playground_stack, read_events, wait_running  # noqa: F401  (module fixture)

TIMEOUT_S = 60


def cli_env(stack) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env.update(
        RLHF_POLICY_TARGET=stack.settings.policy_target,
        RLHF_FEEDBACK_TARGET=stack.settings.feedback_target,
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


def test_label_k_samples_in_the_terminal(playground_stack):
    stack = playground_stack
    child = spawn(stack, "label", "--k", "4")
    child.expect_exact("prompt> ")
    child.sendline("Name a fruit.")
    child.expect(r"\[model (\S+) · prompt logged: (ev-\w+)\]")
    assert child.match.group(1) == stack.policy.version
    prompt_id = child.match.group(2)
    for letter in "ABCD":
        child.expect_exact(f"[{letter}] ")
    child.expect_exact("ranking, best first")
    child.expect_exact("> ")

    # incomplete: the service's message is shown, nothing is written, we may try again
    child.sendline("B A")
    child.expect(r"error: feedback service: INVALID_ARGUMENT: (responses\[2\]\.rank: is 0;[^\r\n]*)")
    assert read_events(stack.settings, "comparisons") == []
    child.expect_exact("ranking, best first")
    child.sendline("B A=D C")
    child.expect(r"ranking recorded: event (ev-\w+)")
    comparison_id = child.match.group(1)
    child.expect_exact("Likert scores")
    child.sendline("B=7 C=2")
    child.expect_exact("flags")
    child.sendline("C:harmful_advice")
    child.expect(r"labels for B recorded: event (ev-\w+)")
    child.expect(r"labels for C recorded: event (ev-\w+)")
    child.expect_exact("demonstration")
    child.sendline("A better answer: mango.")
    child.expect(r"demonstration recorded: event (ev-\w+)")
    demo_id = child.match.group(1)
    child.expect_exact("prompt> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    settings = stack.settings
    [comparison] = read_events(settings, "comparisons")
    assert (comparison.event_id, comparison.labeler_id, comparison.prompt_id) == (comparison_id, "lab1", prompt_id)
    # responses stay in sample order A..D; "B A=D C" gives B 1, A and D 2 (tie), C 3
    assert [r.rank for r in comparison.responses] == [2, 1, 3, 2]
    assert {r.policy_version for r in comparison.responses} == {stack.policy.version}
    texts = [r.text for r in comparison.responses]
    labels = read_events(settings, "labels")
    assert [(e.response, e.likert, list(e.flags)) for e in labels] == [(texts[1], 7, []), (texts[2], 2, [8])]
    [demo] = read_events(settings, "demonstrations")
    assert (demo.event_id, demo.response, demo.prompt_id) == (demo_id, "A better answer: mango.", prompt_id)
    [prompt] = [p for p in read_events(settings, "prompts") if p.event_id == prompt_id]
    assert (prompt.text, prompt.metadata["mode"]) == ("Name a fruit.", "label")


def test_label_refuses_a_wrong_k(playground_stack):
    child = spawn(playground_stack, "label", "--k", "10")
    child.expect_exact("error: playground: INVALID_ARGUMENT: k (num_samples) must be between 4 and 9, got 10")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
