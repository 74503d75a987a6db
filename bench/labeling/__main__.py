"""`python -m bench.labeling [--quick]`: 16 concurrent labelers, each looping
LabelingService.NextTask then SubmitTask, on a dedicated broker.

1. **generate**: comparison tasks whose K = 4 samples the service generates
   on demand from the tiny policy (what a labeler waits for on a cold queue).
2. **pre-generated**: the same, after the service made every task ahead of
   time (`--pregenerate`), so only the queue's own cost shows: the SQLite
   lease, the checks, the FeedbackService write.
3. **baseline**: the same 16 threads submitting the same comparisons straight
   to FeedbackService.BulkSubmit (validate-first), with no queue in front.

Reports NextTask p50/p99, SubmitTask p50/p99 and tasks/s for each, and the
ratio of the queue's throughput to the direct write. The LabelingService runs
as its own process; the policy and feedback services run in this one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import grpc
from rlhf.v1 import events_pb2, feedback_pb2, feedback_pb2_grpc, labeling_pb2, labeling_pb2_grpc

from bench.common import percentile, print_table, run_threads, write_results
from services.common.auth import bearer
from services.common.broker import free_port, start_broker, stop_process
from services.common.config import load_settings, to_env
from services.common.feedback import VALIDATE_FIRST
from services.common.grpc_server import wait_for_serving

LABELERS = 16
K = 4


def tokens() -> str:
    return ",".join(
        [f"bench-lab{i}=lab{i}:labeler" for i in range(LABELERS)]
        + ["bench-user=user0:user", "bench-labeling=labeling-service:labeler"]  # the service's own identity
    )


def log_prompts(settings, n: int, run: str) -> None:
    items = [
        feedback_pb2.BulkItem(prompt=feedback_pb2.LogPromptRequest(request_id=f"{run}-{i}", text=f"({i}) " + text))
        for i, text in enumerate(["Describe the ocean in at most 12 words."] * n)
    ]
    with grpc.insecure_channel(settings.feedback_target) as channel:
        replies = list(
            feedback_pb2_grpc.FeedbackServiceStub(channel).BulkSubmit(
                iter(items), metadata=bearer("bench-user"), timeout=120
            )
        )
    assert len(replies) == n


def start_labeling(settings, home: Path, pregenerate: int, prompts: int) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env.update(to_env(settings.with_overrides(home=home)), RLHF_LABELING_PORT="0", PYTHONUNBUFFERED="1")
    port_file = home / "port"
    argv = [sys.executable, "-m", "services.labeling", "--port-file", str(port_file), "--pregenerate", str(pregenerate)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=open(home / "labeling.log", "ab"))
    deadline = time.monotonic() + 600
    while not (port_file.exists() and port_file.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((home / "labeling.log").read_text()[-3000:])
        time.sleep(0.2)
    target = f"127.0.0.1:{port_file.read_text().strip()}"
    wait_for_serving(target, timeout=60, while_alive=proc)
    with grpc.insecure_channel(target) as channel:  # the prompt feed has read the topic
        stub = labeling_pb2_grpc.LabelingServiceStub(channel)
        request = labeling_pb2.GetStatsRequest()
        while stub.GetStats(request, metadata=bearer("bench-lab0"), timeout=30).queued_prompts + pregenerate < prompts:
            if time.monotonic() > deadline:
                raise RuntimeError("the LabelingService did not read the prompts topic in time")
            time.sleep(0.2)
    return proc, target


def run_checked(work) -> float:
    """run_threads over the labelers; a thread's error fails the benchmark instead of vanishing."""
    errors: list[BaseException] = []

    def guarded(t: int) -> None:
        try:
            work(t)
        except BaseException as err:  # noqa: BLE001 - kept and re-raised in the main thread below
            errors.append(err)

    wall = run_threads(LABELERS, guarded)
    if errors:
        raise errors[0]
    return wall


