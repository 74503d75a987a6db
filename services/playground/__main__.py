"""`python -m services.playground`: serve the web playground on
RLHF_BIND_HOST:RLHF_PLAYGROUND_PORT until SIGTERM/SIGINT."""

from __future__ import annotations

import logging

import uvicorn

from services.common.config import exit_on_config_error, load_settings
from services.common.logs import configure_logging, get_logger, log_fields
from services.playground.app import create_app


def main() -> None:
    settings = exit_on_config_error(load_settings)
    configure_logging("playground", settings.log_level)
    log_fields(
        get_logger(__name__),
        logging.INFO,
        "playground starting",
        host=settings.bind_host,
        port=settings.playground_port,
        policy=settings.policy_target,
        feedback=settings.feedback_target,
        labeling=settings.labeling_target,
    )
    # uvicorn drains open requests on SIGTERM; log_config=None keeps our JSON logs.
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.playground_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
