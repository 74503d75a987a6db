"""`python -m services.controller`: the trainer controller as a service.

It serves grpc.health.v1 on RLHF_CONTROLLER_PORT (for probes), checks the
datasets every RLHF_CONTROLLER_INTERVAL_S, and runs rounds on the configured
executor until SIGTERM.
"""

from __future__ import annotations

import threading

from services.common.config import exit_on_config_error, load_settings
from services.common.grpc_server import serve_until_signal, start_server
from services.common.logs import configure_logging
from services.controller.controller import Controller


def make_executor(settings):
    if settings.executor == "kubernetes":
        from services.controller.k8s_executor import KubernetesExecutor

        return KubernetesExecutor(settings)
    from services.controller.local_executor import LocalExecutor

    return LocalExecutor(settings.home / "controller" / "jobs")


def main() -> None:
    settings = exit_on_config_error(load_settings)
    configure_logging("controller", settings.log_level)
    rollout = None
    if settings.tgi_deployment:
        from services.controller.tgi_rollout import TgiRollout

        rollout = TgiRollout(settings)
    controller = Controller(settings, make_executor(settings), tgi_rollout=rollout)
    server = start_server(settings, "controller", [], settings.controller_port)
    worker = threading.Thread(target=controller.run_forever, name="controller-loop", daemon=True)
    worker.start()
    serve_until_signal(server, settings.grpc_grace_s, on_stop=controller.stop)


if __name__ == "__main__":
    main()
