"""Trainer jobs on Kubernetes.

`build_job_manifests(spec, settings)` is pure: it turns a JobSpec into the
objects to create. Everything cluster-specific (image, resources, GPU
resource name, nodeSelector, tolerations, the data claim) comes from the
"kubernetes executor" settings in services/common/config.py.

With RLHF_TRAINER_JOB_KIND=job (the default; needs nothing but Kubernetes):
- one process: a batch/v1 Job running `python -m trainers.<name> <args>`;
- several processes on one node: the same Job running `torchrun --standalone`;
- several nodes: an Indexed Job (one pod per node, completion index = node
  rank) plus a headless Service named like the Job. The pods take the Service
  as their subdomain, so node 0 is `<job>-0.<job>`: torchrun's master address.

With RLHF_TRAINER_JOB_KIND=pytorchjob (k8s/components/pytorchjob): one
Kubeflow PyTorchJob (Master + Workers); the training operator makes the
Services and hands torchrun its rendezvous through PET_* variables.

Trainer pods run as the image's non-root user with a read-only root file
system. They write only to the data claim (RLHF_HOME: checkpoints, dataset
snapshots, run folders, result files) and to emptyDirs for /tmp, caches and
/dev/shm.

`KubernetesExecutor` creates those objects with the official client and
follows them with a watch. It makes no retries of its own: the controller
retries (RLHF_JOB_RETRIES) and trainers resume from their run folder.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import PurePosixPath
from typing import Any

from services.common import openmp
from services.common.config import FIELDS, ConfigError, Settings
from services.common.logs import get_logger, log_fields
from services.controller.jobs import Executor, JobSpec, JobState, JobStatus

log = get_logger(__name__)

# The image's user (deploy/Dockerfile); stated so runAsNonRoot can be verified.
RUN_AS_UID = 10001
PART_OF = "rlhf-platform"
JOB_LABEL = "rlhf.platform/job"
KAFKA_CLIENT_LABEL = "rlhf.platform/kafka-client"  # k8s/base/network-policies.yaml lets these reach Kafka
PYTORCHJOB = ("kubeflow.org", "v1", "pytorchjobs")
SCRATCH = "/scratch"
# Libraries cache under $HOME and friends; the root file system is read-only.
SCRATCH_ENV = {
    "HOME": f"{SCRATCH}/home",
    "XDG_CACHE_HOME": f"{SCRATCH}/cache",
    "HF_HOME": f"{SCRATCH}/hf",
    "TRITON_CACHE_DIR": f"{SCRATCH}/triton",
    "TORCHINDUCTOR_CACHE_DIR": f"{SCRATCH}/inductor",
}
SHM_SIZE = "1Gi"
_DNS_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Credentials stay with the services; trainers never get them.
_NOT_FOR_TRAINERS = {"RLHF_TOKENS", "RLHF_TOKENS_FILE"}


# --- checks --------------------------------------------------------------------------


def check_settings(settings: Settings) -> None:
    """Trainer pods see only the data claim; the state they share must lie on it."""
    mount = PurePosixPath(settings.data_mount)
    if not mount.is_absolute():
        raise ConfigError(f"RLHF_DATA_MOUNT={settings.data_mount!r} must be an absolute path")
    for env, path in (
        ("RLHF_HOME", settings.home),
        ("RLHF_CHECKPOINT_DIR", settings.checkpoint_dir),
        ("RLHF_DATASET_DIR", settings.dataset_dir),
    ):
        if not PurePosixPath(path).is_relative_to(mount):
            raise ConfigError(f"{env}={path} is not under RLHF_DATA_MOUNT={mount}; trainer pods could not see it")


def _check_spec(spec: JobSpec, settings: Settings) -> None:
    if not _DNS_LABEL.fullmatch(spec.name):
        raise ValueError(
            f"job name {spec.name!r} must be a DNS label: lowercase letters, digits and '-', starting with a letter"
        )
    # Pods are named "<job>-<index>" (Indexed Job) or "<job>-worker-<index>"
    # (PyTorchJob), and those names must stay DNS labels.
    suffix = len(f"-worker-{spec.nodes}") if settings.trainer_job_kind == "pytorchjob" else len(f"-{spec.nodes}")
    if len(spec.name) + suffix > 63:
        raise ValueError(f"job name {spec.name!r} is too long: its pod names must stay within 63 characters")
    if spec.nodes < 1:
        raise ValueError(f"nodes={spec.nodes} must be at least 1")
    if spec.procs_per_node < 1:
        raise ValueError(f"procs_per_node={spec.procs_per_node} must be at least 1")
    if spec.gpus < 0:
        raise ValueError(f"gpus={spec.gpus} must not be negative")
    if spec.result_file and not PurePosixPath(spec.result_file).is_relative_to(settings.data_mount):
        raise ValueError(
            f"result_file={spec.result_file} is not under RLHF_DATA_MOUNT={settings.data_mount}; "
            "the controller could not read it"
        )


# --- manifests ---------------------------------------------------------------------


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def settings_env(settings: Settings) -> list[dict]:
    """This process's settings as env entries, for when no ConfigMap is shared."""
    return [
        {"name": f.metadata["env"], "value": _env_value(getattr(settings, f.name))}
        for f in FIELDS
        if f.metadata["env"] not in _NOT_FOR_TRAINERS
    ]


