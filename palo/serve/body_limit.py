"""Limits on request bodies, for every HTTP service here (controller, OpenAI API, model workers): their size, and
how slowly they may arrive.

Without a size cap a client could send gigabytes that the service reads whole into memory before any check runs. A
body over the cap is answered HTTP 413 with an error in OpenAI's shape, as soon as its ``Content-Length`` (or, for a
chunked upload, its bytes so far) shows it, without reading the rest. The cap is ``$PALO_MAX_REQUEST_MB`` megabytes
(default 256: a request's images are base64 text, and one image may have up to 64 million pixels).

Without a pace a client could hold a request open for good by sending its body a byte at a time (uvicorn times a
connection's headers, see :mod:`palo.serve.utils`, but nothing of its body), and enough such clients hold every
open file of the process. A body must keep coming: no gap of more than :data:`BODY_IDLE_S` seconds between two of
its pieces (nginx's ``client_body_timeout``), and, after the first :data:`BODY_GRACE_S` seconds, an average of at
least :data:`MIN_BODY_BYTES_PER_S` (a byte every few seconds may not). A body that falls behind is answered HTTP 408
and its connection closed. The clock starts when the service first reads the body, so a service that reads late
never blames the client for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from starlette.requests import ClientDisconnect

DEFAULT_MAX_REQUEST_MB = 256
BODY_IDLE_S = 10.0  # the longest silence between two pieces of a body
BODY_GRACE_S = 10.0  # before the average pace counts (a slow start, a TCP window opening)
MIN_BODY_BYTES_PER_S = 4 * 1024  # 32 kbit/s: below any real uplink, far above a byte every few seconds
CLIENT_CLOSED = 499  # the status logged for a request whose client left (nginx's; nobody receives it)


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


class _TooSlow(Exception):
    pass


class BodyLimit:
    """ASGI middleware answering 413 for a request body over ``max_bytes`` and 408 for one that arrives too slowly.

    Args:
        app: The application it wraps.
        max_bytes: The cap (the services pass :func:`max_request_bytes`).
        idle_s: The longest silence between two pieces of a body.
        grace_s: Seconds from the request's start before the average pace counts.
        min_bytes_per_s: The least average pace of a body after ``grace_s``.
    """

    def __init__(self, app: Any, max_bytes: int, idle_s: float = BODY_IDLE_S, grace_s: float = BODY_GRACE_S,
                 min_bytes_per_s: float = MIN_BODY_BYTES_PER_S) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.grace_s = grace_s
        self.min_bytes_per_s = min_bytes_per_s

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        # A body its Content-Length puts over the cap is refused at its first read, not here: by then the router has
        # matched the request, so the 413 is counted under its endpoint (and a route that reads no body, or a path
        # that has none, answers as it would anyway). Nothing of the body is read either way.
        declared_over = declared is not None and declared.isdigit() and int(declared) > self.max_bytes
        received = 0
        body_done = False
        started = False
        start: float | None = None

        async def limited_receive() -> dict:
            nonlocal received, body_done, start
            if body_done:  # what is left to receive is a disconnect, which may rightly wait for good
                return await receive()
            if declared_over:
                raise _TooLarge
            if start is None:
                start = time.monotonic()
            # The next piece must come within the idle time, and before the pace the bytes so far allow runs out.
            paced_until = start + self.grace_s + received / self.min_bytes_per_s
            wait = min(self.idle_s, paced_until - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except asyncio.TimeoutError:
                raise _TooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except ClientDisconnect:
            # The client left while its body was read: nothing failed and nobody is there to answer. It was a
            # 500 with a 50-line traceback in the log, and counted as a server error.
            if started:
                raise
            await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        except _TooLarge:
            if started:  # cannot happen for endpoints that read their body first; nothing more can be said
                raise
            size = f"{int(declared):,} bytes" if declared_over else f"more than {self.max_bytes:,} bytes"
            await self._refuse(send, size)
        except _TooSlow:
            if started:
                raise
            waited = time.monotonic() - (start or 0.0)  # set: the body was being read
            await self._answer(send, 408, f"the request body stopped arriving ({received:,} bytes in {waited:.0f} s):"
                                          f" a body must keep coming, with no pause over {self.idle_s:g} s and at "
                                          f"least {self.min_bytes_per_s:,.0f} bytes/s on average after its first "
                                          f"{self.grace_s:g} s", "request_timeout")

    async def _refuse(self, send: Any, size: str) -> None:
        await self._answer(send, 413, f"the request body is {size}, over the limit of {self.max_bytes:,} bytes "
                                      "($PALO_MAX_REQUEST_MB on the server)", "request_too_large")

    @staticmethod
    async def _answer(send: Any, status: int, message: str, code: str) -> None:
        body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                     "code": code}}).encode("utf-8")
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
