"""services/controller/k8s_executor.py: the manifests it builds and how it reads Job status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes import client

from services.common.config import ConfigError, load_settings
from services.controller.controller import Controller, JobFailed
from services.controller.jobs import JobSpec, JobState
from services.controller.k8s_executor import (
    JOB_LABEL,
    KubernetesExecutor,
    build_job_manifests,
    job_status,
    settings_env,
)
from tests.k8s.jobs_api import JobsApi
from tests.k8s.render import K8S_VERSIONS
from tests.k8s.schema import validate

pytestmark = pytest.mark.unit

BASE_ENV = {
    "RLHF_HOME": "/data",
    "RLHF_TRAINER_IMAGE": "reg.example/rlhf-platform:1.2",
    "RLHF_CHECKPOINT_PVC": "shared-data",
    "RLHF_TRAINER_CONFIG_MAP": "rlhf-config-abc",
    "RLHF_K8S_NAMESPACE": "team-a",
}
GPU_ENV = {
    **BASE_ENV,
    "RLHF_TRAINER_GPU_RESOURCE": "amd.com/gpu",
    "RLHF_TRAINER_NODE_SELECTOR": '{"pool": "gpu"}',
    "RLHF_TRAINER_TOLERATIONS": '[{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]',
}


def spec(**kw) -> JobSpec:
    base = dict(
        name="ppo-r3-0a1b2c",
        trainer="ppo",
        args=["--snapshot", "s7", "--run-dir", "/data/runs/ppo-r3-0a1b2c"],
        result_file="/data/runs/ppo-r3-0a1b2c/result.json",
    )
    return JobSpec(**{**base, **kw})


def only_container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def test_single_process_job_runs_the_trainer_module():
    settings = load_settings(BASE_ENV)
    manifests = build_job_manifests(spec(env={"EXTRA": "1"}), settings)
    assert [m["kind"] for m in manifests] == ["Job"]
    job = manifests[0]
    assert job["metadata"] == {"name": "ppo-r3-0a1b2c", "namespace": "team-a", "labels": job["metadata"]["labels"]}
    c = only_container(job)
    assert c["command"] == ["python", "-m", "trainers.ppo", "--snapshot", "s7", "--run-dir", "/data/runs/ppo-r3-0a1b2c"]
    assert c["image"] == "reg.example/rlhf-platform:1.2"
    assert c["envFrom"] == [{"configMapRef": {"name": "rlhf-config-abc"}}]
    assert {"name": "EXTRA", "value": "1"} in c["env"]
    assert {"name": "GOMP_SPINCOUNT", "value": "1000"} in c["env"]  # services/common/openmp.py
    pod = job["spec"]["template"]["spec"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": "shared-data"}} in pod["volumes"]
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"] and "nodeSelector" not in pod
    assert job["spec"]["backoffLimit"] == 0 and "completionMode" not in job["spec"]
    for version in K8S_VERSIONS:
        validate(job, version)


def test_gpu_job_requests_gpus_on_gpu_nodes():
    settings = load_settings(GPU_ENV)
    (job,) = build_job_manifests(spec(gpus=2, procs_per_node=4), settings)
    c = only_container(job)
    assert c["resources"]["limits"]["amd.com/gpu"] == "8" == c["resources"]["requests"]["amd.com/gpu"]
    assert c["command"][:6] == ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", "4"]
    assert c["command"][6:8] == ["-m", "trainers.ppo"]
    assert {"name": "RLHF_DEVICE", "value": "cuda"} in c["env"]
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    for version in K8S_VERSIONS:
        validate(job, version)


def test_multi_node_job_is_an_indexed_job_with_a_rendezvous_service():
    settings = load_settings(GPU_ENV)
    job, service = build_job_manifests(spec(nodes=4, gpus=1, procs_per_node=8), settings)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 4
    pod = job["spec"]["template"]["spec"]
    c = only_container(job)
    cmd = c["command"]
    flags = dict(zip(cmd[1:11:2], cmd[2:11:2], strict=True))
    assert cmd[0] == "torchrun" and flags == {
        "--nnodes": "4",
        "--nproc-per-node": "8",
        "--node-rank": "$(JOB_COMPLETION_INDEX)",
        "--master-addr": "ppo-r3-0a1b2c-0.ppo-r3-0a1b2c",
        "--master-port": str(settings.torchrun_port),
    }
    assert cmd[11:13] == ["-m", "trainers.ppo"]
    # The node rank: defined in the container's env, so the kubelet can expand it.
    assert any(
        e["name"] == "JOB_COMPLETION_INDEX" and "job-completion-index" in e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in c["env"]
    )
    assert c["resources"]["limits"]["amd.com/gpu"] == "8"
    # Pod DNS: <job>-<index>.<subdomain> needs subdomain == headless Service name.
    assert pod["subdomain"] == service["metadata"]["name"] == "ppo-r3-0a1b2c"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {JOB_LABEL: "ppo-r3-0a1b2c"}
    assert job["spec"]["template"]["metadata"]["labels"][JOB_LABEL] == "ppo-r3-0a1b2c"
    for version in K8S_VERSIONS:
        validate(job, version)
        validate(service, version)


def test_pytorchjob_kind():
    settings = load_settings({**GPU_ENV, "RLHF_TRAINER_JOB_KIND": "pytorchjob"})
    (pj,) = build_job_manifests(spec(nodes=3, gpus=1, procs_per_node=2), settings)
    assert pj["apiVersion"] == "kubeflow.org/v1" and pj["kind"] == "PyTorchJob"
    replicas = pj["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 2
    assert pj["spec"]["nprocPerNode"] == "2"
    c = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert c["name"] == "pytorch" and c["command"][:3] == ["torchrun", "-m", "trainers.ppo"]
    assert c["resources"]["limits"]["amd.com/gpu"] == "2"
    validate(pj, K8S_VERSIONS[-1])
    (single,) = build_job_manifests(spec(), settings)
    assert "Worker" not in single["spec"]["pytorchReplicaSpecs"]
    validate(single, K8S_VERSIONS[-1])


def test_without_a_configmap_the_job_carries_the_settings():
    env = {k: v for k, v in GPU_ENV.items() if k != "RLHF_TRAINER_CONFIG_MAP"}
    settings = load_settings({**env, "RLHF_TOKENS": "secret=alice:admin"})
    (job,) = build_job_manifests(spec(), settings)
    c = only_container(job)
    assert "envFrom" not in c
    values = {e["name"]: e["value"] for e in c["env"] if e["name"].startswith("RLHF_")}
    assert "RLHF_TOKENS" not in values and "RLHF_TOKENS_FILE" not in values
    # The trainer pod loads exactly the controller's settings back.
    assert load_settings(values) == settings.with_overrides(tokens="")
    assert json.loads(values["RLHF_TRAINER_TOLERATIONS"]) == list(settings.trainer_tolerations)
    assert len(settings_env(settings)) == len(values)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"name": "PPO_run"}, "DNS label"),
        ({"name": "9ppo"}, "DNS label"),
        ({"name": "p" * 62, "nodes": 2}, "too long"),
        ({"nodes": 0}, "nodes=0"),
        ({"procs_per_node": 0}, "procs_per_node=0"),
        ({"gpus": -1}, "gpus=-1"),
        ({"result_file": "/tmp/result.json"}, "result_file=/tmp/result.json is not under RLHF_DATA_MOUNT=/data"),
    ],
)
def test_bad_specs_are_refused_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        build_job_manifests(spec(**changes), load_settings(BASE_ENV))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RLHF_HOME": "/var/lib/rlhf"}, "RLHF_HOME=/var/lib/rlhf is not under RLHF_DATA_MOUNT=/data"),
        ({"RLHF_CHECKPOINT_DIR": "/ckpt"}, "RLHF_CHECKPOINT_DIR=/ckpt is not under"),
        ({"RLHF_DATA_MOUNT": "data"}, "RLHF_DATA_MOUNT='data' must be an absolute path"),
    ],
)
def test_state_off_the_data_claim_is_a_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        build_job_manifests(spec(), load_settings({**BASE_ENV, **env}))


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RLHF_TRAINER_CPU": "two"}, "RLHF_TRAINER_CPU='two' is not a Kubernetes quantity"),
        ({"RLHF_TRAINER_MEMORY": "8 GB"}, "RLHF_TRAINER_MEMORY="),
        ({"RLHF_TRAINER_NODE_SELECTOR": "[1]"}, "RLHF_TRAINER_NODE_SELECTOR must be a JSON object"),
        ({"RLHF_TRAINER_NODE_SELECTOR": '{"gpu": true}'}, "values are strings"),
        ({"RLHF_TRAINER_TOLERATIONS": '{"key": "x"}'}, "RLHF_TRAINER_TOLERATIONS must be a JSON list of objects"),
        ({"RLHF_TRAINER_TOLERATIONS": "[oops"}, "RLHF_TRAINER_TOLERATIONS: not valid JSON"),
        ({"RLHF_K8S_NAMESPACE": "Team_A"}, "RLHF_K8S_NAMESPACE='Team_A' must be a DNS label"),
        ({"RLHF_TRAINER_JOB_KIND": "mpijob"}, "RLHF_TRAINER_JOB_KIND='mpijob' is not one of job, pytorchjob"),
        ({"RLHF_TRAINER_GPUS": "-1"}, "RLHF_TRAINER_GPUS=-1 is below the minimum 0"),
    ],
)
def test_executor_settings_are_checked_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        load_settings({**BASE_ENV, **env})


# --- status, from the API's own objects ---------------------------------------------------


def as_json(job: client.V1Job) -> dict:
    return client.ApiClient().sanitize_for_serialization(job)


def condition(kind: str, reason: str = "", message: str = "") -> client.V1JobCondition:
    return client.V1JobCondition(type=kind, status="True", reason=reason or None, message=message or None)


@pytest.mark.parametrize(
    "status, state",
    [
        (None, JobState.PENDING),
        (client.V1JobStatus(), JobState.PENDING),
        (client.V1JobStatus(active=2, ready=1), JobState.RUNNING),
        (
            client.V1JobStatus(succeeded=1, conditions=[condition("SuccessCriteriaMet"), condition("Complete")]),
            JobState.SUCCEEDED,
        ),
        (
            client.V1JobStatus(failed=1, conditions=[condition("FailureTarget", "BackoffLimitExceeded")]),
            JobState.FAILED,
        ),
        (
            client.V1JobStatus(
                failed=1,
                conditions=[condition("Failed", "DeadlineExceeded", "Job was active longer than specified deadline")],
            ),
            JobState.FAILED,
        ),
        (
            client.V1JobStatus(active=1, conditions=[client.V1JobCondition(type="Failed", status="False")]),
            JobState.RUNNING,
        ),
    ],
)
def test_job_status_maps_the_jobs_conditions(status, state):
    job = client.V1Job(metadata=client.V1ObjectMeta(name="x"), status=status)
    assert job_status(as_json(job)).state == state


def test_failed_status_names_the_reason():
    job = client.V1Job(status=client.V1JobStatus(conditions=[condition("Failed", "DeadlineExceeded", "too slow")]))
    assert job_status(as_json(job)).message == "DeadlineExceeded: too slow"


def test_pytorchjob_status():
    running = {"status": {"conditions": [{"type": "Created", "status": "True"}, {"type": "Running", "status": "True"}]}}
    done = {"status": {"conditions": [{"type": "Running", "status": "False"}, {"type": "Succeeded", "status": "True"}]}}
    failed = {
        "status": {
            "conditions": [
                {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": "worker 1 exited 3"}
            ]
        }
    }
    assert job_status(running).state == JobState.RUNNING
    assert job_status(done).state == JobState.SUCCEEDED
    assert job_status(failed).state == JobState.FAILED and "worker 1 exited 3" in job_status(failed).message


# --- KubernetesExecutor through the real client, against a stand-in Jobs API ------------------


@pytest.fixture
def api():
    with JobsApi() as stand_in:
        yield stand_in


@pytest.fixture
def executor(api):
    configuration = client.Configuration(host=api.url)
    return KubernetesExecutor(load_settings(BASE_ENV), api_client=client.ApiClient(configuration))


def test_launch_creates_exactly_the_built_job(api, executor):
    job_spec = spec()
    assert executor.launch(job_spec) == job_spec.name
    stored = api.jobs[job_spec.name]
    expected = build_job_manifests(job_spec, executor.settings)[0]
    assert {k: stored[k] for k in expected} | {"metadata": expected["metadata"]} == expected
    assert ("POST", "/apis/batch/v1/namespaces/team-a/jobs", {}) in api.requests
    assert executor.status(job_spec.name).state == JobState.PENDING


def test_multi_node_launch_creates_a_service_owned_by_the_job(api, executor):
    executor.launch(spec(nodes=2))
    service = api.services["ppo-r3-0a1b2c"]
    (owner,) = service["metadata"]["ownerReferences"]
    assert owner["kind"] == "Job" and owner["uid"] == api.jobs["ppo-r3-0a1b2c"]["metadata"]["uid"]


def test_wait_follows_the_job_with_a_watch(api, executor):
    name = executor.launch(spec())
    # The job finishes only once the executor is watching it.
    api.on_watch = lambda watched: api.set_status(
        watched, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
    )
    status = executor.wait(name, timeout=30)
    assert status.state == JobState.SUCCEEDED
    watches = [q for method, path, q in api.requests if method == "GET" and q.get("watch")]
    assert watches and watches[0]["fieldSelector"] == f"metadata.name={name}"


def test_wait_returns_the_current_state_at_its_timeout(api, executor):
    name = executor.launch(spec())
    api.set_status(name, {"active": 1})
    assert executor.wait(name, timeout=1).state == JobState.RUNNING


def test_a_failed_job_reports_exit_code_and_log_tail(api, executor):
    name = executor.launch(spec())
    api.pods.append(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-x7k2p", "labels": {JOB_LABEL: name}},
            "status": {
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "i",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": {"exitCode": 3, "reason": "Error"}},
                    }
                ]
            },
        }
    )
    api.logs[f"{name}-x7k2p"] = "Traceback ...\nValueError: snapshot s7 not found\n"
    api.set_status(
        name,
        {
            "failed": 1,
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "BackoffLimitExceeded",
                    "message": "Job has reached the specified backoff limit",
                }
            ],
        },
    )
    status = executor.wait(name, timeout=10)
    assert status.state == JobState.FAILED and status.exit_code == 3
    assert "BackoffLimitExceeded" in status.message and "snapshot s7 not found" in status.message
    assert ("GET", f"/api/v1/namespaces/team-a/pods/{name}-x7k2p/log", {"tailLines": "20"}) in api.requests


def test_a_retry_replaces_the_finished_attempt(api, executor):
    name = executor.launch(spec())
    first = api.jobs[name]["metadata"]["uid"]
    api.set_status(name, {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]})
    assert executor.launch(spec()) == name
    assert api.jobs[name]["metadata"]["uid"] != first
    deletes = [q for method, path, q in api.requests if method == "DELETE"]
    assert deletes == [{"propagationPolicy": "Foreground"}]


def test_launch_follows_a_job_that_is_still_running(api, executor):
    name = executor.launch(spec())
    uid = api.jobs[name]["metadata"]["uid"]
    api.set_status(name, {"active": 1})
    assert executor.launch(spec()) == name  # e.g. after a controller restart
    assert api.jobs[name]["metadata"]["uid"] == uid


def test_cancel_deletes_in_the_background_and_tolerates_a_missing_job(api, executor):
    name = executor.launch(spec())
    executor.cancel(name)
    assert name not in api.jobs
    assert [q for method, path, q in api.requests if method == "DELETE"] == [{"propagationPolicy": "Background"}]
    executor.cancel(name)  # already gone: no error
    assert executor.status(name).state == JobState.FAILED


def test_no_cluster_credentials_is_a_clear_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(
        ConfigError,
        match="RLHF_EXECUTOR=kubernetes or RLHF_TGI_DEPLOYMENT needs the Kubernetes API, "
        "but there is no in-cluster service account",
    ):
        KubernetesExecutor(load_settings(BASE_ENV))


def _platform_env() -> dict[str, str]:
    """k8s/base/platform.env: the ConfigMap the controller and every trainer Job read."""
    path = Path(__file__).resolve().parents[2] / "k8s" / "base" / "platform.env"
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
    return {k: v for k, v in pairs}


def _env_the_container_sees(container: dict, config_maps: dict[str, dict[str, str]]) -> dict[str, str]:
    """As the kubelet resolves it: envFrom first, then env entries over it, a later duplicate winning."""
    seen: dict[str, str] = {}
    for source in container.get("envFrom", []):
        seen.update(config_maps[source["configMapRef"]["name"]])
    for entry in container["env"]:
        if "value" in entry:
            seen[entry["name"]] = entry["value"]
    return seen


@pytest.mark.parametrize("config_map", ["rlhf-config-abc", ""])
def test_a_gpu_job_built_as_the_controller_builds_it_trains_on_cuda(tmp_path, api, config_map):
    """The controller runs with the platform's settings (RLHF_DEVICE=cpu); its GPU Jobs must still see cuda."""
    platform = _platform_env()
    assert platform["RLHF_DEVICE"] == "cpu"  # the premise: the controller's own device is cpu
    env = {
        **{k: v for k, v in platform.items() if k not in ("RLHF_HOME",)},
        "RLHF_HOME": str(tmp_path / "data"),
        "RLHF_DATA_MOUNT": str(tmp_path),
        "RLHF_EXECUTOR": "kubernetes",
        "RLHF_TRAINER_IMAGE": "reg.example/rlhf-platform:1.2",
        "RLHF_TRAINER_CONFIG_MAP": config_map,
        "RLHF_TRAINER_GPUS": "1",
        "RLHF_JOB_RETRIES": "0",
        "RLHF_K8S_NAMESPACE": "team-a",
    }
    settings = load_settings(env)
    executor = KubernetesExecutor(settings, api_client=client.ApiClient(client.Configuration(host=api.url)))
    controller = Controller(settings, executor)
    api.on_watch = lambda name: api.set_status(
        name, {"failed": 1, "conditions": [{"type": "Failed", "status": "True"}]}
    )
    with pytest.raises(JobFailed):  # the Job "fails" at once: only the Job it created matters here
        controller.run_job("ppo", ["--snapshot", "s1", "--sft", "sft-1", "--reward", "rm-1"], "ppo-r1")
    container = only_container(api.jobs["ppo-r1"])
    seen = _env_the_container_sees(container, {config_map: platform} if config_map else {})
    assert seen["RLHF_DEVICE"] == "cuda"
    assert seen["RLHF_TRAINER_GPUS"] == "1" and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), "an env name appears twice; which one wins is easy to get wrong"