def _command(spec: JobSpec, settings: Settings) -> list[str]:
    target = ["-m", spec.module, *spec.args]
    if settings.trainer_job_kind == "pytorchjob":
        return ["torchrun", *target]  # the operator sets PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ...
    if spec.nodes == 1 and spec.procs_per_node == 1:
        return ["python", *target]
    if spec.nodes == 1:
        return ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", str(spec.procs_per_node), *target]
    return [
        "torchrun",
        "--nnodes",
        str(spec.nodes),
        "--nproc-per-node",
        str(spec.procs_per_node),
        "--node-rank",
        "$(JOB_COMPLETION_INDEX)",  # expanded by the kubelet from the container's env
        "--master-addr",
        f"{spec.name}-0.{spec.name}",
        "--master-port",
        str(settings.torchrun_port),
        *target,
    ]


def _labels(spec: JobSpec) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "trainer",
        "app.kubernetes.io/component": spec.trainer,
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/managed-by": "rlhf-trainer-controller",
        JOB_LABEL: spec.name,
    }


def _last_wins(env: list[dict]) -> list[dict]:
    """One entry per name, the last given winning, in first-seen order.

    A container with a name twice in `env` takes the later one, but which one
    a reader, a patch or a kustomize merge takes is easy to get wrong; so the
    Job carries each name once, with the value the trainer will see."""
    merged: dict[str, dict] = {}
    for entry in env:
        merged[entry["name"]] = entry
    return list(merged.values())


def _pod_template(spec: JobSpec, settings: Settings) -> dict:
    indexed = settings.trainer_job_kind == "job" and spec.nodes > 1
    # A pod at its CPU limit shares its cores too (services/common/openmp.py).
    env = [{"name": k, "value": v} for k, v in openmp.child_env(SCRATCH_ENV).items()]
    if indexed:
        env.append(
            {
                "name": "JOB_COMPLETION_INDEX",
                "valueFrom": {
                    "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
                },
            }
        )
    env += [{"name": k, "value": v} for k, v in spec.env.items()]
    if spec.gpus:
        # A GPU Job trains on the GPU whatever device the controller itself runs
        # on (its settings, in spec.env or the ConfigMap, say cpu in k8s/base).
        env.append({"name": "RLHF_DEVICE", "value": "cuda"})
    resources = {"cpu": settings.trainer_cpu, "memory": settings.trainer_memory}
    if spec.gpus:
        resources[settings.trainer_gpu_resource] = str(spec.gpus * spec.procs_per_node)
    container: dict[str, Any] = {
        # The training operator finds the container to configure by this name.
        "name": "pytorch" if settings.trainer_job_kind == "pytorchjob" else "trainer",
        "image": settings.trainer_image,
        "command": _command(spec, settings),
        "env": env,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "data", "mountPath": settings.data_mount},
            {"name": "scratch", "mountPath": SCRATCH},
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if settings.trainer_config_map:
        container["envFrom"] = [{"configMapRef": {"name": settings.trainer_config_map}}]  # env entries beat it
    else:
        env = settings_env(settings) + env
    container["env"] = _last_wins(env)
    if indexed:
        container["ports"] = [{"name": "rendezvous", "containerPort": settings.torchrun_port}]
    pod: dict[str, Any] = {
        "serviceAccountName": settings.trainer_service_account,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_UID,
            "runAsGroup": RUN_AS_UID,
            "fsGroup": RUN_AS_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": settings.checkpoint_pvc}},
            {"name": "scratch", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_SIZE}},
        ],
    }
    if settings.trainer_node_selector:
        pod["nodeSelector"] = dict(settings.trainer_node_selector)
    if settings.trainer_tolerations:
        pod["tolerations"] = [dict(t) for t in settings.trainer_tolerations]
    if indexed:
        pod["subdomain"] = spec.name
    return {"metadata": {"labels": {**_labels(spec), KAFKA_CLIENT_LABEL: "true"}}, "spec": pod}


def _metadata(spec: JobSpec, settings: Settings) -> dict:
    return {"name": spec.name, "namespace": settings.k8s_namespace, "labels": _labels(spec)}


