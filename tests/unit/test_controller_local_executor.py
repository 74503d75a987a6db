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


def test_a_restarted_executor_adopts_a_running_job_by_name(tmp_path):
    first = LocalExecutor(tmp_path)
    h = first.launch(JobSpec("ppo-r2", "x", ["-n", "1", "import time; time.sleep(120)"], module="timeit"))
    pid = first.pid(h)
    # A new executor on the same folder (a restarted controller) knows nothing in memory.
    second = LocalExecutor(tmp_path)
    assert second.status("ppo-r2").state == JobState.RUNNING and second.pid("ppo-r2") == pid
    assert second.status("never-started").state == JobState.FAILED
    try:
        second.launch(JobSpec("ppo-r2", "x", ["-c", "pass"], module="timeit"))
        raise AssertionError("a second launch of a running job was allowed")
    except RuntimeError as err:
        assert "already running" in str(err)
    second.cancel("ppo-r2")
    first.wait(h, timeout=30)  # reap it (it is the first executor's child)
    status = second.wait("ppo-r2", timeout=30)
    assert status.state == JobState.FAILED and "exit status unknown" in status.message
