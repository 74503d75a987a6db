"""`python -m services.feedback`: serve FeedbackService on RLHF_FEEDBACK_PORT until SIGTERM."""

from __future__ import annotations

import gc
import logging
import sys

from services.common.config import exit_on_config_error, load_settings
from services.common.grpc_server import serve_until_signal
from services.common.logs import configure_logging, get_logger, log_fields
from services.common.metrics import start_metrics_server

log = get_logger("services.feedback")


def main() -> int:
    settings = exit_on_config_error(load_settings)
    configure_logging("feedback", settings.log_level)
    from kafka.errors import KafkaError

    from services.feedback.server import start

    try:
        handle = start(settings, settings.feedback_port)
    except KafkaError as err:
        # Without the broker nothing could be acknowledged; exit so the
        # supervisor (stack or Kubernetes) restarts us once it is back.
        log_fields(
            log, logging.ERROR, "broker unavailable at start", bootstrap=settings.kafka_bootstrap, error=str(err)
        )
        return 1
    start_metrics_server(settings.metrics_port)
    # Everything loaded so far (modules, descriptors, grpc) lives forever:
    # keep it out of the collector's full passes, which otherwise grow with
    # it and show up as latency spikes.
    gc.freeze()
    serve_until_signal(handle.running, settings.grpc_grace_s, on_stop=lambda: handle.servicer.producer.close(5))
    return 0


if __name__ == "__main__":
    sys.exit(main())
