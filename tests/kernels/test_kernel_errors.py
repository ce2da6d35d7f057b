"""Bad input gets a ValueError that names the argument, on every backend; the signatures (one order, options
keyword-only, the reference's the same) and the backend switch itself are checked."""

import ast
import graphlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo_fast.kernels
from grpo_fast.kernels import (
    fused_linear_grpo_loss,
    fused_linear_logprobs,
    group_advantages,
    grpo_loss,
    interpreter,
    reference,
    resolve_backend,
    selective_logprobs,
    use_backend,
)

ALL_BACKENDS = ("triton", "torch", "reference")
H, W, T = torch.randn(2, 3, 4), torch.randn(11, 4), torch.randint(0, 11, (2, 3))


def _module_tensors_to(device: torch.device, monkeypatch: pytest.MonkeyPatch) -> None:
    """H, W, T (read by the calls below when they run) on the test's device."""
    for name in ("H", "W", "T"):
        monkeypatch.setitem(globals(), name, globals()[name].to(device))


@pytest.mark.parametrize("be", ALL_BACKENDS)
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0, 5])), "targets out of range"),
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0, -1])), "targets out of range"),
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0, 1, 2])), "targets has shape"),
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0.0, 1.0])), "targets must be an integer"),
        (lambda: selective_logprobs(torch.randint(0, 3, (2, 5)), torch.tensor([0, 1])), "logits must be a floating"),
        (lambda: selective_logprobs(torch.randn(2, 5), torch.tensor([0, 1]), temperature=0.0), "temperature"),
        (lambda: fused_linear_logprobs(H.long(), W, T), "hidden must be a floating"),
        (lambda: fused_linear_logprobs(H, W[:, :3], T), "hidden's last dim"),
        (lambda: fused_linear_logprobs(H, W, T, bias=torch.zeros(10)), "bias must have shape"),
        (lambda: fused_linear_logprobs(H, W, T + 11), "targets out of range"),
        (lambda: fused_linear_logprobs(H, W.view(-1), T), "weight must be the lm_head"),
        (lambda: group_advantages(torch.rand(6), 4), "group_size \\(4\\) must divide"),
        (lambda: group_advantages(torch.rand(6), 0), "group_size must be a positive"),
        (lambda: group_advantages(torch.rand(6), 3, scale="seq"), "scale must be one of"),
        (lambda: group_advantages(torch.rand(6, 2), 3, weights=torch.ones(3)), "weights must have shape"),
        (lambda: group_advantages(torch.rand(6), 3, weights=torch.ones(3)), "weights are for"),
        (lambda: group_advantages(torch.arange(6), 3), "rewards must be a floating"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 4)), "mask has shape"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(3), torch.ones(2, 3)), "advantages must be"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), loss_type="ppo"),
         "loss_type must be one of"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3),
                           importance_sampling_level="seq"), "importance_sampling_level"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), beta=0.1),
         "ref_logp is required"),
        (lambda: grpo_loss(torch.randn(2, 3), torch.randn(3, 2), None, torch.randn(2), torch.ones(2, 3)),
         "old_logp has shape"),
        (lambda: grpo_loss(torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), loss_type="dr_grpo",
                           max_completion_length=0), "max_completion_length"),
        (lambda: fused_linear_grpo_loss(H, W, T, None, None, torch.randn(3), torch.ones(2, 3)), "advantages must be"),
        (lambda: fused_linear_grpo_loss(H.int(), W, T, None, None, torch.randn(2), torch.ones(2, 3)),
         "hidden must be a float"),
        (lambda: fused_linear_grpo_loss(H, W, T, None, None, torch.randn(2), torch.ones(2, 2)), "mask has shape"),
        (lambda: fused_linear_grpo_loss(H, W, torch.full((2, 3), -1), None, None, torch.randn(2), torch.ones(2, 3)),
         "targets out of range"),
        (lambda: fused_linear_grpo_loss(H, W, T, None, None, torch.randn(2), torch.ones(2, 3), loss_type="x"),
         "loss_type"),
    ],
)
def test_bad_input_names_the_argument(device, monkeypatch, be, call, match):
    _module_tensors_to(device, monkeypatch)
    with use_backend(be), pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("be", ["triton", "torch"])
def test_bad_chunk_size(device, monkeypatch, be):
    _module_tensors_to(device, monkeypatch)
    with use_backend(be), pytest.raises(ValueError, match="chunk_size must be a positive"):
        fused_linear_logprobs(H, W, T, chunk_size=0)


