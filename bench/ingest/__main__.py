"""`python -m bench.ingest [--quick]`: FeedbackService ingestion vs a direct
kafka-python producer, same records, same broker, same run.

1. Per event: 16 concurrent gRPC clients, each SubmitComparison returning
   after the broker's ack; baseline: 16 threads each `send(...).get()`.
2. Bulk: one BulkSubmit stream; baseline: async `send` of every record + `flush`.
3. Paced: per-event p99 ack latency at a steady 500 events/s (open loop:
   latency counts from the scheduled send time, so a stall is not hidden).

Paths 1 and 2 alternate baseline and service for a few rounds and report
the median round's throughput (latency percentiles pool every round).

The service runs as its own process (`python -m services.feedback`) on a
dedicated Tansu broker; the baselines run in this process. Everything runs
three times: on the durable storage `make up` uses (Tansu on the local object
store), on the same with every object fsync'ed (RLHF_BROKER_FSYNC=true) and
on memory storage, so the cost of durability shows beside the fast figures
(`--storage` picks some).
"""

from __future__ import annotations

import argparse
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc

from bench.common import percentile, print_table, run_threads, write_results
from services.common import bus
from services.common.auth import Identity, bearer
from services.common.broker import free_port, start_broker, start_object_store
from services.common.config import load_settings
from services.common.grpc_server import wait_for_serving
from services.feedback.events import prepare
from services.feedback.validation import Limits

CLIENTS = 16
LABELERS = [f"lab{i}" for i in range(CLIENTS)]
ROOT = Path(__file__).resolve().parents[2]


def comparison(run: str, i: int) -> feedback_pb2.SubmitComparisonRequest:
    """A typical labeling record: a prompt and K=4 ranked responses (~600 bytes)."""
    responses = [
        events_pb2.RankedResponse(
            text=f"Response {k} to prompt {i}: " + "a plausible answer sentence. " * 4,
            policy_version="ppo-3",
            rank=k + 1,
        )
        for k in range(4)
    ]
    return feedback_pb2.SubmitComparisonRequest(
        request_id=f"{run}-{i}", prompt_id=f"ev-prompt-{i % 997}", responses=responses
    )


def baseline_records(requests: list, labelers: list[str]) -> list[tuple[bytes, bytes, list]]:
    """The events the service would write for `requests`, as (key, value, headers)."""
    out = []
    for request, labeler in zip(requests, labelers, strict=False):
        event = prepare("comparisons", request, Identity(labeler, "labeler"), Limits()).event
        out.append((labeler.encode(), event.SerializeToString(), bus.headers_for(event)))
    return out


def row(path: str, who: str, n: int, wall: float, latencies: list[float], baseline: float | None = None) -> dict:
    rate = n / wall
    out = {
        "path": path,
        "client": who,
        "events": n,
        "events_per_s": rate,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }
    out["ratio_to_baseline"] = rate / baseline if baseline else 1.0
    return out


