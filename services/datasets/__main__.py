"""`python -m services.datasets`: build and inspect dataset snapshots.

build [--group G] [--timeout S]     consume what is new, write the cumulative
                                    snapshot, commit; the last stdout line is its id
inspect topics [--group G] [--json] records per topic/partition (and the group's
                                    lag), events per user, histogram of K
inspect snapshot [ID] [--json]      counts per split and kind, prompts per user,
                                    histogram of K, what the rules dropped
list [--json]                       every snapshot, oldest first
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from services.common.config import exit_on_config_error, load_settings
from services.common.logs import configure_logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.datasets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="consume new events and write a snapshot")
    build.add_argument("--group", default=None, help="consumer group (default RLHF_DATASET_GROUP)")
    build.add_argument("--timeout", type=float, default=120.0, help="seconds to read before writing what was read")
    build.add_argument(
        "--pause-before-commit",
        type=Path,
        default=None,
        metavar="FILE",
        help="for crash tests: once the snapshot is durable, write its id to FILE and wait before committing offsets",
    )
    inspect = sub.add_parser("inspect", help="inspect the topics or a snapshot")
    what = inspect.add_subparsers(dest="what", required=True)
    topics = what.add_parser("topics")
    topics.add_argument("--group", default=None, help="also show this group's committed offsets and lag")
    topics.add_argument("--json", action="store_true")
    snapshot = what.add_parser("snapshot")
    snapshot.add_argument("snapshot_id", nargs="?", default=None, help="default: the latest")
    snapshot.add_argument("--json", action="store_true")
    listing = sub.add_parser("list", help="list snapshots")
    listing.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    settings = exit_on_config_error(load_settings)
    configure_logging("datasets", settings.log_level)

    if args.command == "build":
        from services.datasets.builder import build_snapshot

        def pause(snapshot_id: str) -> None:
            args.pause_before_commit.write_text(snapshot_id)
            time.sleep(3600)

        snapshot_id = build_snapshot(
            settings, args.group, args.timeout, before_commit=pause if args.pause_before_commit else None
        )
        print(snapshot_id, flush=True)
        return 0
    if args.command == "inspect":
        from services.datasets import inspect as report

        if args.what == "topics":
            result = report.inspect_topics(settings, args.group)
            print(json.dumps(result, indent=2) if args.json else report.format_topics(result))
        else:
            from services.common.datasets import SnapshotError

            try:
                result = report.inspect_snapshot(settings, args.snapshot_id)
            except (FileNotFoundError, SnapshotError) as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
            print(json.dumps(result, indent=2) if args.json else report.format_snapshot(result))
        return 0
    from services.common.datasets import SnapshotStore

    manifests = SnapshotStore(settings.dataset_dir).list()
    if args.json:
        print(json.dumps(manifests, indent=2))
    else:
        for m in manifests:
            train = m["counts"]["train"]
            print(
                f"{m['snapshot_id']}  parent={m.get('parent') or '-'}  train: "
                + ", ".join(f"{k}={n}" for k, n in train.items())
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
