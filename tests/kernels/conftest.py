"""Kernel-test set-up: the `device` fixture, and the rule for the triton backend on CPU tensors.

A test that takes `device` runs once per device of `utils.DEVICES` (CPU always, CUDA when present; the CUDA runs
carry the `cuda` mark, which `pytest -m cuda` selects): the tensors it creates land there (a default-device
context), so on a GPU machine the triton backend runs on the GPU for real. Triton on CPU tensors needs the
interpreter, which the root conftest switches on only where there is no GPU; elsewhere those cases are skipped.
"""

import pytest
import torch

from grpo_fast.kernels import interpreter
from tests.kernels.utils import DEVICES


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: runs on a CUDA GPU (`make gpu-check` runs `pytest -m cuda`)")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize(
            "device", [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in DEVICES],
            indirect=True,
        )


@pytest.fixture
def device(request):
    """The device of this run; every tensor the test creates without a device lands on it."""
    with torch.device(request.param):
        yield torch.device(request.param)


@pytest.fixture(autouse=True)
def _triton_needs_a_device(request):
    params = getattr(request.node, "callspec", None)
    params = params.params if params is not None else {}
    if params.get("backend", params.get("be")) != "triton" or interpreter.TRITON_INTERPRET:
        return
    if params.get("device", "cpu") == "cpu":
        pytest.skip("the triton backend on CPU tensors needs the Triton interpreter, which is off where a GPU is: "
                    "the cuda run of this test covers the kernels" if "device" in params else
                    "a CPU-tensor triton test: give it the `device` fixture to run it on the GPU")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from tests.kernels.test_compile import COMPILE_REPORT

    lines = config.stash.get(COMPILE_REPORT, None)
    if lines:
        terminalreporter.section("Triton kernels compiled for sm_80 / sm_90 (ptxas -v)")
        for line in lines:
            terminalreporter.write_line(line)
