#!/usr/bin/env bash
# Build llama-cpp-python (llama.cpp's libllama and libmtmd with their Python bindings) from source for this machine's
# CPU, then check that its multimodal bindings load. The tests that run exported GGUF files in llama.cpp itself
# (tests/export/test_gguf_llama_cpp.py) skip without it.
#
# Usage: bash scripts/install_llama_cpp.sh   (in the environment PALO is installed in; about 5 minutes on 2 cores,
# instant when pip's wheel cache holds the build)
#
# Pinned: the tests call libmtmd through this release's bindings (llama_cpp.mtmd_cpp). Needs a C++ compiler; pip
# fetches CMake and Ninja itself. Set CMAKE_ARGS to build for a GPU (e.g. -DGGML_CUDA=on).
set -euo pipefail
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$PYTHON" -m pip install "llama-cpp-python==0.3.36"
"$PYTHON" - <<'PY'
import llama_cpp
import llama_cpp.mtmd_cpp as mtmd

print(f"ok: llama-cpp-python {llama_cpp.__version__}, libmtmd media marker {mtmd.mtmd_default_marker().decode()}")
PY
