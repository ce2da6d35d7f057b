"""Whether Triton runs under its interpreter: `TRITON_INTERPRET=1`, read once at import.

A leaf module (stdlib only), so that the backend choice and the Triton launch configuration read the same flag
without importing each other. The variable must be set before `grpo_fast.kernels` is imported, since triton
reads it when it decorates the kernels.
"""

import os

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
