"""Lineage: from a served policy version back to the comparisons behind it.

Every response names the policy version that produced it. From that version:

    policy  ->  its PPO run (snapshot, init policy, hyperparameters, metrics, run folder)
            ->  the reward model it optimised (a parent of the PPO checkpoint)
            ->  that RM's dataset snapshot
            ->  the comparisons it trained on, counted by the policy version
                that produced their responses

An SFT or base policy ends the chain at its own snapshot.

    python -m services.controller.lineage VERSION [--json]

reads the checkpoint store and the dataset store of the configured RLHF_HOME.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.common.checkpoints import CheckpointError, CheckpointStore, Manifest
from services.common.config import Settings, exit_on_config_error, load_settings
from services.common.datasets import SnapshotStore, count_by_policy_version

COUNTS_KEY = "comparisons_by_policy_version"


def comparisons_by_policy_version(settings: Settings, snapshot: str, split: str = "train") -> dict[str, int]:
    return count_by_policy_version(SnapshotStore(settings.dataset_dir).read(snapshot, split, "comparisons"))


def _summary(m: Manifest) -> dict[str, Any]:
    return {"version": m.version, "kind": m.kind, "parents": m.parents, "dataset_snapshot": m.dataset_snapshot}


def find_run_dir(runs: Path, version: str) -> str:
    """The trainer run folder that published `version` (its run.json names it), or ""."""
    for run_json in sorted(Path(runs).glob("*/run.json")):
        try:
            if json.loads(run_json.read_text()).get("version") == version:
                return str(run_json.parent)
        except (OSError, json.JSONDecodeError):
            continue
    return ""


def lineage(store: CheckpointStore, snapshots: SnapshotStore, version: str, runs: Path | None = None) -> dict:
    """The chain behind one policy version; raises CheckpointError for an unknown or non-policy version."""
    m = store.manifest(version)
    if m.role != "policy":
        raise CheckpointError(f"{version} is a {m.role} checkpoint; lineage starts from a policy version")
    out: dict[str, Any] = {"policy": _summary(m)}
    if m.kind != "ppo":
        out["chain"] = [f"policy {version} ({m.kind}), trained on snapshot {m.dataset_snapshot or '-'}"]
        return out
    reward = next((p for p in m.parents if store.exists(p) and store.manifest(p).kind == "rm"), "")
    out["ppo_run"] = {
        "run_dir": find_run_dir(runs, version) if runs else "",
        "snapshot": m.dataset_snapshot,
        "init": m.parents[0] if m.parents else "",
        "metrics": m.metrics,
        "hyperparameters": m.hyperparameters,
    }
    chain = [f"policy {version} (ppo)", f"PPO run {out['ppo_run']['run_dir'] or '-'} from {out['ppo_run']['init']}"]
    if not reward:
        out["chain"] = [*chain, "reward model: not in the store"]
        return out
    rm = store.manifest(reward)
    counts = rm.metrics.get(COUNTS_KEY) or count_by_policy_version(
        snapshots.read(rm.dataset_snapshot, "train", "comparisons")
    )
    out["reward_model"] = {**_summary(rm), "metrics": rm.metrics}
    out["rm_snapshot"] = {"id": rm.dataset_snapshot, "counts": snapshots.manifest(rm.dataset_snapshot)["counts"]}
    out[COUNTS_KEY] = counts
    out["chain"] = [
        *chain,
        f"reward model {reward}",
        f"snapshot {rm.dataset_snapshot}",
        "comparisons by producing policy: " + ", ".join(f"{v}: {n}" for v, n in counts.items()),
    ]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.controller.lineage", description=__doc__.split("\n")[0])
    parser.add_argument("version", help="a policy version, e.g. the model_version of a served response")
    parser.add_argument("--json", action="store_true", help="print the whole record as JSON")
    args = parser.parse_args(argv)
    settings = exit_on_config_error(load_settings)
    try:
        out = lineage(
            CheckpointStore(settings.checkpoint_dir),
            SnapshotStore(settings.dataset_dir),
            args.version,
            settings.home / "runs",
        )
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else "\n  -> ".join(out["chain"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
