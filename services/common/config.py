"""The platform's configuration: every setting, its environment variable, its
default and its check, in one place.

Services and trainers call `load_settings()` once at start. A bad value stops
start-up with a `ConfigError` that names the variable and the rule it broke;
`exit_on_config_error` turns that into a one-line message and exit status 2.

The README's config table is generated from `FIELDS` (`python -m
services.common.config --markdown`), so the documentation cannot drift.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(name: str, raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        if lo is not None and value < lo:
            raise ConfigError(f"{name}={value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{name}={value} is above the maximum {hi}")
        return value

    return parse


def _float(lo: float | None = None, hi: float | None = None) -> Callable[[str, str], float]:
    def parse(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a number") from None
        if lo is not None and value < lo:
            raise ConfigError(f"{name}={value} is below the minimum {lo}")
        if hi is not None and value > hi:
            raise ConfigError(f"{name}={value} is above the maximum {hi}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in options:
            raise ConfigError(f"{name}={raw!r} is not one of {', '.join(options)}")
        return raw

    return parse


def _str(name: str, raw: str) -> str:
    return raw


def _nonempty(name: str, raw: str) -> str:
    if not raw.strip():
        raise ConfigError(f"{name} must not be empty")
    return raw


def _bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (use true/false)")


def _json_object(name: str, raw: str) -> dict:
    import json

    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name}: not valid JSON ({err.msg} at position {err.pos})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object")
    return value


def _json_array(name: str, raw: str) -> tuple:
    import json

    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{name}: not valid JSON ({err.msg} at position {err.pos})") from None
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise ConfigError(f"{name} must be a JSON list of objects")
    return tuple(value)


def _string_map(name: str, raw: str) -> dict:
    value = _json_object(name, raw)
    if not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{name} must be a JSON object whose values are strings")
    return value


def _k8s_quantity(name: str, raw: str) -> str:
    # Kubernetes resource quantity: 2, 500m, 8Gi, 1.5, 1e3 ...
    import re

    if not re.fullmatch(r"([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?", raw):
        raise ConfigError(f"{name}={raw!r} is not a Kubernetes quantity (e.g. 2, 500m, 8Gi)")
    return raw


def _optional_dns_label(name: str, raw: str) -> str:
    return _dns_label(name, raw) if raw else ""


def _dns_label(name: str, raw: str) -> str:
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", raw):
        raise ConfigError(
            f"{name}={raw!r} must be a DNS label: lowercase letters, digits and '-', at most 63 characters"
        )
    return raw


def _port(name: str, raw: str) -> int:
    return _int(0, 65535)(name, raw)


def _labeling_k(name: str, raw: str) -> int:
    from services.common.feedback import LABELING_MIN_K, MAX_K

    return _int(LABELING_MIN_K, MAX_K)(name, raw)


def _shares(keys: tuple[str, ...] | None) -> Callable[[str, str], dict]:
    """`key=weight,...` -> {key: weight}; weights >= 0 with a positive sum; `keys` (if given) are the only ones."""

    def parse(name: str, raw: str) -> dict:
        out: dict[str, float] = {}
        if raw.lstrip().startswith("{"):  # the JSON form `to_env` writes
            raw = ",".join(f"{k}={v}" for k, v in _json_object(name, raw).items())
        for entry in filter(None, (p.strip() for p in raw.split(","))):
            key, sep, weight = entry.rpartition("=")
            if not sep or not key:
                raise ConfigError(f"{name}: entry {entry!r} must look like key=weight")
            if keys is not None and key not in keys:
                raise ConfigError(f"{name}: {key!r} is not one of {', '.join(keys)}")
            out[key] = _float(0)(name, weight)
        if out and sum(out.values()) <= 0:
            raise ConfigError(f"{name}: the weights must not all be 0")
        return out

    return parse


def _bootstrap(name: str, raw: str) -> str:
    for part in raw.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}={raw!r}: each entry must be host:port")
    return raw


def _setting(env: str, default: str, parse: Callable[[str, str], Any], doc: str) -> Any:
    return field(default=None, metadata={"env": env, "default": default, "parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    """Every setting of the platform. Build it with `load_settings()`."""

    # --- state and models --------------------------------------------------
    home: Path = _setting(
        "RLHF_HOME", "./var", _nonempty, "Root for local state: checkpoints, datasets, logs, pid files."
    )
    checkpoint_dir: Path = _setting(
        "RLHF_CHECKPOINT_DIR", "", _str, "Checkpoint store (default: $RLHF_HOME/checkpoints)."
    )
    dataset_dir: Path = _setting("RLHF_DATASET_DIR", "", _str, "Dataset snapshots (default: $RLHF_HOME/datasets).")
    model: str = _setting(
        "RLHF_MODEL",
        "base",
        _choice("base", "tiny"),
        "Model preset: `base` (SmolLM2-135M-Instruct) or `tiny` (random init, for tests).",
    )
    model_cache: Path = _setting(
        "RLHF_MODEL_CACHE",
        "~/.cache/rlhf-platform",
        _nonempty,
        "Where converted presets (safetensors + tokenizer) are cached.",
    )
    device: str = _setting(
        "RLHF_DEVICE", "cpu", _choice("cpu", "cuda", "auto"), "Torch device for serving and training."
    )
    torch_threads: int = _setting(
        "RLHF_TORCH_THREADS", "0", _int(0, 1024), "Torch intra-op threads (0 = torch default)."
    )

    # --- Kafka ---------------------------------------------------------------
    kafka_bootstrap: str = _setting(
        "RLHF_KAFKA_BOOTSTRAP", "127.0.0.1:9092", _bootstrap, "Kafka bootstrap servers, host:port[,host:port]."
    )
    topic_prefix: str = _setting(
        "RLHF_TOPIC_PREFIX", "rlhf", _nonempty, "Prefix of every topic name (`<prefix>.prompts.v1`, ...)."
    )
    topic_partitions: int = _setting(
        "RLHF_TOPIC_PARTITIONS", "3", _int(1, 1024), "Partitions per topic when the platform creates them."
    )
    topic_replication: int = _setting(
        "RLHF_TOPIC_REPLICATION", "1", _int(1, 16), "Replication factor when the platform creates topics."
    )
    topic_min_insync_replicas: int = _setting(
        "RLHF_TOPIC_MIN_INSYNC_REPLICAS",
        "1",
        _int(1, 16),
        "min.insync.replicas of the topics the platform creates: an acks=all write is on this many brokers"
        " (at most RLHF_TOPIC_REPLICATION; 2 with replication 3 in k8s/).",
    )
    kafka_timeout_s: float = _setting(
        "RLHF_KAFKA_TIMEOUT_S", "5", _float(0.1, 600), "How long a write may wait for the broker's acknowledgement."
    )
    broker_storage: str = _setting(
        "RLHF_BROKER_STORAGE",
        "s3",
        _choice("s3", "memory"),
        "Storage of the embedded broker (`make up`): `s3` keeps records and offsets under $RLHF_HOME/broker"
        " through a local S3 server (about 25 ms per lone acknowledged write); `memory` is fast but a restart"
        " loses everything.",
    )
    broker_fsync: bool = _setting(
        "RLHF_BROKER_FSYNC",
        "false",
        _bool,
        "Storage `s3`: fsync every object the broker writes before acknowledging it (survives power loss;"
        " about 10 ms more per write on a common disk). Off, like Apache Kafka's default: acknowledged writes"
        " survive a crash of the broker or the store, and the kernel writes them out within seconds.",
    )
    broker_s3_port: int = _setting(
        "RLHF_BROKER_S3_PORT", "9094", _port, "Loopback port of the embedded broker's S3 server (storage `s3`)."
    )

    # --- network -------------------------------------------------------------
    bind_host: str = _setting(
        "RLHF_BIND_HOST", "127.0.0.1", _nonempty, "Address the servers listen on (0.0.0.0 in a cluster)."
    )
    policy_port: int = _setting("RLHF_POLICY_PORT", "50051", _port, "PolicyService gRPC port.")
    reward_port: int = _setting("RLHF_REWARD_PORT", "50052", _port, "RewardService gRPC port.")
    feedback_port: int = _setting("RLHF_FEEDBACK_PORT", "50053", _port, "FeedbackService gRPC port.")
    http_port: int = _setting(
        "RLHF_HTTP_PORT", "8080", _port, "HTTP port of the policy service (TGI- and OpenAI-compatible routes)."
    )
    playground_port: int = _setting("RLHF_PLAYGROUND_PORT", "8000", _port, "Playground web UI port.")
    metrics_port: int = _setting(
        "RLHF_METRICS_PORT",
        "0",
        _port,
        "Prometheus /metrics port for this process (0 = off; the policy service also serves it on its HTTP port).",
    )
    policy_target: str = _setting(
        "RLHF_POLICY_TARGET", "127.0.0.1:50051", _nonempty, "Where clients reach the PolicyService."
    )
    reward_target: str = _setting(
        "RLHF_REWARD_TARGET", "127.0.0.1:50052", _nonempty, "Where clients reach the RewardService."
    )
    feedback_target: str = _setting(
        "RLHF_FEEDBACK_TARGET", "127.0.0.1:50053", _nonempty, "Where clients reach the FeedbackService."
    )

    # --- gRPC servers --------------------------------------------------------
    grpc_max_message_bytes: int = _setting(
        "RLHF_GRPC_MAX_MESSAGE_BYTES", "16777216", _int(1024, 1 << 30), "Largest gRPC message accepted or sent."
    )
    grpc_workers: int = _setting(
        "RLHF_GRPC_WORKERS",
        "64",
        _int(1, 4096),
        "Threads handling gRPC calls per thread-pool server (reward, labeling, controller;"
        " the feedback and policy services are asynchronous).",
    )
    grpc_grace_s: float = _setting(
        "RLHF_GRPC_GRACE_S", "10", _float(0, 600), "On SIGTERM: how long in-flight calls may drain."
    )

    # --- auth ----------------------------------------------------------------
    tokens_file: str = _setting("RLHF_TOKENS_FILE", "", _str, "JSON file mapping bearer tokens to {user_id, role}.")
    tokens: str = _setting(
        "RLHF_TOKENS",
        "",
        _str,
        "Inline tokens, `token=user_id:role[:log|:nolog],...` (role: user, labeler, admin; "
        "`:nolog`/`:log` override whether the token's prompts are logged as training data).",
    )
    anonymous_generate: bool = _setting(
        "RLHF_ANONYMOUS_GENERATE",
        "false",
        _bool,
        "Let callers without a token generate (policy gRPC and HTTP APIs); their prompts are not logged.",
    )

    # --- serving -------------------------------------------------------------
    max_batch: int = _setting("RLHF_MAX_BATCH", "16", _int(1, 1024), "Most sequences decoded together in one step.")
    max_queue: int = _setting(
        "RLHF_MAX_QUEUE", "64", _int(1, 100000), "Waiting requests before RESOURCE_EXHAUSTED / HTTP 429."
    )
    max_prompt_tokens: int = _setting(
        "RLHF_MAX_PROMPT_TOKENS", "512", _int(1, 1 << 20), "Longest prompt accepted, in tokens."
    )
    max_new_tokens_limit: int = _setting(
        "RLHF_MAX_NEW_TOKENS_LIMIT", "512", _int(1, 1 << 20), "Largest max_new_tokens a request may ask for."
    )
    default_max_new_tokens: int = _setting(
        "RLHF_DEFAULT_MAX_NEW_TOKENS", "64", _int(1, 1 << 20), "max_new_tokens when a request leaves it unset."
    )
    max_samples: int = _setting("RLHF_MAX_SAMPLES", "16", _int(1, 64), "Largest num_samples (K) per request.")
    kv_budget_tokens: int = _setting(
        "RLHF_KV_BUDGET_TOKENS",
        "24576",
        _int(64, 1 << 24),
        "Total tokens (prompt + generated) the running batch may hold in its KV cache.",
    )
    max_prefill_tokens: int = _setting(
        "RLHF_MAX_PREFILL_TOKENS",
        "4096",
        _int(1, 1 << 24),
        "Most prompt tokens (padding included) prefilled in one engine step; later requests join at the next "
        "step, so a burst of long prompts never stalls the decoding rows for long (one longer prompt goes alone).",
    )
    prefill_shared_prefix: int = _setting(
        "RLHF_PREFILL_SHARED_PREFIX",
        "8",
        _int(0, 1 << 20),
        "Prompts prefilled together that start with at least this many identical tokens (a chat template's "
        "system turn) compute that prefix once, not once per prompt, and later prefills that start with it "
        "reuse it; 0 = off.",
    )
    prompt_cache_tokens: int = _setting(
        "RLHF_PROMPT_CACHE_TOKENS",
        "4096",
        _int(0, 1 << 24),
        "Prefilled prompts kept for reuse, in KV columns (about 23 KB each for the bf16 base model): a prompt "
        "that comes back exactly (a retry, best-of-n over requests, shared templates) joins from its kept "
        "keys/values without a prefill; least recently used first out; each model version keeps its own; "
        "0 = off.",
    )
    fused_decode: bool = _setting(
        "RLHF_FUSED_DECODE",
        "true",
        _bool,
        "Decode steps of Llama-architecture models run the layers by hand with fused q/k/v and gate/up weights "
        "(services/policy/fused.py) instead of transformers' modules; false = transformers' forward.",
    )
    native_kernels: bool = _setting(
        "RLHF_NATIVE_KERNELS",
        "true",
        _bool,
        "The fused decode step's norms, rotary, SiLU and attention run as C loops (services/policy/kernels.c) "
        "built once per machine with the system C compiler ($CC or cc) and cached in RLHF_KERNEL_CACHE, and in bf16 "
        "its linear layers too (AMX tiles; without AMX, AVX512-BF16 up to 8 rows); torch ops and oneDNN's matmul "
        "where there is no compiler, the build fails or its check does (logged). false = always torch ops.",
    )
    kernel_cache: Path = _setting(
        "RLHF_KERNEL_CACHE",
        "",
        _str,
        "Where native kernels are built and cached (writable; keyed by source, flags, compiler and CPU). "
        "Empty = $XDG_CACHE_HOME/rlhf-platform/kernels, else ~/.cache/rlhf-platform/kernels.",
    )
    tgi_url: str = _setting(
        "RLHF_TGI_URL",
        "",
        _str,
        "When set, the policy generates through this TGI server instead of local transformers.",
    )
    tgi_token: str = _setting(
        "RLHF_TGI_TOKEN",
        "",
        _str,
        "Bearer token the policy sends to RLHF_TGI_URL (for an upstream that checks tokens; empty = none).",
    )
    prompt_log: bool = _setting(
        "RLHF_PROMPT_LOG",
        "true",
        _bool,
        "The policy logs every prompt it serves to the prompts topic as training data (tokens may opt out).",
    )
    prompt_log_buffer: int = _setting(
        "RLHF_PROMPT_LOG_BUFFER",
        "10000",
        _int(1, 10_000_000),
        "Prompts the policy holds for the broker while it is away; beyond that they are dropped and counted.",
    )
    serve_version: str = _setting(
        "RLHF_SERVE_VERSION", "", _str, "Pin serving to this checkpoint version at start (empty = latest promoted)."
    )
    reward_batch: int = _setting("RLHF_REWARD_BATCH", "16", _int(1, 4096), "Responses scored in one forward pass.")
    # --- serving (added by the serving team) ---------------------------------
    serve_dtype: str = _setting(
        "RLHF_SERVE_DTYPE",
        "auto",
        _choice("auto", "float32", "bfloat16"),
        "Weights dtype of the served policy and reward models; auto = bfloat16 on a GPU or a CPU with native "
        "bf16 (AVX512-BF16/AMX), else float32 (services/common/dtypes.py).",
    )
    reward_max_responses: int = _setting(
        "RLHF_REWARD_MAX_RESPONSES", "64", _int(1, 4096), "Most responses one Score request may carry."
    )

    # --- trainer controller ----------------------------------------------------
    controller_port: int = _setting(
        "RLHF_CONTROLLER_PORT", "50054", _port, "Trainer controller gRPC port (health only)."
    )
    executor: str = _setting(
        "RLHF_EXECUTOR",
        "local",
        _choice("local", "kubernetes"),
        "Where trainer jobs run: local subprocesses or Kubernetes Jobs.",
    )
    trainer_preset: str = _setting(
        "RLHF_TRAINER_PRESET",
        "cpu",
        _choice("tiny", "cpu", "gpu"),
        "Hyperparameter preset passed to every trainer job.",
    )
    trainer_overrides: str = _setting(
        "RLHF_TRAINER_OVERRIDES",
        "{}",
        _json_object,
        'Per-trainer `--set` overrides as JSON, e.g. {"ppo": {"total_steps": 4}}.',
    )
    controller_interval_s: float = _setting(
        "RLHF_CONTROLLER_INTERVAL_S", "60", _float(1, 86400), "How often the controller checks how the datasets grew."
    )
    controller_schedule_s: float = _setting(
        "RLHF_CONTROLLER_SCHEDULE_S",
        "0",
        _float(0, 604800),
        "Also start a round on this schedule when any new data arrived (0 = growth triggers only).",
    )
    min_new_demonstrations: int = _setting(
        "RLHF_MIN_NEW_DEMONSTRATIONS", "50", _int(1, 10**9), "New demonstrations that trigger an SFT round."
    )
    min_new_comparisons: int = _setting(
        "RLHF_MIN_NEW_COMPARISONS", "50", _int(1, 10**9), "New comparisons that trigger an RM + PPO round."
    )
    job_retries: int = _setting(
        "RLHF_JOB_RETRIES", "2", _int(0, 100), "Times a failed trainer job is retried (it resumes from its run folder)."
    )
    job_timeout_s: float = _setting(
        "RLHF_JOB_TIMEOUT_S",
        "7200",
        _float(1, 604800),
        "A trainer job running longer than this is stopped and counted as failed.",
    )
    gate_min_reward_gain: float = _setting(
        "RLHF_GATE_MIN_REWARD_GAIN",
        "0.0",
        _float(-1e9, 1e9),
        "Promote a PPO policy only if its held-out RM score beats the serving policy's by more than this.",
    )
    gate_max_kl: float = _setting(
        "RLHF_GATE_MAX_KL",
        "20.0",
        _float(0, 1e9),
        "...and only if its KL to SFT (nats per response) stays within this budget.",
    )
    gate_confidence: float = _setting(
        "RLHF_GATE_CONFIDENCE",
        "0.9",
        _float(0.5, 0.9999),
        "Confidence of the policy gate's one-sided paired test: the gain's lower bound must beat the minimum gain.",
    )
    gate_rm_tolerance: float = _setting(
        "RLHF_GATE_RM_TOLERANCE",
        "0.02",
        _float(0, 1),
        "A new RM is promoted if its held-out pair accuracy is at least the serving RM's minus this.",
    )
    ppo_init: str = _setting(
        "RLHF_PPO_INIT",
        "sft",
        _choice("sft", "best"),
        "Where each round's PPO starts: the SFT policy (as in InstructGPT) or the best policy promoted so far.",
    )

    # --- feedback ingestion and the dataset builder (owner: feedback) ----------
    feedback_max_text_bytes: int = _setting(
        "RLHF_FEEDBACK_MAX_TEXT_BYTES",
        "32768",
        _int(1, 1 << 24),
        "Largest prompt, message or response text the FeedbackService accepts, in UTF-8 bytes.",
    )
    feedback_max_metadata_bytes: int = _setting(
        "RLHF_FEEDBACK_MAX_METADATA_BYTES",
        "4096",
        _int(0, 1 << 20),
        "Largest prompt metadata map (keys + values), in UTF-8 bytes.",
    )
    feedback_idempotency_entries: int = _setting(
        "RLHF_FEEDBACK_IDEMPOTENCY_ENTRIES",
        "100000",
        _int(1, 10**8),
        "Request ids each FeedbackService replica remembers, so a retry returns the first reply.",
    )
    feedback_producer: str = _setting(
        "RLHF_FEEDBACK_PRODUCER",
        "librdkafka",
        _choice("librdkafka", "kafka-python"),
        "Kafka client of the FeedbackService's write path: `librdkafka` (confluent-kafka, fast) or `kafka-python`.",
    )
    feedback_max_calls: int = _setting(
        "RLHF_FEEDBACK_MAX_CALLS",
        "4096",
        _int(1, 1 << 20),
        "Feedback calls the FeedbackService handles at once (a BulkSubmit stream counts as one);"
        " more get RESOURCE_EXHAUSTED. Health checks are not counted.",
    )
    feedback_bulk_window: int = _setting(
        "RLHF_FEEDBACK_BULK_WINDOW",
        "1024",
        _int(1, 1 << 20),
        "BulkSubmit items awaiting the broker's acknowledgement at once, per stream.",
    )
    dataset_group: str = _setting(
        "RLHF_DATASET_GROUP",
        "dataset-builder",
        _nonempty,
        "Consumer group of `python -m services.datasets build` (offsets committed after each snapshot).",
    )
    dataset_max_prompts_per_user: int = _setting(
        "RLHF_DATASET_MAX_PROMPTS_PER_USER",
        "200",
        _int(1, 10**9),
        "Prompts kept per user ID in a snapshot (InstructGPT: 200).",
    )
    dataset_dedup_prefix_chars: int = _setting(
        "RLHF_DATASET_DEDUP_PREFIX_CHARS",
        "100",
        _int(8, 1 << 20),
        "Prompts whose normalised text shares this many leading characters count as duplicates.",
    )
    dataset_validation_fraction: float = _setting(
        "RLHF_DATASET_VALIDATION_FRACTION",
        "0.1",
        _float(0, 0.45),
        "Share of user IDs (by hash) whose data goes to the validation split.",
    )
    dataset_test_fraction: float = _setting(
        "RLHF_DATASET_TEST_FRACTION",
        "0.1",
        _float(0, 0.45),
        "Share of user IDs (by hash) whose data goes to the test split.",
    )

    # --- labeling service (services/labeling) ------------------------------------
    labeling_port: int = _setting("RLHF_LABELING_PORT", "50055", _port, "LabelingService gRPC port.")
    labeling_target: str = _setting(
        "RLHF_LABELING_TARGET", "127.0.0.1:50055", _nonempty, "Where clients reach the LabelingService."
    )
    labeling_token: str = _setting(
        "RLHF_LABELING_TOKEN",
        "",
        _str,
        "Bearer token the LabelingService presents to the PolicyService (empty: the labeler's own token).",
    )
    labeling_lease_s: float = _setting(
        "RLHF_LABELING_LEASE_S", "1800", _float(1, 7 * 86400), "How long a labeler holds a task before it is requeued."
    )
    labeling_k: int = _setting(
        "RLHF_LABELING_K", "4", _labeling_k, "Samples per comparison task (InstructGPT: K = 4..9)."
    )
    labeling_demonstration_share: float = _setting(
        "RLHF_LABELING_DEMONSTRATION_SHARE", "0.25", _float(0, 1), "Share of new tasks that ask for a demonstration."
    )
    labeling_overlap_share: float = _setting(
        "RLHF_LABELING_OVERLAP_SHARE",
        "0.1",
        _float(0, 1),
        "Share of tasks given to RLHF_LABELING_OVERLAP_LABELERS labelers, to measure agreement.",
    )
    labeling_overlap_labelers: int = _setting(
        "RLHF_LABELING_OVERLAP_LABELERS", "2", _int(2, 16), "Labelers per overlapping task."
    )
    labeling_split_shares: dict = _setting(
        "RLHF_LABELING_SPLIT_SHARES",
        "train=0.8,validation=0.1,test=0.1",
        _shares(("train", "validation", "test")),
        "Target share of tasks per split (by the prompt author's split), so held-out users get labels too.",
    )
    labeling_policy_targets: dict = _setting(
        "RLHF_LABELING_POLICY_TARGETS",
        "",
        _shares(None),
        "Policy services that sample comparisons, `host:port=weight,...` (empty: RLHF_POLICY_TARGET only); "
        "e.g. the promoted policy plus a service pinned to an earlier version.",
    )
    labeling_max_new_tokens: int = _setting(
        "RLHF_LABELING_MAX_NEW_TOKENS", "64", _int(1, 1 << 16), "Longest sample generated for a comparison task."
    )
    labeling_temperature: float = _setting(
        "RLHF_LABELING_TEMPERATURE", "1.0", _float(0.01, 10), "Sampling temperature of comparison samples."
    )

    # --- kubernetes executor (services/controller/k8s_executor.py; RLHF_EXECUTOR=kubernetes)
    tgi_deployment: str = _setting(
        "RLHF_TGI_DEPLOYMENT",
        "",
        _optional_dns_label,
        "Kubernetes Deployment running TGI for the policy (k8s/overlays/tgi: `tgi`): after each policy promotion"
        " the controller points its --model-id at the new version and Kubernetes rolls it."
        " Empty: TGI keeps its checkpoint.",
    )
    k8s_namespace: str = _setting(
        "RLHF_K8S_NAMESPACE",
        "default",
        _dns_label,
        "Namespace trainer Jobs are created in (k8s/ sets the controller's own).",
    )
    trainer_job_kind: str = _setting(
        "RLHF_TRAINER_JOB_KIND",
        "job",
        _choice("job", "pytorchjob"),
        "Trainer jobs as batch/v1 Jobs, or as Kubeflow PyTorchJobs (needs the training operator).",
    )
    trainer_image: str = _setting(
        "RLHF_TRAINER_IMAGE", "rlhf-platform:0.1.0", _nonempty, "Container image of trainer Jobs."
    )
    trainer_cpu: str = _setting("RLHF_TRAINER_CPU", "2", _k8s_quantity, "CPU request and limit of each trainer pod.")
    trainer_memory: str = _setting(
        "RLHF_TRAINER_MEMORY", "8Gi", _k8s_quantity, "Memory request and limit of each trainer pod."
    )
    trainer_gpu_resource: str = _setting(
        "RLHF_TRAINER_GPU_RESOURCE",
        "nvidia.com/gpu",
        _nonempty,
        "Extended resource a trainer pod requests for its GPUs.",
    )
    trainer_node_selector: dict = _setting(
        "RLHF_TRAINER_NODE_SELECTOR",
        "{}",
        _string_map,
        'nodeSelector of trainer pods, JSON, e.g. {"nvidia.com/gpu.present": "true"}.',
    )
    trainer_tolerations: tuple = _setting(
        "RLHF_TRAINER_TOLERATIONS",
        "[]",
        _json_array,
        "Tolerations of trainer pods, a JSON list of Kubernetes toleration objects.",
    )
    trainer_service_account: str = _setting(
        "RLHF_TRAINER_SERVICE_ACCOUNT", "rlhf-trainer", _dns_label, "ServiceAccount of trainer pods."
    )
    trainer_config_map: str = _setting(
        "RLHF_TRAINER_CONFIG_MAP",
        "",
        _str,
        "ConfigMap trainer pods take their RLHF_* settings from (empty: copy this process's settings into the Job).",
    )
    trainer_ttl_s: int = _setting(
        "RLHF_TRAINER_TTL_S", "86400", _int(0, 10**8), "Finished trainer Jobs are deleted this many seconds later."
    )
    checkpoint_pvc: str = _setting(
        "RLHF_CHECKPOINT_PVC",
        "rlhf-data",
        _dns_label,
        "ReadWriteMany PersistentVolumeClaim holding RLHF_HOME: checkpoints, dataset snapshots, run folders.",
    )
    data_mount: str = _setting(
        "RLHF_DATA_MOUNT",
        "/data",
        _nonempty,
        "Where trainer pods mount that claim; RLHF_HOME, RLHF_CHECKPOINT_DIR and RLHF_DATASET_DIR must lie under it.",
    )
    torchrun_port: int = _setting(
        "RLHF_TORCHRUN_PORT", "29500", _port, "Rendezvous port of multi-node (torchrun) trainer Jobs."
    )
    trainer_gpus: int = _setting(
        "RLHF_TRAINER_GPUS", "0", _int(0, 64), "GPUs per trainer process (JobSpec.gpus); 0 trains on CPU."
    )
    trainer_nodes: int = _setting(
        "RLHF_TRAINER_NODES",
        "1",
        _int(1, 1024),
        "Nodes per trainer job (JobSpec.nodes); >1 runs torchrun across an Indexed Job.",
    )
    trainer_procs_per_node: int = _setting(
        "RLHF_TRAINER_PROCS_PER_NODE", "1", _int(1, 64), "torchrun processes per node (JobSpec.procs_per_node)."
    )

    # --- logging -------------------------------------------------------------
    log_level: str = _setting("RLHF_LOG_LEVEL", "INFO", _choice("DEBUG", "INFO", "WARNING", "ERROR"), "Log level.")

    def __post_init__(self) -> None:  # derive defaults that depend on other settings
        home = Path(self.home).expanduser()
        object.__setattr__(self, "home", home)
        object.__setattr__(self, "model_cache", Path(self.model_cache).expanduser())
        caches = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser()
        object.__setattr__(
            self,
            "kernel_cache",
            Path(self.kernel_cache).expanduser() if self.kernel_cache else caches / "rlhf-platform" / "kernels",
        )
        object.__setattr__(
            self,
            "checkpoint_dir",
            Path(self.checkpoint_dir).expanduser() if self.checkpoint_dir else home / "checkpoints",
        )
        object.__setattr__(
            self, "dataset_dir", Path(self.dataset_dir).expanduser() if self.dataset_dir else home / "datasets"
        )

    def with_overrides(self, **values: Any) -> Settings:
        return dataclasses.replace(self, **values)


FIELDS = [f for f in dataclasses.fields(Settings)]
ENV_NAMES = {f.metadata["env"] for f in FIELDS}


def load_settings(environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read every setting from the environment; raise ConfigError on a bad value.

    Unknown `RLHF_*` variables are an error too: a typo must not silently fall
    back to a default.
    """
    env = os.environ if environ is None else environ
    unknown = sorted(k for k in env if k.startswith("RLHF_") and k not in ENV_NAMES)
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]}; known settings: see `python -m services.common.config`")
    values: dict[str, Any] = {}
    for f in FIELDS:
        name = f.metadata["env"]
        raw = env.get(name, f.metadata["default"])
        values[f.name] = f.metadata["parse"](name, raw)
    settings = Settings(**values)
    if settings.default_max_new_tokens > settings.max_new_tokens_limit:
        raise ConfigError(
            f"RLHF_DEFAULT_MAX_NEW_TOKENS={settings.default_max_new_tokens}"
            f" exceeds RLHF_MAX_NEW_TOKENS_LIMIT={settings.max_new_tokens_limit}"
        )
    if settings.topic_min_insync_replicas > settings.topic_replication:
        raise ConfigError(
            f"RLHF_TOPIC_MIN_INSYNC_REPLICAS={settings.topic_min_insync_replicas} exceeds"
            f" RLHF_TOPIC_REPLICATION={settings.topic_replication}: no acks=all write could succeed"
        )
    if settings.max_prompt_tokens + settings.max_new_tokens_limit > settings.kv_budget_tokens:
        raise ConfigError(
            "RLHF_KV_BUDGET_TOKENS must hold at least one full sequence "
            "(RLHF_MAX_PROMPT_TOKENS + RLHF_MAX_NEW_TOKENS_LIMIT ="
            f" {settings.max_prompt_tokens + settings.max_new_tokens_limit})"
        )
    return dataclasses.replace(settings, **overrides) if overrides else settings


