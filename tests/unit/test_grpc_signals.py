"""How a service process waits for its stop signal (services/common/grpc_server.py
serve_until_signal): SIGTERM stops the server wherever the kernel delivers it."""

from __future__ import annotations

import signal
import threading
import time

from services.common.config import load_settings
from services.common.grpc_server import serve_until_signal, start_server


def test_a_sigterm_delivered_to_another_thread_still_stops_the_server(tmp_path):
    """The kernel may hand a process's SIGTERM to any of its threads (gRPC's own, Kafka's), and
    Python then runs the handler only when the main thread next runs Python code. Here the
    signal goes to a helper thread on purpose; the server must stop within a few seconds, not
    when a second signal happens to reach the main thread."""
    settings = load_settings({"RLHF_HOME": str(tmp_path)})
    running = start_server(settings, "signals-test", [], 0)
    main = threading.get_ident()
    returned, late = threading.Event(), []

    def sender() -> None:
        while signal.getsignal(signal.SIGTERM) is saved[0]:  # until serve_until_signal handles it
            time.sleep(0.01)
        time.sleep(0.2)  # and waits
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # to this thread, not the main one
        if not returned.wait(5):
            late.append("serve_until_signal slept through a SIGTERM handled off the main thread")
            signal.pthread_kill(main, signal.SIGTERM)  # let the test end

    saved = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=sender)
    try:
        thread.start()
        serve_until_signal(running, grace=0.5)
        returned.set()
    finally:
        thread.join()
        signal.signal(signal.SIGTERM, saved[0])
        signal.signal(signal.SIGINT, saved[1])
        running.server.stop(0)
    assert not late
