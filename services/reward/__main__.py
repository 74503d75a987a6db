"""`python -m services.reward`: run the RewardService on RLHF_REWARD_PORT until SIGTERM."""

from __future__ import annotations

from services.common.config import exit_on_config_error, load_settings
from services.common.grpc_server import serve_until_signal
from services.common.logs import configure_logging
from services.common.metrics import start_metrics_server
from services.reward.server import start


def main() -> None:
    settings = exit_on_config_error(load_settings)
    configure_logging("reward", settings.log_level)
    start_metrics_server(settings.metrics_port, settings.bind_host)
    handle = start(settings, settings.reward_port)
    serve_until_signal(handle.grpc_server, settings.grpc_grace_s, on_stop=handle.close)


if __name__ == "__main__":
    main()
