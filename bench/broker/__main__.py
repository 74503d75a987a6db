"""`python -m bench.broker [--quick]`: reading a topic back from the durable broker.

Every service that tails a topic (the LabelingService's prompt feed, the
dataset snapshot builder, the controller) reads through Tansu, which keeps each
produced batch as one object in the local object store
(services/common/objectstore.py) and fetches them one GET at a time. Users'
prompts arrive one request at a time, so a topic holds many one-record batches.

Measured here: N one-record batches (a prompt-sized value each) are produced,
then one consumer reads the topic from the beginning. The same run does it on
the object store as it serves now (TCP_NODELAY on every connection) and on the
baseline, the same store with Nagle's algorithm left on (bench/broker/nagle_store.py,
the behaviour before), alternating them for a few rounds; the median round
counts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from bench.common import print_table, write_results
from services.common.broker import free_port, start_broker, start_object_store, stop_process

STORES = {
    "TCP_NODELAY (now)": "services.common.objectstore",
    "Nagle on (before)": "bench.broker.nagle_store",
}
PARTITIONS = 3
VALUE = b'Describe the ocean in at most 12 words. Include the word "waves".' * 3  # ~200 bytes


def one_round(module: str, records: int, scratch: Path) -> dict:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    data = scratch / uuid.uuid4().hex
    data.mkdir(parents=True)
    port, broker_port = free_port(), free_port()
    store = start_object_store(port, data, scratch / "store.log", module=module)
    broker = None
    try:
        broker = start_broker(broker_port, scratch / "broker.log", s3_endpoint=f"http://127.0.0.1:{port}")
        bootstrap = f"127.0.0.1:{broker_port}"
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic("bench", PARTITIONS, 1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        t0 = time.perf_counter()
        for i in range(records):  # one acknowledged request each: one batch, one object
            producer.send("bench", key=f"user-{i % 80}".encode(), value=VALUE).get(timeout=30)
        produce_s = time.perf_counter() - t0
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
        parts = [TopicPartition("bench", p) for p in range(PARTITIONS)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        t0, read, deadline = time.perf_counter(), 0, time.monotonic() + 300
        while read < records:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {read} of {records} records in 300 s")
            read += sum(len(batch) for batch in consumer.poll(timeout_ms=300).values())
        read_s = time.perf_counter() - t0
        consumer.close()
        return {"produce_s": produce_s, "read_s": read_s}
    finally:
        if broker is not None:
            stop_process(broker)
        stop_process(store)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer records and rounds")
    parser.add_argument("--records", type=int, default=0)
    args = parser.parse_args(argv)
    records = args.records or (200 if args.quick else 900)
    rounds = 1 if args.quick else 3
    runs: dict[str, list[dict]] = {name: [] for name in STORES}
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        for r in range(rounds):
            for name, module in STORES.items():
                runs[name].append(one_round(module, records, Path(tmp)))
                print(f"round {r + 1}/{rounds} {name}: {runs[name][-1]}", flush=True)
    rows = []
    for name, results in runs.items():
        read_s = statistics.median(x["read_s"] for x in results)
        produce_s = statistics.median(x["produce_s"] for x in results)
        rows.append(
            {
                "store": name,
                "read_s": read_s,
                "records_per_s_read": records / read_s,
                "produce_s": produce_s,
                "records_per_s_produce": records / produce_s,
            }
        )
    print_table(f"bench/broker: {records} one-record batches on Tansu + the object store, median of {rounds}", rows)
    now, before = rows
    ratio = now["records_per_s_read"] / before["records_per_s_read"]
    print(f"read throughput, TCP_NODELAY / Nagle on = {ratio:.1f}x", flush=True)
    write_results(
        "broker",
        {
            "records": records,
            "rounds": rounds,
            "partitions": PARTITIONS,
            "stores": rows,
            "raw": runs,
            "rows": [
                {
                    "what": f"reading back {records} one-record batches (Tansu on the object store, one consumer)",
                    "result": f"{now['records_per_s_read']:.0f} records/s ({now['read_s']:.2f} s)",
                    "baseline": f"the same store with Nagle's algorithm on (before): "
                    f"{before['records_per_s_read']:.0f} records/s ({before['read_s']:.1f} s)",
                    "ratio": round(ratio, 1),
                    "ratio_unit": " faster",
                }
            ],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
