"""What the trainer controller launches, and the interface every executor
implements (local subprocesses, Kubernetes Jobs).

A JobSpec names a trainer module (`trainers.sft`, `trainers.rm`,
`trainers.ppo`) and its CLI arguments; an executor runs it somewhere and
reports its state. Executors never interpret trainer arguments.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field


class JobState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED)


@dataclass
class JobSpec:
    name: str  # unique, DNS-1123 friendly: e.g. "rm-r2-a1b2c3"
    trainer: str  # "sft" | "rm" | "ppo"
    args: list[str]  # CLI arguments after `python -m trainers.<trainer>`
    env: dict[str, str] = field(default_factory=dict)
    gpus: int = 0  # GPUs per process (0 = CPU)
    nodes: int = 1  # >1: multi-node torchrun (Indexed Job + headless Service)
    procs_per_node: int = 1  # torchrun --nproc-per-node
    result_file: str = ""  # where the trainer writes {"version": ..., "metrics": ...}
    module: str = ""  # defaults to trainers.<trainer>

    def __post_init__(self) -> None:
        self.module = self.module or f"trainers.{self.trainer}"

    def argv(self, python: str = "python") -> list[str]:
        """The command one node runs (torchrun when several processes per node)."""
        if self.procs_per_node > 1 or self.nodes > 1:
            return ["torchrun", f"--nproc-per-node={self.procs_per_node}", "-m", self.module, *self.args]
        return [python, "-m", self.module, *self.args]


@dataclass
class JobStatus:
    state: JobState
    message: str = ""
    exit_code: int | None = None


class Executor(abc.ABC):
    """Runs trainer jobs. Implementations: LocalExecutor, KubernetesExecutor."""

    @abc.abstractmethod
    def launch(self, spec: JobSpec) -> str:
        """Start the job; return a handle (its name)."""

    @abc.abstractmethod
    def status(self, handle: str) -> JobStatus:
        """Current state, without blocking."""

    @abc.abstractmethod
    def wait(self, handle: str, timeout: float | None = None) -> JobStatus:
        """Block until the job finishes (or timeout: return its current state)."""

    @abc.abstractmethod
    def cancel(self, handle: str) -> None:
        """Stop the job and release what it holds."""