def to_env(settings: Settings) -> dict[str, str]:
    """The RLHF_* variables that reproduce `settings` in a child process or Job."""
    import json

    out = {}
    for f in FIELDS:
        value = getattr(settings, f.name)
        out[f.metadata["env"]] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else str(value)
    return out


def exit_on_config_error(fn: Callable[[], Any]) -> Any:
    """Run `fn`; on ConfigError print one clear line to stderr and exit with status 2."""
    try:
        return fn()
    except ConfigError as err:
        print(f"configuration error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def markdown_table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        # Empty means off or unset; the two folders derived from RLHF_HOME say so in their text.
        default = f"`{f.metadata['default']}`" if f.metadata["default"] else "(empty)"
        rows.append(f"| `{f.metadata['env']}` | {default} | {f.metadata['doc']} |")
    return "\n".join(rows)


README_START, README_END = "<!-- CONFIG-TABLE -->", "<!-- /CONFIG-TABLE -->"


def readme_with_table(text: str) -> str:
    """README text with the generated table between its markers."""
    head, sep, rest = text.partition(README_START)
    if not sep:
        raise ValueError(f"README has no {README_START} marker")
    # The first time there is no end marker yet: keep everything after the start.
    old_table, end, tail = rest.partition(README_END)
    if not end:
        tail = rest
    return f"{head}{README_START}\n{markdown_table()}\n{README_END}{tail}"


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown_table())
    elif "--readme" in sys.argv:
        path = Path(sys.argv[sys.argv.index("--readme") + 1])
        path.write_text(readme_with_table(path.read_text()))
    else:
        s = exit_on_config_error(load_settings)
        for f in FIELDS:
            print(f"{f.metadata['env']}={getattr(s, f.name)}")
