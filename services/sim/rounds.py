"""The demo's per-round evaluation: does the policy improve as the loop iterates?

For each RM+PPO round of the demo, on held-out users (the final snapshot's
test split, topped up from validation; the same prompts and seeds for every
model, as in services/sim/report.py):

- the served policy after the round's gates: mean gold score with a 95% CI,
  and its paired gold win rate against SFT;
- the round's new RM: pairwise accuracy on the held-out comparisons, against
  the labelers' rankings and against the gold ranking of the same responses;
- the served policy's KL to SFT (the gate job's measurement of the round in
  which it was promoted; 0 for SFT);
- the gate's decisions, with their reasons;
- over-optimisation (Gao et al. 2022): the proxy RM score PPO optimised, per
  PPO step, and for each round's candidate the proxy score against the gold
  score of the very samples the gate job drew;
- lineage: the comparisons each round's RM trained on, by producing policy.

`write_rounds(...)` adds a "rounds" entry to report.json, a section to
report.md, and gold_by_round.png, overoptimisation.png and lineage.png.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.common.checkpoints import CheckpointStore
from services.common.config import Settings
from services.common.datasets import SnapshotStore
from services.common.models import resolve_device
from services.controller.lineage import lineage
from services.sim.report import (
    EvalConfig,
    _f,
    _read_metrics,
    eval_prompts,
    generate,
    gold_ranked,
    held_out,
    rm_comparison_scores,
    rm_pairwise,
)
from services.sim.stats import mean_ci, paired_win_rate
from services.sim.tasks import gold_score


@dataclass
class RoundRecord:
    """What the demo knows about one RM+PPO round."""

    round: int
    collected_on: list[str]  # policy versions that produced this round's samples (the LabelingService's record)
    comparisons: int  # comparisons submitted this round
    rm: str  # the round's new reward model
    candidate: str  # the round's PPO policy
    served_after: str  # the policy served once the round's gates decided
    decisions: list[dict] = field(default_factory=list)
    run_dirs: dict[str, str] = field(default_factory=dict)
    labeler_agreement: float | None = None  # measured by the LabelingService on every overlapping task so far
    agreement_pairs: int = 0  # response pairs behind it


def _gate_samples(run_dir: str) -> tuple[list[dict], dict]:
    """The gate job's samples (prompt, candidate, incumbent texts) and its result JSON."""
    folder = Path(run_dir)
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]
    return samples, json.loads((folder / "result.json").read_text())


