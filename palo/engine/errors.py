"""Errors the engine raises to its callers (each maps to one HTTP answer in the worker)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of the engine's errors."""


class QueueFull(EngineError):
    """Too many requests are already waiting (HTTP 503 with ``Retry-After``)."""


class RequestTooLarge(EngineError, ValueError):
    """The request can never run: its prompt plus answer exceed the model length or the whole KV cache."""


class EngineClosed(EngineError, RuntimeError):
    """The engine was shut down."""
