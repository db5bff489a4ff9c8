"""Entry point of the original scripts (``deepspeed palo/train/train_mem.py ...``).

The original patched LLaMA attention with FlashAttention here. transformers now selects the attention kernel itself
(PyTorch SDPA by default, which uses flash kernels on recent GPUs), so this is the same job as ``train.py``; pass
``--attn_implementation flash_attention_2`` to run the flash-attn package's kernels as the original did.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from palo.train.train import main  # noqa: E402

if __name__ == "__main__":
    main()