def evaluate_rounds(
    settings: Settings, rounds: Sequence[RoundRecord], sft_version: str, snapshot_id: str, cfg: EvalConfig
) -> dict[str, Any]:
    device = resolve_device(settings.device)
    store, snapshots = CheckpointStore(settings.checkpoint_dir), SnapshotStore(settings.dataset_dir)
    prompts, splits = eval_prompts(snapshots, snapshot_id, cfg.prompts, cfg.seed)
    if not prompts:
        raise ValueError(f"snapshot {snapshot_id} has no held-out prompts to evaluate the rounds on")
    gold: dict[str, list[float]] = {}
    for version in [sft_version, *dict.fromkeys(r.served_after for r in rounds)]:
        if version not in gold:
            answers = generate(settings, store.path(version), prompts, cfg, device, version.split("-")[0])
            gold[version] = [gold_score(p, a) for p, a in zip(prompts, answers, strict=True)]
    comparisons, cmp_splits = held_out(snapshots, snapshot_id, "comparisons")
    by_gold = gold_ranked(comparisons)

    kl = {sft_version: 0.0}
    rows = []
    mean, low, high = mean_ci(gold[sft_version])
    rows.append({"round": 0, "served": sft_version, "mean_gold": mean, "gold_ci": [low, high], "kl_to_sft": 0.0})
    for r in rounds:
        samples, gate = _gate_samples(r.run_dirs["gate"])
        kl[r.candidate] = gate["policy"]["mean_kl_to_reference"]
        scores = rm_comparison_scores(store.path(r.rm), comparisons, device, f"round {r.round} RM, held-out")
        vs_labelers, vs_gold = rm_pairwise(comparisons, scores), rm_pairwise(by_gold, scores)
        proxy = gate["policy"]["scores"]
        mean, low, high = mean_ci(gold[r.served_after])
        rows.append(
            {
                "round": r.round,
                "collected_on": r.collected_on,
                "comparisons_collected": r.comparisons,
                "rm": r.rm,
                "candidate": r.candidate,
                "served": r.served_after,
                "mean_gold": mean,
                "gold_ci": [low, high],
                "win_vs_sft": paired_win_rate(gold[r.served_after], gold[sft_version]).as_dict(),
                "labeler_agreement": r.labeler_agreement,
                "agreement_pairs": r.agreement_pairs,
                "rm_accuracy_vs_labelers": vs_labelers,
                "rm_accuracy_vs_gold": vs_gold,
                "kl_to_sft": kl.get(r.served_after),
                "gate": [{k: d[k] for k in ("model", "version", "promote", "reason")} for d in r.decisions],
                "overoptimisation": {
                    "candidate_proxy": statistics.fmean(proxy["candidate"]["new_rm"]),
                    "candidate_gold": statistics.fmean(gold_score(s["prompt"], s["candidate"]) for s in samples),
                    "incumbent_proxy": statistics.fmean(proxy["incumbent"]["new_rm"]),
                    "incumbent_gold": statistics.fmean(gold_score(s["prompt"], s["incumbent"]) for s in samples),
                },
                "ppo_curve": [
                    {"step": m["step"], "reward_score": m["reward_score"], "kl": m.get("kl")}
                    for m in _read_metrics(Path(r.run_dirs["ppo"]))
                    if isinstance(m.get("reward_score"), (int, float))
                ],
                "lineage": lineage(store, snapshots, r.candidate).get("comparisons_by_policy_version", {}),
            }
        )
    return {
        "prompts": len(prompts),
        "prompt_splits": splits,
        "comparisons": len(comparisons),
        "comparison_splits": cmp_splits,
        "config": asdict(cfg),
        "rows": rows,
    }


