"""services/controller/lineage.py: policy -> PPO run -> RM -> snapshot -> comparisons by producing policy."""

import json

import pytest

from services.common.checkpoints import CheckpointError, CheckpointStore
from services.common.datasets import SnapshotStore
from services.controller.lineage import count_by_policy_version, lineage, main


def _comparison(*versions):
    return {
        "prompt_text": "p",
        "responses": [{"text": f"r{i}", "policy_version": v, "rank": i + 1} for i, v in enumerate(versions)],
    }


def _checkpoint(store, kind, version, parents=(), snapshot="", metrics=None):
    with store.stage(kind, version=version, parents=list(parents), dataset_snapshot=snapshot) as (folder, manifest):
        (folder / "weights.bin").write_bytes(version.encode())
        manifest.metrics = metrics or {}


def test_counts_a_comparison_once_per_producing_version():
    counts = count_by_policy_version([_comparison("sft-1", "sft-1"), _comparison("sft-1", "ppo-1"), _comparison("")])
    assert counts == {"ppo-1": 1, "sft-1": 2, "unknown": 1}


def test_walks_from_a_served_policy_to_the_comparisons_its_rm_trained_on(tmp_path, monkeypatch, capsys):
    store, snapshots = CheckpointStore(tmp_path / "checkpoints"), SnapshotStore(tmp_path / "datasets")
    snap = snapshots.write(
        {
            "train": {"comparisons": [_comparison("sft-1", "sft-1"), _comparison("ppo-1", "ppo-1", "ppo-1")]},
            "validation": {"comparisons": [_comparison("ppo-1", "sft-1")]},  # held out: not trained on
        }
    )["snapshot_id"]
    _checkpoint(store, "sft", "sft-1")
    _checkpoint(store, "rm", "rm-2", parents=["sft-1"], snapshot=snap)
    _checkpoint(store, "ppo", "ppo-2", parents=["ppo-1", "sft-1", "rm-2"], snapshot=snap)
    run = tmp_path / "runs" / "ppo-r3"
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"version": "ppo-2", "kind": "ppo"}))

    chain = lineage(store, snapshots, "ppo-2", tmp_path / "runs")
    assert chain["ppo_run"]["run_dir"] == str(run) and chain["ppo_run"]["init"] == "ppo-1"
    assert chain["reward_model"]["version"] == "rm-2" and chain["rm_snapshot"]["id"] == snap
    assert chain["comparisons_by_policy_version"] == {"ppo-1": 1, "sft-1": 1}
    assert lineage(store, snapshots, "sft-1")["chain"][0].startswith("policy sft-1 (sft)")
    with pytest.raises(CheckpointError, match="reward checkpoint"):
        lineage(store, snapshots, "rm-2")

    # The CLI reads the configured home's stores.
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    monkeypatch.setenv("RLHF_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    monkeypatch.setenv("RLHF_DATASET_DIR", str(tmp_path / "datasets"))
    assert main(["ppo-2"]) == 0
    assert "comparisons by producing policy: ppo-1: 1, sft-1: 1" in capsys.readouterr().out
    assert main(["no-such-version"]) == 2
