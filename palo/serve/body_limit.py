"""A cap on the size of request bodies, for every HTTP service here (controller, OpenAI API, model workers).

Without it a client could send gigabytes that the service reads whole into memory before any check runs. A body
over the cap is answered HTTP 413 with an error in OpenAI's shape, as soon as its ``Content-Length`` (or, for a
chunked upload, its bytes so far) shows it, without reading the rest. The cap is ``$PALO_MAX_REQUEST_MB`` megabytes
(default 256: a request's images are base64 text, and one image may have up to 64 million pixels).
"""

from __future__ import annotations

import json
import os
from typing import Any

DEFAULT_MAX_REQUEST_MB = 256


def max_request_bytes() -> int:
    """The cap in bytes, from ``$PALO_MAX_REQUEST_MB`` (a positive number) or the default.

    Raises:
        ValueError: If the variable is set to anything but a positive number.
    """
    raw = os.environ.get("PALO_MAX_REQUEST_MB")
    if raw is None or not raw.strip():
        return DEFAULT_MAX_REQUEST_MB * 2**20
    try:
        megabytes = float(raw)
    except ValueError:
        megabytes = -1.0
    if not megabytes > 0 or megabytes == float("inf"):
        raise ValueError(f"PALO_MAX_REQUEST_MB must be a positive number of megabytes, got {raw!r}")
    return int(megabytes * 2**20)


class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware answering 413 for a request body over ``max_bytes``.

    Args:
        app: The application it wraps.
        max_bytes: The cap (the services pass :func:`max_request_bytes`).
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, f"{int(declared):,} bytes")
            return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _TooLarge:
            if started:  # cannot happen for endpoints that read their body first; nothing more can be said
                raise
            await self._refuse(send, f"more than {self.max_bytes:,} bytes")

    async def _refuse(self, send: Any, size: str) -> None:
        body = json.dumps({"error": {
            "message": f"the request body is {size}, over the limit of {self.max_bytes:,} bytes "
                       "($PALO_MAX_REQUEST_MB on the server)",
            "type": "invalid_request_error", "param": None, "code": "request_too_large"}}).encode("utf-8")
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
