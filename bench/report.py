"""Results tables, generated from measured files.

    python -m bench.report             print every generated block
    python -m bench.report --write     rewrite the generated blocks of README.md and docs/results.md
    python -m bench.report --check     exit 1 if a block differs from its rendering (tests/unit/test_results_tables.py)
    python -m bench.report --update    first copy the latest measured files into docs/results/, then --write:
                                       bench/results/<name>.json -> docs/results/bench/<name>.json,
                                       var/demo/report/report.json -> docs/results/demo/<preset>-seed<N>.json
                                       (--demo-report PATH, repeatable, copies other demo homes' reports)

The checked-in results live in docs/results/ (bench/results/ and var/ are not
tracked): one JSON file per benchmark and one per demo run. Each names its
`date`, `machine` (with the CPU capability, which decides the dtype) and
`commit`; `--update` adds those that a benchmark file lacks (benchmarks record them
when they write), and a demo keeps the ones its report recorded, else "not recorded"
and the report file's date. A block of generated text
sits between `<!-- NAME -->` and `<!-- /NAME -->` markers; text outside the
markers is written by hand and left alone.

How a benchmark adds its table: put a `rows` list in the JSON it writes
(bench/common.write_results), one object per table row:

    what        what was measured                 "serving, 16 concurrent gRPC streams"
    result      the figure, as the bench words it "76 tok/s"  (or {"value": 76.0, "unit": "tok/s"})
    baseline    the same-run baseline and figure  "HF `generate`, one at a time: 15.4 tok/s"
    ratio       result / baseline, or null        4.95
    headline    true: bold, and listed in the README's summary
    ratio_unit, ratio_note   optional text after the ratio ("× faster", " (target 0.5)")

Then `make bench` + `python -m bench.report --update` put it in the tables. A
benchmark file without `rows` is still listed (name, date, machine), so a new
benchmark shows up before it has a table. A demo file is rendered from the keys
services/sim/report.py writes (`win_rates`, `rm_accuracy`, `kl_to_sft`, and
`rounds` from services/sim/rounds.py); one without `win_rates` (e.g. another
kind of demo) is listed by name.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.provenance import CAPPED, commit, machine

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "docs" / "results"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "results.md")
MEASURED_BENCH = ROOT / "bench" / "results"
MEASURED_DEMO = ROOT / "var" / "demo" / "report" / "report.json"
COMPARISONS = (("ppo_vs_sft", "PPO vs SFT"), ("ppo_vs_base", "PPO vs base"), ("sft_vs_base", "SFT vs base"))
MINUS = "\u2212"  # typeset minus, as the hand-written tables had it


@dataclass
class Results:
    """Every checked-in result: benchmark files by name, demo files by file stem."""

    bench: dict[str, dict[str, Any]] = field(default_factory=dict)
    demo: dict[str, dict[str, Any]] = field(default_factory=dict)


def load(results_dir: Path = RESULTS_DIR) -> Results:
    results = Results()
    for kind, into in (("bench", results.bench), ("demo", results.demo)):
        for path in sorted((results_dir / kind).glob("*.json")):
            into[path.stem] = json.loads(path.read_text())
    return results


# --- formatting -------------------------------------------------------------------------


def _num(x: float, digits: int, sign: bool = False) -> str:
    text = f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"
    return text.replace("-", MINUS)


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def _win(w: Mapping[str, Any]) -> tuple[str, bool]:
    """'0.664 [0.539, 0.770]' and whether its CI excludes a coin flip."""
    if "ci_low" not in w:
        return _num(w["win_rate"], 3), False
    text = f"{_num(w['win_rate'], 3)} [{_num(w['ci_low'], 3)}, {_num(w['ci_high'], 3)}]"
    return text, w["ci_low"] > 0.5 or w["ci_high"] < 0.5


def _diff(w: Mapping[str, Any]) -> tuple[str, bool]:
    """'+0.070 [+0.019, +0.122]' and whether its CI excludes 0."""
    if "mean_diff" not in w:
        return "–", False
    if "diff_ci_low" not in w:
        return _num(w["mean_diff"], 3, sign=True), False
    text = f"{_num(w['mean_diff'], 3, True)} [{_num(w['diff_ci_low'], 3, True)}, {_num(w['diff_ci_high'], 3, True)}]"
    return text, w["diff_ci_low"] > 0 or w["diff_ci_high"] < 0


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _figure(value: Any) -> str:
    if isinstance(value, Mapping):
        return f"{value['value']:g} {value.get('unit', '')}".strip()
    return "–" if value is None else str(value)


def _ratio(row: Mapping[str, Any]) -> str:
    ratio = row.get("ratio")
    text = "–" if ratio is None else _bold(f"{ratio:g}×{row.get('ratio_unit', '')}", bool(row.get("headline")))
    return text + row.get("ratio_note", "")


def _provenance(name: str, data: Mapping[str, Any]) -> str:
    parts = [data.get("date", "date not recorded"), data.get("machine", "machine not recorded")]
    parts.append(f"commit {data.get('commit', 'not recorded')}")
    line = f"- `{name}`: " + "; ".join(parts) + "."
    if data.get("note"):
        line += f" {data['note']}"
    return line


def _demos(results: Results) -> list[tuple[str, dict[str, Any]]]:
    """Demo runs with gold win rates, by preset and seed."""
    runs = [(stem, d) for stem, d in results.demo.items() if "win_rates" in d]
    return sorted(runs, key=lambda item: (item[1].get("preset", ""), item[1].get("seed", 0), item[0]))


# --- the blocks ------------------------------------------------------------------------


def demo_comparisons(results: Results) -> str:
    """Per demo run that has all three comparisons: win rate, W/T/L and gold difference."""
    out: list[str] = []
    for stem, d in _demos(results):
        rates = d["win_rates"]
        if not all(key in rates and "wins" in rates[key] for key, _ in COMPARISONS):
            continue
        out += [
            f"{d.get('preset', '?')} preset, seed {d.get('seed', '?')} ({d.get('date', 'undated')}, `{stem}`):",
            "",
            "| comparison (gold preference) | win rate [95% CI] | W / T / L | mean gold difference [95% CI] |",
            "|---|---|---|---|",
        ]
        for key, label in COMPARISONS:
            w = rates[key]
            win, win_sig = _win(w)
            diff, diff_sig = _diff(w)
            out.append(
                f"| {_bold(label, win_sig or diff_sig)} | {_bold(win, win_sig)} | "
                f"{w['wins']} / {w['ties']} / {w['losses']} | {_bold(diff, diff_sig)} |"
            )
        out.append("")
    return "\n".join(out).rstrip() or "No demo result with all three comparisons yet."


def _cpu(d: Mapping[str, Any]) -> str | None:
    """The run's CPU capability, marked where PyTorch was capped below the CPU by hand."""
    capped = CAPPED in str(d.get("machine", ""))
    return f"{d['cpu_capability']}, capped" if capped and d.get("cpu_capability") else d.get("cpu_capability")


