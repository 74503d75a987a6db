"""`rlhf-playground`: the playground in a terminal.

  rlhf-playground chat             interactive prompt; answers stream in
  rlhf-playground batch FILE       log every prompt of a file (text lines or JSONL)
  rlhf-playground label [--k K]    rank K samples per prompt, score, flag, demonstrate

The token comes from --token, or is asked for without echo. Targets come from
RLHF_POLICY_TARGET / RLHF_FEEDBACK_TARGET like every other client.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import grpc
from rlhf.v1 import policy_pb2

from services.common.config import exit_on_config_error, load_settings
from services.common.logs import configure_logging
from services.playground.client import (
    FLAG_NAMES,
    LIKERT_MAX,
    LIKERT_MIN,
    MAX_K,
    MIN_K,
    GenerationOptions,
    PlaygroundClient,
    PlaygroundError,
    check_k,
    new_request_id,
    next_or_error,
    ranks_from_groups,
    request_id_for,
)

LETTERS = "ABCDEFGHI"
# Errors after which going on with the next item is pointless.
FATAL = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAVAILABLE}

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
        if isinstance(err, PlaygroundError):
            who = f"{err.service} service" if err.service != "playground" else "playground"
            return f"{who}: {err.code.name}: {err.message}"
        return str(err)

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
    except PlaygroundError as err:
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
        except PlaygroundError as err:
            term.error(err)
            if err.code in FATAL:
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
        except PlaygroundError as err:
            failed += 1
            bar.write(f"error: {path.name}:{number}: {term.describe(err)}", file=term.err)
            if err.code in FATAL:
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


def label_one(
    client: PlaygroundClient, term: Terminal, token: str, prompt: str, k: int, options: GenerationOptions
) -> bool:
    """Label one prompt; False when input ended."""
    try:
        batch = client.samples(token, prompt, k, options)
    except PlaygroundError as err:
        term.error(err)
        return True
    term.say(f"[model {batch.model_version} · prompt logged: {batch.prompt_event_id}]")
    for i, text in enumerate(batch.texts):
        term.say(f"\n[{LETTERS[i]}] {text or '(empty)'}")
    term.say()
    batch_id = new_request_id()

    def submitted(what: str, reply: dict) -> None:
        note = " (already recorded)" if reply["duplicate"] else ""
        term.say(f"{what} recorded: event {reply['event_id']}{note}")

    # The ranking goes to the service as typed; if it refuses (a sample left
    # out, a bad K) its message is shown and the labeler tries again.
    while True:
        ranks = ask_until_valid(
            term,
            f"ranking, best first ({LETTERS[0]}..{LETTERS[k - 1]}, '=' marks a tie)> ",
            lambda s: parse_ranking(s, k),
        )
        if ranks is None:
            return False
        try:
            submitted(
                "ranking",
                client.submit_comparison(
                    token,
                    batch_id + "-cmp",
                    prompt,
                    batch.texts,
                    ranks,
                    batch.model_version,
                    prompt_id=batch.prompt_event_id,
                ),
            )
            break
        except PlaygroundError as err:
            term.error(err)
            if err.code in FATAL:
                return True

    likert = ask_until_valid(
        term,
        f"Likert scores {LIKERT_MIN}-{LIKERT_MAX}, e.g. 'A=6 C=2' (blank skips)> ",
        lambda s: parse_likert(s, k),
        allow_blank=True,
    )
    flags = ask_until_valid(
        term,
        "flags, e.g. 'B:hallucination,harmful_advice' (blank skips)> ",
        lambda s: parse_flags(s, k),
        allow_blank=True,
    )
    if likert is None or flags is None:
        return False
    for i in sorted(set(likert) | set(flags)):
        try:
            submitted(
                f"labels for {LETTERS[i]}",
                client.submit_labels(
                    token,
                    f"{batch_id}-lab-{i}",
                    prompt,
                    batch.texts[i],
                    batch.model_version,
                    likert.get(i, 0),
                    flags.get(i, []),
                    prompt_id=batch.prompt_event_id,
                ),
            )
        except PlaygroundError as err:
            term.error(err)

    demo = term.ask("demonstration: your ideal answer on one line ('@A' starts from sample A, blank skips)> ")
    if demo is None:
        return False
    demo = demo.strip()
    if demo.startswith("@"):
        try:
            index = sample_index(demo[1:2], k)
        except InputError as err:
            term.error(err)
            return True
        demo = (batch.texts[index] + demo[2:]).strip()
    if demo:
        try:
            submitted(
                "demonstration",
                client.submit_demonstration(token, batch_id + "-demo", prompt, demo, prompt_id=batch.prompt_event_id),
            )
        except PlaygroundError as err:
            term.error(err)
    return True


def run_label(client: PlaygroundClient, term: Terminal, token: str, k: int, options: GenerationOptions) -> int:
    try:
        check_k(k)
    except PlaygroundError as err:
        term.error(err)
        return 2
    term.say(f"Labeling: {k} samples per prompt. Empty prompt or Ctrl-D quits.")
    while True:
        prompt = term.ask("prompt> ")
        if prompt is None or not prompt.strip():
            return 0
        if not label_one(client, term, token, prompt.strip(), k, options):
            return 0


# --------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf-playground", description="Prompt the policy and label its answers from a terminal."
    )
    parser.add_argument("--token", help="bearer token (asked for without echo when left out)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="0: the server's default")
    parser.add_argument("--temperature", type=float, default=None, help="default: the server's (labeling: 1.0)")
    sub = parser.add_subparsers(dest="mode")
    chat = sub.add_parser("chat", help="interactive prompt with streamed answers (the default)")
    chat.add_argument("--chat", action="store_true", help="start in chat mode (keep the conversation)")
    batch = sub.add_parser("batch", help="log every prompt of a file: one per line, or JSONL with prompt/messages")
    batch.add_argument("file", type=Path)
    label = sub.add_parser("label", help="rank K samples per prompt, with optional scores, flags, demonstrations")
    label.add_argument("--k", type=int, default=MIN_K, help=f"samples per prompt, {MIN_K}..{MAX_K}")
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
    temperature = args.temperature if args.temperature is not None or mode != "label" else 1.0
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=temperature)
    client = PlaygroundClient(settings)
    try:
        if mode == "batch":
            return run_batch(client, term, token, args.file)
        if mode == "label":
            return run_label(client, term, token, args.k, options)
        return run_chat(client, term, token, options, getattr(args, "chat", False))
    except KeyboardInterrupt:
        term.say()
        return 130
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
