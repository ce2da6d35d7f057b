"""The test suite, a package tree mirroring grpo_fast (shared helpers: `from tests.<folder>.<module> import ...`)."""
