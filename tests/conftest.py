"""Shared fixtures: a real Tansu broker, isolated settings, the tiny model.

- `broker`: one Tansu broker for the whole session, on a free port, with
  memory storage for speed (a restart empties it); durability tests start
  their own durable broker (tests/integration/test_broker_durable.py,
  tests/e2e/test_broker_durable.py).
- `settings`: Settings with a fresh RLHF_HOME and a unique topic prefix per
  test, pointing at that broker, model preset `tiny`.
- `tiny_model_dir`: the tiny preset (built once, cached like `make setup`).
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

import pytest

from services.common.broker import free_port, start_broker, stop_process
from services.common.config import load_settings
from services.common.models import ensure_preset

MODEL_CACHE = os.environ.get("RLHF_MODEL_CACHE", str(Path("~/.cache/rlhf-platform").expanduser()))


class _WithFields(logging.Formatter):
    """pytest's log lines plus the structured fields `log_fields` attaches, so a
    failure's captured log says why (e.g. the reason a checkpoint was rejected)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        fields = getattr(record, "fields", None)
        return f"{line} {json.dumps(fields, default=str)}" if fields else line


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    plugin = config.pluginmanager.get_plugin("logging-plugin")
    if plugin is not None:
        for handler in (plugin.caplog_handler, plugin.report_handler):
            handler.setFormatter(_WithFields(plugin.formatter))


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """A real Kafka-protocol broker (Tansu, memory storage) on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    proc = start_broker(port, log_path=log)
    yield f"127.0.0.1:{port}"
    stop_process(proc)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return ensure_preset("tiny", Path(MODEL_CACHE))


def make_settings(home: Path, bootstrap: str = "127.0.0.1:9092", **env: str):
    """Settings for a test: isolated state, unique topics, tiny model."""
    base = {
        "RLHF_HOME": str(home),
        "RLHF_MODEL": "tiny",
        "RLHF_MODEL_CACHE": MODEL_CACHE,
        "RLHF_KAFKA_BOOTSTRAP": bootstrap,
        "RLHF_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}",
        "RLHF_TOPIC_PARTITIONS": "1",
        # Services serve fp32 in tests whatever the CPU: tests compare served numbers with fp32 references.
        "RLHF_SERVE_DTYPE": "float32",
    }
    base.update(env)
    return load_settings(base)


@pytest.fixture
def settings(tmp_path, broker, tiny_model_dir):
    return make_settings(tmp_path / "home", broker)
