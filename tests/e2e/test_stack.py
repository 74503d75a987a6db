"""`make up` with the tiny model reaches SERVING on every service within 60 s;
starting twice is harmless; `make down` leaves none of our processes."""

import json
import os
import subprocess
import sys
import time

import psutil

from services.common.broker import free_port
from tests.conftest import MODEL_CACHE


def test_up_twice_then_down(tmp_path, tiny_model_dir):
    home = tmp_path / "home"
    env = {
        **os.environ,
        "RLHF_HOME": str(home),
        "RLHF_MODEL": "tiny",
        "RLHF_MODEL_CACHE": MODEL_CACHE,
        "RLHF_TRAINER_PRESET": "tiny",
        "RLHF_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "RLHF_BROKER_S3_PORT": str(free_port()),  # the durable default: Tansu on a local S3 store
        "RLHF_CONTROLLER_INTERVAL_S": "3600",
    }
    for name in ("POLICY", "REWARD", "FEEDBACK", "LABELING", "HTTP", "PLAYGROUND", "CONTROLLER"):
        env[f"RLHF_{name}_PORT"] = str(free_port())
    env["RLHF_POLICY_TARGET"] = f"127.0.0.1:{env['RLHF_POLICY_PORT']}"
    env["RLHF_FEEDBACK_TARGET"] = f"127.0.0.1:{env['RLHF_FEEDBACK_PORT']}"
    env["RLHF_REWARD_TARGET"] = f"127.0.0.1:{env['RLHF_REWARD_PORT']}"
    env["RLHF_LABELING_TARGET"] = f"127.0.0.1:{env['RLHF_LABELING_PORT']}"
    stack = [sys.executable, "-m", "services.stack"]
    try:
        started = time.monotonic()
        up = subprocess.run([*stack, "up", "--timeout", "60"], env=env, capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - started
        assert up.returncode == 0, up.stdout + up.stderr
        assert "all services SERVING" in up.stdout
        assert elapsed < 60, f"stack took {elapsed:.1f}s"
        pids = {p.stem: json.loads(p.read_text())["pid"] for p in (home / "run").glob("*.pid")}
        assert set(pids) == {
            "broker-store",
            "broker",
            "policy",
            "reward",
            "feedback",
            "labeling",
            "playground",
            "controller",
        }

        again = subprocess.run([*stack, "up", "--timeout", "60"], env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        # every process, store and broker included
        assert again.stdout.count("already running") == len(pids), again.stdout + again.stderr
        assert {p.stem: json.loads(p.read_text())["pid"] for p in (home / "run").glob("*.pid")} == pids
    finally:
        down = subprocess.run([*stack, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stderr
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, (
            f"{name} still running"
        )
    assert not list((home / "run").glob("*.pid"))
    # stopping twice is harmless
    assert subprocess.run([*stack, "down"], env=env, capture_output=True, timeout=60).returncode == 0
