"""Generate Python code from protos/ (compiled with --proto_path=protos so
that generated imports resolve as the `rlhf.v1` package). `--check`
regenerates into a temporary folder and fails if the committed code differs."""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[2] / "protos"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"--proto_path={ROOT}",
        f"--proto_path={include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def generated_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.name.endswith(SUFFIXES)}


def main() -> int:
    if "--check" not in sys.argv:
        generate(ROOT)
        print(f"generated {len(generated_files(ROOT))} files under {ROOT}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(ROOT)
        stale = sorted((want ^ have) | {f for f in want & have if not filecmp.cmp(fresh / f, ROOT / f, shallow=False)})
        if stale:
            print("generated protobuf code is stale; run `make protos`:\n  " + "\n  ".join(stale), file=sys.stderr)
            return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
