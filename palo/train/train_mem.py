"""Entry point of the original scripts (``deepspeed palo/train/train_mem.py ...``).

The same job as ``train.py``; the attention kernel is chosen with ``--attn_implementation`` (``flash_attention_2``
for the flash-attn package). See docs/compat.md#training.
"""

from __future__ import annotations

import pathlib
import sys

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from palo.train.train import main  # noqa: E402

if __name__ == "__main__":
    main()
