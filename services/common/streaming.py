"""A streamed HTTP response that releases what it streams from when the response ends.

A `finally` inside the async generator that feeds a `StreamingResponse` is not
enough to free a policy slot when the reader leaves: starlette cancels the send
that is blocked on the reader, not the generator, so the generator stays
suspended at its `yield` and its `finally` waits until the generator is
finalised, which a reference cycle can delay for seconds. `StreamUntilEnd`
calls `on_end` as the response itself returns, however it ends: the last
event sent, an error, or the client gone."""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import StreamingResponse


class StreamUntilEnd(StreamingResponse):
    def __init__(self, content, on_end: Callable[[], None], **kwargs):
        super().__init__(content, **kwargs)
        self.on_end = on_end

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()