# --- per event ---------------------------------------------------------------------
def per_event_grpc(target: str, run: str, n: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    requests = [comparison(run, i) for i in range(n)]  # built up front, like the baseline's records

    def work(t: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            metadata = bearer(f"tok-{LABELERS[t]}")
            mine = []
            for i in range(t, n, CLIENTS):
                started = time.perf_counter()
                stub.SubmitComparison(requests[i], metadata=metadata, timeout=30)
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

    return run_threads(CLIENTS, work), latencies


def per_event_kafka(producer, topic: str, records: list) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        mine = []
        for key, value, headers in records[t::CLIENTS]:
            started = time.perf_counter()
            producer.send(topic, key=key, value=value, headers=headers).get(timeout=30)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    return run_threads(CLIENTS, work), latencies


# --- bulk ------------------------------------------------------------------------------
def bulk_grpc(target: str, run: str, n: int) -> tuple[float, list[float]]:
    sent: list[float] = []
    latencies: list[float] = []
    prepared = [feedback_pb2.BulkItem(comparison=comparison(run, i)) for i in range(n)]  # built up front

    def items():
        for item in prepared:
            sent.append(time.perf_counter())
            yield item

    with grpc.insecure_channel(target) as channel:
        stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
        started = time.perf_counter()
        for i, _reply in enumerate(stub.BulkSubmit(items(), metadata=bearer(f"tok-{LABELERS[0]}"), timeout=600)):
            latencies.append(time.perf_counter() - sent[i])
        wall = time.perf_counter() - started
    assert len(latencies) == n, f"bulk: {len(latencies)} replies for {n} items"
    return wall, latencies


def bulk_kafka(producer, topic: str, records: list) -> tuple[float, list[float]]:
    latencies: list[float] = []
    started = time.perf_counter()
    for key, value, headers in records:
        sent = time.perf_counter()
        producer.send(topic, key=key, value=value, headers=headers).add_callback(
            lambda _md, s=sent: latencies.append(time.perf_counter() - s)
        )
    producer.flush(timeout=120)
    wall = time.perf_counter() - started
    return wall, latencies


# --- paced -----------------------------------------------------------------------------
def paced(rate: float, seconds: float, submit) -> list[float]:
    """Open-loop load: event i is due at start + i/rate; latency counts from when it was due."""
    due: queue.Queue = queue.Queue()
    latencies: list[float] = []
    lock = threading.Lock()
    n = int(rate * seconds)

    def worker(t: int) -> None:
        while True:
            item = due.get()
            if item is None:
                return
            i, due_at = item
            submit(t, i)
            with lock:
                latencies.append(time.perf_counter() - due_at)

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(CLIENTS)]
    for t in threads:
        t.start()
    start = time.perf_counter() + 0.05
    for i in range(n):
        due_at = start + i / rate
        delay = due_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        due.put((i, due_at))
    for _ in threads:
        due.put(None)
    for t in threads:
        t.join()
    return latencies


def measure(storage: str, args, counts: tuple[int, int, float, int]) -> list[dict]:
    """Every path, baseline and service, on a fresh broker with `storage` (see --storage)."""
    n_event, n_bulk, paced_s, rounds = counts
    work = Path(tempfile.mkdtemp(prefix=f"bench-ingest-{storage}-"))
    port, grpc_port = free_port(), free_port()
    store = None
    endpoint = None
    if storage.startswith("s3"):
        store_port = free_port()
        store = start_object_store(store_port, work / "broker", work / "objectstore.log", fsync=storage == "s3-fsync")
        endpoint = f"http://127.0.0.1:{store_port}"
    broker = start_broker(port, log_path=work / "tansu.log", s3_endpoint=endpoint)
    env = {
        "RLHF_HOME": str(work / "home"),
        "RLHF_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
        "RLHF_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:6]}",
        "RLHF_FEEDBACK_PORT": str(grpc_port),
        "RLHF_LOG_LEVEL": "WARNING",
        "RLHF_TOKENS": ",".join(f"tok-{lab}={lab}:labeler" for lab in LABELERS),
    }
    settings = load_settings(env)
    server = subprocess.Popen(
        [sys.executable, "-m", "services.feedback"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}, **env},
        stdout=open(work / "feedback.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    target = f"127.0.0.1:{grpc_port}"
    rows: list[dict] = []
    try:
        wait_for_serving(target, timeout=60)
        topic = bus.Topics.from_settings(settings).name("comparisons")
        producer = bus.make_producer(settings)
        labelers = [LABELERS[i % CLIENTS] for i in range(max(n_event, n_bulk))]
        per_event_gen = [comparison("kafka-pe", i) for i in range(n_event)]
        bulk_gen = [comparison("kafka-bulk", i) for i in range(n_bulk)]
        per_event_records = baseline_records(per_event_gen, labelers)
        bulk_records = baseline_records(bulk_gen, [LABELERS[0]] * n_bulk)

        # Warm both paths: connections, topic metadata, producer ids.
        per_event_grpc(target, "warm", 2 * CLIENTS)
        per_event_kafka(producer, topic, per_event_records[: 2 * CLIENTS])

        # Alternate baseline and service in rounds: the machine is shared and
        # noisy, and alternating exposes both to the same background load.
        runs: dict[tuple[str, str], list[tuple[int, float, list[float]]]] = {}
        for r in range(rounds):
            for (path, who), run in (
                (
                    ("per-event", "kafka-python send().get() x16"),
                    lambda: per_event_kafka(producer, topic, per_event_records),
                ),
                (
                    ("per-event", "FeedbackService x16 clients"),
                    lambda r=r: per_event_grpc(target, f"grpc-pe{r}", n_event),
                ),
                (("bulk", "kafka-python send()+flush"), lambda: bulk_kafka(producer, topic, bulk_records)),
                (("bulk", "FeedbackService BulkSubmit"), lambda r=r: bulk_grpc(target, f"grpc-bulk{r}", n_bulk)),
            ):
                wall, lat = run()
                runs.setdefault((path, who), []).append((len(lat), wall, lat))
        baseline_rate: dict[str, float] = {}
        for (path, who), results in runs.items():
            rates = sorted(n / wall for n, wall, _ in results)
            rate = rates[len(rates) // 2]  # the median round
            latencies = [x for _, _, lat in results for x in lat]
            total = sum(n for n, _, _ in results)
            rows.append(row(path, who, total, total / rate, latencies, baseline_rate.setdefault(path, rate)))

        records_by_i = baseline_records(
            [comparison("kafka-paced", i) for i in range(int(args.rate * paced_s))], labelers
        )
        lat = paced(
            args.rate,
            paced_s,
            lambda t, i: producer.send(
                topic, key=records_by_i[i][0], value=records_by_i[i][1], headers=records_by_i[i][2]
            ).get(timeout=30),
        )
        base = row(f"paced {args.rate:.0f}/s", "kafka-python send().get()", len(lat), paced_s, lat)
        channels = [grpc.insecure_channel(target) for _ in range(CLIENTS)]
        stubs = [feedback_pb2_grpc.FeedbackServiceStub(c) for c in channels]
        lat = paced(
            args.rate,
            paced_s,
            lambda t, i: stubs[t].SubmitComparison(
                comparison("grpc-paced", i), metadata=bearer(f"tok-{LABELERS[t]}"), timeout=30
            ),
        )
        for c in channels:
            c.close()
        rows += [base, row(f"paced {args.rate:.0f}/s", "FeedbackService", len(lat), paced_s, lat, base["events_per_s"])]
        producer.close(timeout=10)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        for proc in (broker, store):
            if proc is not None:
                proc.kill()
                proc.wait()
    return [{"storage": storage, **r} for r in rows]


STORAGE_NAMES = {"s3": "durable (s3)", "s3-fsync": "durable + fsync", "memory": "memory"}


def report_rows(rows: list[dict], storages: list[str]) -> list[dict]:
    """The rows bench/report.py renders into the results tables (see its docstring): per storage,
    the per-event, bulk and paced FeedbackService figures against kafka-python in the same run."""
    out = []
    for storage in storages:
        mine = [r for r in rows if r["storage"] == storage]
        (base_e, svc_e), (base_b, svc_b), (base_p, svc_p) = mine[0:2], mine[2:4], mine[4:6]
        name = STORAGE_NAMES[storage]
        out += [
            {
                "what": f"ingest, {name}, per event (16 gRPC clients, each RPC waits for the broker's ack)",
                "result": f"{svc_e['events_per_s']:.0f} events/s, p99 {svc_e['p99_ms']:.1f} ms",
                "baseline": f"kafka-python `send().get()` ×16: {base_e['events_per_s']:.0f}/s",
                "ratio": round(svc_e["ratio_to_baseline"], 3),
                "ratio_note": " (target 0.5)",
                "headline": storage == "s3",
            },
            {
                "what": f"ingest, {name}, bulk (`BulkSubmit`)",
                "result": f"{svc_b['events_per_s']:.0f} events/s",
                "baseline": f"kafka-python `send()` + `flush()`: {base_b['events_per_s']:.0f}/s",
                "ratio": round(svc_b["ratio_to_baseline"], 3),
                "ratio_note": " (target 0.5)",
            },
            {
                "what": f"ingest, {name}, paced {svc_p['events_per_s']:.0f} events/s",
                "result": f"p99 {svc_p['p99_ms']:.1f} ms",
                "baseline": f"kafka-python: p99 {base_p['p99_ms']:.1f} ms",
                "ratio": None,
                "ratio_note": " (target ≤ 50 ms)",
            },
        ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (small counts)")
    parser.add_argument("--rate", type=float, default=500.0, help="events/s of the paced run")
    parser.add_argument(
        "--storage",
        default="s3,s3-fsync,memory",
        help="broker storages to measure, comma-separated: s3 (the durable default of `make up`),"
        " s3-fsync (RLHF_BROKER_FSYNC=true), memory",
    )
    args = parser.parse_args(argv)
    counts = (600, 2000, 3.0, 2) if args.quick else (3000, 12000, 10.0, 3)
    storages = [s.strip() for s in args.storage.split(",") if s.strip()]
    unknown = set(storages) - {"s3", "s3-fsync", "memory"}
    if unknown or not storages:
        parser.error(f"--storage: unknown {sorted(unknown)}; choose from s3, s3-fsync, memory")
    rows = [r for storage in storages for r in measure(storage, args, counts)]

    print_table("bench/ingest: FeedbackService vs direct kafka-python (same records, same broker)", rows)
    verdicts = {}
    for storage in storages:
        mine = [r for r in rows if r["storage"] == storage]
        per_event, bulk, paced_row = mine[1], mine[3], mine[5]
        verdicts[storage] = {
            "per_event_ratio": per_event["ratio_to_baseline"],
            "bulk_ratio": bulk["ratio_to_baseline"],
            "per_event_p99_ms": per_event["p99_ms"],
            "paced_p99_ms": paced_row["p99_ms"],
            "pass": per_event["ratio_to_baseline"] >= 0.5
            and bulk["ratio_to_baseline"] >= 0.5
            and paced_row["p99_ms"] <= 50,
        }
        v = verdicts[storage]
        print(
            f"{storage}: per-event >= 50% of direct Kafka ({v['per_event_ratio']:.0%},"
            f" p99 {v['per_event_p99_ms']:.1f} ms),"
            f" bulk >= 50% ({v['bulk_ratio']:.0%}), paced p99 <= 50 ms ({v['paced_p99_ms']:.1f} ms):"
            f" {'PASS' if v['pass'] else 'FAIL'}"
        )
    write_results(
        "ingest",
        {
            "quick": args.quick,
            "clients": CLIENTS,
            "rounds": counts[3],
            "storages": storages,
            "measurements": rows,
            "targets": verdicts,
            "rows": report_rows(rows, storages),
            "cpu_count": os.cpu_count(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
