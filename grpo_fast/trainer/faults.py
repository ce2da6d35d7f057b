"""Crash points for the recovery tests: the process SIGKILLs itself at a named point of a run.

With `GRPO_FAST_KILL_AT=<point>:<n>` in the environment, the n-th time this process reaches `crash_point(<point>)`
it sends itself SIGKILL (no handler, no flush, no cleanup: a power cut as far as the run folder can tell);
`<point>:<n>:<rank>` does it on that torchrun rank only. Unset, as everywhere outside the tests, nothing happens.

Points: "step" (the step's rollouts are done, its update is not), "checkpoint" (inside a checkpoint write: the
model is saved, the trainer state is not), "eval" (an evaluation's completions are generated, not yet judged).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT = "GRPO_FAST_KILL_AT"
_reached: Counter[str] = Counter()


def crash_point(point: str) -> None:
    """SIGKILLs this process when `GRPO_FAST_KILL_AT` names `point` and this is its n-th pass (see the module)."""
    spec = os.environ.get(KILL_AT)
    if not spec:
        return
    name, count, *rank = spec.split(":")
    if name != point or (rank and rank[0] != os.environ.get("RANK", "0")):
        return
    _reached[point] += 1
    if _reached[point] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
