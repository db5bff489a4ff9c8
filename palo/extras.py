"""Which optional extra a feature needs, said before the work and in one line (``pip install 'palo[serve]'``).

The base install (``pip install palo``) loads, chats and answers benchmark questions; serving, judging and plots
come with extras (pyproject.toml). A feature started without its extra failed with a traceback naming a package
the user never asked for (``starlette`` for ``palo.LLM``), or only at its end (the quickstart's plot, after the
training).
"""

from __future__ import annotations

import importlib.util

# What each extra's features import (the packages pip brings with the extra; starlette and anyio come with fastapi).
PACKAGES = {
    "serve": ("fastapi", "starlette", "anyio", "uvicorn", "httpx", "gradio"),
    "eval": ("openai", "matplotlib"),
    "train": ("deepspeed",),
}


class MissingExtra(ImportError):
    """A feature's optional packages are not installed; the message names them and the install command."""


def missing(*packages: str) -> list[str]:
    """The ``packages`` (top-level import names) that cannot be imported here."""
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):
            return True

    return [name for name in packages if absent(name)]


def install_hint(*extras: str) -> str:
    """``pip install 'palo[eval,serve]'``."""
    return f"pip install 'palo[{','.join(extras)}]'"


def require(feature: str, *extras: str, packages: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingExtra` if any package ``feature`` needs (default: all of ``extras``') is missing.

    Raises:
        MissingExtra: Naming the feature, the missing packages and the ``pip install`` that brings them.
    """
    needed = packages if packages is not None else tuple(p for extra in extras for p in PACKAGES[extra])
    absent = missing(*needed)
    if absent:
        raise MissingExtra(f"{feature} needs {', '.join(absent)}, not installed here: {install_hint(*extras)}")
