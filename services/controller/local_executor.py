"""Runs trainer jobs as local subprocesses: the embedded default.

Each job gets its own session (so cancel stops it and its children) and a
log file in the executor's folder. Multi-process jobs run under torchrun
with the venv's interpreter.

A job outlives the controller that started it: its own session keeps it
alive if the controller is killed. Each launch leaves `<name>.pid` (pid and
the process's start time, so a reused pid is not mistaken for it); a
restarted controller's executor finds a job it did not start by that file,
reports it RUNNING while that process lives, and can wait for or cancel it.
Its exit status is then unknown (it is not our child): the controller judges
the outcome by the job's result file, which trainers write last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from services.common import openmp
from services.common.files import write_text_atomic
from services.common.logs import get_logger, log_fields
from services.controller.jobs import Executor, JobSpec, JobState, JobStatus

log = get_logger(__name__)


class LocalExecutor(Executor):
    def __init__(self, log_dir: Path, base_env: dict[str, str] | None = None, echo: bool = False):
        """echo=True also copies each job's output (progress bars included) to our stdout."""
        self.echo = echo
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.base_env = dict(os.environ if base_env is None else base_env)
        self._procs: dict[str, subprocess.Popen] = {}
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()

    def launch(self, spec: JobSpec) -> str:
        argv = spec.argv(sys.executable)
        if argv[0] == "torchrun":  # the venv's torchrun, not whatever is on PATH
            argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        env = openmp.child_env({**self.base_env, **spec.env, "PYTHONUNBUFFERED": "1"})
        logfile = open(self.log_dir / f"{spec.name}.log", "ab")
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if self.echo else logfile,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        if self.echo:
            threading.Thread(target=self._tee, args=(proc, logfile), daemon=True).start()
        else:
            logfile.close()
        with self._lock:
            if (spec.name in self._procs and self._procs[spec.name].poll() is None) or (
                spec.name not in self._procs and self._adopted_pid(spec.name)
            ):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise RuntimeError(f"job {spec.name} is already running")
            self._procs[spec.name] = proc
        write_text_atomic(self._pid_file(spec.name), json.dumps({"pid": proc.pid, "start": _start_time(proc.pid)}))
        log_fields(log, logging.INFO, "job launched", job=spec.name, pid=proc.pid, argv=argv)
        return spec.name

    @staticmethod
    def _tee(proc: subprocess.Popen, logfile) -> None:
        with logfile:
            while chunk := os.read(proc.stdout.fileno(), 4096):
                logfile.write(chunk)
                logfile.flush()
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()

    def running(self) -> dict[str, int]:
        """{job name: pid} of the jobs still running (this executor's own)."""
        return {name: p.pid for name, p in list(self._procs.items()) if p.poll() is None}

    def pid(self, handle: str) -> int:
        return self._procs[handle].pid if handle in self._procs else self._adopted_pid(handle)

    def _pid_file(self, handle: str) -> Path:
        return self.log_dir / f"{handle}.pid"

    def _adopted_pid(self, handle: str) -> int:
        """The pid of a live job started by an earlier executor (0 if none)."""
        try:
            record = json.loads(self._pid_file(handle).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return 0
        pid = int(record.get("pid", 0))
        return pid if pid and _start_time(pid) == record.get("start") else 0

    def log_path(self, handle: str) -> Path:
        return self.log_dir / f"{handle}.log"

    def status(self, handle: str) -> JobStatus:
        proc = self._procs.get(handle)
        if proc is None:
            if self._adopted_pid(handle):
                return JobStatus(JobState.RUNNING)
            if self._pid_file(handle).exists():
                return JobStatus(
                    JobState.FAILED, f"job {handle} ended while no executor watched it; exit status unknown"
                )
            return JobStatus(JobState.FAILED, f"unknown job {handle}")
        code = proc.poll()
        if code is None:
            return JobStatus(JobState.RUNNING)
        if code == 0:
            return JobStatus(JobState.SUCCEEDED, exit_code=0)
        reason = (
            "cancelled"
            if handle in self._cancelled
            else (f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}")
        )
        return JobStatus(JobState.FAILED, f"{reason}; log: {self.log_path(handle)}", exit_code=code)

    def wait(self, handle: str, timeout: float | None = None) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(handle)
            if status.state.finished or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(0.2)

    def cancel(self, handle: str) -> None:
        proc = self._procs.get(handle)
        if proc is None:
            pid = self._adopted_pid(handle)
            if pid:
                self._cancelled.add(handle)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # not our child: no wait() to time a SIGTERM against
            return
        if proc.poll() is not None:
            return
        self._cancelled.add(handle)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None if gone.

    A zombie (exited, not yet reaped) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return None if fields[0] == "Z" else fields[19]
