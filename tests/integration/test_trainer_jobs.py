"""The trainer jobs end to end, as the controller runs them: real processes,
the tiny model, a real broker for the CREATED announcements.

- SFT -> RM -> PPO(-ptx) -> evaluate publish verified checkpoints that load;
- a job killed with SIGKILL and re-run on its run dir resumes and ends with
  exactly the weights and metrics of the uninterrupted run;
- RM and PPO under torchrun with 2 CPU processes (DDP over gloo);
- bad input is refused with a message naming it, and publishes nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from rlhf.v1 import events_pb2
from safetensors.torch import load_file

from services.common import bus
from services.common.checkpoints import CheckpointStore
from services.common.config import load_settings
from services.common.datasets import SnapshotStore
from services.common.models import (
    RewardModel,
    encode_prompt_response,
    load_causal_lm,
    load_tokenizer,
    pad_batch,
    render_prompt,
)
from tests.conftest import MODEL_CACHE
from trainers import evaluate
from trainers import rm as rm_trainer
from trainers import sft as sft_trainer
from trainers.config import JobError
from trainers.synthetic import write_snapshot

pytestmark = pytest.mark.integration

# Long enough that a SIGKILL lands mid-run; short enough for seconds on 2 cores.
SETS = {
    "sft": ["--set", "epochs=3"],
    "rm": ["--set", "batch_size=2", "--set", "epochs=2", "--set", "micro_batch_size=2"],
    "ppo": ["--set", "total_steps=6", "--set", "ptx_coef=0.5"],
}


class World:
    def __init__(self, root: Path, broker: str):
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
        self.env.update(
            {
                "RLHF_HOME": str(root / "home"),
                "RLHF_MODEL": "tiny",
                "RLHF_MODEL_CACHE": MODEL_CACHE,
                "RLHF_KAFKA_BOOTSTRAP": broker,
                "RLHF_TOPIC_PREFIX": f"t{uuid.uuid4().hex[:10]}",
                "RLHF_TOPIC_PARTITIONS": "1",
                "RLHF_TORCH_THREADS": "1",
                "OMP_NUM_THREADS": "1",
            }
        )
        self.settings = load_settings({k: v for k, v in self.env.items() if k.startswith("RLHF_")})
        self.store = CheckpointStore(self.settings.checkpoint_dir)
        self.snapshot = write_snapshot(self.settings.dataset_dir, 40)

    def command(self, trainer: str, args: list[str], name: str, torchrun: int = 0) -> list[str]:
        launcher = (
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
            if torchrun
            else [sys.executable]
        )
        run_dir = [] if trainer == "evaluate" else ["--run-dir", str(self.root / name)]
        return [
            *launcher,
            "-m",
            f"trainers.{trainer}",
            *args,
            *run_dir,
            "--result-file",
            str(self.root / f"{name}.json"),
            "--preset",
            "tiny",
        ]

    def run(self, trainer: str, args: list[str], name: str, torchrun: int = 0, env: dict | None = None) -> dict:
        proc = subprocess.run(
            self.command(trainer, args, name, torchrun),
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=180,
        )
        (self.root / f"{name}.stderr").write_text(proc.stderr)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((self.root / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def world(tmp_path_factory, broker, tiny_model_dir):
    w = World(tmp_path_factory.mktemp("trainers"), broker)
    bus.create_topics(w.settings, ["checkpoints"])
    return w


@pytest.fixture(scope="module")
def trained(world):
    """One uninterrupted SFT -> RM -> PPO chain (also the reference for the resume tests)."""
    sft = world.run("sft", ["--snapshot", world.snapshot, *SETS["sft"]], "sft")
    rm = world.run("rm", ["--snapshot", world.snapshot, "--sft", sft["version"], *SETS["rm"]], "rm")
    ppo = world.run(
        "ppo", ["--snapshot", world.snapshot, "--sft", sft["version"], "--reward", rm["version"], *SETS["ppo"]], "ppo"
    )
    return {"sft": sft, "rm": rm, "ppo": ppo}


def trainer_args(world, trained, trainer: str) -> list[str]:
    args = ["--snapshot", world.snapshot]
    if trainer in ("rm", "ppo"):
        args += ["--sft", trained["sft"]["version"]]
    if trainer == "ppo":
        args += ["--reward", trained["rm"]["version"]]
    return args + SETS[trainer]


def weights(store: CheckpointStore, version: str) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(store.path(version).glob("*.safetensors")):
        out.update({f"{path.name}:{k}": v for k, v in load_file(str(path)).items()})
    return out


def test_chain_publishes_verified_checkpoints_that_load(world, trained):
    sft, rm, ppo = trained["sft"], trained["rm"], trained["ppo"]
    snapshot_train = SnapshotStore(world.settings.dataset_dir).read(world.snapshot, "train", "demonstrations")

    # SFT: a policy folder the serving code loads as is (LoRA, if any, merged)
    manifest = world.store.verify(sft["version"])
    assert (manifest.kind, manifest.dataset_snapshot, manifest.parents) == ("sft", world.snapshot, [])
    assert manifest.hyperparameters["epochs"] == 3 and manifest.hyperparameters["preset"] == "tiny"
    assert manifest.metrics["best_val_loss"] < 10.5 and sft["announced"] is True
    load_causal_lm(world.store.path(sft["version"]))
    run_dir = Path(sft["run_dir"])
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == sft["metrics"]["steps"] == 24
    assert (run_dir / "curves.png").stat().st_size > 1000 and "| best_val_loss |" in (run_dir / "report.md").read_text()

    # RM: learns the synthetic preference; held-out users; demonstrations centred at 0
    manifest = world.store.verify(rm["version"])
    assert (manifest.kind, manifest.parents) == ("rm", [sft["version"]])
    # lineage reads which policy produced the RM's training comparisons from the manifest
    train_comparisons = SnapshotStore(world.settings.dataset_dir).read(world.snapshot, "train", "comparisons")
    assert manifest.metrics["comparisons_by_policy_version"] == {"synthetic": len(train_comparisons)}
    metrics = rm["metrics"]
    assert metrics["val_pair_accuracy"] >= 0.75 and metrics["val_prompt_accuracy"] >= 0.75, metrics
    assert metrics["val_users_overlapping_train"] == 0 and metrics["val_prompts"] == 8
    model = RewardModel.from_pretrained(world.store.path(rm["version"]))
    tok = load_tokenizer(world.store.path(rm["version"]))
    demos = [
        encode_prompt_response(tok, render_prompt(tok, d["prompt_text"]), d["response"], 64)
        for d in snapshot_train[:16]
    ]
    with torch.no_grad():
        assert abs(float(model.score(*pad_batch(demos, tok.pad_token_id)).mean())) < 1e-4

    # PPO-ptx: a policy with both parents and the per-step metrics
    manifest = world.store.verify(ppo["version"])
    assert (manifest.kind, manifest.role, manifest.parents) == ("ppo", "policy", [sft["version"], rm["version"]])
    load_causal_lm(world.store.path(ppo["version"]))
    rows = [json.loads(line) for line in (Path(ppo["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward_score", "kl", "entropy", "clip_fraction", "value_loss", "response_length", "ptx_loss"):
        assert all(key in row for row in rows), key
    # the tiny preset publishes the EMA of the policy (decay 0.5), which has moved away from the last weights
    state = torch.load(Path(ppo["run_dir"]) / "state" / "latest.pt", weights_only=False)
    assert manifest.metrics["ema_decay"] == 0.5 and state["ema"].keys() == state["policy"].keys()
    assert any(not torch.equal(state["ema"][k], state["policy"][k]) for k in state["ema"])

    # every publish was announced as CREATED, after the checkpoint was in the store
    seen = {event.version: event for event in bus.read_topic(world.settings, "checkpoints")}
    for result in (sft, rm, ppo):
        event = seen[result["version"]]
        assert event.type == events_pb2.CheckpointEvent.TYPE_CREATED
        assert event.manifest_sha256 == world.store.manifest_sha256(result["version"])


@pytest.fixture
def in_process(world, monkeypatch):
    """Run a trainer's main() in this process (no interpreter start-up) with the world's settings."""
    for key in [k for k in os.environ if k.startswith("RLHF_")]:
        monkeypatch.delenv(key)
    for key, value in world.env.items():
        if key.startswith("RLHF_"):
            monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    yield lambda main, argv: main([*argv, "--preset", "tiny"])
    torch.set_num_threads(threads)


def test_gate_evaluation(world, trained, in_process):
    sft, rm, ppo = (trained[k]["version"] for k in ("sft", "rm", "ppo"))
    for policy in (sft, ppo):
        in_process(
            evaluate.main,
            [
                "--policy",
                policy,
                "--reference",
                sft,
                "--reward",
                rm,
                "--snapshot",
                world.snapshot,
                "--result-file",
                str(world.root / f"eval-{policy}.json"),
                "--run-dir",
                str(world.root / f"eval-{policy}"),
            ],
        )
    same = json.loads((world.root / f"eval-{sft}.json").read_text())
    moved = json.loads((world.root / f"eval-{ppo}.json").read_text())
    assert same["kl_to_reference"] == 0.0 and same["n"] == 8  # a policy against itself
    assert moved["n"] == 8 and moved["kl_to_reference"] != 0.0 and isinstance(moved["mean_reward"], float)
    assert 0 < moved["mean_response_length"] <= 12
    assert len((world.root / f"eval-{ppo}" / "samples.jsonl").read_text().splitlines()) == 8


def test_bad_input_is_refused_and_publishes_nothing(world, trained, in_process):
    before = {m.version for m in world.store.list()}
    result = world.root / "bad.json"
    base = ["--run-dir", str(world.root / "bad"), "--result-file", str(result)]
    with pytest.raises(JobError, match="dataset snapshot 'ds-missing' not found"):
        in_process(sft_trainer.main, ["--snapshot", "ds-missing", *base])
    with pytest.raises(JobError, match="has no train comparisons"):
        empty = SnapshotStore(world.settings.dataset_dir).write({"train": {"demonstrations": []}})["snapshot_id"]
        in_process(rm_trainer.main, ["--snapshot", empty, "--sft", trained["sft"]["version"], *base])
    with pytest.raises(SystemExit) as exit_info:  # argparse: exit status 2 and the message on stderr
        in_process(sft_trainer.main, ["--snapshot", world.snapshot, "--set", "lr=fast", *base])
    assert exit_info.value.code == 2
    assert {m.version for m in world.store.list()} == before and not result.exists()


@pytest.mark.parametrize("trainer", ["sft", "rm", "ppo"])
def test_killed_job_resumes_to_the_same_result(world, trained, trainer):
    name = f"{trainer}-killed"
    run_dir = world.root / name
    log = open(world.root / f"{name}.log", "w")
    proc = subprocess.Popen(
        world.command(trainer, trainer_args(world, trained, trainer), name), env=world.env, stdout=log, stderr=log
    )
    metrics, state = run_dir / "metrics.jsonl", run_dir / "state" / "latest.pt"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # kill once a resume point exists, mid-run
        if state.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the job finished before it could be killed"
    version = json.loads((run_dir / "run.json").read_text())["version"]
    assert not world.store.exists(version)  # nothing half-published

    resumed = world.run(trainer, trainer_args(world, trained, trainer), name)
    reference = trained[trainer]
    assert resumed["version"] == version
    expected, actual = weights(world.store, reference["version"]), weights(world.store, version)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    def rows(result: dict) -> list[dict]:  # the logged metrics, wall time aside
        lines = (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if k != "time_s"} for x in lines]

    assert rows(resumed) == rows(reference)
    assert '"msg": "resuming from run dir"' in (world.root / f"{name}.stderr").read_text()


@pytest.mark.parametrize("trainer", ["rm", "ppo"])
def test_under_torchrun_with_two_cpu_processes(world, trained, trainer):
    if trainer == "rm":  # the reference run's config, so the logs can be compared step by step
        args = trainer_args(world, trained, trainer)
    else:  # PPO-ptx: two backwards per update
        args = trainer_args(world, trained, trainer)[:6] + ["--set", "total_steps=2", "--set", "ptx_coef=0.5"]
    result = world.run(trainer, args, f"{trainer}-ddp", torchrun=2)
    world.store.verify(result["version"])
    if trainer == "ppo":
        load_causal_lm(world.store.path(result["version"]))
    else:
        RewardModel.from_pretrained(world.store.path(result["version"]))
        assert result["metrics"]["val_pair_accuracy"] >= 0.75
    rows = [json.loads(x) for x in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == result["metrics"]["steps"] + (
        trainer == "rm"
    )  # rank 0 alone writes (RM: + the final validation row)
    if trainer == "rm":  # what rank 0 logs covers both ranks' halves of each step, as the single process's log does
        single = [json.loads(x) for x in (Path(trained["rm"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert [(r.get("pairs"), r.get("responses")) for r in rows] == [
            (r.get("pairs"), r.get("responses")) for r in single
        ]
        assert rows[0]["train_loss"] == pytest.approx(single[0]["train_loss"], rel=1e-4)
        assert rows[0]["train_pair_accuracy"] == pytest.approx(single[0]["train_pair_accuracy"])
