"""Bearer-token authentication shared by every API: the gRPC services, the
policy's HTTP APIs (TGI-compatible and OpenAI-compatible) and the playground.

A token maps to an identity (user id) and a role. The identity of a caller is
always taken from its token, never from a request payload.

Roles: `user` may generate, score and log prompts; `labeler` may also submit
demonstrations, comparisons and labels; `admin` may do everything, including
pinning versions.

Prompt logging: the policy service logs every prompt it serves to the prompts
topic as training data (services/policy/prompt_log.py). A token's entry says
whether its prompts are logged (`log_prompts`); unset, prompts of `user`
tokens are logged and those of `labeler` and `admin` tokens are not (staff
traffic, such as labelers sampling outputs to rank, is not user data).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.config import ConfigError, Settings
from services.common.errors import Status, StatusError, abort

ROLES = ("user", "labeler", "admin")
# What each role may do, cumulatively.
_GRANTS = {"user": {"user"}, "labeler": {"user", "labeler"}, "admin": {"user", "labeler", "admin"}}
# RLHF_TOKENS entries may end with one of these to set log_prompts.
_LOG_FLAGS = {"log": True, "nolog": False}


@dataclass(frozen=True)
class Identity:
    user_id: str
    role: str
    log_prompts: bool | None = None  # None: the role's default (on for `user`)

    def may(self, role: str) -> bool:
        return role in _GRANTS[self.role]

    @property
    def anonymous(self) -> bool:
        return not self.user_id

    @property
    def logs_prompts(self) -> bool:
        """Whether prompts served to this caller become training data by default."""
        if self.anonymous:
            return False  # nobody to attribute them to
        return self.role == "user" if self.log_prompts is None else self.log_prompts


# A caller without a token where RLHF_ANONYMOUS_GENERATE allows generation.
ANONYMOUS = Identity("", "user", log_prompts=False)


def parse_inline_tokens(raw: str, source: str = "RLHF_TOKENS") -> dict[str, Identity]:
    """`token=user_id:role[:log|:nolog],...`"""
    tokens: dict[str, Identity] = {}
    for entry in filter(None, (p.strip() for p in raw.split(","))):
        token, sep, rest = entry.partition("=")
        user, sep2, role = rest.partition(":")
        role, _, flag = role.partition(":")
        if not sep or not sep2 or not token or not user:
            raise ConfigError(f"{source}: entry {entry!r} must look like token=user_id:role[:log|:nolog]")
        if role not in ROLES:
            raise ConfigError(f"{source}: role {role!r} for user {user!r} is not one of {', '.join(ROLES)}")
        if flag and flag not in _LOG_FLAGS:
            raise ConfigError(f"{source}: entry for user {user!r} ends with {flag!r}; use :log or :nolog")
        tokens[token] = Identity(user, role, _LOG_FLAGS.get(flag))
    return tokens


def load_tokens(settings: Settings) -> dict[str, Identity]:
    """Tokens from RLHF_TOKENS_FILE (JSON: {token: {user_id, role, log_prompts?}}) and RLHF_TOKENS."""
    tokens: dict[str, Identity] = {}
    if settings.tokens_file:
        path = Path(settings.tokens_file).expanduser()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"RLHF_TOKENS_FILE={path}: cannot read tokens ({err})") from None
        for token, entry in data.items():
            role = entry.get("role")
            if role not in ROLES or not entry.get("user_id"):
                who = entry.get("user_id")
                raise ConfigError(
                    f"RLHF_TOKENS_FILE={path}: entry for user {who!r} needs user_id and a role in {ROLES}"
                )
            log_prompts = entry.get("log_prompts")
            if log_prompts is not None and not isinstance(log_prompts, bool):
                raise ConfigError(
                    f"RLHF_TOKENS_FILE={path}: entry for user {entry['user_id']!r}: log_prompts must be true or false"
                )
            tokens[token] = Identity(entry["user_id"], role, log_prompts)
    tokens.update(parse_inline_tokens(settings.tokens))
    return tokens


def write_tokens_file(path: Path, tokens: Mapping[str, Identity]) -> None:
    def entry(i: Identity) -> dict:
        out = {"user_id": i.user_id, "role": i.role}
        return out if i.log_prompts is None else out | {"log_prompts": i.log_prompts}

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({t: entry(i) for t, i in tokens.items()}, indent=2))
    path.chmod(0o600)


class Authenticator:
    """Resolves bearer tokens. `anonymous_generate` (RLHF_ANONYMOUS_GENERATE) lets
    callers without a known token generate where a handler allows it: a known
    token still identifies its user (and is logged as such), while a missing or
    unknown one (OpenAI clients must send some key; "EMPTY" is the custom) is
    anonymous there. Everywhere else tokens are checked as always."""

    def __init__(self, tokens: Mapping[str, Identity], anonymous_generate: bool = False):
        self.tokens = dict(tokens)
        self.anonymous_generate = anonymous_generate

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        return cls(load_tokens(settings), settings.anonymous_generate)

    def identify(self, authorization: str | None, need: str, open_to_anonymous: bool = False) -> Identity:
        """Resolve an `authorization: Bearer <token>` value; raise StatusError
        (UNAUTHENTICATED, or PERMISSION_DENIED for a role without the right)."""
        if open_to_anonymous and self.anonymous_generate:
            scheme, _, token = (authorization or "").partition(" ")
            known = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
            if known is None:
                return ANONYMOUS
        if not authorization:
            raise StatusError(
                Status.UNAUTHENTICATED, "missing bearer token (send the header 'authorization: Bearer <token>')"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise StatusError(Status.UNAUTHENTICATED, "authorization must be 'Bearer <token>'")
        identity = self.tokens.get(token.strip())
        if identity is None:
            raise StatusError(Status.UNAUTHENTICATED, "unknown bearer token")
        if not identity.may(need):
            raise StatusError(Status.PERMISSION_DENIED, f"role {identity.role!r} may not do this; needs {need!r}")
        return identity

    def require(self, context: grpc.ServicerContext, need: str, open_to_anonymous: bool = False) -> Identity:
        """Authenticate a gRPC call, aborting it with UNAUTHENTICATED/PERMISSION_DENIED."""
        try:
            return self.identify(metadata_value(context, "authorization"), need, open_to_anonymous)
        except StatusError as err:
            abort(context, err)
            raise  # unreachable: abort raises

    async def require_aio(
        self, context: grpc.aio.ServicerContext, need: str, open_to_anonymous: bool = False
    ) -> Identity:
        """`require` for grpc.aio handlers."""
        try:
            return self.identify(metadata_value(context, "authorization"), need, open_to_anonymous)
        except StatusError as err:
            await abort(context, err)
            raise  # unreachable: abort raises


def metadata_value(context, key: str) -> str | None:
    """One invocation-metadata value of a gRPC call (keys are lower case)."""
    return dict(context.invocation_metadata() or ()).get(key)


def bearer(token: str) -> list[tuple[str, str]]:
    """Call metadata for a client: `stub.X(req, metadata=bearer(token))`."""
    return [("authorization", f"Bearer {token}")]


def bearer_header(token: str) -> dict[str, str]:
    """The same for HTTP clients (TGI's `Client(url, headers=...)`, httpx)."""
    return {"Authorization": f"Bearer {token}"}


class _Details(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds `authorization: Bearer <token>` to every call that does not set one."""

    def __init__(self, token: str):
        self.header = bearer(token)[0]

    def _details(self, details):
        metadata = list(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata.append(self.header)
        return _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


def with_token(channel: grpc.Channel, token: str) -> grpc.Channel:
    """A channel whose calls all carry `token` (a call's own metadata wins)."""
    return grpc.intercept_channel(channel, _BearerInterceptor(token))


def dev_tokens(
    users: Iterable[str] = ("alice", "bob"), labelers: Iterable[str] = ("lab1", "lab2")
) -> dict[str, Identity]:
    """Well-known tokens for the local stack and tests: `dev-<name>`."""
    out = {f"dev-{u}": Identity(u, "user") for u in users}
    out.update({f"dev-{name}": Identity(name, "labeler") for name in labelers})
    out["dev-admin"] = Identity("admin", "admin")
    return out
