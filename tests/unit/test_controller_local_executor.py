"""The local executor runs real subprocesses; a killed job reports FAILED."""

import os
import signal

from services.controller.jobs import JobSpec, JobState
from services.controller.local_executor import LocalExecutor


def test_success_failure_and_kill(tmp_path):
    ex = LocalExecutor(tmp_path)
    ok = ex.launch(JobSpec("ok", "x", [], module="this"))  # `python -m this` prints the Zen
    assert ex.wait(ok, timeout=30).state == JobState.SUCCEEDED
    assert "Beautiful is better than ugly" in ex.log_path(ok).read_text()

    bad = ex.launch(JobSpec("bad", "x", [], module="services.controller.no_such_module"))
    status = ex.wait(bad, timeout=30)
    assert status.state == JobState.FAILED and "exited with status 1" in status.message

    slow = ex.launch(JobSpec("slow", "x", ["-n", "1", "import time; time.sleep(120)"], module="timeit"))
    assert ex.status(slow).state == JobState.RUNNING
    os.kill(ex.pid(slow), signal.SIGKILL)
    status = ex.wait(slow, timeout=30)
    assert status.state == JobState.FAILED and "SIGKILL" in status.message


def test_cancel_stops_the_job(tmp_path):
    ex = LocalExecutor(tmp_path)
    h = ex.launch(JobSpec("c", "x", ["-n", "1", "import time; time.sleep(120)"], module="timeit"))
    ex.cancel(h)
    status = ex.status(h)
    assert status.state == JobState.FAILED and "cancelled" in status.message
