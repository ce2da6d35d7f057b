"""Test set-up shared by every test module.

Without a GPU, the Triton kernels are checked under the Triton interpreter, which must be switched on before
triton decorates the kernels, i.e. before `grpo_fast.kernels` is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
