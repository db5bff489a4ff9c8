"""Running Triton kernels on the CPU for tests: Triton's interpreter (``TRITON_INTERPRET=1``) in a subprocess.

The variable must be set before triton is first imported, hence the subprocess. Triton 3.6's interpreter (the one
torch 2.11 pins) cannot run kernels that loop up to a loaded scalar (``range(0, length, BLOCK)``), which this
project's paged decode kernel and Liger's cross-entropy do; 3.7 and later can.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import textwrap

__all__ = ["interpretable_liger", "interpreter_unusable", "run_interpreted"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIN_TRITON = (3, 7)


def interpreter_unusable(*packages: str) -> str | None:
    """Why the interpreted tests cannot run here (a skip reason), or None when they can.

    Args:
        *packages: Other import names the test needs besides triton (e.g. ``"liger_kernel"``).
    """
    for name in ("triton", *packages):
        if importlib.util.find_spec(name) is None:
            return f"needs the {name} package (the dev extra installs it; on CPU it runs interpreted)"
    version = importlib.metadata.version("triton")
    if tuple(int(part) for part in version.split(".")[:2]) < MIN_TRITON:
        return f"triton {version}'s interpreter cannot run these kernels (3.7 or later can)"
    return None


def run_interpreted(code: str, cwd: str | None = None, timeout: float = 300) -> str:
    """Run ``code`` (dedented) in a Python subprocess under Triton's interpreter; return its standard output.

    Raises:
        AssertionError: If the subprocess fails (with the end of its standard error).
    """
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                            timeout=timeout, cwd=cwd or ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def interpretable_liger() -> None:
    """Make ``apply_liger_kernel_to_llama`` leave RMSNorm and SwiGLU modules PyTorch's, in this process.

    The interpreter cannot run those two Liger kernels (they take scalar kernel arguments); its RoPE and fused
    linear cross-entropy kernels stay Liger's. For interpreted tests only: on CUDA all four run.
    """
    import liger_kernel.transformers.monkey_patch as monkey_patch

    monkey_patch._patch_rms_norm_module = lambda *args, **kwargs: None
    monkey_patch._patch_swiglu_module = lambda *args, **kwargs: None
