"""Offline schema validation: kubernetes-validate's OpenAPI-derived JSON
schemas (strict: unknown fields fail) for built-in kinds, and the minimal
vendored schemas in schemas/ for the CRD kinds of the optional components."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate

SCHEMAS = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMAS / "servicemonitor.json",
    ("kubeflow.org/v1", "PyTorchJob"): SCHEMAS / "pytorchjob.json",
}


def validate_builtin(obj: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        raise AssertionError(
            f"{obj['kind']}/{obj['metadata'].get('name')} invalid for Kubernetes {version} at {path}: {err.message}"
        ) from None


def validate_crd(obj: dict, version: str) -> None:
    schema = json.loads(CRD_SCHEMAS[(obj["apiVersion"], obj["kind"])].read_text())
    try:
        jsonschema.Draft202012Validator(schema).validate(obj)
    except jsonschema.ValidationError as err:
        path = ".".join(str(p) for p in err.path)
        raise AssertionError(f"{obj['kind']}/{obj['metadata'].get('name')} invalid at {path}: {err.message}") from None
    if obj["kind"] == "PyTorchJob":  # its pod templates against the real schema
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            wrapper = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{obj['metadata']['name']}-{role.lower()}"},
                "template": replica["template"],
            }
            validate_builtin(wrapper, version)


def validate(obj: dict, version: str) -> None:
    if (obj["apiVersion"], obj["kind"]) in CRD_SCHEMAS:
        validate_crd(obj, version)
    else:
        validate_builtin(obj, version)
