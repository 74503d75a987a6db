"""What the policy service's edges (gRPC, HTTP) need from a generation backend.

Two backends implement it: `LocalBackend` (services/policy/engine.py: the
continuous-batching engine on a hot-swapped local model) and `TgiBackend`
(services/policy/tgi_backend.py: a Text Generation Inference server). Both are
transport-free: they report outcomes as `StatusError`s (on `submit`, or as a
`Failed` event on the request), and the edges map those to gRPC codes and HTTP
statuses.
"""

from __future__ import annotations

from typing import Any, Protocol

from services.policy.request import GenRequest


class PolicyBackend(Protocol):
    name: str  # "local" or "tgi", reported in ModelInfo.backend

    @property
    def tokenizer(self) -> Any:
        """The serving model's tokenizer: the edges render chat templates and count prompt tokens with it."""

    @property
    def version(self) -> str:
        """The version that new requests are served by."""

    def start(self) -> None: ...

    def stop(self) -> None:
        """Fail what is still queued or running with UNAVAILABLE and release the model."""

    def submit(self, req: GenRequest) -> None:
        """Queue `req`; events arrive in its sink from the backend's own thread.

        Raises StatusError at once when the request cannot be queued
        (UNAVAILABLE: not serving; RESOURCE_EXHAUSTED: the queue is full)."""

    def model_info(self) -> dict:
        """The fields of common.v1.ModelInfo."""

    def pin(self, version: str) -> None:
        """Serve `version` from now on (admin); a StatusError when it cannot."""
