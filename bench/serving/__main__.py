"""Serving benchmark: the PolicyService on the real base model (SmolLM2-135M).

1. Baseline, in this process: HF `model.generate`, fp32, one request at a time,
   run before and after the closed loop, each on 1 intra-op thread and on the
   default count; the fastest run counts (this machine's CPUs are shared, so
   the conservative ratio uses the better baseline).
2. The machine's limit, in this process: matrix-multiply throughput at the
   model's own linear-layer shapes, in the serving dtype, at the batch sizes
   served (1, 16, 32 rows), the best of plain, prepacked and the fused decode
   step's fused and prepacked weights, on 1 thread and on the default count. Model
   FLOPs utilisation (MFU) of a level is
   tok/s x 2 x parameters / that peak at its batch size.
3. Closed loop: 1, 4, 16, 32 concurrent gRPC clients streaming 64 new tokens
   each from a fixed prompt set, against `python -m services.policy` run as a
   subprocess whose RSS is sampled with psutil; TTFT p50/p99 per level. The set's
   8 prompts come back, so after their first prefill the server's prompt cache
   (RLHF_PROMPT_CACHE_TOKENS) serves them; each level reports how its prompts'
   prefills were had (computed, deduplicated within a join, cached), and 32
   clients run once more with every prompt made new, which computes them all.
4. Hot swap: while 8 streams run, a new checkpoint is published and promoted
   (services.common.bus.promote_checkpoint); reports the time from the
   announcement to the first response naming the new version, and failures.
5. llama.cpp on the same GGUF, single stream, only if `llama_cpp` is importable
   (`make bench-llamacpp` installs it).

The serving dtype is the shipped default, `auto` (services/common/dtypes.py):
bf16 where the CPU has native bf16, else fp32. The CPU capability is printed
and written with the figures.

    python -m bench.serving [--quick] [--dtype auto|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import psutil
import torch
from prometheus_client.parser import text_string_to_metric_families
from rlhf.v1 import policy_pb2, policy_pb2_grpc
from tqdm import tqdm
from transformers import AutoConfig

from bench.common import percentile, print_table, run_threads, write_results
from services.common.auth import bearer
from services.common.bootstrap import ensure_seeded
from services.common.broker import free_port, start_broker, stop_process
from services.common.bus import create_topics, promote_checkpoint
from services.common.checkpoints import CheckpointStore
from services.common.config import load_settings
from services.common.dtypes import cpu_capability, resolve_dtype
from services.common.grpc_server import wait_for_serving
from services.common.models import GGUF_FILE, ensure_preset, gguf_dir, load_causal_lm, load_tokenizer, render_prompt
from services.policy.fused import Linear, prepack_linears
from services.policy.kernels import NativeOps, decode_ops

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle works, part by part.",
    "Describe your ideal weekend in a small mountain village.",
    "Write a letter to a friend about learning to cook.",
    "Explain why the sky is blue to a ten-year-old, with examples.",
    "Tell me about the history of the printing press.",
    "Write a poem about autumn leaves and the first frost.",
    "Give me advice on starting a vegetable garden on a balcony.",
]
CONCURRENCY = (1, 4, 16, 32)
GB = 1024**3
BENCH_TOKEN = "bench-serving"


def report_rows(dtype: str, base: dict, levels: list[dict], swap: dict, fresh: dict | None = None) -> list[dict]:
    """The rows bench/report.py renders into the results tables (see its docstring)."""
    by_clients = {level["clients"]: level for level in levels}
    shown = [(by_clients.get(clients), "") for clients in (1, 16, 32)]
    shown.append((fresh, ", every prompt new (no prefill shared or cached)"))
    rows = []
    for level, note in shown:
        if level is None:
            continue
        clients = level["clients"]
        rows.append(
            {
                "what": f"serving, {clients} concurrent gRPC stream{'s' if clients > 1 else ''}, 64 new tokens,"
                f" base model {dtype}{note}",
                "result": f"{level['tok_s']:.0f} tok/s, MFU {level['mfu']:.0%}, TTFT p99 {level['ttft_p99_ms']:.0f} ms,"
                f" peak RSS {level['peak_rss_gb']:.2f} GB",
                "baseline": f"HF `generate` fp32, one request at a time: {base['tok_s']:.1f} tok/s",
                "ratio": round(level["tok_s"] / base["tok_s"], 2),
                "headline": clients == 16 and not note,
            }
        )
    if swap:
        rows.append(
            {
                "what": "hot swap under 8 streams",
                "result": f"new version served {swap['swap_latency_s']:.2f} s after the announcement,"
                f" {swap['failed']} of {swap['requests']} requests failed",
                "ratio": None,
            }
        )
    return rows


class RssSampler:
    """Samples a process's resident set size every 50 ms; keeps the peak per phase."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(0.05)

    def take_peak(self) -> int:
        """The peak since the last call (and reset it)."""
        peak, self.peak = self.peak, self.proc.memory_info().rss
        return max(peak, self.peak)

    def stop(self) -> None:
        self._stop.set()


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives."""

    def __init__(self):
        self.calls = 0
        self.first_at = None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first_at is None:  # call 1 is the prompt
            self.first_at = time.perf_counter()

    def end(self):
        pass


def baseline(preset_dir: Path, prompts: list[str], new_tokens: int, device: str = "cpu") -> dict:
    """HF generate, fp32, one request at a time: what serving must beat. Its best
    thread count counts: first one intra-op thread, then this process's default
    count (given up once it has taken longer than the one-thread run, when it can
    no longer be faster: on a busy machine an OpenMP team of 2 can be many times
    slower than one thread)."""
    default_threads = torch.get_num_threads()
    runs = [_baseline_run(preset_dir, prompts, new_tokens, device, 1)]
    if default_threads != 1:
        runs.append(_baseline_run(preset_dir, prompts, new_tokens, device, default_threads, runs[0]["wall_s"]))
    torch.set_num_threads(default_threads)
    best = max(runs, key=lambda r: r["tok_s"])
    return {**best, "thread_runs": [{"threads": r["threads"], "tok_s": r["tok_s"]} for r in runs]}


def _baseline_run(
    preset_dir: Path, prompts: list[str], new_tokens: int, device: str, threads: int, give_up_s: float | None = None
) -> dict:
    torch.set_num_threads(threads)
    model = load_causal_lm(preset_dir, device=device)
    params = sum(p.numel() for p in model.parameters())
    tok = load_tokenizer(preset_dir)
    encoded = [
        torch.tensor([tok(render_prompt(tok, p), add_special_tokens=False).input_ids], device=device) for p in prompts
    ]
    with torch.inference_mode():
        model.generate(
            encoded[0], attention_mask=torch.ones_like(encoded[0]), max_new_tokens=4, do_sample=False
        )  # warm up
        tokens, ttfts = 0, []
        started = time.perf_counter()
        for ids in tqdm(encoded, desc=f"baseline HF generate, {threads} thread(s)", leave=False):
            if give_up_s is not None and time.perf_counter() - started > give_up_s:
                break  # already slower than the run it is compared with
            streamer = _FirstToken()
            t0 = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=tok.pad_token_id,
            )
            ttfts.append((streamer.first_at or time.perf_counter()) - t0)
            tokens += out.shape[1] - ids.shape[1]
        wall = time.perf_counter() - started
    del model
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "params": params,
        "threads": threads,
    }


def matmul_peak(config, dtype: torch.dtype, batch_sizes, device: str = "cpu", seconds: float = 1.0) -> dict[int, float]:
    """GFLOP/s of one forward pass's linear layers at the model's shapes (q, k, v, o,
    gate, up, down, unembedding), `m` rows at a time, in `dtype`: the best this
    machine's matmul does for the work a decode step of m rows asks of it.

    "Best" is over the ways the server could run them: plain `F.linear`; the
    prepacked oneDNN weights its prefill runs bf16 on; the fused decode step's
    layers (services/policy/fused.py: q/k/v and gate/up as one layer each,
    prepacked for m rows), with the same FLOPs; and those layers on the native kernels'
    own bf16 matmul where this CPU has it for m rows (AMX tiles: any m; AVX512-BF16 dot
    products: up to SMALL_LINEAR_ROWS); each on one intra-op thread and on this process's
    default count (on a busy machine one thread can be much faster). A higher peak means
    a lower, more conservative MFU."""
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter), (vocab, h)]
    fused_shapes = [(q + 2 * kv, h), (h, q), (2 * inter, h), (h, inter), (vocab, h)]

    def weights(of) -> list[torch.Tensor]:
        return [torch.randn(o, i, device=device, dtype=dtype) * i**-0.5 for o, i in of]

    plain = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False, device=device, dtype=dtype) for o, i in shapes)
    with torch.no_grad():
        for layer, w in zip(plain, weights(shapes), strict=True):
            layer.weight.copy_(w)
    packed = copy.deepcopy(plain)
    widths = [i for _, i in shapes]
    variants = {"plain": list(zip(plain, widths, strict=True))}
    if prepack_linears(packed):
        variants["prepacked"] = list(zip(packed, widths, strict=True))
    default_threads = torch.get_num_threads()
    group = config.num_attention_heads // config.num_key_value_heads
    ops, _ = decode_ops(dtype, torch.device(device), True, load_settings().kernel_cache, group)
    native = ops if isinstance(ops, NativeOps) else None
    peaks = {}
    with torch.inference_mode():
        for m in batch_sizes:
            ways = dict(variants)
            ways["fused, packed for m rows"] = [(Linear(w, m), w.shape[1]) for w in weights(fused_shapes)]
            ways["packed for m rows"] = [(Linear(w, m), w.shape[1]) for w in weights(shapes)]
            if native is not None:
                own = [(Linear(w, m, native), w.shape[1]) for w in weights(fused_shapes)]
                if all(layer.own_rows >= m for layer, _ in own):
                    ways["fused, native matmul"] = own
            inputs = {inp: torch.randn(m, inp, dtype=dtype, device=device) for _, inp in shapes}
            flops = sum(2 * m * out * inp for out, inp in shapes)
            best = 0.0
            for threads in sorted({1, default_threads}):
                torch.set_num_threads(threads)
                for layers in ways.values():

                    def one_pass(layers=layers, inputs=inputs):
                        for layer, width in layers:
                            layer(inputs[width])

                    one_pass()  # warm up (oneDNN picks its kernels on the first call)
                    for _ in range(3):
                        reps, started = 0, time.perf_counter()
                        while time.perf_counter() - started < seconds / 3:
                            one_pass()
                            reps += 1
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        best = max(best, reps * flops / (time.perf_counter() - started))
            torch.set_num_threads(default_threads)
            peaks[m] = best / 1e9
    return peaks


def stream_once(stub, prompt: str, new_tokens: int, timeout: float = 300) -> tuple[int, float, set[str], float]:
    """One streaming request: (tokens, ttft seconds, versions seen, when the first message came)."""
    request = policy_pb2.GenerateRequest(
        prompt=prompt, parameters=policy_pb2.GenerationParameters(max_new_tokens=new_tokens, temperature=0.0)
    )
    t0 = time.perf_counter()
    first, first_wall, count, versions = None, 0.0, 0, set()
    for message in stub.GenerateStream(request, metadata=bearer(BENCH_TOKEN), timeout=timeout):
        if first is None:
            first, first_wall = time.perf_counter() - t0, time.time()
        count += 1
        versions.add(message.model_version)
    return count, first or 0.0, versions, first_wall


def closed_loop(target: str, clients: int, rounds: int, new_tokens: int, fresh: bool = False) -> dict:
    """`clients` threads, each sending `rounds` requests back to back, from the fixed prompt set;
    `fresh`: each prompt made new (a request tag appended), so that no prefill can be shared or
    served from the server's prompt cache."""
    tokens, ttfts, failures = [0] * clients, [], []
    lock = threading.Lock()
    run = uuid.uuid4().hex[:6]

    def prompt(i: int, r: int) -> str:
        text = PROMPTS[(i + r) % len(PROMPTS)]
        return f"{text} (Request {run}-{i}-{r}.)" if fresh else text

    def client(i: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            for r in range(rounds):
                try:
                    n, ttft, _, _ = stream_once(stub, prompt(i, r), new_tokens)
                except grpc.RpcError as err:
                    with lock:
                        failures.append(f"{err.code().name}: {err.details()}")
                    continue
                with lock:
                    tokens[i] += n
                    ttfts.append(ttft)

    wall = run_threads(clients, client)
    return {
        "clients": clients,
        "requests": clients * rounds,
        "tokens": sum(tokens),
        "wall_s": wall,
        "tok_s": sum(tokens) / wall,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "failed": len(failures),
    }


def prefill_counts(http_port: int) -> dict[str, float]:
    """The server's joining prompts so far by how their prefill was had (rlhf_prefill_prompts_total:
    computed, deduplicated, cached), from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "rlhf_prefill_prompts":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    how = sample.labels["how"]
                    counts[how] = counts.get(how, 0.0) + sample.value
    return counts


def measured_loop(target: str, http_port: int, clients: int, rounds: int, new_tokens: int, fresh: bool = False):
    """`closed_loop`, with how the server had its prompts' prefills during it."""
    before = prefill_counts(http_port)
    r = closed_loop(target, clients, rounds, new_tokens, fresh)
    after = prefill_counts(http_port)
    r["prefill_prompts"] = {how: int(after[how] - before.get(how, 0.0)) for how in after}
    r["prompts"] = "each new" if fresh else "fixed set"
    return r


def swap_under_load(settings, target: str, store: CheckpointStore, source: Path, streams: int, new_tokens: int) -> dict:
    """Promote a new checkpoint while `streams` clients stream; measure swap latency and failures."""
    new = store.import_dir(source, "sft", parents=[store.promoted("policy") or ""]).version
    stop = threading.Event()
    seen_new: list[float] = []
    failures: list[str] = []
    counts = {"requests": 0}
    lock = threading.Lock()

    def client(i: int) -> None:
        with grpc.insecure_channel(target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            r = 0
            while not stop.is_set():
                try:
                    _, _, versions, first_wall = stream_once(stub, PROMPTS[(i + r) % len(PROMPTS)], new_tokens)
                except grpc.RpcError as err:
                    with lock:
                        failures.append(f"{err.code().name}: {err.details()}")
                    continue
                finally:
                    r += 1
                with lock:
                    counts["requests"] += 1
                    if new in versions:
                        seen_new.append(first_wall)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    time.sleep(3.0)  # let the load settle before announcing
    event = promote_checkpoint(settings, new, reason="bench.serving swap")
    announced = event.created_unix_ms / 1000.0
    deadline = time.monotonic() + 60
    while not seen_new and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2.0)  # keep the load on a little after the swap
    stop.set()
    for t in threads:
        t.join(timeout=300)
    latency = (min(seen_new) - announced) if seen_new else float("nan")
    return {
        "streams": streams,
        "new_version": new,
        "swap_latency_s": latency,
        "requests": counts["requests"],
        "failed": len(failures),
        "failures": failures[:5],
    }


def llama_cpp_reference(prompts: list[str], new_tokens: int) -> dict | None:
    """llama.cpp on the same GGUF, one request at a time, in a child process: a
    crash inside llama.cpp (its AMX kernels segfault on some Xeons, ggml-org/llama.cpp#20824)
    is reported, not fatal to the rest of the bench. None if llama_cpp is not installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    spec = json.dumps({"prompts": prompts, "new_tokens": new_tokens})
    run = subprocess.run(
        [sys.executable, "-m", "bench.serving", "--llama-cpp-child", spec], capture_output=True, text=True
    )
    if run.returncode != 0:
        why = f"signal {-run.returncode}" if run.returncode < 0 else f"exit status {run.returncode}"
        print(f"llama.cpp reference failed ({why}): {run.stderr.strip()[-500:]}", flush=True)
        return {"failed": why}
    return json.loads(run.stdout.strip().splitlines()[-1])


def _llama_cpp_child(spec: str) -> None:
    from llama_cpp import Llama

    args = json.loads(spec)
    llm = Llama(model_path=str(gguf_dir() / GGUF_FILE), n_ctx=1024, verbose=False)
    tokens = 0
    started = time.perf_counter()
    for prompt in args["prompts"]:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], max_tokens=args["new_tokens"], temperature=0.0
        )
        tokens += out["usage"]["completion_tokens"]
    wall = time.perf_counter() - started
    print(json.dumps({"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}), flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: fewer tokens and rounds")
    parser.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="weights dtype of the served model (auto, the shipped default: bf16 only with native bf16)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="where the baseline and the server run"
    )
    parser.add_argument("--llama-cpp-child", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.llama_cpp_child:
        _llama_cpp_child(args.llama_cpp_child)
        return 0
    new_tokens = 16 if args.quick else 64
    rounds = 1 if args.quick else 2
    baseline_prompts = PROMPTS[:2] if args.quick else PROMPTS
    levels = (1, 16, 32) if args.quick else CONCURRENCY
    serve_dtype, dtype_reason = resolve_dtype(args.dtype, args.device)
    dtype_name = str(serve_dtype).removeprefix("torch.")
    capability = cpu_capability() if args.device == "cpu" else torch.cuda.get_device_name(0)
    print(f"serving dtype {dtype_name} ({dtype_reason}); CPU capability {cpu_capability()}", flush=True)

    base_settings = load_settings()
    preset_dir = ensure_preset("base", base_settings.model_cache)
    home = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    broker_port, grpc_port, http_port = free_port(), free_port(), free_port()
    env_values = {
        "RLHF_HOME": str(home),
        "RLHF_MODEL": "base",
        "RLHF_MODEL_CACHE": str(base_settings.model_cache),
        "RLHF_KAFKA_BOOTSTRAP": f"127.0.0.1:{broker_port}",
        "RLHF_TOPIC_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
        "RLHF_TOPIC_PARTITIONS": "1",
        "RLHF_POLICY_PORT": str(grpc_port),
        "RLHF_HTTP_PORT": str(http_port),
        "RLHF_MAX_BATCH": "32",
        "RLHF_MAX_QUEUE": "64",
        "RLHF_SERVE_DTYPE": args.dtype,
        "RLHF_DEVICE": args.device,
        "RLHF_LOG_LEVEL": "WARNING",
        "RLHF_TOKENS": f"{BENCH_TOKEN}=bench:user:nolog",  # the bench's prompts are not training data
    }
    settings = load_settings(env_values)
    broker = start_broker(broker_port, log_path=home / "tansu.log")
    server = None
    sampler = None
    try:
        create_topics(settings, ["checkpoints"])
        store = CheckpointStore(settings.checkpoint_dir)
        ensure_seeded(settings, store)  # here, so the server's RSS holds only what serving needs
        env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")} | env_values
        log = open(home / "policy.log", "wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "services.policy"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        sampler = RssSampler(server.pid)
        target = f"127.0.0.1:{grpc_port}"
        try:
            wait_for_serving(target, timeout=300, while_alive=server)
        except (TimeoutError, RuntimeError):
            log.flush()
            print((home / "policy.log").read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        print(
            f"policy service up (pid {server.pid}, dtype {dtype_name}); RSS {sampler.take_peak() / GB:.2f} GB",
            flush=True,
        )

        base_before = baseline(preset_dir, baseline_prompts, new_tokens, args.device)
        config = AutoConfig.from_pretrained(preset_dir)
        params = base_before["params"]
        peak_seconds = 0.6 if args.quick else 2.0
        peaks_before = matmul_peak(config, serve_dtype, levels, args.device, seconds=peak_seconds)
        with grpc.insecure_channel(target) as channel:  # warm the server's code paths
            stream_once(policy_pb2_grpc.PolicyServiceStub(channel), PROMPTS[0], 4)
        sampler.take_peak()

        results = []
        for clients in tqdm(levels, desc="concurrency levels", leave=False):
            r = measured_loop(target, http_port, clients, rounds, new_tokens)
            r["peak_rss_gb"] = sampler.take_peak() / GB
            results.append(r)
        # The fixed set's 8 prompts come back (the server's prompt cache serves their prefills after the
        # first time); the same 32-stream load with every prompt new shows the cost of computing them all.
        fresh = None
        if 32 in levels:
            fresh = measured_loop(target, http_port, 32, rounds, new_tokens, fresh=True)
            fresh["peak_rss_gb"] = sampler.take_peak() / GB
        base_after = baseline(preset_dir, baseline_prompts, new_tokens, args.device)
        peaks_after = matmul_peak(config, serve_dtype, levels, args.device, seconds=peak_seconds)
        # Like the baseline, the better of two measurements counts: a higher peak is the conservative MFU.
        peaks = {m: max(peaks_before[m], peaks_after[m]) for m in levels}
        print_table(
            f"Matmul throughput at the model's shapes ({dtype_name}, {capability})",
            [{"rows": m, "gflop_s_before": peaks_before[m], "gflop_s_after": peaks_after[m]} for m in levels],
        )
        measured = results + ([fresh] if fresh else [])
        for r in measured:
            r["mfu"] = r["tok_s"] * 2 * params / (peaks[r["clients"]] * 1e9)
        if any(r["mfu"] > 1 for r in measured):
            print(
                "warning: MFU above 100%: the matmul peak was measured while the machine was busy "
                "(on a shared CPU, 2 OpenMP threads can run ~8x slower than 1); rerun on a quiet machine",
                flush=True,
            )
        base = max(base_before, base_after, key=lambda b: b["tok_s"])
        rows = [
            {
                "setup": f"HF generate fp32, 1 at a time (baseline, {name})",
                "clients": 1,
                "requests": len(baseline_prompts),
                "tokens": b["tokens"],
                "tok_s": b["tok_s"],
                "x_baseline": b["tok_s"] / base["tok_s"],
                "ttft_p50_ms": b["ttft_p50_ms"],
                "ttft_p99_ms": b["ttft_p99_ms"],
                "failed": 0,
                "peak_rss_gb": "",
            }
            for name, b in (("before", base_before), ("after", base_after))
        ]
        for r in measured:
            rows.append(
                {
                    "setup": f"PolicyService gRPC ({dtype_name}), prompts: {r['prompts']}",
                    "clients": r["clients"],
                    "requests": r["requests"],
                    "tokens": r["tokens"],
                    "tok_s": r["tok_s"],
                    "x_baseline": r["tok_s"] / base["tok_s"],
                    "ttft_p50_ms": r["ttft_p50_ms"],
                    "ttft_p99_ms": r["ttft_p99_ms"],
                    "failed": r["failed"],
                    "peak_rss_gb": r["peak_rss_gb"],
                    "matmul_gflop_s": peaks[r["clients"]],
                    "mfu": r["mfu"],
                    "prefills computed/dedup/cached": "/".join(
                        str(r["prefill_prompts"].get(how, 0)) for how in ("computed", "deduplicated", "cached")
                    ),
                }
            )
        llama = llama_cpp_reference(baseline_prompts, new_tokens)
        measured_llama = llama if llama and "failed" not in llama else None
        if measured_llama:
            rows.append(
                {
                    "setup": "llama.cpp (same GGUF), 1 at a time",
                    "clients": 1,
                    "tokens": measured_llama["tokens"],
                    "tok_s": measured_llama["tok_s"],
                    "x_baseline": measured_llama["tok_s"] / base["tok_s"],
                }
            )
        print_table(f"Serving throughput, {new_tokens} new tokens per request (aggregate generated tokens/s)", rows)
        if not llama:
            print("llama.cpp reference: skipped (llama_cpp is not installed)")

        swap = swap_under_load(settings, target, store, preset_dir, streams=8, new_tokens=new_tokens)
        swap_rss = sampler.take_peak() / GB
        print_table(
            "Hot swap under load (8 streams)",
            [
                {
                    "swap_latency_s": swap["swap_latency_s"],
                    "requests": swap["requests"],
                    "failed": swap["failed"],
                    "new_version": swap["new_version"],
                    "peak_rss_gb": swap_rss,
                }
            ],
        )
        if swap["failures"]:
            print("failures:", swap["failures"])

        by_clients = {r["clients"]: r for r in results}

        def at(clients: int, test):
            """A check on one concurrency level; None when this run did not measure it."""
            return test(by_clients[clients]) if clients in by_clients else None

        if 32 in by_clients:
            r32 = by_clients[32]
            print(f"TTFT at 32 clients: p50 {r32['ttft_p50_ms']:.0f} ms, p99 {r32['ttft_p99_ms']:.0f} ms", flush=True)
        checks = {
            "1 stream >= 1.0x HF generate": at(1, lambda r: r["tok_s"] >= base["tok_s"]),
            "16 streams >= 8x HF generate": at(16, lambda r: r["tok_s"] >= 8 * base["tok_s"]),
            "32 streams >= 40% MFU": at(32, lambda r: r["mfu"] >= 0.40),
            "TTFT p99 at 32 clients <= 1 s": at(32, lambda r: r["ttft_p99_ms"] <= 1000),
            "peak RSS at 32 streams <= 2.5 GB": at(32, lambda r: r["peak_rss_gb"] <= 2.5),
            "16 streams >= 2x llama.cpp single stream": (
                at(16, lambda r: r["tok_s"] >= 2 * measured_llama["tok_s"]) if measured_llama else None
            ),
            "swap: no failed requests": swap["failed"] == 0,
            "swap: new version within 15 s": swap["swap_latency_s"] <= 15,
        }
        for name, ok in checks.items():
            print(f"  [{'n/a' if ok is None else 'PASS' if ok else 'FAIL'}] {name}")
        name = (
            "serving"
            + ("" if args.dtype == "auto" else f"-{args.dtype}")
            + ("" if args.device == "cpu" else f"-{args.device}")
        )
        write_results(
            name,
            {
                "quick": args.quick,
                "dtype": args.dtype,
                "serving_dtype": dtype_name,
                "dtype_reason": dtype_reason,
                "cpu_capability": cpu_capability(),
                "cpu_count": os.cpu_count(),
                "params": params,
                "matmul_gflop_s": peaks,
                "matmul_gflop_s_runs": [peaks_before, peaks_after],
                "device": args.device,
                "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                "new_tokens": new_tokens,
                "baseline": base,
                "baseline_runs": [base_before, base_after],
                "levels": results,
                "fresh_prompts_32": fresh,
                "llama_cpp": llama,
                "swap": {**swap, "peak_rss_gb": swap_rss},
                "checks": checks,
                "rows": report_rows(dtype_name, base, results, swap, fresh),
            },
        )
        return 0
    finally:
        if sampler:
            sampler.stop()
        if server is not None:
            server.terminate()
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
        stop_process(broker)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