def _pytorch_job(spec: JobSpec, settings: Settings) -> dict:
    template = _pod_template(spec, settings)
    replicas = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if spec.nodes > 1:
        replicas["Worker"] = {"replicas": spec.nodes - 1, "restartPolicy": "Never", "template": template}
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": _metadata(spec, settings),
        "spec": {
            "runPolicy": {
                "backoffLimit": 0,
                "ttlSecondsAfterFinished": settings.trainer_ttl_s,
                "activeDeadlineSeconds": int(settings.job_timeout_s),
                "cleanPodPolicy": "None",  # keep failed pods for their logs until the TTL
            },
            "nprocPerNode": str(spec.procs_per_node),
            "pytorchReplicaSpecs": replicas,
        },
    }


def build_job_manifests(spec: JobSpec, settings: Settings) -> list[dict]:
    """The objects that run `spec`: [Job], [Job, headless Service] or [PyTorchJob]."""
    check_settings(settings)
    _check_spec(spec, settings)
    if settings.trainer_job_kind == "pytorchjob":
        return [_pytorch_job(spec, settings)]
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # the controller retries; a torchrun gang must not half-restart
        "ttlSecondsAfterFinished": settings.trainer_ttl_s,
        "activeDeadlineSeconds": int(settings.job_timeout_s),  # backstop if the controller is gone
        "template": _pod_template(spec, settings),
    }
    if spec.nodes > 1:
        job_spec.update(completionMode="Indexed", completions=spec.nodes, parallelism=spec.nodes)
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": _metadata(spec, settings), "spec": job_spec}
    if spec.nodes == 1:
        return [job]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(spec, settings),
        "spec": {
            "clusterIP": "None",
            # Rendezvous starts before any pod is Ready; DNS must resolve anyway.
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: spec.name},
            "ports": [{"name": "rendezvous", "port": settings.torchrun_port, "targetPort": settings.torchrun_port}],
        },
    }
    return [job, service]


# --- status ----------------------------------------------------------------------------


def job_status(job: dict) -> JobStatus:
    """The state of a Job or PyTorchJob, given as a dict (its API JSON)."""
    status = job.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("status") != "True":
            continue
        if cond.get("type") in ("Complete", "SuccessCriteriaMet", "Succeeded"):
            return JobStatus(JobState.SUCCEEDED, cond.get("message") or "", 0)
        if cond.get("type") in ("Failed", "FailureTarget"):
            return JobStatus(
                JobState.FAILED, f"{cond.get('reason') or 'Failed'}: {cond.get('message') or ''}".rstrip(": ")
            )
    if (
        status.get("active")
        or status.get("ready")
        or any(c.get("type") == "Running" and c.get("status") == "True" for c in status.get("conditions") or [])
    ):
        return JobStatus(JobState.RUNNING)
    return JobStatus(JobState.PENDING)


# --- executor ----------------------------------------------------------------------------


