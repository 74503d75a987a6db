"""`python -m services.labeling`: serve LabelingService on RLHF_LABELING_PORT until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from services.common.config import exit_on_config_error, load_settings
from services.common.grpc_server import serve_until_signal
from services.common.logs import configure_logging, get_logger, log_fields
from services.common.metrics import start_metrics_server

log = get_logger("services.labeling")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.labeling", description=__doc__)
    parser.add_argument("--port-file", type=Path, help="write the bound port here once ready (RLHF_LABELING_PORT=0)")
    parser.add_argument(
        "--pregenerate",
        type=int,
        default=0,
        metavar="N",
        help="before reporting ready, read the prompts topic and make up to N tasks with their samples",
    )
    args = parser.parse_args(argv)
    settings = exit_on_config_error(load_settings)
    configure_logging("labeling", settings.log_level)
    from services.labeling.server import start

    handle = start(settings, settings.labeling_port)
    start_metrics_server(settings.metrics_port)
    if args.pregenerate:
        handle.feed.caught_up.wait(120)
        made = handle.servicer.pregenerate(args.pregenerate)
        log_fields(log, logging.INFO, "tasks pre-generated", tasks=made)
    if args.port_file:
        args.port_file.write_text(str(handle.port))
    log_fields(log, logging.INFO, "serving", port=handle.port)
    serve_until_signal(handle.running, settings.grpc_grace_s, on_stop=handle.close)
    return 0


if __name__ == "__main__":
    sys.exit(main())
