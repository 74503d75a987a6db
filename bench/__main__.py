"""`make bench`: run every benchmark in turn (each writes bench/results/<name>.json).

`python -m bench serving ingest` runs a subset.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("ingest", "broker", "serving", "train", "rm_scoring", "labeling", "ppo")


def main(argv: list[str]) -> int:
    chosen = argv or list(BENCHMARKS)
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    failed = []
    for name in chosen:
        print(f"\n=== bench/{name} ===", flush=True)
        if subprocess.call([sys.executable, "-m", f"bench.{name}"]) != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
