"""The results tables in README.md and docs/results.md are generated from docs/results/*.json."""

from __future__ import annotations

import json
import os
import shutil

from bench import report

ROOT = report.ROOT


def test_every_generated_table_matches_the_checked_in_results():
    blocks = report.render(report.load())
    for doc in report.DOCUMENTS:
        text = doc.read_text()
        assert report.blocks_in(text), f"{doc.name} has no generated results block"
        assert report.with_blocks(text, blocks) == text, (
            f"{doc.relative_to(ROOT)} differs from docs/results/*.json: python -m bench.report --write"
        )
    readme = (ROOT / "README.md").read_text()
    assert "RESULTS-SUMMARY" in report.blocks_in(readme)
    results_md = (ROOT / "docs" / "results.md").read_text()
    assert {"DEMO-COMPARISONS", "DEMO-SEEDS", "DEMO-ROUNDS", "BENCH-TABLE"} <= set(report.blocks_in(results_md))


def test_a_changed_figure_makes_the_tables_stale(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "docs" / "results", results)
    run = next(p for p in sorted((results / "demo").glob("*.json")) if "win_rates" in json.loads(p.read_text()))
    data = json.loads(run.read_text())
    rate = data["win_rates"]["ppo_vs_sft"]
    before = f"{rate['win_rate']:.3f} [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}]"
    rate["win_rate"] = 0.0123
    run.write_text(json.dumps(data))
    blocks = report.render(report.load(results))
    readme = (ROOT / "README.md").read_text()
    assert report.with_blocks(readme, blocks) != readme
    after = f"0.012 [{rate['ci_low']:.3f}, {rate['ci_high']:.3f}]"
    assert after in blocks["DEMO-SEEDS"] and before not in blocks["DEMO-SEEDS"]


def test_new_and_unknown_result_files_are_listed_not_dropped(tmp_path):
    results = tmp_path / "results"
    (results / "bench").mkdir(parents=True)
    (results / "demo").mkdir()
    # A benchmark that writes rows, one that does not yet, and a demo of another shape.
    (results / "bench" / "mfu.json").write_text(
        json.dumps(
            {
                "date": "2026-12-02",
                "machine": "m",
                "commit": "abc",
                "rows": [
                    {"what": "decode MFU", "result": {"value": 0.31, "unit": "of peak"}, "baseline": "b", "ratio": 2.5},
                    {"what": "prefill", "result": "9 ms", "headline": True, "ratio": None},
                ],
            }
        )
    )
    (results / "bench" / "durable.json").write_text(json.dumps({"date": "2026-12-02", "events_per_s": 2300}))
    (results / "demo" / "rounds-seed0.json").write_text(json.dumps({"kind": "demo", "rounds": [{"round": 1}]}))
    blocks = report.render(report.load(results))
    assert "| decode MFU | 0.31 of peak | b | 2.5× | 2026-12-02 |" in blocks["BENCH-TABLE"]
    assert "Benchmarks without table rows yet: `durable`" in blocks["BENCH-TABLE"]
    assert "`durable`: 2026-12-02; machine not recorded; commit not recorded." in blocks["BENCH-TABLE"]
    assert "| prefill | 9 ms; – | 2026-12-02 |" in blocks["RESULTS-SUMMARY"]
    assert "Other demo results (no gold win rates to tabulate): `rounds-seed0`" in blocks["DEMO-SEEDS"]


def test_update_copies_a_demo_report_into_its_result_file(tmp_path, monkeypatch):
    measured = tmp_path / "report.json"
    measured.write_text(
        json.dumps(
            {
                "win_rates": {"ppo_vs_sft": {"win_rate": 0.6, "ci_low": 0.51, "ci_high": 0.7}},
                "rm_accuracy": {"held_out": {"accuracy": 0.7}},
                "kl_to_sft": 0.5,
                "extra": {"preset": {"name": "tiny", "seed": 3}, "timings_s": {"a": 10.4, "b": 20.3}},
            }
        )
    )
    monkeypatch.setattr(report, "MEASURED_DEMO", measured)
    monkeypatch.setattr(report, "MEASURED_BENCH", tmp_path / "no-bench-results")
    written = report.update(tmp_path / "results")
    data = json.loads((tmp_path / "results" / "demo" / "tiny-seed3.json").read_text())
    assert written == [tmp_path / "results" / "demo" / "tiny-seed3.json"]
    assert (data["preset"], data["seed"], data["wall_s"], data["kl_to_sft"]) == ("tiny", 3, 31, 0.5)
    row = report.demo_seeds(report.load(tmp_path / "results")).splitlines()[2]
    assert row.startswith("| tiny | 3 | – | – | **0.600 [0.510, 0.700]** | – | – | – | 70.0% | 0.50 | 31 s |")


def test_a_demo_result_names_the_run_that_measured_it_not_the_copy(tmp_path, monkeypatch):
    """A demo report copied in later, on other code or another machine, keeps its own
    date, commit and machine; one that never recorded them says so, dated by its file."""
    measured = tmp_path / "report.json"
    recorded = {"date": "2026-11-30", "commit": "abc1234", "machine": "2-core x86_64, CPU capability AVX2"}
    monkeypatch.setattr(report, "MEASURED_BENCH", tmp_path / "no-bench-results")
    for extra in (recorded, {"cpu_capability": "AVX2"}):
        measured.write_text(json.dumps({"extra": {"preset": {"name": "cpu", "seed": 1}, **extra}}))
        os.utime(measured, (1764460800, 1764460800))  # 2025-11-30 UTC
        (written,) = report.update(tmp_path / "results", demo_reports=[measured])
        data = json.loads(written.read_text())
        if extra is recorded:
            assert {k: data[k] for k in recorded} == recorded
        else:
            assert (data["date"], data["commit"], data["machine"]) == (
                "2025-11-30",
                "not recorded",
                "CPU capability AVX2",
            )


