"""Rubric judges and reward functions."""

from grpo_fast.rewards.judge import FACTUAL_FAIL_PENALTY, STRATEGY_REWARD, Judge, JudgeReward, Judgment, rubric_reward

__all__ = ["FACTUAL_FAIL_PENALTY", "STRATEGY_REWARD", "Judge", "JudgeReward", "Judgment", "rubric_reward"]
