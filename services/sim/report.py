"""The demo's evaluation against the gold preference, and its report.

`write_report(...)` measures, on users the trainers never saw (the dataset
snapshot's test split, topped up from validation when test is small):

1. the reward model's pairwise accuracy on the held-out users' comparisons
   (ties dropped, Wilson intervals), against the gold preference and against
   the labelers' own rankings (one scoring pass serves both), beside the
   labelers' agreement with each other as the LabelingService measured it
   (their agreement bounds what an RM can reach against them); and on a
   sample of training comparisons for contrast;
2. the gold win rate of PPO against SFT, of PPO against the base model and
   of SFT against the base model: every model answers the same prompts with
   the same sampling settings, prompt i always with the same seed (a
   response never depends on the batch it was decoded in), and each prompt is
   one paired comparison (win 1, tie 0.5, loss 0). Intervals are 95% (see
   services/sim/stats.py). The answers are sampled by the serving engine
   (services/policy/offline.py) in the evaluation's dtype;
3. the final KL to the SFT policy (from the PPO trainer's metrics);
4. the trainers' curves (their metrics.jsonl files, whatever keys exist);
5. example generations before and after.

It writes report.md, report.json and PNG plots into one folder.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.common.checkpoints import CheckpointStore
from services.common.config import Settings
from services.common.datasets import SnapshotStore
from services.common.logs import get_logger, log_fields
from services.common.models import (
    RewardModel,
    encode_prompts,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
)
from services.common.rm_scoring import comparison_scores, pair_accuracy
from services.policy.offline import sample_all
from services.sim.stats import mean_ci, paired_win_rate, wilson
from services.sim.tasks import check_scores, gold_ranks, gold_score, parse_constraints, words

log = get_logger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """How the held-out generations are sampled: identical for every model."""

    prompts: int = 96  # held-out prompts (unique texts)
    samples_per_prompt: int = 1  # > 1 averages several samples per prompt: less noise, more time
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 64  # rows the engine decodes together (a response does not depend on it)
    dtype: str = "float32"  # or "bfloat16"
    seed: int = 1234
    rm_held_in: int = 32  # training comparisons scored for contrast (0 = skip)
    examples: int = 4

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"EvalConfig.dtype={self.dtype!r} must be float32 or bfloat16")
        for name in ("prompts", "samples_per_prompt", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"EvalConfig.{name}={getattr(self, name)} must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"EvalConfig needs temperature >= 0 and 0 < top_p <= 1 (got {self.temperature}, {self.top_p})"
            )


# --- held-out data -------------------------------------------------------------
def held_out(
    snapshots: SnapshotStore, snapshot_id: str, kind: str, want: int | None = None
) -> tuple[list[dict], list[str]]:
    """Records of users outside training: test, then validation if test is short."""
    records, splits = [], []
    for split in ("test", "validation"):
        got = snapshots.read(snapshot_id, split, kind)
        if got:
            records += got
            splits.append(split)
        if want is not None and len(records) >= want:
            break
    return records, splits


def eval_prompts(snapshots: SnapshotStore, snapshot_id: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    records, splits = held_out(snapshots, snapshot_id, "prompts", n)
    texts = sorted({r["text"] for r in records if r.get("text", "").strip()})
    random.Random(seed).shuffle(texts)
    return texts[:n], splits


# --- generation and scoring ------------------------------------------------------
_GENERATED: dict[tuple, list[str]] = {}
_RM_SCORES: dict[tuple, list[list[float]]] = {}


def generate(
    settings: Settings, model_dir: Path, prompts: Sequence[str], cfg: EvalConfig, device: str, label: str = ""
) -> list[str]:
    """Sample one answer per prompt; prompt i always uses seed (cfg.seed, i), so
    every model sees the same random numbers for the same prompts.

    Checkpoints are immutable and sampling is seeded, so a repeat call (the
    final report and the per-round report evaluate the same models) is
    answered from memory."""
    key = (str(model_dir), tuple(prompts), cfg, device)
    if key not in _GENERATED:
        _GENERATED[key] = _generate(settings, model_dir, prompts, cfg, device, label)
    return list(_GENERATED[key])


def _generate(
    settings: Settings, model_dir: Path, prompts: Sequence[str], cfg: EvalConfig, device: str, label: str
) -> list[str]:
    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir, device=device, dtype=getattr(torch, cfg.dtype))
    ids = encode_prompts(tok, prompts)
    seeds = [(cfg.seed << 20) + i for i in range(len(ids))]
    samples = sample_all(
        model,
        tok,
        settings,
        ids,
        seeds,
        rows=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        service="eval",
        version=model_dir.name,
        desc=f"eval: generate {label}",
    )
    return [s.text.strip() for s in samples]


def rm_comparison_scores(
    rm_dir: Path, comparisons: Sequence[Mapping[str, Any]], device: str, label: str
) -> list[list[float]]:
    """The RM's score of every response of these comparisons, in fp32 (from memory
    when this RM has already scored these comparisons: the final report and the
    per-round report both evaluate the last round's RM)."""
    key = (str(rm_dir), tuple((c["prompt_text"], *(r["text"] for r in c["responses"])) for c in comparisons), device)
    if key not in _RM_SCORES:
        tok = load_tokenizer(rm_dir)
        rm = RewardModel.from_pretrained(rm_dir, device=device)
        _RM_SCORES[key] = comparison_scores(rm, tok, comparisons, device, desc=f"eval: RM scores ({label})")
    return _RM_SCORES[key]


