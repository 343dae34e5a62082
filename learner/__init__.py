"""The learner: validate corrections, train per-user and shared LoRA adapters, gate, publish.

`LearnerControl` is what the bots talk to (through `bot.ports.LearnerPort`); `run_worker`
is the standalone job loop (`ouro learner`); `sync_engine` keeps a bot process's engine in
step with adapters another process published.
"""

from learner.control import LearnerConfig, LearnerControl
from learner.job import JobContext, JobOutcome, run_job
from learner.publish import rollback, sync_engine
from learner.worker import run_worker

__all__ = [
    "JobContext",
    "JobOutcome",
    "LearnerConfig",
    "LearnerControl",
    "rollback",
    "run_job",
    "run_worker",
    "sync_engine",
]
