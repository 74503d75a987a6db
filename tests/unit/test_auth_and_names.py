"""Token parsing (roles, the prompt-logging flag), who is anonymous, the
per-request logging decision, and the checkpoint store's naming rule."""

from __future__ import annotations

import json

import pytest

from services.common.auth import ANONYMOUS, Authenticator, Identity, load_tokens, parse_inline_tokens
from services.common.checkpoints import CheckpointError, CheckpointStore, new_version, version_name_problem
from services.common.config import ConfigError, load_settings
from services.common.errors import Status, StatusError
from services.policy.prompt_log import wanted


def test_inline_tokens_carry_the_logging_flag():
    tokens = parse_inline_tokens("a=alice:user,b=bob:user:nolog,l=lab:labeler,m=mia:labeler:log")
    assert [tokens[t].logs_prompts for t in "ablm"] == [True, False, False, True]
    with pytest.raises(ConfigError, match=":log or :nolog"):
        parse_inline_tokens("a=alice:user:sometimes")


def test_tokens_file_log_prompts_must_be_a_boolean(tmp_path):
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps({"t": {"user_id": "u", "role": "user", "log_prompts": False}}))
    assert load_tokens(load_settings({"RLHF_TOKENS_FILE": str(path)}))["t"] == Identity("u", "user", False)
    path.write_text(json.dumps({"t": {"user_id": "u", "role": "user", "log_prompts": "no"}}))
    with pytest.raises(ConfigError, match="log_prompts must be true or false"):
        load_tokens(load_settings({"RLHF_TOKENS_FILE": str(path)}))


def test_anonymous_only_where_allowed_and_configured():
    closed = Authenticator({"t": Identity("u", "user")})
    opened = Authenticator({"t": Identity("u", "user")}, anonymous_generate=True)
    for auth in (closed, opened):
        with pytest.raises(StatusError) as err:
            auth.identify(None, "user")  # a handler that is not open to anonymous callers
        assert err.value.status == Status.UNAUTHENTICATED
    with pytest.raises(StatusError):
        closed.identify("Bearer EMPTY", "user", open_to_anonymous=True)
    assert opened.identify("Bearer EMPTY", "user", open_to_anonymous=True) is ANONYMOUS
    assert opened.identify("Bearer t", "user", open_to_anonymous=True) == Identity("u", "user")
    with pytest.raises(StatusError) as err:
        closed.identify("Bearer t", "admin")
    assert err.value.status == Status.PERMISSION_DENIED


def test_the_logging_decision():
    user, labeler = Identity("u", "user"), Identity("l", "labeler")
    assert wanted(user, None) and not wanted(labeler, None) and not wanted(ANONYMOUS, "true")
    assert not wanted(user, "false") and wanted(labeler, "true") and not wanted(user, "Off")
    with pytest.raises(StatusError, match="rlhf-log-prompt"):
        wanted(user, "perhaps")


@pytest.mark.parametrize("name", [new_version("sft"), "base-tiny-seed", "rm-tiny-seed", "ppo.2026_v1"])
def test_platform_version_names_follow_the_rule(name):
    assert version_name_problem(name) is None


@pytest.mark.parametrize("name", ["", ".staging", "../x", "a/b", "x" * 129, "sft nope", "é-1", "-lead"])
def test_other_names_are_refused_before_the_filesystem(tmp_path, name):
    assert version_name_problem(name)
    store = CheckpointStore(tmp_path)
    assert not store.exists(name)
    with pytest.raises(CheckpointError) as err:
        store.manifest(name)
    assert str(tmp_path) not in str(err.value)