def rm_pairwise(comparisons: Sequence[Mapping[str, Any]], scores: Sequence[Sequence[float]]) -> dict[str, Any]:
    """How often the RM orders a labelled pair like the ranking (ties dropped), with a 95% interval."""
    acc = pair_accuracy(comparisons, scores)
    low, high = wilson(acc["correct"], acc["pairs"])
    return {
        "comparisons": acc["comparisons"],
        "pairs": acc["pairs"],
        "accuracy": acc["accuracy"],
        "ci_low": low,
        "ci_high": high,
    }


def gold_ranked(comparisons: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The same comparisons, ranked by the gold preference instead of the labeler."""
    out = []
    for c in comparisons:
        ranks = gold_ranks(c["prompt_text"], [r["text"] for r in c["responses"]])
        out.append({**c, "responses": [{**r, "rank": k} for r, k in zip(c["responses"], ranks, strict=True)]})
    return out


def _constraint_kind(prompt: str) -> str:
    c = parse_constraints(prompt)
    for name, on in (
        ("refusal", c.harmful),
        ("bullets", c.bullets),
        ("lowercase", c.lowercase),
        ("question", c.question),
        ("keyword", c.keyword),
    ):
        if on:
            return name
    return "other"


def _model_summary(prompts: Sequence[str], answers: Sequence[str], scores: Sequence[float]) -> dict[str, Any]:
    mean, low, high = mean_ci(list(scores))
    lengths = [len(words(a)) for a in answers]
    within = [len(words(a)) <= parse_constraints(p).limit for p, a in zip(prompts, answers, strict=True)]
    keyword = [
        check_scores(p, a)["keyword"] for p, a in zip(prompts, answers, strict=True) if parse_constraints(p).keyword
    ]
    return {
        "mean_gold": mean,
        "gold_ci_low": low,
        "gold_ci_high": high,
        "mean_words": statistics.mean(lengths) if lengths else 0.0,
        "within_limit": sum(within) / len(within) if within else 0.0,
        "keyword_rate": sum(keyword) / len(keyword) if keyword else float("nan"),
    }


# --- the report ---------------------------------------------------------------------
def write_report(
    settings: Settings,
    out_dir: Path,
    *,
    base_version: str | None,
    sft_version: str,
    ppo_version: str,
    rm_version: str,
    snapshot_id: str,
    run_dirs: Mapping[str, Path] | None = None,
    extra: Mapping[str, Any] | None = None,
    config: EvalConfig | None = None,
    labeler_agreement: Mapping[str, Any] | None = None,
) -> Path:
    """Evaluate against the gold preference and write report.md; return its path.

    Beside it: report.json (every number), win_rates.png, gold_scores.png and
    curves_<run>.png for each run folder holding a trainer's metrics.jsonl.
    `run_dirs` maps a run's name ("sft", "rm", "ppo") to its --run-dir.
    `extra` holds run facts shown in a table; its key `kl_to_sft`, when
    given, is the final KL (else the PPO run's last logged KL is used).
    `labeler_agreement` is the LabelingService's GetStats figures
    (pairwise_agreement, compared_pairs, kendall_tau_b, overlap_tasks).
    `base_version=None` skips the base model (saves a third of the time).
    Raises CheckpointError / SnapshotError for a missing or corrupt input,
    before anything is written.
    """
    cfg = config or EvalConfig()
    out_dir = Path(out_dir)
    extra = dict(extra or {})
    run_dirs = {k: Path(v) for k, v in (run_dirs or {}).items()}
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    device = resolve_device(settings.device)
    store, snapshots = CheckpointStore(settings.checkpoint_dir), SnapshotStore(settings.dataset_dir)
    # Before to after: the order of every table and example.
    models = {"base": base_version} if base_version else {}
    models.update(sft=sft_version, ppo=ppo_version)
    for version in {**models, "rm": rm_version}.values():
        store.verify(version)  # never evaluate a corrupt or missing checkpoint
    snapshots.manifest(snapshot_id)  # SnapshotError names a missing snapshot
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    # 1. reward model against the labelers and against the gold preference (the same scores)
    held_cmp, cmp_splits = held_out(snapshots, snapshot_id, "comparisons")
    held_scores = rm_comparison_scores(store.path(rm_version), held_cmp, device, "held-out")
    rm_result = {
        "held_out": rm_pairwise(held_cmp, held_scores),
        "held_out_vs_gold": rm_pairwise(gold_ranked(held_cmp), held_scores),
        "held_out_splits": cmp_splits,
        "labeler_agreement": dict(labeler_agreement) if labeler_agreement else None,
    }
    if cfg.rm_held_in:
        train_cmp = snapshots.read(snapshot_id, "train", "comparisons")
        sample = random.Random(cfg.seed).sample(train_cmp, min(cfg.rm_held_in, len(train_cmp)))
        rm_result["held_in"] = rm_pairwise(
            sample, rm_comparison_scores(store.path(rm_version), sample, device, "train")
        )

    # 2. gold win rates on held-out users' prompts
    prompts, prompt_splits = eval_prompts(snapshots, snapshot_id, cfg.prompts, cfg.seed)
    if not prompts:
        raise ValueError(f"snapshot {snapshot_id} has no held-out (test/validation) prompts to evaluate on")
    # Each prompt is repeated samples_per_prompt times; a prompt's score is its samples' mean.
    per = max(1, cfg.samples_per_prompt)
    expanded = [p for p in prompts for _ in range(per)]
    samples = {name: generate(settings, store.path(v), expanded, cfg, device, name) for name, v in models.items()}
    answers = {name: texts[::per] for name, texts in samples.items()}  # the first sample of each prompt
    scores = {
        name: [statistics.mean(gold_score(p, a) for a in texts[i * per : (i + 1) * per]) for i, p in enumerate(prompts)]
        for name, texts in samples.items()
    }
    pairs = [("ppo", "sft"), ("ppo", "base"), ("sft", "base")]
    win_rates = {
        f"{a}_vs_{b}": paired_win_rate(scores[a], scores[b]).as_dict() for a, b in pairs if a in scores and b in scores
    }
    summary = {
        name: _model_summary(
            expanded, samples[name], [gold_score(p, a) for p, a in zip(expanded, samples[name], strict=True)]
        )
        for name in models
    }
    by_kind: dict[str, dict[str, float]] = {}
    for p in prompts:
        by_kind.setdefault(_constraint_kind(p), {}).setdefault("n", 0)
        by_kind[_constraint_kind(p)]["n"] += 1
    for kind in by_kind:
        for name in models:
            vals = [scores[name][i] for i, p in enumerate(prompts) if _constraint_kind(p) == kind]
            by_kind[kind][name] = statistics.mean(vals)

    # 3. KL to SFT: passed in, else the PPO run's last logged KL
    kl, kl_source = extra.pop("kl_to_sft", None), "passed in by the caller"
    curves = {name: _read_metrics(path) for name, path in run_dirs.items()}
    if kl is None:
        for key in ("kl_to_sft", "kl", "mean_kl", "approx_kl"):
            values = [r[key] for r in curves.get("ppo", []) if isinstance(r.get(key), (int, float))]
            if values:
                kl, kl_source = values[-1], f"last `{key}` in the PPO run's metrics.jsonl"
                break

    # 4. plots
    plots = {name: _plot_run(out_dir, name, records) for name, records in curves.items()}
    plots = {k: v for k, v in plots.items() if v}
    _plot_scores(out_dir / "gold_scores.png", scores)
    _plot_win_rates(out_dir / "win_rates.png", win_rates)

    result = {
        "versions": {**models, "rm": rm_version},
        "snapshot_id": snapshot_id,
        "eval": {"prompts": len(prompts), "splits": prompt_splits, **cfg.__dict__},
        "rm_accuracy": rm_result,
        "win_rates": win_rates,
        "models": summary,
        "by_constraint": by_kind,
        "kl_to_sft": kl,
        "kl_source": kl_source if kl is not None else "not available",
        "extra": extra,
        "eval_wall_s": round(time.time() - started, 1),
        "examples": [
            {
                "prompt": p,
                **{name: {"text": answers[name][i], "gold": gold_score(p, answers[name][i])} for name in models},
            }
            for i, p in enumerate(prompts[: cfg.examples])
        ],
    }
    (out_dir / "report.json").write_text(json.dumps(result, indent=2, default=str))
    path = out_dir / "report.md"
    path.write_text(_markdown(result, plots))
    log_fields(
        log,
        20,
        "report written",
        path=str(path),
        ppo_vs_sft=win_rates.get("ppo_vs_sft", {}).get("win_rate"),
        rm_accuracy=rm_result["held_out"]["accuracy"],
        wall_s=result["eval_wall_s"],
    )
    return path


def _read_metrics(run_dir: Path) -> list[dict]:
    """The trainer's metrics.jsonl (see trainers/job.py); [] when absent."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            out.append(record)
    return out


def _plot_run(out_dir: Path, name: str, records: list[dict]) -> str:
    from trainers.report import plot_curves  # the trainers' own plotting, so curves look alike

    keys = sorted(
        {k for r in records for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        - {"step", "time_s"}
    )
    if not keys:
        return ""
    path = out_dir / f"curves_{name}.png"
    plot_curves(path, records, keys, title=f"{name} training")
    return path.name if path.exists() else ""


def _plot_scores(path: Path, scores: Mapping[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(scores)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 3.2))
    ax.boxplot([scores[n] for n in names], showmeans=True)
    ax.set_xticks(range(1, len(names) + 1), names)
    ax.set_ylabel("gold score")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("gold score on held-out users' prompts", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_win_rates(path: Path, win_rates: Mapping[str, Mapping[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(win_rates)
    fig, ax = plt.subplots(figsize=(1.8 * max(1, len(names)) + 2, 3.2))
    rates = [win_rates[n]["win_rate"] for n in names]
    errors = [
        [r - win_rates[n]["ci_low"] for n, r in zip(names, rates, strict=True)],
        [win_rates[n]["ci_high"] - r for n, r in zip(names, rates, strict=True)],
    ]
    ax.bar(range(len(names)), rates, yerr=errors, capsize=6, color="#4c72b0")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(names)), [n.replace("_", " ") for n in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel("gold win rate (95% CI)")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _f(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) else str(x)


def _accuracy(a: Mapping[str, Any]) -> str:
    return f"**{_f(a['accuracy'])}** [{_f(a['ci_low'])}, {_f(a['ci_high'])}], {a['pairs']} pairs"


def _rm_section(rm: Mapping[str, Any]) -> list[str]:
    """Three figures side by side: how far labelers agree, and the RM against gold and against the labelers."""
    agreement = rm.get("labeler_agreement") or {}
    if agreement.get("compared_pairs"):
        measured = (
            f"**{_f(agreement['pairwise_agreement'])}**, {agreement['compared_pairs']} pairs "
            f"on {agreement.get('overlap_tasks', '?')} overlapping tasks"
        )
    else:
        measured = "not measured (no overlapping tasks)"
    splits = " + ".join(rm["held_out_splits"]) or "none"
    lines = [
        "## Reward model: labeler agreement, accuracy against gold and against the labelers",
        "",
        f"On held-out users' comparisons ({splits}; ties dropped; 95% Wilson intervals). The labelers' agreement "
        "(LabelingService, pairs of labelers on the same task; a response pair both tie counts as agreement, one "
        "tie against an order as disagreement) bounds the accuracy an RM can reach against them.",
        "",
        "| labeler agreement | RM accuracy vs gold | RM accuracy vs labelers |",
        "|---|---|---|",
    ]
    vs_gold = _accuracy(rm["held_out_vs_gold"]) if "held_out_vs_gold" in rm else "-"
    lines += [f"| {measured} | {vs_gold} | {_accuracy(rm['held_out'])} |", ""]
    if "held_in" in rm:
        lines.append(f"- training users (sample), vs labelers: {_accuracy(rm['held_in'])}.")
    return lines


def _markdown(r: Mapping[str, Any], plots: Mapping[str, str]) -> str:
    v, e = r["versions"], r["eval"]
    lines = [
        "# RLHF demo report",
        "",
        f"Dataset snapshot `{r['snapshot_id']}`. Policies: "
        + ", ".join(f"{k} `{x}`" for k, x in v.items() if k != "rm")
        + f"; reward model `{v['rm']}`.",
        "",
        f"Evaluation: {e['prompts']} prompts of held-out users ({' + '.join(e['splits'])} split), "
        f"{e['samples_per_prompt']} sample(s) per model and prompt (a prompt's score is their mean), "
        f"temperature {e['temperature']}, top-p {e['top_p']}, at most {e['max_new_tokens']} new tokens, "
        f"the same seeds for every model. Scores come from the gold preference (services/sim/tasks.py).",
        "",
    ]
    lines += [
        "## Gold win rates",
        "",
        "| comparison | win rate | 95% CI | W/T/L | mean gold diff | 95% CI | significant |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, w in r["win_rates"].items():
        lines.append(
            f"| {name.replace('_', ' ')} | {_f(w['win_rate'])} | [{_f(w['ci_low'])}, {_f(w['ci_high'])}] | "
            f"{w['wins']}/{w['ties']}/{w['losses']} | {_f(w['mean_diff'], 4)} | "
            f"[{_f(w['diff_ci_low'], 4)}, {_f(w['diff_ci_high'], 4)}] | "
            f"{'yes' if w['significant'] else 'no'} |"
        )
    lines += [
        "",
        "![win rates](win_rates.png)",
        "",
        "## Models on held-out prompts",
        "",
        "| model | mean gold | 95% CI | mean words | within word limit | required word used |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in r["models"].items():
        lines.append(
            f"| {name} | {_f(s['mean_gold'])} | [{_f(s['gold_ci_low'])}, {_f(s['gold_ci_high'])}] | "
            f"{_f(s['mean_words'], 1)} | "
            f"{_f(100 * s['within_limit'], 0)}% | {_f(100 * s['keyword_rate'], 0)}% |"
        )
    names = list(r["models"])
    lines += [
        "",
        "Mean gold score by the constraint a prompt states:",
        "",
        "| constraint | n | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for kind, row in sorted(r["by_constraint"].items()):
        lines.append(f"| {kind} | {row['n']} | " + " | ".join(_f(row[n]) for n in names) + " |")
    lines += ["", "![gold scores](gold_scores.png)", ""]
    lines += _rm_section(r["rm_accuracy"])
    lines += [
        "(InstructGPT: labelers agree 72.6 ± 1.5%; its RM reaches 72.4% on held-in and 69.6% on held-out labelers.)",
        "",
        "## KL to the SFT policy",
        "",
        f"Final KL: **{_f(r['kl_to_sft'], 4)}** ({r['kl_source']}).",
        "",
    ]
    if r["extra"]:
        lines += ["## Run facts", "", "| item | value |", "|---|---|"]
        lines += [f"| {k} | {_f(x, 4) if isinstance(x, float) else x} |" for k, x in r["extra"].items()]
        lines.append("")
    lines += ["## Training curves", ""]
    lines += [f"![{name}]({png})" for name, png in plots.items()] or ["No metrics.jsonl was found in the run folders."]
    lines += ["", "## Examples, before and after", ""]
    for ex in r["examples"]:
        lines += [f"**Prompt:** {ex['prompt']}", ""]
        for name in names:
            text = ex[name]["text"].replace("\n", " ⏎ ")
            lines.append(f"- *{name}* (gold {_f(ex[name]['gold'], 2)}): {text}")
        lines.append("")
    lines.append(f"Evaluation took {r['eval_wall_s']} s.")
    return "\n".join(lines) + "\n"
