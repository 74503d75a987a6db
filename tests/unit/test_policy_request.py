"""The hop from the engine's thread onto the servers' event loop (services/policy/request.py
loop_sink): every event arrives, in order per request, and a burst of events wakes the loop once."""

from __future__ import annotations

import asyncio
import threading

from services.common.errors import Status, StatusError
from services.policy.request import Failed, Finished, loop_sink


def test_a_burst_of_events_from_another_thread_arrives_in_order_with_one_wake_up():
    async def main():
        loop = asyncio.get_running_loop()
        wakes = 0
        real = loop.call_soon_threadsafe

        def counted(*args):
            nonlocal wakes
            wakes += 1
            return real(*args)

        loop.call_soon_threadsafe = counted
        first, second = asyncio.Queue(), asyncio.Queue()
        sinks = [loop_sink(first), loop_sink(second)]
        events = [Finished(version=str(i), prompt_tokens=i, completion_tokens=0) for i in range(50)]

        def burst():  # a decode step's events for two requests, interleaved
            for i, event in enumerate(events):
                sinks[i % 2](event)

        thread = threading.Thread(target=burst)
        thread.start()
        thread.join()
        got = [await asyncio.wait_for(q.get(), 5) for q in (first,) * 25 + (second,) * 25]
        assert got == events[0::2] + events[1::2]
        assert wakes == 1  # the loop ran nothing while the burst was posted: one hand-over carries all
        later = Failed(StatusError(Status.UNAVAILABLE, "later"))
        sinks[0](later)  # the next event after a hand-over wakes it again
        assert await asyncio.wait_for(first.get(), 5) is later and wakes == 2

    asyncio.run(main())