def _served_at_end(d: Mapping[str, Any]) -> str | None:
    """What the run served after its last round's gates: PPO or SFT (None without rounds)."""
    rounds = d.get("rounds") or []
    if not rounds:
        return None
    return "PPO" if str(rounds[-1]["served"]).strip("`").startswith("ppo") else "SFT"


def _final_vs_sft(d: Mapping[str, Any]) -> str:
    """The served policy's gold win rate against SFT; a rejected PPO candidate's in words."""
    candidate = _num(d["win_rates"]["ppo_vs_sft"]["win_rate"], 3)
    if _served_at_end(d) == "SFT":
        return f"SFT served (rejected PPO candidate {candidate})"
    return candidate


def demo_seeds(results: Results) -> str:
    """One row per demo run: the headline comparison, the RM, KL and wall time."""
    runs = _demos(results)
    lines = [
        "| preset | seed | CPU | served at the end "
        "| PPO (where SFT is served: the last candidate) vs SFT win rate [95% CI] "
        "| mean gold diff [95% CI] | PPO vs base | SFT vs base "
        "| RM acc., held-out users | KL to SFT | wall | date |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, d in runs:
        rates = d["win_rates"]
        win, win_sig = _win(rates["ppo_vs_sft"]) if "ppo_vs_sft" in rates else ("–", False)
        diff, diff_sig = _diff(rates.get("ppo_vs_sft", {}))
        base = _num(rates["ppo_vs_base"]["win_rate"], 3) if "ppo_vs_base" in rates else "–"
        sft = _num(rates["sft_vs_base"]["win_rate"], 3) if "sft_vs_base" in rates else "–"
        rm = _pct(d.get("rm_accuracy", {}).get("held_out", {}).get("accuracy"))
        kl = "–" if d.get("kl_to_sft") is None else _num(d["kl_to_sft"], 2)
        wall = "–" if d.get("wall_s") is None else f"{d['wall_s']:.0f} s"
        lines.append(
            f"| {d.get('preset', '?')} | {d.get('seed', '?')} | {_cpu(d) or '–'} | {_served_at_end(d) or '–'} "
            f"| {_bold(win, win_sig)} | {_bold(diff, diff_sig)} "
            f"| {base} | {sft} | {rm} | {kl} | {wall} | {d.get('date', '–')} |"
        )
    lines += ["", "Where and when:", ""] + [_provenance(stem, d) for stem, d in runs]
    others = sorted(set(results.demo) - {stem for stem, _ in runs})
    if others:
        lines += ["", "Other demo results (no gold win rates to tabulate): " + ", ".join(f"`{s}`" for s in others)]
    return "\n".join(lines)


def _gate(decisions: list[Mapping[str, Any]]) -> str:
    return ", ".join(f"{d['model']} {'promoted' if d.get('promote') else 'rejected'}" for d in decisions) or "–"


def demo_rounds(results: Results) -> str:
    """Per demo run with rounds: the served policy round by round (services/sim/rounds.py)."""
    out: list[str] = []
    for stem, d in _demos(results):
        rounds = d.get("rounds") or []
        if not rounds:
            continue
        out += [
            f"{d.get('preset', '?')} preset, seed {d.get('seed', '?')} ({d.get('date', 'undated')}, `{stem}`, "
            f"{_cpu(d) or 'CPU capability not recorded'}):",
            "",
            "| round | samples from | served after | gold score [95% CI] | win rate vs SFT [95% CI] "
            "| RM acc. vs gold / labelers | KL to SFT | gates |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rounds:
            low, high = r.get("gold_ci") or (None, None)
            gold = f"{_num(r['mean_gold'], 3)} [{_num(low, 3)}, {_num(high, 3)}]" if low is not None else "–"
            win, win_sig = _win(r["win_vs_sft"]) if r.get("win_vs_sft") else ("–", False)
            rm = f"{_pct(r['rm_vs_gold'])} / {_pct(r['rm_vs_labelers'])}" if r.get("rm_vs_gold") is not None else "–"
            kl = "–" if r.get("kl_to_sft") is None else _num(r["kl_to_sft"], 2)
            out.append(
                f"| {r['round']} | {', '.join(r.get('collected_on') or []) or '–'} | {r['served']} | {gold} "
                f"| {_bold(win, win_sig)} | {rm} | {kl} | {_gate(r.get('gate') or [])} |"
            )
        out.append("")
    return "\n".join(out).rstrip() or "No demo result with rounds yet."


def bench_table(results: Results) -> str:
    """Every benchmark's rows; benchmarks without rows are listed by name."""
    lines = ["| benchmark | result | baseline (same run) | ratio | date |", "|---|---|---|---|---|"]
    for name, data in sorted(results.bench.items()):
        for row in data.get("rows", ()):
            lines.append(
                f"| {row.get('what', name)} | {_figure(row.get('result'))} | {_figure(row.get('baseline'))} "
                f"| {_ratio(row)} | {data.get('date', '–')} |"
            )
    lines += ["", "Where and when:", ""] + [_provenance(name, data) for name, data in sorted(results.bench.items())]
    bare = [name for name, data in sorted(results.bench.items()) if not data.get("rows")]
    if bare:
        lines += ["", "Benchmarks without table rows yet: " + ", ".join(f"`{n}`" for n in bare)]
    return "\n".join(lines)


def summary(results: Results) -> str:
    """The README's few lines: the demo's headline per run and each benchmark's headline rows."""
    lines = ["| result | figure | measured |", "|---|---|---|"]
    runs = _demos(results)
    if runs:
        presets = sorted({d.get("preset", "?") for _, d in runs})
        dates = sorted({d.get("date", "–") for _, d in runs})
        cpus = {_cpu(d) for _, d in runs}  # runs on different CPUs say which
        seeds = ", ".join(str(d.get("seed", "?")) + (f" ({_cpu(d) or '?'})" if len(cpus) > 1 else "") for _, d in runs)
        wins = ", ".join(_final_vs_sft(d) for _, d in runs if "ppo_vs_sft" in d["win_rates"])
        sft = ", ".join(
            _num(d["win_rates"]["sft_vs_base"]["win_rate"], 3) if "sft_vs_base" in d["win_rates"] else "–"
            for _, d in runs
        )
        rms = ", ".join(_pct(d.get("rm_accuracy", {}).get("held_out", {}).get("accuracy")) for _, d in runs)
        when = " to ".join(dict.fromkeys([dates[0], dates[-1]]))
        lines.append(
            f"| `make demo` ({'/'.join(presets)}), final policy vs SFT gold win rate, seeds {seeds} | {wins} | {when} |"
        )
        lines.append(f"| `make demo`, SFT vs base model gold win rate, seeds {seeds} | {sft} | {when} |")
        lines.append(f"| `make demo`, reward model pair accuracy on held-out users, seeds {seeds} | {rms} | {when} |")
    for _name, data in sorted(results.bench.items()):
        for row in data.get("rows", ()):
            if row.get("headline"):
                ratio = _ratio({**row, "ratio_note": ""})  # the notes stay in the full table
                lines.append(f"| {row.get('what')} | {_figure(row.get('result'))}; {ratio} | {data.get('date', '–')} |")
    return "\n".join(lines)


BLOCKS = {
    "RESULTS-SUMMARY": summary,
    "DEMO-COMPARISONS": demo_comparisons,
    "DEMO-SEEDS": demo_seeds,
    "DEMO-ROUNDS": demo_rounds,
    "BENCH-TABLE": bench_table,
}


def render(results: Results) -> dict[str, str]:
    return {name: build(results) for name, build in BLOCKS.items()}


def with_blocks(text: str, blocks: Mapping[str, str]) -> str:
    """`text` with every generated block it holds replaced by its rendering."""

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in blocks:
            return match.group(0)
        return f"<!-- {name} -->\n{blocks[name]}\n<!-- /{name} -->"

    return re.sub(r"<!-- ([A-Z-]+) -->\n.*?<!-- /\1 -->", replace, text, flags=re.S)


def blocks_in(text: str) -> list[str]:
    return [name for name in re.findall(r"<!-- ([A-Z-]+) -->", text) if name in BLOCKS]


# --- copying fresh measurements in -----------------------------------------------------


def _stamp(data: dict[str, Any], date: str) -> dict[str, Any]:
    data.setdefault("date", date)
    data.setdefault("machine", machine())
    data.setdefault("commit", commit())
    return data


def demo_result(report: Mapping[str, Any], date: str) -> dict[str, Any]:
    """The table's share of a demo's report.json (services/sim/report.py writes it). The
    demo's own date, commit and machine (services/demo.py records them) win over those of
    the process copying it in, which may run on other code and another CPU; a report that
    lacks them gets `date` (when it was written) and no commit or machine."""
    extra = report.get("extra", {})
    preset = extra.get("preset", {})
    timings = extra.get("timings_s", {})
    wall = report.get("total_wall_s") or (sum(timings.values()) if timings else None)
    data = {
        "kind": "demo",
        "preset": preset.get("name", "?"),
        "seed": preset.get("seed", 0),
        "wall_s": None if wall is None else round(wall),
        "cpu_capability": extra.get("cpu_capability"),
        "win_rates": report.get("win_rates", {}),
        "rm_accuracy": report.get("rm_accuracy", {}),
        "kl_to_sft": report.get("kl_to_sft"),
        "rounds": [_round_row(r) for r in report.get("rounds", {}).get("rows", [])],
        "timings_s": timings,
        "source": "python -m bench.report --update from the demo's report/report.json",
        "date": extra.get("date", date),
        "commit": extra.get("commit", "not recorded"),
        "machine": extra.get("machine")
        or (f"CPU capability {extra['cpu_capability']}" if extra.get("cpu_capability") else "not recorded"),
    }
    return data


def _round_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """The table's share of one row of services/sim/rounds.py's per-round evaluation."""
    win = row.get("win_vs_sft") or {}
    return {
        "round": row["round"],
        "collected_on": row.get("collected_on", []),
        "served": row["served"],
        "mean_gold": row["mean_gold"],
        "gold_ci": row.get("gold_ci"),
        "win_vs_sft": {k: win[k] for k in ("win_rate", "ci_low", "ci_high", "wins", "ties", "losses") if k in win},
        "rm_vs_gold": (row.get("rm_accuracy_vs_gold") or {}).get("accuracy"),
        "rm_vs_labelers": (row.get("rm_accuracy_vs_labelers") or {}).get("accuracy"),
        "kl_to_sft": row.get("kl_to_sft"),
        "gate": [{"model": g["model"], "promote": g["promote"]} for g in row.get("gate", [])],
    }


def update(results_dir: Path = RESULTS_DIR, demo_reports: list[Path] | None = None) -> list[Path]:
    """Copy the latest measured files into `results_dir`; return what was written."""
    written = []
    (results_dir / "bench").mkdir(parents=True, exist_ok=True)
    (results_dir / "demo").mkdir(parents=True, exist_ok=True)
    for path in sorted(MEASURED_BENCH.glob("*.json")):
        data = json.loads(path.read_text())
        data = _stamp(data, str(data.get("at", ""))[:10] or _today())
        written.append(_write_json(results_dir / "bench" / path.name, data))
    for path in demo_reports if demo_reports is not None else [MEASURED_DEMO]:
        if path.exists():
            written_on = time.strftime("%Y-%m-%d", time.gmtime(path.stat().st_mtime))
            data = demo_result(json.loads(path.read_text()), written_on)
            written.append(_write_json(results_dir / "demo" / f"{data['preset']}-seed{data['seed']}.json", data))
    return written


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def _write_json(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the generated blocks in place")
    mode.add_argument("--check", action="store_true", help="exit 1 if a generated block is stale")
    mode.add_argument("--update", action="store_true", help="copy the latest measured files in, then --write")
    parser.add_argument(
        "--demo-report",
        action="append",
        type=Path,
        metavar="PATH",
        help="with --update: a demo report.json to copy (repeatable; default var/demo/report/report.json)",
    )
    args = parser.parse_args(argv)
    if args.demo_report and not args.update:
        parser.error("--demo-report goes with --update")
    if args.update:
        for path in update(demo_reports=args.demo_report):
            print(f"updated {path.relative_to(ROOT)}")
    blocks = render(load())
    if not (args.write or args.check or args.update):
        for name, text in blocks.items():
            print(f"<!-- {name} -->\n{text}\n<!-- /{name} -->\n")
        return 0
    stale = []
    for doc in DOCUMENTS:
        text = doc.read_text()
        fresh = with_blocks(text, blocks)
        if fresh != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(fresh)
    if args.check and stale:
        print(
            f"stale generated results in {', '.join(map(str, stale))}: python -m bench.report --write", file=sys.stderr
        )
        return 1
    for path in stale:
        print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
