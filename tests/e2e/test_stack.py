"""`make up` with the tiny model reaches SERVING on every service within 60 s;
starting twice is harmless; `make down` leaves none of our processes; a demo
stopped by SIGTERM mid-run takes its stack and trainer job down with it."""

import json
import os
import signal
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


def _gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_demo_stopped_by_sigterm_mid_run_leaves_no_service_or_trainer_job_running(tmp_path, tiny_model_dir):
    home, out = tmp_path / "demo", tmp_path / "demo.log"
    jobs = home / "controller" / "jobs"
    with out.open("w") as log:
        demo = subprocess.Popen(
            [sys.executable, "-m", "services.demo", "--preset", "tiny", "--home", str(home)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RLHF_MODEL_CACHE": MODEL_CACHE},
        )
    pids: dict[str, int] = {}
    try:
        deadline = time.monotonic() + 240
        while not list(jobs.glob("*.pid")):  # the stack is up and the SFT job has started
            assert demo.poll() is None, out.read_text()[-3000:]
            assert time.monotonic() < deadline, out.read_text()[-3000:]
            time.sleep(0.1)
        pids = {p.stem: json.loads(p.read_text())["pid"] for p in [*(home / "run").glob("*.pid"), *jobs.glob("*.pid")]}
        assert {"broker", "policy", "labeling"} <= set(pids) and any(name.startswith("sft") for name in pids), pids
        assert all(not _gone(pid) for pid in pids.values())
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(120)
        still = [name for name, pid in pids.items() if not _gone(pid)]
        assert not still, f"still running after the demo stopped: {still}"
        assert code == 128 + signal.SIGTERM, out.read_text()[-3000:]
        assert not list((home / "run").glob("*.pid"))
    finally:
        if demo.poll() is None:
            demo.kill()
        for pid in pids.values():  # leave nothing behind for the next test, whatever the outcome
            if not _gone(pid):
                os.killpg(pid, signal.SIGKILL)
