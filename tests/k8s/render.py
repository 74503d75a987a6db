"""Rendering k8s/ with kustomize, offline, and reading the result.

Variants: k8s/ itself, its base, every overlay, and every overlay combined
with every non-empty set of components (composed through a throwaway
kustomization in a temporary folder, since components are opt-in).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from services.common.config import load_settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").exists())
COMPONENTS = sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").exists())
# Kubernetes versions the manifests are validated against (kubernetes-validate ships 1.25..1.37).
K8S_VERSIONS = ("1.30", "1.34")
PLATFORM_IMAGES = ("rlhf-platform", "rlhf-platform-cuda")


def _component_sets(base: str) -> list[tuple[str, ...]]:
    out = []
    for n in range(1, len(COMPONENTS) + 1):
        for combo in itertools.combinations(COMPONENTS, n):
            if base == "tgi" and "tgi" in combo:  # the tgi overlay already includes it
                continue
            out.append(combo)
    return out


def variants() -> dict[str, tuple[str, tuple[str, ...]]]:
    """name -> (folder relative to k8s/, components)."""
    out = {"k8s": (".", ()), "base": ("base", ())}
    for overlay in OVERLAYS:
        out[overlay] = (f"overlays/{overlay}", ())
    for base, folder in [("base", "base")] + [(o, f"overlays/{o}") for o in OVERLAYS]:
        for combo in _component_sets(base):
            out[f"{base}+{'+'.join(combo)}"] = (folder, combo)
    return out


VARIANTS = variants()


def kustomize(folder: Path) -> list[dict]:
    proc = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"kubectl kustomize {folder} failed:\n{proc.stderr}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def compose(folder: str, components: tuple[str, ...] = (), **extra) -> list[dict]:
    """Render k8s/<folder> plus components and any other kustomization fields, as a user's overlay would."""
    with tempfile.TemporaryDirectory(prefix="k8s-variant-") as tmp:
        # kustomize accepts only relative paths to other kustomizations.
        def rel(path) -> str:
            return os.path.relpath(path, tmp)

        doc = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [rel(K8S / folder)],
            "components": [rel(K8S / "components" / c) for c in components],
            **extra,
        }
        Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump(doc))
        return kustomize(Path(tmp))


def render(name: str) -> list[dict]:
    folder, components = VARIANTS[name]
    return compose(folder, components) if components else kustomize(K8S / folder)


def render_all() -> dict[str, list[dict]]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(VARIANTS, pool.map(render, VARIANTS), strict=True))


# --- reading rendered objects ---------------------------------------------------------


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(obj: dict) -> dict | None:
    """The pod spec of a workload (Deployment, StatefulSet, Job), else None."""
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if pod_spec(o) is not None]


def unique(objects) -> list[dict]:
    seen: dict[str, dict] = {}
    for obj in objects:
        seen.setdefault(json.dumps(obj, sort_keys=True), obj)
    return list(seen.values())


def container_env(objects: list[dict], workload: dict, container: dict) -> dict[str, str]:
    """The environment a container starts with: its ConfigMaps, then its env (which wins)."""
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(one(objects, "ConfigMap", src["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif entry.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[entry["name"]] = workload["metadata"]["namespace"]
    return env


def settings_of(objects: list[dict], deployment: str):
    """Settings exactly as a Deployment's first container would load them."""
    workload = one(objects, "Deployment", deployment)
    env = container_env(objects, workload, pod_spec(workload)["containers"][0])
    return load_settings({k: v for k, v in env.items() if k.startswith("RLHF_")})
