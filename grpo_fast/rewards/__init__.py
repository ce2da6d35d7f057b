"""Rubric judges and reward functions."""

from grpo_fast.rewards.judge import FACTUAL_FAIL_PENALTY, STRATEGY_REWARD, Judge, JudgeReward, Judgment, rubric_reward
from grpo_fast.rewards.llm_judge import LLMJudge, LLMJudgeConfig
from grpo_fast.rewards.rule_judge import RuleJudge

__all__ = [
    "FACTUAL_FAIL_PENALTY",
    "STRATEGY_REWARD",
    "Judge",
    "JudgeReward",
    "Judgment",
    "LLMJudge",
    "LLMJudgeConfig",
    "RuleJudge",
    "rubric_reward",
]