# --- plots -----------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_gold_by_round(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    x = [r["round"] for r in rows]
    y = [r["mean_gold"] for r in rows]
    err = [
        [m - r["gold_ci"][0] for m, r in zip(y, rows, strict=True)],
        [r["gold_ci"][1] - m for m, r in zip(y, rows, strict=True)],
    ]
    ax.errorbar(x, y, yerr=err, marker="o", capsize=5)
    ax.set_xticks(x, ["SFT" if i == 0 else f"round {i}" for i in x])
    ax.set_ylabel("served policy: mean gold (95% CI)")
    ax.set_title("gold score on held-out users, round by round", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_overoptimisation(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    for r in rows[1:]:
        curve = r["ppo_curve"]
        left.plot(
            [c["step"] for c in curve], [c["reward_score"] for c in curve], marker=".", label=f"round {r['round']}"
        )
        o = r["overoptimisation"]
        right.scatter([o["candidate_proxy"]], [o["candidate_gold"]], label=f"round {r['round']} PPO")
        right.scatter(
            [o["incumbent_proxy"]], [o["incumbent_gold"]], marker="x", label=f"round {r['round']} serving before"
        )
    left.set_xlabel("PPO step")
    left.set_ylabel("proxy RM score (training rollouts)")
    left.set_title("what PPO optimised", fontsize=10)
    right.set_xlabel("proxy RM score (round's RM)")
    right.set_ylabel("gold score")
    right.set_title("proxy vs gold on the gate's held-out samples", fontsize=10)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_lineage(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    plt = _pyplot()
    rounds = rows[1:]
    versions = list(dict.fromkeys(v for r in rounds for v in r["lineage"]))
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    bottom = [0] * len(rounds)
    for v in versions:
        counts = [r["lineage"].get(v, 0) for r in rounds]
        ax.bar([f"round {r['round']} RM" for r in rounds], counts, bottom=bottom, label=v)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_ylabel("training comparisons")
    ax.set_title("what each round's RM trained on, by producing policy", fontsize=10)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- the report section ---------------------------------------------------------------------
def _agreement(row: Mapping[str, Any]) -> str:
    if row.get("labeler_agreement") is None or not row.get("agreement_pairs"):
        return "- (no overlap yet)"
    return f"{_f(row['labeler_agreement'])} ({row['agreement_pairs']})"


def _markdown(result: Mapping[str, Any]) -> str:
    rows = result["rows"]
    lines = [
        "",
        "## Round by round",
        "",
        f"The served policy after each round's gates, on {result['prompts']} prompts of held-out users "
        f"({' + '.join(result['prompt_splits'])}); each round's RM on {result['comparisons']} held-out comparisons "
        f"({' + '.join(result['comparison_splits']) or 'none'}), ranked by the labelers and by the gold preference.",
        "",
        "Labeler agreement is the LabelingService's measure over every overlapping task so far (response pairs "
        "in brackets): it bounds the RM's accuracy against the labelers.",
        "",
        "| round | comparisons on | served | mean gold [95% CI] | win vs SFT [95% CI] | labeler agreement | "
        "RM acc. vs gold | RM acc. vs labelers | KL to SFT | gates |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = f"{_f(r['mean_gold'])} [{_f(r['gold_ci'][0])}, {_f(r['gold_ci'][1])}]"
        if r["round"] == 0:
            lines.append(f"| SFT | - | `{r['served']}` | {ci} | - | - | - | - | 0 | - |")
            continue
        w = r["win_vs_sft"]
        gates = "; ".join(f"{d['model']} {'promoted' if d['promote'] else 'rejected'}" for d in r["gate"])
        lines.append(
            f"| {r['round']} | {', '.join(f'`{v}`' for v in r['collected_on'])} ({r['comparisons_collected']}) | "
            f"`{r['served']}` | {ci} | {_f(w['win_rate'])} [{_f(w['ci_low'])}, {_f(w['ci_high'])}] | "
            f"{_agreement(r)} | "
            f"{_f(r['rm_accuracy_vs_gold']['accuracy'])} | {_f(r['rm_accuracy_vs_labelers']['accuracy'])} | "
            f"{_f(r['kl_to_sft'])} | {gates} |"
        )
    lines += ["", "![gold by round](gold_by_round.png)", "", "Gate decisions:", ""]
    for r in rows[1:]:
        lines += [f"- round {r['round']}, {d['model']} `{d['version']}`: {d['reason']}" for d in r["gate"]]
    lines += [
        "",
        "### Over-optimisation",
        "",
        "Left: the proxy RM score PPO optimised, per step. Right: each round's candidate and the policy serving before "
        "it, proxy RM score against gold score, on the same held-out samples (the gate job's). A candidate to the "
        "right of the policy it replaces but not above it gained on the proxy only.",
        "",
        "![over-optimisation](overoptimisation.png)",
        "",
        "### Lineage",
        "",
        "The comparisons each round's RM trained on, by the policy that produced them "
        "(`python -m services.controller.lineage VERSION` prints the whole chain):",
        "",
        "![lineage](lineage.png)",
        "",
    ]
    for r in rows[1:]:
        counts = ", ".join(f"`{v}` {n}" for v, n in r["lineage"].items())
        lines.append(f"- round {r['round']}: PPO `{r['candidate']}` <- RM `{r['rm']}` <- {counts}")
    return "\n".join(lines) + "\n"


def write_rounds(
    settings: Settings,
    out_dir: Path,
    rounds: Sequence[RoundRecord],
    *,
    sft_version: str,
    snapshot_id: str,
    config: EvalConfig,
) -> dict[str, Any]:
    """Evaluate every round; add "rounds" to report.json and a section to report.md (both must exist)."""
    out_dir = Path(out_dir)
    result = evaluate_rounds(settings, rounds, sft_version, snapshot_id, config)
    rows = result["rows"]
    _plot_gold_by_round(out_dir / "gold_by_round.png", rows)
    _plot_overoptimisation(out_dir / "overoptimisation.png", rows)
    _plot_lineage(out_dir / "lineage.png", rows)
    report = json.loads((out_dir / "report.json").read_text())
    report["rounds"] = result
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    with open(out_dir / "report.md", "a") as fh:
        fh.write(_markdown(result))
    return result
