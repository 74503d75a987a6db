"""The local stack: `make up`, `make down`, `make logs`, `make status`.

`up` starts, on loopback: the Tansu broker (with its S3 store under
$RLHF_HOME/broker when RLHF_BROKER_STORAGE=s3, the default), the topics, the seed checkpoints,
the policy, reward, feedback and labeling gRPC services, the playground and the
trainer controller. It waits until every health check reports SERVING, then
prints the endpoints.

Every process is started in its own session and recorded in
$RLHF_HOME/run/<name>.pid with its start time. `down` stops exactly those
processes (the pid must still belong to the process we started), never
anything matched by name. Starting or stopping twice is harmless.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from services.common.auth import dev_tokens, write_tokens_file
from services.common.broker import port_open, start_broker, start_object_store, wait_for_kafka
from services.common.config import Settings, exit_on_config_error, load_settings


@dataclass(frozen=True)
class Component:
    name: str
    module: str
    health: str  # "grpc:<port>" or "http:<port>/<path>"


def components(settings: Settings) -> list[Component]:
    return [
        Component("policy", "services.policy", f"grpc:{settings.policy_port}"),
        Component("reward", "services.reward", f"grpc:{settings.reward_port}"),
        Component("feedback", "services.feedback", f"grpc:{settings.feedback_port}"),
        Component("labeling", "services.labeling", f"grpc:{settings.labeling_port}"),
        Component("playground", "services.playground", f"http:{settings.playground_port}/healthz"),
        Component("controller", "services.controller", f"grpc:{settings.controller_port}"),
    ]


class Stack:
    def __init__(self, settings: Settings, skip: tuple[str, ...] = ()):
        self.settings = settings
        self.components = [c for c in components(settings) if c.name not in skip]
        self.run_dir = settings.home / "run"
        self.log_dir = settings.home / "log"

    # --- pid bookkeeping -----------------------------------------------------
    def _pidfile(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def _record(self, name: str, proc: subprocess.Popen) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        created = psutil.Process(proc.pid).create_time()
        self._pidfile(name).write_text(json.dumps({"pid": proc.pid, "create_time": created, "cmd": proc.args}))

    def _alive(self, name: str) -> psutil.Process | None:
        """The process we recorded under `name`, if it is still that process: the same pid, and
        the same start time or, failing that, the same command line. A start time read later can
        differ from the recorded one: psutil derives it from the kernel's boot time, which moves
        whenever the wall clock is slewed or stepped (NTP, a VM restored from a snapshot)."""
        try:
            info = json.loads(self._pidfile(name).read_text())
            proc = psutil.Process(info["pid"])
            same = abs(proc.create_time() - info["create_time"]) < 0.01 or proc.cmdline() == info["cmd"]
            if same and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except (FileNotFoundError, json.JSONDecodeError, KeyError, psutil.Error):
            pass
        return None

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        if self._alive(name):
            print(f"  {name}: already running")
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
        self._record(name, proc)
        print(f"  {name}: started (pid {proc.pid})")

    # --- commands --------------------------------------------------------------
    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        tokens_file = self.settings.tokens_file
        if not tokens_file and not self.settings.tokens:
            path = self.settings.home / "tokens.json"
            if not path.exists():
                write_tokens_file(path, dev_tokens())
            tokens_file = str(path)
        env.update(
            {"RLHF_HOME": str(self.settings.home), "RLHF_TOKENS_FILE": tokens_file or "", "PYTHONUNBUFFERED": "1"}
        )
        # Services keep OpenMP's default spin; the controller's trainer jobs get the short one
        # (services/common/openmp.py: the local executor adds it).
        return env

    def up(self, timeout: float = 120.0) -> int:
        s = self.settings
        started = time.monotonic()
        s.home.mkdir(parents=True, exist_ok=True)
        host, _, port = s.kafka_bootstrap.split(",")[0].rpartition(":")
        print(f"starting the local stack (model preset: {s.model}, state: {s.home})")
        if self._alive("broker"):
            if s.broker_storage == "s3":
                self._start_store()  # a broker whose store died gets it back
            print("  broker: already running")
        elif port_open(host, int(port)):
            print(f"  broker: using the Kafka broker already listening on {s.kafka_bootstrap}")
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            endpoint = self._start_store() if s.broker_storage == "s3" else None
            proc = start_broker(int(port), log_path=self.log_dir / "broker.log", host=host, s3_endpoint=endpoint)
            self._record("broker", proc)
            where = f"records under {self.store_dir}" if endpoint else "in memory: a restart loses every record"
            print(f"  broker: started Tansu on {s.kafka_bootstrap} (pid {proc.pid}; {where})")
        wait_for_kafka(s.kafka_bootstrap, timeout=30)

        from services.common.bootstrap import ensure_seeded
        from services.common.bus import create_topics

        create_topics(s)
        print(f"  seed checkpoints: {ensure_seeded(s)}")
        env = self.child_env()
        for comp in self.components:
            self._spawn(comp.name, [sys.executable, "-m", comp.module], env)
        for comp in self.components:
            self._wait_healthy(comp, deadline=started + timeout)
        print(f"\nall services SERVING after {time.monotonic() - started:.1f}s")
        self.print_endpoints()
        return 0

    @property
    def store_dir(self) -> Path:
        return self.settings.home / "broker"

    def _start_store(self) -> str:
        """The durable broker's S3 object store: started unless it runs already; its endpoint."""
        s = self.settings
        if self._alive("broker-store"):
            print("  broker-store: already running")
        else:
            proc = start_object_store(
                s.broker_s3_port, self.store_dir, log_path=self.log_dir / "broker-store.log", fsync=s.broker_fsync
            )
            self._record("broker-store", proc)
            print(f"  broker-store: started the object store on 127.0.0.1:{s.broker_s3_port} (pid {proc.pid})")
        return f"http://127.0.0.1:{s.broker_s3_port}"

    def _wait_healthy(self, comp: Component, deadline: float) -> None:
        from services.common.grpc_server import wait_for_serving

        while True:
            if not self._alive(comp.name):
                tail = (self.log_dir / f"{comp.name}.log").read_text(errors="replace")[-2000:]
                raise SystemExit(f"{comp.name} exited during start-up; last log lines:\n{tail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SystemExit(f"{comp.name} did not become healthy in time; see `make logs`")
            kind, _, where = comp.health.partition(":")
            try:
                if kind == "grpc":
                    wait_for_serving(f"127.0.0.1:{where}", timeout=min(5.0, remaining))
                elif kind == "http":
                    import httpx

                    port, _, path = where.partition("/")
                    if httpx.get(f"http://127.0.0.1:{port}/{path}", timeout=2).status_code != 200:
                        raise TimeoutError
                print(f"  {comp.name}: SERVING" if kind else f"  {comp.name}: running")
                return
            except Exception:  # noqa: BLE001 - not healthy yet; keep polling until the deadline
                time.sleep(0.5)

    def print_endpoints(self) -> None:
        s = self.settings
        print(
            "\nendpoints:\n"
            f"  Kafka broker            {s.kafka_bootstrap}\n"
            f"  PolicyService (gRPC)    127.0.0.1:{s.policy_port}\n"
            f"  RewardService (gRPC)    127.0.0.1:{s.reward_port}\n"
            f"  FeedbackService (gRPC)  127.0.0.1:{s.feedback_port}\n"
            f"  LabelingService (gRPC)  127.0.0.1:{s.labeling_port}\n"
            f"  TGI-compatible HTTP     http://127.0.0.1:{s.http_port}\n"
            f"  Playground              http://127.0.0.1:{s.playground_port}\n"
            f"  logs                    {self.log_dir}  (make logs)\n"
            f"  dev tokens              {self.child_env()['RLHF_TOKENS_FILE']}"
        )

    def down(self, timeout: float = 20.0) -> int:
        names = [c.name for c in reversed(components(self.settings))] + ["broker", "broker-store"]
        for name in names:
            proc = self._alive(name)
            if proc is None:
                self._pidfile(name).unlink(missing_ok=True)
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: it and its children
            except ProcessLookupError:
                pass
            if not _exited(proc, timeout):
                os.killpg(proc.pid, signal.SIGKILL)
                _exited(proc, 5)
            self._pidfile(name).unlink(missing_ok=True)
            print(f"  {name}: stopped")
        print("local stack is down")
        return 0

    def status(self) -> int:
        for name in ["broker-store", "broker"] + [c.name for c in components(self.settings)]:
            proc = self._alive(name)
            print(f"  {name:<12} {f'running (pid {proc.pid})' if proc else 'stopped'}")
        return 0

    def logs(self, lines: int = 40) -> int:
        for path in sorted(self.log_dir.glob("*.log")):
            print(f"==> {path} <==")
            print("\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return 0


def _exited(proc: psutil.Process, timeout: float) -> bool:
    """Wait until `proc` has exited. It is not our child (the `up` that started
    it has exited), so it stays a zombie until init reaps it, which can take
    seconds: a zombie has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf-stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "logs"])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for SERVING")
    args = parser.parse_args(argv)
    stack = Stack(exit_on_config_error(load_settings))
    if args.command == "up":
        return stack.up(args.timeout)
    return getattr(stack, args.command)()


if __name__ == "__main__":
    raise SystemExit(main())
