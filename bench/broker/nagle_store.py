"""The baseline object store of bench/broker: services.common.objectstore as it was before
TCP_NODELAY, with Nagle's algorithm left on. Only the benchmark starts it."""

from __future__ import annotations

import sys

from services.common import objectstore

if __name__ == "__main__":
    objectstore.Handler.disable_nagle_algorithm = False
    sys.exit(objectstore.main(sys.argv[1:]))