def test_a_restarted_controller_adopts_its_running_job_by_name(tmp_path, api):
    """Job names are deterministic per round and trainer: a new controller follows the Job, never creates a second."""
    env = {**BASE_ENV, "RLHF_HOME": str(tmp_path / "data"), "RLHF_DATA_MOUNT": str(tmp_path), "RLHF_JOB_RETRIES": "0"}
    settings = load_settings(env)
    configuration = client.Configuration(host=api.url)
    first = Controller(settings, KubernetesExecutor(settings, api_client=client.ApiClient(configuration)))
    args = ["--snapshot", "s1", "--sft", "sft-1", "--reward", "rm-1"]
    first.executor.launch(first.job_spec("ppo", args, "ppo-r4"))  # ... and then the controller died
    api.set_status("ppo-r4", {"active": 1})

    restarted = Controller(settings, KubernetesExecutor(settings, api_client=client.ApiClient(configuration)))
    result_file = tmp_path / "data" / "runs" / "ppo-r4" / "result.json"

    def finish(name: str) -> None:  # the trainer writes its result, then its pod completes
        result_file.write_text(json.dumps({"version": "ppo-4"}))
        api.set_status(name, {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})

    api.on_watch = finish
    assert restarted.run_job("ppo", args, "ppo-r4")["version"] == "ppo-4"
    creates = [path for method, path, _ in api.requests if method == "POST" and path.endswith("/jobs")]
    assert len(creates) == 1, "the restarted controller created the job again"
    kinds = [(d["kind"], d.get("state")) for d in restarted.decisions()]
    assert ("job_adopted", "running") in kinds and ("job_started", None) not in kinds
