"""Bearer-token authentication shared by the gRPC services and the playground.

A token maps to an identity (user id) and a role. The identity of a caller is
always taken from its token, never from a request payload.

Roles: `user` may log prompts and generate; `labeler` may also submit
demonstrations, comparisons and labels; `admin` may do everything, including
pinning versions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.common.config import ConfigError, Settings

ROLES = ("user", "labeler", "admin")
# What each role may do, cumulatively.
_GRANTS = {"user": {"user"}, "labeler": {"user", "labeler"}, "admin": {"user", "labeler", "admin"}}


@dataclass(frozen=True)
class Identity:
    user_id: str
    role: str

    def may(self, role: str) -> bool:
        return role in _GRANTS[self.role]


class AuthError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def parse_inline_tokens(raw: str, source: str = "RLHF_TOKENS") -> dict[str, Identity]:
    tokens: dict[str, Identity] = {}
    for entry in filter(None, (p.strip() for p in raw.split(","))):
        token, sep, rest = entry.partition("=")
        user, sep2, role = rest.partition(":")
        if not sep or not sep2 or not token or not user:
            raise ConfigError(f"{source}: entry {entry!r} must look like token=user_id:role")
        if role not in ROLES:
            raise ConfigError(f"{source}: role {role!r} for user {user!r} is not one of {', '.join(ROLES)}")
        tokens[token] = Identity(user, role)
    return tokens


def load_tokens(settings: Settings) -> dict[str, Identity]:
    """Tokens from RLHF_TOKENS_FILE (JSON: {token: {user_id, role}}) and RLHF_TOKENS."""
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
                raise ConfigError(
                    f"RLHF_TOKENS_FILE={path}: entry for user {entry.get('user_id')!r} needs user_id and a role in {ROLES}"
                )
            tokens[token] = Identity(entry["user_id"], role)
    tokens.update(parse_inline_tokens(settings.tokens))
    return tokens


def write_tokens_file(path: Path, tokens: Mapping[str, Identity]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({t: {"user_id": i.user_id, "role": i.role} for t, i in tokens.items()}, indent=2))
    path.chmod(0o600)


class Authenticator:
    def __init__(self, tokens: Mapping[str, Identity]):
        self.tokens = dict(tokens)

    def identify(self, authorization: str | None, need: str) -> Identity:
        """Resolve an `authorization: Bearer <token>` value; raise AuthError."""
        if not authorization:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "missing bearer token (metadata 'authorization: Bearer <token>')"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "authorization must be 'Bearer <token>'")
        identity = self.tokens.get(token.strip())
        if identity is None:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token")
        if not identity.may(need):
            raise AuthError(
                grpc.StatusCode.PERMISSION_DENIED, f"role {identity.role!r} may not do this; needs {need!r}"
            )
        return identity

    def require(self, context: grpc.ServicerContext, need: str) -> Identity:
        """Authenticate a gRPC call, aborting it with UNAUTHENTICATED/PERMISSION_DENIED."""
        try:
            return self.identify(_authorization(context), need)
        except AuthError as err:
            context.abort(err.code, str(err))
            raise  # unreachable: abort raises

    async def require_aio(self, context: grpc.aio.ServicerContext, need: str) -> Identity:
        """`require` for grpc.aio handlers."""
        try:
            return self.identify(_authorization(context), need)
        except AuthError as err:
            await context.abort(err.code, str(err))
            raise  # unreachable: abort raises


def _authorization(context) -> str | None:
    return dict(context.invocation_metadata() or ()).get("authorization")


def bearer(token: str) -> list[tuple[str, str]]:
    """Call metadata for a client: `stub.X(req, metadata=bearer(token))`."""
    return [("authorization", f"Bearer {token}")]


def dev_tokens(
    users: Iterable[str] = ("alice", "bob"), labelers: Iterable[str] = ("lab1", "lab2")
) -> dict[str, Identity]:
    """Well-known tokens for the local stack and tests: `dev-<name>`."""
    out = {f"dev-{u}": Identity(u, "user") for u in users}
    out.update({f"dev-{l}": Identity(l, "labeler") for l in labelers})
    out["dev-admin"] = Identity("admin", "admin")
    return out
