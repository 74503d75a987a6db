"""k8s/: every variant renders, validates offline, and keeps the platform's invariants."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
import uuid

import pytest

from services.common.bootstrap import seed_version
from services.common.config import load_settings
from services.controller.jobs import JobSpec
from services.controller.k8s_executor import KAFKA_CLIENT_LABEL, RUN_AS_UID, SCRATCH_ENV, build_job_manifests
from tests.k8s.render import (
    K8S_VERSIONS,
    OVERLAYS,
    PLATFORM_IMAGES,
    VARIANTS,
    compose,
    container_env,
    find,
    one,
    pod_spec,
    settings_of,
    unique,
    workloads,
)
from tests.k8s.schema import CRD_SCHEMAS, validate, validate_builtin

pytestmark = pytest.mark.unit

# kinds that a bare cluster serves: `kubectl apply -k k8s/` must need no CRD
BUILTIN_API_VERSIONS = {
    "v1",
    "apps/v1",
    "batch/v1",
    "rbac.authorization.k8s.io/v1",
    "networking.k8s.io/v1",
    "policy/v1",
    "autoscaling/v2",
}
GRPC_SERVICES = {
    "policy": "policy_port",
    "reward": "reward_port",
    "feedback": "feedback_port",
    "labeling": "labeling_port",
    "trainer-controller": "controller_port",
}
DEFAULTS = load_settings({})


def image_name(image: str) -> str:
    return image.rsplit(":", 1)[0]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def controller_job(objects: list[dict], **shape) -> list[dict]:
    """The trainer Job the controller would create, with exactly the settings its Deployment gets."""
    settings = settings_of(objects, "trainer-controller")
    spec = JobSpec(
        name="sft-r1-a1b2c3",
        trainer="sft",
        args=["--snapshot", "s1"],
        result_file=f"{settings.home}/runs/sft-r1-a1b2c3/result.json",
        gpus=shape.get("gpus", settings.trainer_gpus),
        nodes=shape.get("nodes", settings.trainer_nodes),
        procs_per_node=shape.get("procs_per_node", settings.trainer_procs_per_node),
    )
    return build_job_manifests(spec, settings)


# --- rendering and schemas -----------------------------------------------------------


def test_every_overlay_and_component_combination_renders(renders):
    assert {"dev", "gpu", "tgi"} <= set(OVERLAYS)
    for name, objects in renders.items():
        ids = [(o["kind"], o["metadata"]["name"]) for o in objects]
        assert len(ids) == len(set(ids)), f"{name}: duplicate objects"
        assert find(objects, "Deployment", "policy"), f"{name}: no policy Deployment"


def test_k8s_root_is_the_base(renders):
    assert renders["k8s"] == renders["base"]


def test_base_needs_no_crds(renders):
    for name in ["k8s", *OVERLAYS]:
        extra = {o["apiVersion"] for o in renders[name]} - BUILTIN_API_VERSIONS
        assert not extra, f"{name} needs CRDs: {extra}"


def test_components_add_their_crd_kinds(renders):
    assert find(renders["base+servicemonitor"], "ServiceMonitor")
    assert (
        one(
            renders["base+pytorchjob"],
            "ConfigMap",
            settings_of(renders["base+pytorchjob"], "trainer-controller").trainer_config_map,
        )["data"]["RLHF_TRAINER_JOB_KIND"]
        == "pytorchjob"
    )
    role = one(renders["base+pytorchjob"], "Role", "trainer-controller")
    assert any("pytorchjobs" in rule["resources"] and "watch" in rule["verbs"] for rule in role["rules"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_validates_against_the_schema(renders, version):
    objects = unique(o for variant in renders.values() for o in variant)
    assert any((o["apiVersion"], o["kind"]) in CRD_SCHEMAS for o in objects)
    for obj in objects:
        validate(obj, version)


def test_the_validator_rejects_a_typo(renders):
    broken = copy.deepcopy(one(renders["base"], "Deployment", "policy"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = broken["spec"]["template"]["spec"][
        "containers"
    ][0].pop("readinessProbe")
    with pytest.raises(AssertionError, match="readinessProbes"):
        validate_builtin(broken, K8S_VERSIONS[-1])
    monitor = copy.deepcopy(find(renders["base+servicemonitor"], "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["intervl"] = "30s"
    with pytest.raises(AssertionError, match="intervl"):
        validate(monitor, K8S_VERSIONS[-1])


# --- pods --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_pod_is_locked_down(renders, variant):
    for obj in workloads(renders[variant]):
        where = f"{variant}: {obj['kind']}/{obj['metadata']['name']}"
        spec = pod_spec(obj)
        assert spec["enableServiceLinks"] is False, where
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        volumes = {v["name"] for v in spec.get("volumes", [])} | {
            t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])
        }
        for c in containers(spec):
            name, _, tag = c["image"].rpartition(":")
            assert name and tag and tag != "latest" and "/" not in tag, f"{where} {c['name']}: pin the image tag"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, (
                f"{where} {c['name']}"
            )
            assert sc["capabilities"]["drop"] == ["ALL"], f"{where} {c['name']}"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where} {c['name']}: {kind}"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= volumes, f"{where} {c['name']}: mounts an undefined volume"
            if c in spec["containers"]:  # (an init container that only copies files needs none)
                assert "/tmp" in mounts, f"{where} {c['name']}: read-only root needs a writable /tmp"
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), f"{where} {c['name']}: duplicate env {names}"
        # Long-running pods are probed; Jobs are not.
        if obj["kind"] != "Job":
            for c in spec["containers"]:
                assert "readinessProbe" in c and "livenessProbe" in c, f"{where} {c['name']}: probes"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_platform_pods_run_as_the_image_user_with_writable_caches(renders, variant):
    objects = renders[variant]
    for obj in workloads(objects):
        spec = pod_spec(obj)
        for c in spec["containers"]:
            if image_name(c["image"]) not in PLATFORM_IMAGES:
                continue
            assert spec["securityContext"]["runAsUser"] == RUN_AS_UID
            env = container_env(objects, obj, c)
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            for var in SCRATCH_ENV:  # HOME and the caches point into a mounted emptyDir
                assert any(env[var].startswith(m + "/") for m in mounts), f"{obj['metadata']['name']}: {var}={env[var]}"


def test_services_use_grpc_probes_on_the_configured_ports(renders):
    objects = renders["base"]
    for name, field in GRPC_SERVICES.items():
        port = getattr(DEFAULTS, field)
        c = pod_spec(one(objects, "Deployment", name))["containers"][0]
        assert {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"] == port
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == port, f"{name} {probe}"
        service = one(objects, "Service", name)
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == port
    policy = pod_spec(one(objects, "Deployment", "policy"))["containers"][0]
    assert {p["name"]: p["containerPort"] for p in policy["ports"]}["http"] == DEFAULTS.http_port
    playground = pod_spec(one(objects, "Deployment", "playground"))["containers"][0]
    assert playground["ports"][0]["containerPort"] == DEFAULTS.playground_port
    assert playground["readinessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_configmap_loads_and_matches_the_pods(renders, variant):
    objects = renders[variant]
    for name in ("policy", "reward", "feedback", "labeling", "playground", "trainer-controller"):
        settings = settings_of(objects, name)  # raises on any unknown or invalid RLHF_* value
        c = pod_spec(one(objects, "Deployment", name))["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        if "metrics" in ports:
            assert ports["metrics"] == settings.metrics_port
        for target in (
            settings.policy_target,
            settings.reward_target,
            settings.feedback_target,
            settings.labeling_target,
        ):
            host, port = target.split(":")
            service = one(objects, "Service", host)
            assert int(port) in {p["port"] for p in service["spec"]["ports"]}
        host, port = settings.kafka_bootstrap.split(":")
        assert int(port) in {p["port"] for p in one(objects, "Service", host)["spec"]["ports"]}


def test_modules_that_pods_run_exist(renders):
    commands = [
        c["command"]
        for objects in renders.values()
        for obj in workloads(objects)
        for c in pod_spec(obj)["containers"]
        if "command" in c
    ]
    modules = {cmd[2] for cmd in commands if cmd[:2] == ["python", "-m"]}
    assert {
        "services.policy",
        "services.reward",
        "services.feedback",
        "services.labeling",
        "services.playground",
        "services.controller",
    } <= modules
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module


# --- images, the controller's Jobs and storage -------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_trainer_jobs_match_the_deployments(renders, variant):
    objects = renders[variant]
    controller = one(objects, "Deployment", "trainer-controller")
    platform_images = {
        c["image"]
        for o in workloads(objects)
        for c in pod_spec(o)["containers"]
        if image_name(c["image"]) in PLATFORM_IMAGES
    }
    policy_image = pod_spec(one(objects, "Deployment", "policy"))["containers"][0]["image"]
    claim = one(objects, "PersistentVolumeClaim", "rlhf-data")
    for shape in ({}, {"gpus": 1}, {"nodes": 3, "procs_per_node": 2}):
        manifests = controller_job(objects, **shape)
        job = manifests[0]
        template = (
            job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
            if job["kind"] == "PyTorchJob"
            else job["spec"]["template"]
        )
        pod = template["spec"]
        c = pod["containers"][0]
        # The image: the controller's own, or the CUDA image the GPU policy runs.
        expected = (
            policy_image
            if image_name(policy_image) == "rlhf-platform-cuda"
            else pod_spec(controller)["containers"][0]["image"]
        )
        assert c["image"] == expected and c["image"] in platform_images
        # The same claim, mounted where the Deployments mount it.
        data = next(v for v in pod["volumes"] if "persistentVolumeClaim" in v)
        assert data["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        mount = next(m["mountPath"] for m in c["volumeMounts"] if m["name"] == data["name"])
        for deployment in ("policy", "trainer-controller"):
            dep = pod_spec(one(objects, "Deployment", deployment))
            dep_volume = next(
                v["name"]
                for v in dep["volumes"]
                if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
            )
            assert mount in {m["mountPath"] for m in dep["containers"][0]["volumeMounts"] if m["name"] == dep_volume}
        # The same settings, the rendered (hashed) ConfigMap.
        assert c["envFrom"] == pod_spec(controller)["containers"][0]["envFrom"]
        one(objects, "ServiceAccount", pod["serviceAccountName"])
        assert template["metadata"]["labels"][KAFKA_CLIENT_LABEL] == "true"
        assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "trainer"
        for obj in manifests:
            validate(obj, K8S_VERSIONS[-1])


def test_retargeting_the_images_retargets_the_trainer_jobs():
    images = [
        {"name": "rlhf-platform", "newName": "reg.example/ml/rlhf-platform", "newTag": "2.0"},
        {"name": "rlhf-platform-cuda", "newName": "reg.example/ml/rlhf-platform-cuda", "newTag": "2.0"},
    ]
    for folder, image in (
        ("base", "reg.example/ml/rlhf-platform:2.0"),
        ("overlays/gpu", "reg.example/ml/rlhf-platform-cuda:2.0"),
    ):
        objects = compose(folder, images=images)
        assert pod_spec(one(objects, "Deployment", "policy"))["containers"][0]["image"] == image
        assert controller_job(objects)[0]["spec"]["template"]["spec"]["containers"][0]["image"] == image


def test_gpu_overlay_puts_policy_and_trainers_on_gpus(renders):
    objects = renders["gpu"]
    policy = pod_spec(one(objects, "Deployment", "policy"))
    assert policy["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert image_name(policy["containers"][0]["image"]) == "rlhf-platform-cuda"
    assert policy["nodeSelector"] and policy["tolerations"]
    settings = settings_of(objects, "trainer-controller")
    assert settings.trainer_gpus >= 1
    pod = controller_job(objects)[0]["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"][settings.trainer_gpu_resource] == str(settings.trainer_gpus)
    assert pod["nodeSelector"] == policy["nodeSelector"]
    assert pod["tolerations"] == policy["tolerations"]
    for name in ("reward", "feedback", "playground"):
        assert (
            "nvidia.com/gpu" not in pod_spec(one(objects, "Deployment", name))["containers"][0]["resources"]["limits"]
        )


def test_tgi_serves_the_seed_policy_from_the_data_claim(renders):
    for variant in ("tgi", "gpu+tgi"):
        objects = renders[variant]
        policy_env = container_env(
            objects,
            one(objects, "Deployment", "policy"),
            pod_spec(one(objects, "Deployment", "policy"))["containers"][0],
        )
        service = one(objects, "Service", "tgi")
        assert policy_env["RLHF_TGI_URL"] == f"http://tgi:{service['spec']['ports'][0]['port']}"
        settings = settings_of(objects, "policy")
        tgi = pod_spec(one(objects, "Deployment", "tgi"))
        args = dict(a.lstrip("-").split("=", 1) for a in tgi["containers"][0]["args"])
        assert args["model-id"] == f"{settings.checkpoint_dir}/{seed_version(settings, 'policy')}"
        assert tgi["volumes"][0]["persistentVolumeClaim"]["claimName"] == "rlhf-data"


def test_dev_overlay_is_small_and_single_node(renders):
    objects = renders["dev"]
    assert settings_of(objects, "policy").model == "tiny"
    assert one(objects, "PersistentVolumeClaim", "rlhf-data")["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert one(objects, "HorizontalPodAutoscaler", "policy")["spec"]["minReplicas"] == 1
    assert one(objects, "PodDisruptionBudget", "policy")["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "policy"}},
    }
    for obj in workloads(objects):
        for c in pod_spec(obj)["containers"]:
            assert "nvidia.com/gpu" not in c["resources"]["limits"]


# --- names, RBAC, network, secrets ---------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_no_service_name_injects_settings(renders, variant):
    # Service links would put <NAME>_PORT=... into pods: a Service named
    # kafka breaks the apache/kafka image, and rlhf-* would be unknown RLHF_* settings.
    for svc in find(renders[variant], "Service"):
        name = svc["metadata"]["name"]
        assert name != "kafka" and not name.replace("-", "_").upper().startswith("RLHF_"), name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_namespaced_object_is_in_the_platform_namespace(renders, variant):
    # Components add resources after the base's namespace transformer ran:
    # an object without its own namespace would land in kubectl's default.
    cluster_scoped = {
        "Namespace",
        "CustomResourceDefinition",
        "ClusterRole",
        "ClusterRoleBinding",
        "PersistentVolume",
        "StorageClass",
    }
    stray = [
        (o["kind"], o["metadata"]["name"])
        for o in renders[variant]
        if o["kind"] not in cluster_scoped and o["metadata"].get("namespace") != "rlhf"
    ]
    assert stray == []
    for binding in find(renders[variant], "RoleBinding"):
        assert all(s.get("namespace") == "rlhf" for s in binding["subjects"] if s["kind"] == "ServiceAccount"), binding[
            "metadata"
        ]["name"]


def test_grpc_services_stop_taking_traffic_then_drain_within_the_grace_period(renders):
    objects = renders["base"]
    config = one(
        objects,
        "ConfigMap",
        next(
            o["metadata"]["name"]
            for o in objects
            if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("rlhf-config")
        ),
    )
    grace = float(config["data"].get("RLHF_GRPC_GRACE_S", load_settings({}).grpc_grace_s))
    for name in ("policy", "reward", "feedback", "labeling"):
        spec = pod_spec(one(objects, "Deployment", name))
        (container,) = spec["containers"]
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        # endpoints drop the pod during the pause, then SIGTERM: drain for RLHF_GRPC_GRACE_S, before Kubernetes kills it
        assert pause > 0 and pause + grace < spec["terminationGracePeriodSeconds"], name


def test_rbac_is_per_component_and_minimal(renders):
    objects = renders["base"]
    for obj in workloads(objects):
        spec = pod_spec(obj)
        account = one(objects, "ServiceAccount", spec["serviceAccountName"])
        api_access = spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken", True))
        assert api_access == (obj["metadata"]["name"] == "trainer-controller"), obj["metadata"]["name"]
    accounts = [pod_spec(o)["serviceAccountName"] for o in workloads(objects)]
    assert len(accounts) == len(set(accounts)), "one ServiceAccount per component"
    rules = one(objects, "Role", "trainer-controller")["rules"]
    grants = {(res, verb) for rule in rules for res in rule["resources"] for verb in rule["verbs"]}
    for verb in ("create", "get", "list", "watch", "delete"):
        assert ("jobs", verb) in grants and ("services", verb) in grants
    assert {("pods", "get"), ("pods/log", "get"), ("pods", "list")} <= grants
    assert not any(v in {"*"} or r == "*" for r, v in grants)
    binding = one(objects, "RoleBinding", "trainer-controller")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "trainer-controller", "namespace": "rlhf"}]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def _allows(policies: list[dict], direction: str, labels: dict, peer: dict | None, port: int) -> bool:
    """Whether some policy lets a pod with `labels` talk in `direction` to/from `peer`
    (pod labels, None = outside) on `port`."""
    key, peers = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    for pol in policies:
        if direction not in pol["spec"]["policyTypes"] or not _selects(pol["spec"]["podSelector"], labels):
            continue
        for rule in pol["spec"].get(key, []):
            ports = rule.get("ports")
            if ports and port not in {p["port"] for p in ports}:
                continue
            sources = rule.get(peers)
            if sources is None or any(
                ("podSelector" in s and peer is not None and _selects(s["podSelector"], peer))
                or ("namespaceSelector" in s and "podSelector" not in s)
                or "ipBlock" in s
                for s in sources
            ):
                return True
    return False


def test_network_policies_deny_by_default_and_allow_what_each_needs(renders):
    objects = renders["tgi"]
    policies = find(objects, "NetworkPolicy")
    deny = one(objects, "NetworkPolicy", "default-deny")["spec"]
    assert (
        deny["podSelector"] == {}
        and set(deny["policyTypes"]) == {"Ingress", "Egress"}
        and "ingress" not in deny
        and "egress" not in deny
    )
    labels = {o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"] for o in workloads(objects)}
    trainer = controller_job(objects)[0]["spec"]["template"]["metadata"]["labels"]
    kafka = labels["kafka-broker"]
    for client in ("policy", "reward", "feedback", "labeling", "trainer-controller", "create-topics"):
        assert _allows(policies, "Egress", labels[client], kafka, 9092) and _allows(
            policies, "Ingress", kafka, labels[client], 9092
        ), client
    assert _allows(policies, "Egress", trainer, kafka, 9092) and _allows(policies, "Ingress", kafka, trainer, 9092)
    assert not _allows(policies, "Ingress", kafka, labels["playground"], 9092)
    for name in labels:
        assert _allows(policies, "Egress", labels[name], None, 53), f"{name}: DNS"
    for target, port in (("policy", 50051), ("reward", 50052), ("feedback", 50053), ("labeling", 50055)):
        assert _allows(policies, "Egress", labels["playground"], labels[target], port)
        assert _allows(policies, "Ingress", labels[target], labels["playground"], port)
    for target, port in (("policy", 50051), ("feedback", 50053)):  # samples in, submissions out
        assert _allows(policies, "Egress", labels["labeling"], labels[target], port)
        assert _allows(policies, "Ingress", labels[target], labels["labeling"], port)
    assert not _allows(policies, "Egress", labels["labeling"], labels["reward"], 50052)
    assert _allows(policies, "Egress", labels["trainer-controller"], None, 443), "controller -> API server"
    assert not _allows(policies, "Egress", labels["policy"], None, 443)
    assert _allows(policies, "Ingress", labels["policy"], None, 50051) and not _allows(
        policies, "Ingress", labels["reward"], None, 50052
    )
    assert _allows(policies, "Egress", labels["policy"], labels["tgi"], 8080) and _allows(
        policies, "Ingress", labels["tgi"], labels["policy"], 8080
    )
    assert _allows(policies, "Ingress", trainer, trainer, 29500) and _allows(
        policies, "Egress", trainer, trainer, 29500
    )


def test_tokens_come_from_a_secret_that_is_never_committed(renders):
    for name, objects in renders.items():
        assert not find(objects, "Secret"), name
    objects = renders["base"]
    for name in ("policy", "reward", "feedback", "labeling", "playground"):
        dep = one(objects, "Deployment", name)
        spec = pod_spec(dep)
        c = spec["containers"][0]
        tokens_file = container_env(objects, dep, c)["RLHF_TOKENS_FILE"]
        volume = next(v for v in spec["volumes"] if "secret" in v)
        assert volume["secret"]["secretName"] == "rlhf-tokens"
        mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
        assert tokens_file.startswith(mount["mountPath"] + "/") and mount["readOnly"]
    assert "RLHF_TOKENS_FILE" not in container_env(
        objects,
        one(objects, "Deployment", "trainer-controller"),
        pod_spec(one(objects, "Deployment", "trainer-controller"))["containers"][0],
    )


def test_policy_scales_with_an_autoscaler_and_a_disruption_budget(renders):
    objects = renders["base"]
    hpa = one(objects, "HorizontalPodAutoscaler", "policy")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "policy"}
    assert 1 <= hpa["minReplicas"] < hpa["maxReplicas"]
    assert "replicas" not in one(objects, "Deployment", "policy")["spec"], "the autoscaler owns the replica count"
    pdb = one(objects, "PodDisruptionBudget", "policy")["spec"]
    assert pdb["minAvailable"] < hpa["minReplicas"]
    assert pdb["selector"] == one(objects, "Deployment", "policy")["spec"]["selector"]


def _kafka_env(objects: list[dict]) -> dict[str, str | dict]:
    kafka = one(objects, "StatefulSet", "kafka-broker")
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in pod_spec(kafka)["containers"][0]["env"]}


def test_kafka_is_three_replicated_brokers_that_match_acks_all(renders):
    """acks=all means something: 3 KRaft brokers, topics on 3 of them, a write on >= 2, one may be drained."""
    objects = renders["base"]
    kafka = one(objects, "StatefulSet", "kafka-broker")
    assert kafka["spec"]["replicas"] == 3 and kafka["spec"]["podManagementPolicy"] == "Parallel"
    env = _kafka_env(objects)
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert voters == [f"{i}@kafka-broker-{i}.kafka-broker.$(POD_NAMESPACE).svc:9093" for i in range(3)]
    assert env["KAFKA_NODE_ID"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
    assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2" and env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "3"
    assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    assert one(objects, "Service", "kafka-broker")["spec"]["publishNotReadyAddresses"] is True
    for deployment in ("feedback", "trainer-controller"):  # the topics' creators and writers
        settings = settings_of(objects, deployment)
        assert (settings.topic_replication, settings.topic_min_insync_replicas) == (3, 2)
    pdb = one(objects, "PodDisruptionBudget", "kafka-broker")["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": kafka["spec"]["selector"]}
    policies = find(objects, "NetworkPolicy")
    brokers = kafka["spec"]["template"]["metadata"]["labels"]
    for port in (9092, 9093):  # replication and the quorum, under default deny
        assert _allows(policies, "Egress", brokers, brokers, port) and _allows(
            policies, "Ingress", brokers, brokers, port
        )

    dev = renders["dev"]
    assert one(dev, "StatefulSet", "kafka-broker")["spec"]["replicas"] == 1
    env = _kafka_env(dev)
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "0@kafka-broker-0.kafka-broker.$(POD_NAMESPACE).svc:9093"
    assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "1" and env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    settings = settings_of(dev, "feedback")
    assert (settings.topic_replication, settings.topic_min_insync_replicas) == (1, 1)


def test_labels_do_not_touch_selectors(renders):
    for obj in workloads(renders["base"]):
        if obj["kind"] != "Job":  # a Job's selector is generated
            assert "app.kubernetes.io/part-of" not in obj["spec"]["selector"]["matchLabels"]
        assert obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "rlhf-platform"


# --- the topics Job, run for real against a broker ------------------------------------------


def test_the_topics_job_creates_the_topics(renders, broker, tmp_path):
    from kafka import KafkaAdminClient

    from services.common.bus import Topics

    objects = renders["base"]
    job = one(objects, "Job", "create-topics")
    c = pod_spec(job)["containers"][0]
    env = container_env(objects, job, c)
    prefix = f"k{uuid.uuid4().hex[:10]}"
    env.update(
        RLHF_KAFKA_BOOTSTRAP=broker,
        RLHF_TOPIC_PREFIX=prefix,
        RLHF_HOME=str(tmp_path),
        HOME=str(tmp_path),
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        HF_HOME=str(tmp_path / "hf"),
    )
    env = {k: v for k, v in env.items() if not k.startswith(("TRITON", "TORCHINDUCTOR"))}
    env["PATH"] = "/usr/bin:/bin"
    assert c["command"][:2] == ["python", "-c"]
    proc = subprocess.run([sys.executable, *c["command"][1:]], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    admin = KafkaAdminClient(bootstrap_servers=broker)
    try:
        assert set(Topics(prefix).all().values()) <= set(admin.list_topics())
    finally:
        admin.close()
    assert proc.stdout.startswith("topics: ")
