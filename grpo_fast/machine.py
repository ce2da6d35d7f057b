"""What a figure names as its machine: the CPU model as /proc/cpuinfo gives it."""

import platform
from pathlib import Path


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, with family/model/stepping where `cpuinfo` has them (VMs often mask the name:
    "AMD EPYC (family 26, model 2, stepping 1)"); the platform's processor name without the file."""
    fields: dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.processor() or platform.machine())
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')}, stepping {fields.get('stepping', '?')})"
    return name
