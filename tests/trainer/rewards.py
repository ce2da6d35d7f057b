"""Reward functions the trainer tests share."""


def varied_reward(prompts, completions, **columns):
    """A reward that tells a random model's completions apart (a function of their characters)."""
    return [(sum(map(ord, c)) % 5) / 4 for c in completions]
