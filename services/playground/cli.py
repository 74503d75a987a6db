"""`rlhf-playground`: the playground in a terminal.

  rlhf-playground chat             interactive prompt; answers stream in
  rlhf-playground batch FILE       log every prompt of a file (text lines or JSONL)
  rlhf-playground label            work the labeling queue: demonstrate, or score,
                                   flag and rank the task's samples

The token comes from --token, or is asked for without echo. Targets come from
RLHF_POLICY_TARGET / RLHF_FEEDBACK_TARGET / RLHF_LABELING_TARGET like every
other client.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from rlhf.v1 import policy_pb2

from services.common.config import exit_on_config_error, load_settings
from services.common.errors import Status, StatusError
from services.common.logs import configure_logging
from services.playground.client import (
    FLAG_NAMES,
    LIKERT_MAX,
    LIKERT_MIN,
    GenerationOptions,
    Judgement,
    PlaygroundClient,
    Task,
    describe,
    next_or_error,
    ranks_from_groups,
    request_id_for,
)

LETTERS = "ABCDEFGHI"
# Errors after which going on with the next item is pointless.
FATAL = {Status.UNAUTHENTICATED, Status.PERMISSION_DENIED, Status.UNAVAILABLE}

HELP_CHAT = """commands:
  /chat   keep the conversation (send the history with each prompt); again to turn off
  /new    start a new conversation
  /help   this help
  /quit   leave (Ctrl-D works too; Ctrl-C stops a running answer)"""


class InputError(ValueError):
    """The person typed something the terminal cannot parse; ask again."""


# --------------------------------------------------------------- parsing
def sample_index(name: str, k: int) -> int:
    """'B' or 'b' or '2' -> 1, for K samples."""
    name = name.strip().upper()
    if name.isdigit() and 1 <= int(name) <= k:
        return int(name) - 1
    if len(name) == 1 and name in LETTERS[:k]:
        return LETTERS.index(name)
    raise InputError(f"unknown sample {name!r}: use {LETTERS[0]}..{LETTERS[k - 1]} or 1..{k}")


def parse_ranking(text: str, k: int) -> list[int]:
    """'C A=D B' (best first, '=' ties) -> ranks per sample; unnamed samples stay 0."""
    groups: list[list[int]] = []
    seen: set[int] = set()
    for group in re.split(r"[\s,>]+", text.strip()):
        if not group:
            continue
        members = [sample_index(part, k) for part in group.split("=") if part]
        for index in members:
            if index in seen:
                raise InputError(f"sample {LETTERS[index]} appears twice")
            seen.add(index)
        groups.append(members)
    if not groups:
        raise InputError("type a ranking, best first, e.g. 'C A=D B'")
    return ranks_from_groups(groups, k)


def parse_likert(text: str, k: int) -> dict[int, int]:
    """'A=6 C=2' -> {0: 6, 2: 2}."""
    out = {}
    for item in text.split():
        name, sep, value = item.partition("=")
        if not sep or not value.isdigit():
            raise InputError(f"{item!r}: write SAMPLE=SCORE, e.g. A=6")
        out[sample_index(name, k)] = int(value)  # the service checks the 1..7 range
    return out


def flag_name(word: str) -> str:
    name = "LABEL_FLAG_" + word.strip().upper().removeprefix("LABEL_FLAG_").replace("-", "_").replace(" ", "_")
    if name not in FLAG_NAMES:
        short = ", ".join(n.removeprefix("LABEL_FLAG_").lower() for n in FLAG_NAMES)
        raise InputError(f"unknown flag {word!r}; flags: {short}")
    return name


def parse_flags(text: str, k: int) -> dict[int, list[str]]:
    """'B:hallucination,harmful_advice C:expresses_opinion' -> {1: [...], 2: [...]}."""
    out: dict[int, list[str]] = {}
    for item in text.split():
        name, sep, words = item.partition(":")
        if not sep or not words:
            raise InputError(f"{item!r}: write SAMPLE:flag[,flag], e.g. B:hallucination")
        out.setdefault(sample_index(name, k), []).extend(flag_name(w) for w in words.split(",") if w)
    return out


# --------------------------------------------------------------- terminal helpers
class Terminal:
    def __init__(self, out: TextIO = sys.stdout, err: TextIO = sys.stderr):
        self.out, self.err = out, err

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    @staticmethod
    def describe(err: Exception | str) -> str:
        return describe(err) if isinstance(err, StatusError) else str(err)

    def error(self, err: Exception | str) -> None:
        print(f"error: {self.describe(err)}", file=self.err, flush=True)

    def ask(self, prompt: str) -> str | None:
        """One line of input; None at end of input."""
        try:
            return input(prompt)
        except EOFError:
            self.say()
            return None


def ask_until_valid(term: Terminal, prompt: str, parse: Callable[[str], object], allow_blank: bool = False):
    """Ask until `parse` accepts the answer; None at end of input, {} for a blank answer if allowed."""
    while True:
        line = term.ask(prompt)
        if line is None:
            return None
        if allow_blank and not line.strip():
            return {}
        try:
            return parse(line)
        except InputError as err:
            term.error(err)


# --------------------------------------------------------------- modes
def stream_answer(
    client: PlaygroundClient,
    term: Terminal,
    token: str,
    prompt: str,
    messages: list[dict] | None,
    options: GenerationOptions,
) -> str | None:
    """Print one answer as it streams; return its final text (None if stopped or refused)."""
    call = client.stream(token, prompt, messages, options)
    final = None
    try:
        while (message := next_or_error(call)) is not None:
            if message.token.text and not message.token.special:
                term.out.write(message.token.text)
                term.out.flush()
            if message.finish_reason:
                final = message.generated_text
                reason = policy_pb2.FinishReason.Name(message.finish_reason).removeprefix("FINISH_REASON_").lower()
                term.say(f"\n[model {message.model_version} · {reason} · {message.usage.completion_tokens} tokens]")
    except KeyboardInterrupt:
        call.cancel()  # frees the policy's slot at once
        term.say("\n[stopped]")
    except StatusError as err:
        call.cancel()
        term.say()
        term.error(err)
    return final


def run_chat(client: PlaygroundClient, term: Terminal, token: str, options: GenerationOptions, chat: bool) -> int:
    history: list[dict] = []
    term.say("RLHF playground. Type a prompt; /help for commands.")
    while True:
        line = term.ask("chat> " if chat else "you> ")
        if line is None or line.strip() in ("/quit", "/exit"):
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/help":
            term.say(HELP_CHAT)
            continue
        if text == "/new":
            history.clear()
            term.say("[new conversation]")
            continue
        if text == "/chat":
            chat, history = not chat, []
            term.say(f"[chat mode {'on' if chat else 'off'}]")
            continue
        messages = history + [{"role": "user", "content": text}] if chat else None
        try:
            logged = client.log_prompt(
                token, prompt="" if chat else text, messages=messages, mode="chat" if chat else "prompt"
            )
        except StatusError as err:
            term.error(err)
            if err.status in FATAL:
                return 1
            continue
        term.say(f"[prompt logged: {logged['event_id']}]")
        answer = stream_answer(client, term, token, "" if chat else text, messages, options)
        if chat and answer is not None:
            history += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def read_batch(path: Path) -> list[tuple[int, dict]]:
    """(line number, {prompt | messages}) for each prompt in a text or JSONL file."""
    items = []
    jsonl = path.suffix in (".jsonl", ".ndjson")
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or (not jsonl and line.lstrip().startswith("#")):
            continue
        if not jsonl:
            items.append((number, {"prompt": line.strip()}))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not (record.get("prompt") or record.get("messages")):
            raise InputError(f'{path}:{number}: each line needs a "prompt" string or a "messages" list')
        items.append((number, {"prompt": record.get("prompt", ""), "messages": record.get("messages")}))
    return items


def run_batch(client: PlaygroundClient, term: Terminal, token: str, path: Path) -> int:
    from tqdm import tqdm

    try:
        items = read_batch(path)
    except (OSError, InputError) as err:
        term.error(err)
        return 2
    content_key = request_id_for(path.read_text(encoding="utf-8"))
    logged = duplicates = failed = 0
    bar = tqdm(items, desc=f"logging {path.name}", unit="prompt", file=term.err)
    for number, item in bar:
        # The id depends on the file's content and the line, so re-running the
        # same file records nothing twice.
        request_id = request_id_for("batch", content_key, str(number))
        try:
            reply = client.log_prompt(
                token, prompt=item["prompt"], messages=item.get("messages"), mode="batch", request_id=request_id
            )
        except StatusError as err:
            failed += 1
            bar.write(f"error: {path.name}:{number}: {term.describe(err)}", file=term.err)
            if err.status in FATAL:
                break
            continue
        logged += 1
        duplicates += reply["duplicate"]
        bar.write(
            json.dumps({"line": number, "event_id": reply["event_id"], "duplicate": reply["duplicate"]}), file=term.out
        )
    bar.close()
    term.say(f"logged {logged} prompt(s) from {path} ({duplicates} already recorded), {failed} failed")
    return 1 if failed else 0


def ask_judgements(term: Terminal, task: Task) -> list[Judgement] | None:
    """Likert scores and flags for every sample, then the ranking with ties (InstructGPT's order)."""
    k = len(task.samples)
    likert = ask_until_valid(
        term,
        f"Likert scores {LIKERT_MIN}-{LIKERT_MAX} for every sample, e.g. 'A=6 B=3 ...'> ",
        lambda s: parse_likert(s, k),
    )
    if likert is None:
        return None
    flags = ask_until_valid(
        term,
        "flags, e.g. 'B:hallucination,harmful_advice' (blank: none)> ",
        lambda s: parse_flags(s, k),
        allow_blank=True,
    )
    if flags is None:
        return None
    ranks = ask_until_valid(
        term, f"ranking, best first ({LETTERS[0]}..{LETTERS[k - 1]}, '=' marks a tie)> ", lambda s: parse_ranking(s, k)
    )
    if ranks is None:
        return None
    return [
        Judgement(sample.sample_id, likert.get(i, 0), ranks[i], tuple(flags.get(i, ())))
        for i, sample in enumerate(task.samples)
    ]


def label_one(client: PlaygroundClient, term: Terminal, token: str, task: Task) -> bool | None:
    """Label one leased task; True when submitted, None when input ended.

    The task is submitted in one call, all or nothing: when the service refuses
    it, its message is shown, nothing was recorded, and the labeler answers again.
    """
    left = max(0, (task.lease_expires_unix_ms / 1000 - time.time()) / 60)
    term.say(f"\n[task {task.task_id} · {task.kind} · lease {left:.0f} min left]")
    term.say(f"prompt: {task.prompt_text}")
    for i, sample in enumerate(task.samples):
        term.say(f"\n[{LETTERS[i]}] {sample.text or '(empty)'}")
    term.say()
    while True:
        if task.kind == "demonstration":
            line = term.ask("demonstration: the answer you would want, on one line> ")
            if line is None:
                return None
            kwargs = {"demonstration": line.strip()}
        else:
            judgements = ask_judgements(term, task)
            if judgements is None:
                return None
            kwargs = {"judgements": judgements}
        try:
            reply = client.submit_task(token, task.task_id, **kwargs)
        except StatusError as err:
            term.error(err)
            if err.status in FATAL or err.status is Status.FAILED_PRECONDITION:  # e.g. the lease expired
                return False
            continue
        note = " (already recorded)" if reply["duplicate"] else ""
        term.say(f"{task.kind} recorded: event {reply['event_id']}{note}")
        return True


def run_label(client: PlaygroundClient, term: Terminal, token: str) -> int:
    term.say("Labeling: tasks come from the queue. Ctrl-D quits.")
    while True:
        try:
            task = client.next_task(token)
        except StatusError as err:
            if err.status is Status.NOT_FOUND:
                term.say("No task is queued now; come back later.")
                return 0
            term.error(err)
            return 1
        if label_one(client, term, token, task) is None:
            return 0


# --------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-playground", description="Prompt the policy and label its answers from a terminal."
    )
    parser.add_argument("--token", help="bearer token (asked for without echo when left out)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the server's default")
    parser.add_argument("--temperature", type=float, default=None, help="default: the server's")
    sub = parser.add_subparsers(dest="mode")
    chat = sub.add_parser("chat", help="interactive prompt with streamed answers (the default)")
    chat.add_argument("--chat", action="store_true", help="start in chat mode (keep the conversation)")
    batch = sub.add_parser("batch", help="log every prompt of a file: one per line, or JSONL with prompt/messages")
    batch.add_argument("file", type=Path)
    sub.add_parser("label", help="work the labeling queue: demonstrations, or Likert, flags and ranking per task")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = exit_on_config_error(load_settings)
    # The terminal is for the conversation: only warnings and worse are logged.
    configure_logging("playground-cli", "WARNING" if settings.log_level in ("DEBUG", "INFO") else settings.log_level)
    term = Terminal()
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    token = args.token or getpass.getpass("access token: ").strip()
    if not token:
        term.error("a token is needed (--token)")
        return 2
    mode = args.mode or "chat"
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    client = PlaygroundClient(settings)
    try:
        if mode == "batch":
            return run_batch(client, term, token, args.file)
        if mode == "label":
            return run_label(client, term, token)
        return run_chat(client, term, token, options, getattr(args, "chat", False))
    except KeyboardInterrupt:
        term.say()
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
