"""The demo report runs end to end on tiny checkpoints and writes Markdown,
JSON and PNG plots; identical policies with identical seeds tie everywhere."""

from __future__ import annotations

import json
import random

import pytest

from services.common.checkpoints import CheckpointError, CheckpointStore
from services.common.datasets import SnapshotStore
from services.common.models import RewardModel, load_tokenizer
from services.sim.report import EvalConfig, write_report
from services.sim.tasks import gold_ranks, sample_task, write_demonstration
from tests.conftest import make_settings

PNG = b"\x89PNG\r\n\x1a\n"


def _comparison(rng: random.Random, i: int, user: str, labeler_agrees: bool = True) -> dict:
    """Three responses ranked by gold, or (labeler_agrees=False) in the order a careless labeler gives."""
    prompt = sample_task(rng, family="describe").render()
    texts = [write_demonstration(prompt, random.Random(i)), "The thing is big " * 6, "ok"]
    ranks = gold_ranks(prompt, texts) if labeler_agrees else [3, 2, 1]
    return {
        "event_id": f"c{i}",
        "prompt_id": f"p{i}",
        "user_id": user,
        "labeler_id": "labeler-0",
        "prompt_text": prompt,
        "responses": [{"text": t, "policy_version": "sft-x", "rank": r} for t, r in zip(texts, ranks, strict=True)],
    }


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dir):
    settings = make_settings(tmp_path / "home")
    store = CheckpointStore(settings.checkpoint_dir)
    base = store.import_dir(tiny_model_dir, "base").version
    sft = store.import_dir(tiny_model_dir, "sft", parents=[base]).version
    ppo = store.import_dir(tiny_model_dir, "ppo", parents=[sft]).version
    with store.stage("rm", parents=[sft]) as (folder, manifest):
        RewardModel.from_causal_lm(tiny_model_dir).save_pretrained(folder, tokenizer=load_tokenizer(tiny_model_dir))
        rm = manifest.version
    rng = random.Random(0)
    data = {
        "train": {"comparisons": [_comparison(rng, i, "user-000") for i in range(3)]},
        "validation": {
            "prompts": [
                {
                    "event_id": "v1",
                    "prompt_id": "v1",
                    "user_id": "user-007",
                    "text": sample_task(rng).render(),
                    "source": "sim",
                }
            ]
        },
        "test": {
            "prompts": [
                {
                    "event_id": f"t{i}",
                    "prompt_id": f"t{i}",
                    "user_id": "user-009",
                    "text": sample_task(rng).render(),
                    "source": "sim",
                }
                for i in range(5)
            ],
            "comparisons": [_comparison(rng, 10 + i, "user-009", labeler_agrees=i > 0) for i in range(3)],
        },
    }
    snapshot = SnapshotStore(settings.dataset_dir).write(data)["snapshot_id"]
    runs = tmp_path / "runs"
    for name, keys in (("sft", ["loss"]), ("ppo", ["reward", "kl", "loss"])):
        (runs / name).mkdir(parents=True)
        lines = [json.dumps({"step": s, "time_s": s * 1.5, **{k: 1.0 / (s + 1) for k in keys}}) for s in range(5)]
        (runs / name / "metrics.jsonl").write_text(
            "\n".join(lines) + '\n{"step": 5, "los'
        )  # last line cut short by a crash
    (runs / "rm").mkdir()  # no metrics at all: plotted gracefully as nothing
    return (
        settings,
        dict(base=base, sft=sft, ppo=ppo, rm=rm, snapshot=snapshot),
        {n: runs / n for n in ("sft", "rm", "ppo")},
        data,
    )


