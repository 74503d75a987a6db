"""`python -m services.policy`: run the PolicyService (gRPC on RLHF_POLICY_PORT,
TGI- and OpenAI-compatible HTTP on RLHF_HTTP_PORT) until SIGTERM."""

from __future__ import annotations

from services.common.config import exit_on_config_error, load_settings
from services.common.grpc_server import serve_until_signal
from services.common.logs import configure_logging
from services.common.metrics import start_metrics_server
from services.policy.server import start


def main() -> None:
    settings = exit_on_config_error(load_settings)
    configure_logging("policy", settings.log_level)
    start_metrics_server(settings.metrics_port, settings.bind_host)
    handle = start(settings, settings.policy_port, settings.http_port)
    serve_until_signal(handle.grpc_server, settings.grpc_grace_s, on_stop=handle.close)


if __name__ == "__main__":
    main()