def test_update_copies_rounds_from_named_demo_reports_and_renders_them(tmp_path, monkeypatch):
    def row(n: int, served: str, gold: float, promote: bool) -> dict:
        return {
            "round": n,
            "collected_on": [f"v{n - 1}"],
            "served": served,
            "mean_gold": gold,
            "gold_ci": [gold - 0.05, gold + 0.05],
            "win_vs_sft": {"win_rate": 0.7, "ci_low": 0.58, "ci_high": 0.8, "wins": 40, "ties": 10, "losses": 14},
            "rm_accuracy_vs_gold": {"accuracy": 0.61, "pairs": 90},
            "rm_accuracy_vs_labelers": {"accuracy": 0.66, "pairs": 90},
            "kl_to_sft": 1.25,
            "gate": [
                {"model": "reward", "promote": True, "reason": "r", "version": "rm"},
                {"model": "policy", "promote": promote, "reason": "p", "version": served},
            ],
            "ppo_curve": [{"step": 0, "reward_score": -1.0}],  # not copied: the table does not show it
        }

    measured = tmp_path / "home" / "report.json"
    measured.parent.mkdir()
    measured.write_text(
        json.dumps(
            {
                "win_rates": {"ppo_vs_sft": {"win_rate": 0.7, "ci_low": 0.58, "ci_high": 0.8}},
                "total_wall_s": 1190.4,
                "extra": {"preset": {"name": "cpu", "seed": 7}, "cpu_capability": "AVX2", "timings_s": {"a": 1}},
                "rounds": {"rows": [row(1, "ppo-a", 0.65, True), row(2, "ppo-a", 0.66, False)]},
            }
        )
    )
    monkeypatch.setattr(report, "MEASURED_BENCH", tmp_path / "no-bench-results")
    written = report.update(tmp_path / "results", demo_reports=[measured, tmp_path / "missing.json"])
    assert written == [tmp_path / "results" / "demo" / "cpu-seed7.json"]
    data = json.loads(written[0].read_text())
    assert (data["wall_s"], data["cpu_capability"], len(data["rounds"])) == (1190, "AVX2", 2)
    assert "ppo_curve" not in data["rounds"][0]
    table = report.demo_rounds(report.load(tmp_path / "results"))
    assert "cpu preset, seed 7" in table and "AVX2" in table
    assert "| 2 | v1 | ppo-a | 0.660 [0.610, 0.710] | **0.700 [0.580, 0.800]** | 61.0% / 66.0% | 1.25 " in table
    assert table.rstrip().endswith("| reward promoted, policy rejected |")
    results = report.load(tmp_path / "results")
    assert "| cpu | 7 | AVX2 | PPO | **0.700 [0.580, 0.800]** |" in report.demo_seeds(results)
    assert "final policy vs SFT gold win rate, seeds 7 | 0.700 |" in report.summary(results)


def test_a_run_whose_gates_kept_sft_says_so_instead_of_the_candidates_win_rate(tmp_path):
    """The headline is the policy served at the end: where every PPO candidate was rejected
    that is SFT itself, and the last candidate's (bad) win rate must not read as the result."""
    (tmp_path / "demo").mkdir()
    rounds = [{"round": n, "served": "`sft-a`", "mean_gold": 0.8, "gate": []} for n in (0, 1, 2, 3)]
    run = {"preset": "cpu", "seed": 2, "win_rates": {"ppo_vs_sft": {"win_rate": 0.016}}, "rounds": rounds}
    (tmp_path / "demo" / "cpu-seed2.json").write_text(json.dumps(run))
    results = report.load(tmp_path)
    assert "seeds 2 | SFT served (rejected PPO candidate 0.016) |" in report.summary(results)
    assert "| cpu | 2 | – | SFT | 0.016 " in report.demo_seeds(results)


def test_a_run_on_a_capped_cpu_is_labelled_so_in_the_summary(tmp_path):
    (tmp_path / "demo").mkdir()
    capped = "2-core x86_64, CPU capability AVX2 (capped by ATEN_CPU_CAPABILITY=avx2 on a CPU with avx512_bf16)"
    for stem, cap, machine in (("a", "AVX2", capped), ("b", "AVX512+avx512_bf16", "2-core x86_64")):
        run = {"preset": "cpu", "seed": 0, "cpu_capability": cap, "machine": machine, "win_rates": {}}
        (tmp_path / "demo" / f"cpu-seed0-{stem}.json").write_text(json.dumps(run))
    summary = report.summary(report.load(tmp_path))
    assert "seeds 0 (AVX2, capped), 0 (AVX512+avx512_bf16) |" in summary


def test_the_seeds_table_names_each_runs_cpu_and_marks_a_capped_one(tmp_path):
    results = tmp_path / "results"
    shutil.copytree(ROOT / "docs" / "results", results)
    run = next(p for p in sorted((results / "demo").glob("*.json")) if "win_rates" in json.loads(p.read_text()))
    data = json.loads(run.read_text())
    data.update(seed=7, cpu_capability="AVX2", machine=f"2-core x86_64, {report.CAPPED}")
    (results / "demo" / "cpu-seed7.json").write_text(json.dumps(data))
    row = next(line for line in report.render(report.load(results))["DEMO-SEEDS"].splitlines() if "| 7 |" in line)
    assert row.startswith("| cpu | 7 | AVX2, capped | ")
