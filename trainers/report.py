"""What a training run leaves for a reader: curves.png and report.md."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def plot_curves(path: Path, records: list[dict], keys: list[str], title: str) -> None:
    """One small panel per metric against step (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(isinstance(r.get(k), int | float) for r in records)]
    if not keys:
        return
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):  # the grid may have spare panels
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def markdown_report(title: str, summary: Mapping[str, Any], cfg: Any, notes: str = "") -> str:
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["| metric | value |", "|---|---|"]
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    lines += [
        "",
        "![training curves](curves.png)",
        "",
        "## Config",
        "",
        "```json",
        json.dumps(dataclasses.asdict(cfg), indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)
