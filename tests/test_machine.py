"""The CPU name every figure carries."""

from pathlib import Path

import pytest

from grpo_fast.machine import cpu_model


def test_the_cpu_is_named_with_its_family_and_model():
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this system")
    first = cpuinfo.read_text().split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    name = cpu_model()
    assert name.startswith(fields.get("model name", ""))
    if "cpu family" in fields:
        assert f"(family {fields['cpu family']}, model {fields['model']}," in name