def labeler_loop(target: str, tasks: int) -> dict:
    """16 threads, NextTask then SubmitTask, until `tasks` are submitted in all."""
    claimed, lock = [0], threading.Lock()
    next_ms: list[float] = []
    submit_ms: list[float] = []

    def work(t: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = labeling_pb2_grpc.LabelingServiceStub(channel)
            metadata = bearer(f"bench-lab{t}")
            while True:
                with lock:
                    if claimed[0] >= tasks:
                        return
                    claimed[0] += 1
                started = time.perf_counter()
                task = stub.NextTask(labeling_pb2.NextTaskRequest(), metadata=metadata, timeout=600)
                took = time.perf_counter() - started
                judgements = [
                    labeling_pb2.SampleJudgement(sample_id=s.sample_id, likert=4, rank=1 + i // 2)
                    for i, s in enumerate(task.samples)
                ]
                started = time.perf_counter()
                stub.SubmitTask(
                    labeling_pb2.SubmitTaskRequest(task_id=task.task_id, judgements=judgements),
                    metadata=metadata,
                    timeout=120,
                )
                with lock:
                    next_ms.append(took * 1000)
                    submit_ms.append((time.perf_counter() - started) * 1000)

    wall = run_checked(work)
    return {"tasks": tasks, "wall_s": wall, "next_ms": next_ms, "submit_ms": submit_ms}


def direct_loop(settings, tasks: int, run: str) -> dict:
    """Baseline: the same comparison writes, straight to FeedbackService."""
    counter, lock, submit_ms = [0], threading.Lock(), []

    def work(t: int) -> None:
        with grpc.insecure_channel(settings.feedback_target) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            while True:
                with lock:
                    if counter[0] >= tasks:
                        return
                    counter[0] += 1
                    i = counter[0]
                responses = [
                    events_pb2.RankedResponse(
                        text=f"sample {k} of {i}: an answer of a few words.", policy_version="v", rank=1 + k // 2
                    )
                    for k in range(K)
                ]
                item = feedback_pb2.BulkItem(
                    comparison=feedback_pb2.SubmitComparisonRequest(
                        request_id=f"{run}-d{i}", prompt_id=f"p-{i}", responses=responses
                    )
                )
                started = time.perf_counter()
                list(stub.BulkSubmit(iter([item]), metadata=[*bearer(f"bench-lab{t}"), VALIDATE_FIRST], timeout=120))
                with lock:
                    submit_ms.append((time.perf_counter() - started) * 1000)

    wall = run_checked(work)
    return {"tasks": tasks, "wall_s": wall, "next_ms": [], "submit_ms": submit_ms}


def summary(mode: str, result: dict) -> dict:
    return {
        "mode": mode,
        "tasks": result["tasks"],
        "tasks_per_s": result["tasks"] / result["wall_s"],
        "next_p50_ms": percentile(result["next_ms"], 50),
        "next_p99_ms": percentile(result["next_ms"], 99),
        "submit_p50_ms": percentile(result["submit_ms"], 50),
        "submit_p99_ms": percentile(result["submit_ms"], 99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.labeling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 tasks per mode instead of 320")
    args = parser.parse_args(argv)
    tasks = 64 if args.quick else 320
    from services.feedback import server as feedback_server
    from services.policy import server as policy_server

    root = Path(tempfile.mkdtemp(prefix="bench-labeling-"))
    port = free_port()
    broker = start_broker(port, log_path=root / "tansu.log")
    policy = feedback = None
    try:
        settings = load_settings(
            {
                "RLHF_HOME": str(root / "home"),
                "RLHF_MODEL": "tiny",
                "RLHF_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}",
                "RLHF_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
                "RLHF_TOPIC_PARTITIONS": "1",
                "RLHF_TOKENS": tokens(),
                "RLHF_LABELING_TOKEN": "bench-labeling",  # pre-generation has no labeler's token to present
                "RLHF_LABELING_K": str(K),
                "RLHF_LABELING_DEMONSTRATION_SHARE": "0",
                "RLHF_LABELING_OVERLAP_SHARE": "0",
                "RLHF_LABELING_MAX_NEW_TOKENS": "16",
                "RLHF_DATASET_MAX_PROMPTS_PER_USER": "1000000",
                **{k: v for k, v in os.environ.items() if k == "RLHF_MODEL_CACHE"},
            }
        )
        policy = policy_server.start(settings, port=0, http_port=None, follow=False)
        feedback = feedback_server.start(settings, port=0)
        settings = settings.with_overrides(
            policy_target=f"127.0.0.1:{policy.port}", feedback_target=f"127.0.0.1:{feedback.port}"
        )
        run = uuid.uuid4().hex[:8]
        log_prompts(settings, 2 * tasks, run)  # each mode's fresh queue sees them all; half are left over

        rows, raw = [], {}
        for mode, pregenerate in (("generate", 0), ("pre-generated", tasks)):
            home = root / mode
            home.mkdir()
            proc, target = start_labeling(settings, home, pregenerate, 2 * tasks)
            try:
                raw[mode] = labeler_loop(target, tasks)
            finally:
                stop_process(proc)
            rows.append(summary(mode, raw[mode]))
        raw["direct"] = direct_loop(settings, tasks, run)
        rows.append(summary("baseline: FeedbackService directly", raw["direct"]))
        print_table(f"bench/labeling: {LABELERS} labelers, K = {K}, {tasks} tasks per mode", rows)
        generate, queued, direct = rows
        ratio = queued["tasks_per_s"] / direct["tasks_per_s"]
        print(f"queue-only throughput / direct feedback writes = {ratio:.2f}", flush=True)
        write_results(
            "labeling",
            {
                "quick": args.quick,
                "labelers": LABELERS,
                "k": K,
                "modes": rows,
                "queue_vs_direct_ratio": ratio,
                "cpu_count": os.cpu_count(),
                # the rows bench/report.py renders into the results tables
                "rows": [
                    {
                        "what": f"labeling queue, {LABELERS} labelers, pre-generated tasks (NextTask + SubmitTask)",
                        "result": f"{queued['tasks_per_s']:.0f} tasks/s, NextTask p50 {queued['next_p50_ms']:.0f} ms"
                        f" / p99 {queued['next_p99_ms']:.0f} ms",
                        "baseline": f"the same writes straight to FeedbackService: {direct['tasks_per_s']:.0f}/s",
                        "ratio": round(ratio, 3),
                    },
                    {
                        "what": f"labeling queue, samples generated on demand (tiny model, K = {K})",
                        "result": f"{generate['tasks_per_s']:.1f} tasks/s, NextTask"
                        f" p50 {generate['next_p50_ms']:.0f} ms / p99 {generate['next_p99_ms']:.0f} ms",
                        "baseline": f"pre-generated: {queued['tasks_per_s']:.0f} tasks/s",
                        "ratio": round(generate["tasks_per_s"] / queued["tasks_per_s"], 4),
                    },
                ],
            },
        )
        return 0
    finally:
        if feedback:
            feedback.stop()
        if policy:
            policy.stop()
        stop_process(broker)


if __name__ == "__main__":
    raise SystemExit(main())