def kube_client():
    """A client for the Kubernetes API: in-cluster, else the local kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()  # outside a cluster: $KUBECONFIG or ~/.kube/config
        except (config.ConfigException, OSError) as err:
            raise ConfigError(
                f"RLHF_EXECUTOR=kubernetes or RLHF_TGI_DEPLOYMENT needs the Kubernetes API, "
                f"but there is no in-cluster service account "
                f"and no usable kubeconfig ({err})"
            ) from None
    return client.ApiClient()


class KubernetesExecutor(Executor):
    """Runs each JobSpec as a Job (or PyTorchJob) in RLHF_K8S_NAMESPACE; the handle is its name."""

    LOG_LINES = 20
    WATCH_WINDOW_S = 300

    def __init__(self, settings: Settings, api_client=None):
        from kubernetes import client

        check_settings(settings)
        self.settings = settings
        self.namespace = settings.k8s_namespace
        self.api = api_client or kube_client()
        self.batch = client.BatchV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.pytorchjob = settings.trainer_job_kind == "pytorchjob"

    # The two kinds differ only in which API call creates, reads, lists and deletes them.
    def _create(self, body: dict) -> None:
        if self.pytorchjob:
            self.custom.create_namespaced_custom_object(*PYTORCHJOB[:2], self.namespace, PYTORCHJOB[2], body)
        else:
            self.batch.create_namespaced_job(self.namespace, body)

    def _read(self, name: str) -> dict:
        if self.pytorchjob:
            return self.custom.get_namespaced_custom_object(*PYTORCHJOB[:2], self.namespace, PYTORCHJOB[2], name)
        return self.api.sanitize_for_serialization(self.batch.read_namespaced_job(name, self.namespace))

    def _delete(self, name: str, propagation: str) -> None:
        if self.pytorchjob:
            self.custom.delete_namespaced_custom_object(
                *PYTORCHJOB[:2], self.namespace, PYTORCHJOB[2], name, propagation_policy=propagation
            )
        else:
            self.batch.delete_namespaced_job(name, self.namespace, propagation_policy=propagation)

    def _watch(self, name: str, seconds: int):
        from kubernetes import watch

        if self.pytorchjob:
            lister, args = self.custom.list_namespaced_custom_object, (*PYTORCHJOB[:2], self.namespace, PYTORCHJOB[2])
        else:
            lister, args = self.batch.list_namespaced_job, (self.namespace,)
        stream = watch.Watch()
        try:
            for event in stream.stream(lister, *args, field_selector=f"metadata.name={name}", timeout_seconds=seconds):
                obj = event["object"]
                yield event["type"], obj if isinstance(obj, dict) else self.api.sanitize_for_serialization(obj)
        finally:
            stream.stop()

    # --- Executor --------------------------------------------------------------------
    def launch(self, spec: JobSpec) -> str:
        from kubernetes.client.exceptions import ApiException

        job, *rest = build_job_manifests(spec, self.settings)
        try:
            self._create(job)
        except ApiException as err:
            if err.status != 409:
                raise
            if not job_status(self._read(spec.name)).state.finished:
                # A controller restarted mid-round finds its job still running: follow it.
                log_fields(log, logging.WARNING, "job already running; following it", job=spec.name)
                return spec.name
            # A retry (the controller reuses the name): remove the finished
            # attempt and everything it owns, then start afresh.
            self._delete_and_wait(spec.name)
            self._create(job)
        if rest:
            uid = self._read(spec.name)["metadata"]["uid"]
            owner = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": spec.name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
            for service in rest:
                service["metadata"]["ownerReferences"] = [owner]  # deleting the Job deletes it
                self.core.create_namespaced_service(self.namespace, service)
        log_fields(
            log,
            20,
            "trainer job created",
            job=spec.name,
            kind=job["kind"],
            trainer=spec.trainer,
            nodes=spec.nodes,
            gpus=spec.gpus,
            image=self.settings.trainer_image,
            namespace=self.namespace,
        )
        return spec.name

    def status(self, handle: str) -> JobStatus:
        from kubernetes.client.exceptions import ApiException

        try:
            current = job_status(self._read(handle))
        except ApiException as err:
            if err.status == 404:
                return JobStatus(
                    JobState.FAILED, f"job {handle} not found (deleted, or removed after RLHF_TRAINER_TTL_S)"
                )
            raise
        return self._with_failure_detail(handle, current)

    def wait(self, handle: str, timeout: float | None = None) -> JobStatus:
        deadline = None if timeout is None else time.monotonic() + timeout
        current = self.status(handle)
        while not current.state.finished:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return current
            # The server ends a watch after `seconds`; then re-read and watch again.
            seconds = self.WATCH_WINDOW_S if left is None else max(1, min(self.WATCH_WINDOW_S, int(left)))
            for kind, obj in self._watch(handle, seconds):
                if kind == "ERROR":  # e.g. 410 Gone: re-read below
                    break
                if kind == "DELETED":
                    return JobStatus(JobState.FAILED, f"job {handle} was deleted")
                current = job_status(obj)
                if current.state.finished:
                    break
            if not current.state.finished:
                current = self.status(handle)
        return self._with_failure_detail(handle, current)

    def cancel(self, handle: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self._delete(handle, "Background")  # pods and an owned Service go with it
        except ApiException as err:
            if err.status != 404:
                raise
        log_fields(log, logging.INFO, "trainer job cancelled", job=handle, namespace=self.namespace)

    # --- helpers -----------------------------------------------------------------------
    def _delete_and_wait(self, name: str, timeout: float = 120.0) -> None:
        from kubernetes.client.exceptions import ApiException

        # Foreground: the object stays until its pods and Service are gone, so
        # once it reads 404 every name it used is free again.
        try:
            self._delete(name, "Foreground")
        except ApiException as err:
            if err.status != 404:
                raise
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._read(name)
            except ApiException as err:
                if err.status == 404:
                    return
                raise
            time.sleep(1)
        raise TimeoutError(f"job {name} was not deleted within {timeout:.0f}s")

    def _with_failure_detail(self, handle: str, status: JobStatus) -> JobStatus:
        """For a failed job: the trainer's exit code and the tail of its log."""
        if status.state != JobState.FAILED:
            return status
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_LABEL}={handle}").items
            for pod in pods:
                for cs in (pod.status.container_statuses or []) if pod.status else []:
                    term = cs.state.terminated if cs.state else None
                    if term and term.exit_code:
                        tail = self.core.read_namespaced_pod_log(
                            pod.metadata.name, self.namespace, tail_lines=self.LOG_LINES
                        )
                        return JobStatus(JobState.FAILED, f"{status.message}\n{tail}".strip(), term.exit_code)
        except ApiException as err:
            log_fields(log, logging.WARNING, "could not read the failed job's pods", job=handle, error=str(err.reason))
        return status
