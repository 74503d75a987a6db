"""The OpenMP spin limit reaches every trainer job the platform starts, unless the caller chose one
(k8s trainer Jobs: tests/k8s/test_k8s_executor.py); serving processes keep the default spin."""

from __future__ import annotations

import sys
from pathlib import Path

from services.common import openmp
from services.common.config import load_settings
from services.controller.jobs import JobSpec
from services.controller.local_executor import LocalExecutor
from services.stack import Stack


def test_child_env_adds_the_spin_limit_and_respects_a_chosen_policy():
    assert openmp.child_env({"A": "1"}) == {"A": "1", "GOMP_SPINCOUNT": openmp.SPIN_COUNT}
    assert openmp.child_env({"OMP_WAIT_POLICY": "ACTIVE"}) == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert openmp.child_env({"GOMP_SPINCOUNT": "5"}) == {"GOMP_SPINCOUNT": "5"}


def test_a_local_job_runs_with_it(tmp_path):
    (tmp_path / "envprobe.py").write_text(
        "import os, pathlib\npathlib.Path(os.environ['PROBE_OUT']).write_text(os.environ.get('GOMP_SPINCOUNT', ''))\n"
    )
    out = tmp_path / "spin.txt"
    executor = LocalExecutor(tmp_path / "jobs", base_env={"PATH": str(Path(sys.executable).parent)})
    spec = JobSpec(name="probe", trainer="sft", args=[], module="envprobe")
    spec.env = {"PROBE_OUT": str(out), "PYTHONPATH": str(tmp_path)}
    handle = executor.launch(spec)
    executor.wait(handle, timeout=60)
    assert out.read_text() == openmp.SPIN_COUNT


def test_serving_processes_keep_the_default_spin(tmp_path, monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    stack = Stack(load_settings({"RLHF_HOME": str(tmp_path / "home")}))
    assert "GOMP_SPINCOUNT" not in stack.child_env()
    platform_env = Path(__file__).resolve().parents[2] / "k8s" / "base" / "platform.env"
    assert not [line for line in platform_env.read_text().splitlines() if line.startswith("GOMP_SPINCOUNT=")]
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")  # an operator's own choice still reaches them
    assert stack.child_env()["GOMP_SPINCOUNT"] == "7"
