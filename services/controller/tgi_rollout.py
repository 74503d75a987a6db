"""Points a TGI Deployment at each policy the controller promotes.

TGI loads one checkpoint folder when it starts (`--model-id`) and cannot swap
weights while it runs. With RLHF_TGI_DEPLOYMENT set (k8s/overlays/tgi does),
the controller patches that Deployment's `--model-id` to the promoted
version's folder on the shared data claim after each policy promotion, and
Kubernetes rolls the TGI pods. The TGI-backed policy service reports the new
version as soon as TGI serves it, because TGI's /info names the folder.

Only `--model-id` changes, through a strategic-merge patch of the one
container that has it; a Deployment already on that folder is left alone.
"""

from __future__ import annotations

from services.common.config import Settings
from services.common.logs import get_logger, log_fields
from services.controller.k8s_executor import kube_client

log = get_logger(__name__)

MODEL_ID = "--model-id"


class RolloutError(RuntimeError):
    pass


def _is_model_id(arg: str) -> bool:
    return arg == MODEL_ID or arg.startswith(MODEL_ID + "=")


def with_model_id(args: list[str], path: str) -> list[str]:
    """`args` with TGI's model id set to `path`, in either the `--model-id=X`
    or the `--model-id X` form (appended when absent); nothing else moves."""
    out: list[str] = []
    found, i = False, 0
    while i < len(args):
        arg = args[i]
        if _is_model_id(arg):
            out.append(f"{MODEL_ID}={path}")
            found = True
            i += 2 if arg == MODEL_ID else 1  # the separate form's value goes too
            continue
        out.append(arg)
        i += 1
    if not found:
        out.append(f"{MODEL_ID}={path}")
    return out


class TgiRollout:
    def __init__(self, settings: Settings, client=None):
        from kubernetes import client as k8s

        self.name = settings.tgi_deployment
        self.namespace = settings.k8s_namespace
        self.checkpoint_dir = settings.checkpoint_dir  # the same path in TGI's pods: both mount the claim at RLHF_HOME
        self.apps = k8s.AppsV1Api(client or kube_client())

    def roll(self, version: str) -> bool:
        """Serve `version` from the Deployment; False if it already does."""
        from kubernetes.client.exceptions import ApiException

        path = str(self.checkpoint_dir / version)
        try:
            deployment = self.apps.read_namespaced_deployment(self.name, self.namespace)
        except ApiException as err:
            raise RolloutError(
                f"cannot read Deployment {self.namespace}/{self.name} (RLHF_TGI_DEPLOYMENT): {err.status} {err.reason}"
            ) from None
        containers = deployment.spec.template.spec.containers
        container = next((c for c in containers if any(_is_model_id(a) for a in c.args or [])), None)
        if container is None:
            raise RolloutError(f"Deployment {self.namespace}/{self.name} has no container with a {MODEL_ID} argument")
        args = with_model_id(list(container.args), path)
        if args == list(container.args):
            return False
        patch = {"spec": {"template": {"spec": {"containers": [{"name": container.name, "args": args}]}}}}
        try:
            self.apps.patch_namespaced_deployment(self.name, self.namespace, patch)
        except ApiException as err:
            raise RolloutError(
                f"cannot patch Deployment {self.namespace}/{self.name}: {err.status} {err.reason}"
            ) from None
        log_fields(
            log,
            20,
            "TGI deployment rolled to the promoted policy",
            deployment=self.name,
            version=version,
            model_id=path,
        )
        return True