def test_report_end_to_end(tmp_path, tiny_run):
    settings, v, run_dirs, data = tiny_run
    cfg = EvalConfig(prompts=6, samples_per_prompt=2, max_new_tokens=8, batch_size=4, rm_held_in=2, examples=2)
    path = write_report(
        settings,
        tmp_path / "report",
        base_version=v["base"],
        sft_version=v["sft"],
        ppo_version=v["ppo"],
        rm_version=v["rm"],
        snapshot_id=v["snapshot"],
        run_dirs=run_dirs,
        extra={"demo_wall_s": 12.5},
        config=cfg,
        labeler_agreement={
            "pairwise_agreement": 0.73,
            "compared_pairs": 120,
            "kendall_tau_b": 0.5,
            "overlap_tasks": 20,
        },
    )
    out = path.parent
    text = path.read_text()
    for heading in (
        "## Gold win rates",
        "## Reward model: labeler agreement, accuracy against gold and against the labelers",
        "## KL to the SFT policy",
        "## Examples, before and after",
    ):
        assert heading in text
    for png in ("win_rates.png", "gold_scores.png", "curves_sft.png", "curves_ppo.png"):
        assert (out / png).read_bytes()[:8] == PNG
        assert f"]({png})" in text
    assert not (out / "curves_rm.png").exists()

    result = json.loads((out / "report.json").read_text())
    # 5 test prompts are fewer than asked for: validation (also held-out users) tops them up
    assert result["eval"]["prompts"] == 6 and result["eval"]["splits"] == ["test", "validation"]
    # SFT and PPO are the same weights sampled with the same seeds: every prompt ties
    same = result["win_rates"]["ppo_vs_sft"]
    assert (same["ties"], same["win_rate"], same["mean_diff"], same["significant"]) == (6, 0.5, 0.0, False)
    assert set(result["win_rates"]) == {"ppo_vs_sft", "ppo_vs_base", "sft_vs_base"}
    pairs = sum(
        1
        for c in data["test"]["comparisons"]
        for i, a in enumerate(c["responses"])
        for b in c["responses"][i + 1 :]
        if a["rank"] != b["rank"]
    )
    assert result["rm_accuracy"]["held_out"]["pairs"] == pairs and result["rm_accuracy"]["held_out"]["comparisons"] == 3
    # Against gold, the careless labeler's comparison counts by its gold ranks: the two figures differ.
    gold = [gold_ranks(c["prompt_text"], [r["text"] for r in c["responses"]]) for c in data["test"]["comparisons"]]
    gold_pairs = sum(1 for ranks in gold for i, a in enumerate(ranks) for b in ranks[i + 1 :] if a != b)
    vs_gold, vs_labelers = result["rm_accuracy"]["held_out_vs_gold"], result["rm_accuracy"]["held_out"]
    assert vs_gold["pairs"] == gold_pairs and vs_gold["comparisons"] == 3
    assert vs_gold["accuracy"] != vs_labelers["accuracy"]
    assert result["rm_accuracy"]["labeler_agreement"]["pairwise_agreement"] == 0.73
    row = next(
        line for line in text.splitlines() if line.startswith("| **0.730**, 120 pairs on 20 overlapping tasks |")
    )
    assert f"**{vs_gold['accuracy']:.3f}**" in row.split("|")[2] and f"**{vs_labelers['accuracy']:.3f}**" in row
    assert (
        0.0
        <= result["rm_accuracy"]["held_out"]["ci_low"]
        <= result["rm_accuracy"]["held_out"]["accuracy"]
        <= result["rm_accuracy"]["held_out"]["ci_high"]
        <= 1.0
    )
    assert result["rm_accuracy"]["held_in"]["comparisons"] == 2
    assert result["kl_to_sft"] == pytest.approx(0.2) and "metrics.jsonl" in result["kl_source"]
    assert len(result["examples"]) == 2 and result["extra"] == {"demo_wall_s": 12.5}


def test_missing_checkpoint_is_refused_and_nothing_written(tmp_path, tiny_run):
    settings, v, run_dirs, _ = tiny_run
    with pytest.raises(CheckpointError, match="ppo-missing"):
        write_report(
            settings,
            tmp_path / "nothing",
            base_version=None,
            sft_version=v["sft"],
            ppo_version="ppo-missing",
            rm_version=v["rm"],
            snapshot_id=v["snapshot"],
            run_dirs=run_dirs,
        )
    assert not (tmp_path / "nothing").exists()


def test_bad_eval_config_names_the_field():
    with pytest.raises(ValueError, match="EvalConfig.samples_per_prompt=0"):
        EvalConfig(samples_per_prompt=0)
    with pytest.raises(ValueError, match="dtype"):
        EvalConfig(dtype="fp8")
