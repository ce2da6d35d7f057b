"""The header of every benchmark run: CPU model, the ISA paths in use (the tiler's kernels and torch's CPU kernels),
torch's version and the thread counts. Printed in pytest's header and saved in the benchmark JSON's `machine_info`
(key "grpo_fast"), so that a figure always names the machine it came from."""

import os
from functools import cache

import pytest
import torch

from grpo_fast.machine import cpu_model


@cache
def machine() -> dict[str, object]:
    """What the header reports, as JSON-ready values."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    info: dict[str, object] = {
        "cpu": cpu_model(),
        "cores": cores,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }
    try:
        from grpo_fast.vision.tiling import isa, supported_isas
    except ImportError as err:  # the C++ tiler is not built
        info["tiler_isa"] = f"not built ({err})"
    else:
        info["tiler_isa"] = isa()
        info["tiler_isas_supported"] = list(supported_isas())
        info["tiler_threads"] = cores  # num_threads=None: every core this process may use
    return info


def pytest_report_header(config: pytest.Config) -> list[str]:
    m = machine()
    supported = m.get("tiler_isas_supported")
    tiler = f"{m['tiler_isa']} (supported: {', '.join(supported)})" if supported else m["tiler_isa"]
    torch_threads = f"{m['torch_threads']} intra-op threads, {m['torch_interop_threads']} inter-op threads"
    return [
        f"cpu: {m['cpu']}, {m['cores']} cores",
        f"isa: tiler {tiler}; torch cpu capability {m['torch_cpu_capability']}",
        f"threads: torch {m['torch']} {torch_threads}; tiler (num_threads=None) {m.get('tiler_threads', '-')}",
    ]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    # torch's thread count may have been changed by a benchmark module: record the value at the end as well.
    machine_info["grpo_fast"] = {**machine(), "torch_threads_at_end": torch.get_num_threads()}


@pytest.fixture(scope="module")
def say(request: pytest.FixtureRequest):
    """Writes a line to the terminal, past pytest's output capture."""
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return write
