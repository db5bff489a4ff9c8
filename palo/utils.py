"""The original ``palo.utils`` import path, for scripts written against PALO's (and LLaVA's ``llava.utils``).

``from palo.utils import disable_torch_init`` opens PALO's own ``model_vqa.py`` and the scripts derived from
LLaVA's; the other names are the original module's serving helpers. Each lives where this project uses it; this
module keeps the old path working and imports neither torch nor the web stack.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from palo.serve.protocol import MODERATION_MSG as moderation_msg
from palo.serve.protocol import SERVER_ERROR_MSG as server_error_msg
from palo.serve.utils import build_logger, violates_moderation

__all__ = ["StreamToLogger", "build_logger", "disable_torch_init", "moderation_msg", "pretty_print_semaphore",
           "server_error_msg", "violates_moderation"]


def disable_torch_init() -> None:
    """Does nothing here; kept because the original scripts call it before loading a model.

    The original replaced ``reset_parameters`` of ``torch.nn.Linear`` and ``torch.nn.LayerNorm`` for the whole
    process, to skip the random initialisation of weights the checkpoint then overwrites. transformers 5 already
    builds a checkpoint's modules without initialising what it loads, and the process-wide patch would leave every
    layer made later in the same process (a LoRA adapter, a new projector) uninitialised.
    """


def pretty_print_semaphore(semaphore: Any) -> str:
    """``Semaphore(value=N, locked=B)`` for an ``asyncio.Semaphore``, ``"None"`` for none (the original's log text)."""
    if semaphore is None:
        return "None"
    return f"Semaphore(value={semaphore._value}, locked={semaphore.locked()})"


class StreamToLogger:
    """A file-like object that sends what is written to it to a logger, a record per line (the original's, for
    ``sys.stdout = StreamToLogger(logger)``); anything else a stream has is the real stdout's.

    Args:
        logger: Where the lines go.
        log_level: Their level.
    """

    def __init__(self, logger: logging.Logger, log_level: int = logging.INFO) -> None:
        self.terminal = sys.stdout
        self.logger = logger
        self.log_level = log_level
        self.linebuf = ""  # the last line, until its newline comes

    def __getattr__(self, name: str) -> Any:
        return getattr(self.terminal, name)

    def write(self, buf: str) -> int:
        lines = (self.linebuf + buf).split("\n")
        self.linebuf = lines.pop()
        for line in lines:
            self.logger.log(self.log_level, line.rstrip())
        return len(buf)

    def flush(self) -> None:
        if self.linebuf:
            self.logger.log(self.log_level, self.linebuf.rstrip())
        self.linebuf = ""
