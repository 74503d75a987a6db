"""The local stack recognises the processes it started (services/stack.py): `make up` twice
starts nothing new, and a recorded pid that now belongs to another program is not taken for it."""

from __future__ import annotations

import json
import subprocess
import sys

from services.common.config import load_settings
from services.stack import Stack


def test_a_recorded_process_is_recognised_even_when_its_start_time_reads_differently(tmp_path):
    stack = Stack(load_settings({"RLHF_HOME": str(tmp_path / "home")}))
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stack._record("svc", proc)
        assert stack._alive("svc").pid == proc.pid
        # The kernel's boot time, from which psutil derives start times, moved since the record
        # (a slewed or stepped wall clock): the same pid running the same command is still ours.
        record = json.loads(stack._pidfile("svc").read_text())
        stack._pidfile("svc").write_text(json.dumps({**record, "create_time": record["create_time"] - 1.5}))
        assert stack._alive("svc").pid == proc.pid
        # A pid that now runs another command, with another start time, is someone else's.
        stack._pidfile("svc").write_text(json.dumps({**record, "create_time": 1.0, "cmd": ["other"]}))
        assert stack._alive("svc") is None
    finally:
        proc.kill()
        proc.wait()
    stack._pidfile("svc").write_text(json.dumps(record))
    assert stack._alive("svc") is None  # it exited
