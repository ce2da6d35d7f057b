"""The GRPO trainer: the loop (`loop`), rollouts (`rollout`), evaluation, set-up and the run folder (`run_dir`)."""

from grpo_fast.trainer.loop import GRPOTrainer, StepStats, UnscorableError, run
from grpo_fast.trainer.rollout import Rollout

__all__ = ["GRPOTrainer", "Rollout", "StepStats", "UnscorableError", "run"]
