"""The demo's presets reach the platform's settings, and only where a preset sets them."""

import os

from services import demo
from services.common.config import load_settings


def test_the_cpu_preset_sets_the_policy_gates_kl_budget_and_tiny_leaves_the_operators(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "environ", {**os.environ, "RLHF_GATE_MAX_KL": "7.5"})
    demo.configure_environment(demo.PRESETS["tiny"], tmp_path / "tiny")
    assert load_settings().gate_max_kl == 7.5  # no budget in the preset: the operator's setting stands
    demo.configure_environment(demo.PRESETS["cpu"], tmp_path / "cpu")
    assert load_settings().gate_max_kl == demo.PRESETS["cpu"].gate_max_kl == 5.0
