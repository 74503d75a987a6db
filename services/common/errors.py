"""One status error for the whole platform, free of any transport.

Engines, stores and validators raise `StatusError(Status.X, message)`. The edges
translate: gRPC servicers call `grpc_code(err.status)` (or `abort(context, err)`),
the HTTP APIs call `http_status(err.status)`. The same outcome therefore reads the
same everywhere, and nothing below an edge imports `grpc` to fail a request.

The statuses follow gRPC's `doc/statuscodes.md`, the vocabulary every caller of
ours already knows; the HTTP column is the mapping grpc-gateway and Google APIs use.
"""

from __future__ import annotations

import enum


class Status(enum.Enum):
    """An outcome a caller can act on; value = (gRPC code name, HTTP status)."""

    INVALID_ARGUMENT = ("INVALID_ARGUMENT", 422)  # TGI and FastAPI answer validation errors with 422
    NOT_FOUND = ("NOT_FOUND", 404)
    ALREADY_EXISTS = ("ALREADY_EXISTS", 409)
    FAILED_PRECONDITION = ("FAILED_PRECONDITION", 400)
    UNAUTHENTICATED = ("UNAUTHENTICATED", 401)
    PERMISSION_DENIED = ("PERMISSION_DENIED", 403)
    RESOURCE_EXHAUSTED = ("RESOURCE_EXHAUSTED", 429)
    CANCELLED = ("CANCELLED", 499)
    DEADLINE_EXCEEDED = ("DEADLINE_EXCEEDED", 504)
    UNAVAILABLE = ("UNAVAILABLE", 503)
    INTERNAL = ("INTERNAL", 500)

    @property
    def http(self) -> int:
        return self.value[1]


class StatusError(Exception):
    """A request failed with `status`; `message` is safe to show the caller."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status
        self.message = message

    def __repr__(self) -> str:
        return f"StatusError({self.status.name}, {self.message!r})"


def invalid(message: str) -> StatusError:
    """The common case: a field broke a rule; the message names the field and the limit."""
    return StatusError(Status.INVALID_ARGUMENT, message)


def http_status(status: Status) -> int:
    return status.http


def grpc_code(status: Status):
    """The grpc.StatusCode for `status` (imported here so callers below the edge never need grpc)."""
    import grpc

    return getattr(grpc.StatusCode, status.value[0])


def status_of_grpc(code) -> Status:
    """The inverse of grpc_code, for clients that turn an RpcError back into a StatusError."""
    try:
        return Status[code.name]
    except KeyError:
        return Status.INTERNAL


def abort(context, err: StatusError):
    """Fail a gRPC call (sync or aio context) with err's status and message."""
    return context.abort(grpc_code(err.status), err.message)