def test_fused_loss_needs_sequences():
    with use_backend("torch"), pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        fused_linear_grpo_loss(H[0], W, T[0], None, None, torch.randn(3), torch.ones(3))


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("GRPO_FAST_BACKEND", raising=False)
    assert resolve_backend(cpu) == "torch"
    assert resolve_backend(torch.device("cuda")) == "triton"
    monkeypatch.setenv("GRPO_FAST_BACKEND", "reference")
    assert resolve_backend(cpu) == "reference"
    with use_backend("torch"):  # the override wins over the variable
        assert resolve_backend(cpu) == "torch"
    monkeypatch.setenv("GRPO_FAST_BACKEND", "cuda")
    with pytest.raises(ValueError, match="GRPO_FAST_BACKEND must be one of"):
        resolve_backend(cpu)
    with pytest.raises(ValueError, match="backend must be one of"), use_backend("fast"):
        pass


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(interpreter, "TRITON_INTERPRET", False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend(torch.device("cpu"))


# the public ops' parameters in order; "*": the options after it are keyword-only
VARIANTS = ("use_bias_correction_kl sapo_temperature_pos sapo_temperature_neg vespo_k_pos vespo_lambda_pos "
            "vespo_k_neg vespo_lambda_neg off_policy_mask_threshold entropy_coef")
SIGNATURES = {
    "grpo_loss": "logp old_logp ref_logp advantages mask * beta epsilon_low epsilon_high delta loss_type "
                 f"importance_sampling_level max_completion_length {VARIANTS} entropy entropy_mask",
    "fused_linear_grpo_loss": "hidden weight targets old_logp ref_logp advantages mask bias * beta epsilon_low "
                              "epsilon_high delta loss_type importance_sampling_level max_completion_length "
                              f"temperature chunk_size compute_dtype {VARIANTS} entropy_mask",
    "fused_linear_logprobs": "hidden weight targets bias * temperature chunk_size return_entropy compute_dtype",
    "selective_logprobs": "logits targets * temperature",
    "group_advantages": "rewards group_size * scale eps weights multi_objective_aggregation",
}


@pytest.mark.parametrize("name", SIGNATURES)
def test_signatures_are_one_order_and_the_references_match(name):
    signature = inspect.signature(getattr(grpo_fast.kernels, name))
    words = []
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and "*" not in words:
            words.append("*")
        words.append(p.name)
    assert " ".join(words) == SIGNATURES[name]
    assert inspect.signature(getattr(reference, name)) == signature


@pytest.mark.parametrize("module", [grpo_fast.kernels, reference], ids=["public", "reference"])
@pytest.mark.parametrize(
    "name, args",
    [
        ("selective_logprobs", (torch.randn(2, 5), torch.tensor([0, 1]), 0.7)),  # temperature
        ("fused_linear_logprobs", (H, W, T, None, 0.7)),  # temperature
        ("group_advantages", (torch.rand(6), 3, "batch")),  # scale
        ("grpo_loss", (torch.randn(2, 3), None, None, torch.randn(2), torch.ones(2, 3), 0.1)),  # beta
        ("fused_linear_grpo_loss", (H, W, T, None, None, torch.randn(2), torch.ones(2, 3), None, 0.1)),  # beta
    ],
)
def test_options_are_keyword_only(module, name, args):
    with pytest.raises(TypeError, match="positional argument"):
        getattr(module, name)(*args)


def _kernel_imports() -> dict[str, set[str]]:
    """Each module of grpo_fast.kernels (the package's __init__ aside) -> the kernels modules it imports, at the top
    or inside a function."""
    folder = Path(grpo_fast.kernels.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        imported = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "grpo_fast.kernels":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grpo_fast.kernels."):
                imported.add(node.module.rsplit(".", 1)[1])
            elif isinstance(node, ast.Import):
                imported |= {a.name.rsplit(".", 1)[1] for a in node.names if a.name.startswith("grpo_fast.kernels.")}
        graph[name] = imported & modules
    return graph


def test_kernel_modules_import_each_other_without_a_cycle():
    graph = _kernel_imports()
    assert "rowwise_triton" in graph["backend"] and graph["interpreter"] == set()  # the graph is really read
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError, naming the cycle


def test_importing_the_backend_does_not_import_the_triton_row_kernels():
    check = "import sys, grpo_fast.kernels.backend; sys.exit('grpo_fast.kernels.rowwise_triton' in sys.modules)"
    root = Path(grpo_fast.kernels.__file__).parents[2]
    done = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr or "importing grpo_fast.kernels.backend imported rowwise_triton"
