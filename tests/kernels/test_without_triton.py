"""The package and its CPU path work where triton is not installed (macOS, Windows), and import triton lazily
where it is: each check runs in a fresh interpreter, the first with every `import triton` made to fail."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).parents[2]

# a finder in front of every other one that refuses triton and its submodules, as an absent package would
BLOCK_TRITON = """
import sys

class NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, NoTriton())
"""

CPU_PATH = """
import torch
import grpo_fast.kernels as kernels
from grpo_fast.kernels import resolve_backend, use_backend

h, w, t = torch.randn(2, 3, 8), torch.randn(11, 8, requires_grad=True), torch.randint(0, 11, (2, 3))
loss, _ = kernels.fused_linear_grpo_loss(h, w, t, None, None, torch.randn(2), torch.ones(2, 3))
loss.backward()
assert w.grad is not None and torch.isfinite(w.grad).all()
logp = kernels.selective_logprobs(torch.randn(4, 11), torch.randint(0, 11, (4,)))
kernels.grpo_loss(logp.view(2, 2), None, None, torch.randn(2), torch.ones(2, 2))
kernels.group_advantages(torch.rand(8), 4)
assert resolve_backend(torch.device("cuda")) == "torch", "CUDA tensors fall back to the torch path"
with use_backend("triton"):
    try:
        resolve_backend(torch.device("cpu"))
    except RuntimeError as e:
        assert "pip install triton" in str(e), e
    else:
        raise AssertionError("the triton backend without triton must raise")
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          check=False)


def test_cpu_path_without_triton():
    done = _run(BLOCK_TRITON + CPU_PATH + "\nassert 'triton' not in sys.modules\n")
    assert done.returncode == 0, done.stderr


def test_importing_the_package_does_not_import_triton():
    done = _run("import sys, grpo_fast.kernels\nsys.exit('triton' in sys.modules)")
    assert done.returncode == 0, done.stderr or "import grpo_fast.kernels imported triton"
