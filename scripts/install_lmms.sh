#!/usr/bin/env bash
# Install lmms-eval next to PALO without torchvision, then check that torch, transformers and lmms-eval import.
#
# Usage: bash scripts/install_lmms.sh   (in the environment PALO is installed in; run from the repository root)
#
# lmms-eval 0.7.3 requires torchvision. With a CPU torch, pip picks a torchvision built for the CUDA torch of the
# same version, which does not load ("operator torchvision::nms does not exist") and, once installed, breaks
# transformers' own imports (transformers.pipelines imports it). So: lmms-eval's other requirements through the
# extra, lmms-eval itself without its dependencies. Nothing PALO runs through lmms-eval needs torchvision.
# With a CUDA torch from PyPI, `pip install lmms-eval==0.7.3` (torchvision included) works as well.
set -euo pipefail
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
"$PYTHON" -m pip install -e ".[lmms]"
"$PYTHON" -m pip install --no-deps "lmms-eval==0.7.3"
"$PYTHON" - <<'PY'
import importlib.util

import torch
import transformers
import lmms_eval.evaluator  # noqa: F401
from sentencepiece import sentencepiece_model_pb2  # noqa: F401 - fails where protobuf is older than its generated code
from lmms_eval.models import get_model

get_model("palo"), get_model("palo_api")
tv = "not installed" if importlib.util.find_spec("torchvision") is None else "INSTALLED (may break transformers)"
print(f"ok: torch {torch.__version__}, transformers {transformers.__version__}, lmms-eval models palo and "
      f"palo_api registered; torchvision {tv}")
PY
