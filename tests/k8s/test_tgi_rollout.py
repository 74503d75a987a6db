"""TGI follows promotions: the controller points the TGI Deployment at each
policy it promotes (services/controller/tgi_rollout.py), through the real
`kubernetes` client against the stand-in API, and the k8s/ tgi variants
wire that up (env, RBAC, the shared data path)."""

from __future__ import annotations

import pytest
from kubernetes import client

from services.common.checkpoints import CheckpointStore
from services.common.config import load_settings
from services.controller.controller import Controller
from services.controller.local_executor import LocalExecutor
from services.controller.tgi_rollout import RolloutError, TgiRollout, with_model_id
from services.policy.tgi_backend import version_of
from tests.conftest import make_settings
from tests.k8s.jobs_api import JobsApi
from tests.k8s.render import one, pod_spec

pytestmark = pytest.mark.unit

TGI_ARGS = ["--model-id=/data/checkpoints/base-base-seed", "--port=8080", "--max-input-tokens=512"]


def deployment(args: list[str]) -> dict:
    containers = [
        {"name": "tgi", "image": "ghcr.io/huggingface/text-generation-inference:3.3.0", "args": list(args)},
        {"name": "log-shipper", "image": "reg.example/shipper:1", "args": ["--model-id-is-not-mine"]},
    ]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "tgi", "namespace": "rlhf"},
        "spec": {
            "selector": {"matchLabels": {"app": "tgi"}},
            "template": {"metadata": {"labels": {"app": "tgi"}}, "spec": {"containers": containers}},
        },
    }


@pytest.fixture
def api():
    with JobsApi() as stand_in:
        stand_in.deployments["tgi"] = deployment(TGI_ARGS)
        yield stand_in


def rollout_for(api: JobsApi, settings) -> TgiRollout:
    return TgiRollout(settings, client.ApiClient(client.Configuration(host=api.url)))


def test_model_id_is_replaced_in_either_form_and_nothing_else_moves():
    assert with_model_id(TGI_ARGS, "/data/checkpoints/ppo-1") == ["--model-id=/data/checkpoints/ppo-1", *TGI_ARGS[1:]]
    assert with_model_id(["--port", "8080", "--model-id", "/old", "--quantize", "fp8"], "/new") == [
        "--port",
        "8080",
        "--model-id=/new",
        "--quantize",
        "fp8",
    ]
    assert with_model_id(["--port=8080"], "/new") == ["--port=8080", "--model-id=/new"]
    assert version_of("/data/checkpoints/ppo-20261127T010203-ab12cd") == "ppo-20261127T010203-ab12cd"
    assert version_of("/data/checkpoints/sft-1/") == "sft-1" and version_of("sft-2") == "sft-2"


def test_rollout_patches_only_the_model_id_of_the_tgi_container(api):
    rollout = rollout_for(
        api, load_settings({"RLHF_HOME": "/data", "RLHF_TGI_DEPLOYMENT": "tgi", "RLHF_K8S_NAMESPACE": "rlhf"})
    )
    assert rollout.roll("ppo-20261127T010203-ab12cd") is True
    [(name, kind, body)] = api.patches
    assert (name, kind) == ("tgi", "application/strategic-merge-patch+json")
    new_args = ["--model-id=/data/checkpoints/ppo-20261127T010203-ab12cd", *TGI_ARGS[1:]]
    assert body == {"spec": {"template": {"spec": {"containers": [{"name": "tgi", "args": new_args}]}}}}
    tgi, shipper = api.deployments["tgi"]["spec"]["template"]["spec"]["containers"]
    assert tgi["args"] == new_args and shipper["args"] == ["--model-id-is-not-mine"]

    assert rollout.roll("ppo-20261127T010203-ab12cd") is False and len(api.patches) == 1  # already serving it: no roll
    del api.deployments["tgi"]
    with pytest.raises(RolloutError, match="cannot read Deployment rlhf/tgi .RLHF_TGI_DEPLOYMENT.: 404"):
        rollout.roll("ppo-2")


def test_controller_rolls_tgi_after_each_policy_promotion_and_survives_a_failed_roll(
    api, broker, tmp_path, tiny_model_dir
):
    settings = make_settings(tmp_path, broker, RLHF_TGI_DEPLOYMENT="tgi")
    store = CheckpointStore(settings.checkpoint_dir)
    rm, ppo, ppo2 = (store.import_dir(tiny_model_dir, kind).version for kind in ("rm", "ppo", "ppo"))
    controller = Controller(settings, LocalExecutor(tmp_path / "jobs"), tgi_rollout=rollout_for(api, settings))

    controller.promote(rm, "a reward model: TGI serves policies only")
    assert api.patches == []
    controller.promote(ppo, "gate passed")
    [(_, _, body)] = api.patches
    assert body["spec"]["template"]["spec"]["containers"][0]["args"][0] == f"--model-id={settings.checkpoint_dir / ppo}"

    del api.deployments["tgi"]  # e.g. deleted by hand: the promotion stands, the failure is on record
    controller.promote(ppo2, "gate passed")
    assert store.promoted("policy") == ppo2
    kinds = [(d["kind"], d["version"]) for d in controller.decisions()]
    assert kinds == [
        ("promoted", rm),
        ("promoted", ppo),
        ("tgi_rolled", ppo),
        ("promoted", ppo2),
        ("tgi_roll_failed", ppo2),
    ]
    assert "404" in controller.decisions()[-1]["error"]


@pytest.mark.parametrize("variant", ["tgi", "base+tgi"])
def test_tgi_variants_let_the_controller_roll_the_tgi_deployment(renders, variant):
    objects = renders[variant]
    controller = one(objects, "Deployment", "trainer-controller")
    spec = pod_spec(controller)
    env = {e["name"]: e.get("value") for e in spec["containers"][0].get("env", [])}
    target = one(objects, "Deployment", env["RLHF_TGI_DEPLOYMENT"])
    # TGI reads the folder the controller names: the claim is mounted at RLHF_HOME in both pods
    tgi = next(c for c in pod_spec(target)["containers"] if any(a.startswith("--model-id") for a in c.get("args", [])))
    mounts = {m["name"]: m["mountPath"] for m in tgi["volumeMounts"]}
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(target)["volumes"]
        if "persistentVolumeClaim" in v
    }
    (data_volume,) = [name for name, claim in claims.items() if claim == "rlhf-data"]
    assert mounts[data_volume] == "/data" and next(a for a in tgi["args"] if a.startswith("--model-id")).startswith(
        "--model-id=/data/checkpoints/"
    )
    # RBAC: the controller's account may read and patch that one Deployment, nothing more
    account = spec["serviceAccountName"]
    grants = set()
    for binding in (
        o
        for o in objects
        if o["kind"] == "RoleBinding"
        and {"kind": "ServiceAccount", "name": account, "namespace": "rlhf"} in o["subjects"]
    ):
        role = one(objects, "Role", binding["roleRef"]["name"])
        for rule in role["rules"]:
            if "apps" in rule.get("apiGroups", []):
                grants |= {
                    (res, verb, tuple(rule.get("resourceNames", [])))
                    for res in rule["resources"]
                    for verb in rule["verbs"]
                }
    assert grants == {
        ("deployments", "get", (target["metadata"]["name"],)),
        ("deployments", "patch", (target["metadata"]["name"],)),
    }
