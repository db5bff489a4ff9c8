"""Small helpers shared by the serving processes: log files and HTTP client settings."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import logging.handlers
import math
import os
import re
import socket
import struct
import sys
import time
import urllib.parse
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from starlette.responses import StreamingResponse

from palo.serve.body_limit import max_request_bytes

# The original wrote its logs into the working directory (``LOGDIR = "."``), i.e. into a checkout when started from
# one; here they go to this folder under it (ignored by git) unless $PALO_LOGDIR names another.
DEFAULT_LOG_DIR = "logs"


def service_url_error(url: object) -> str | None:
    """Why ``url`` cannot be a service's base URL (a worker's or controller's address), or None when it can.

    A base URL is absolute (``http://`` or ``https://`` with a host): httpx refuses anything else only when a request
    is sent, so a worker registered as ``localhost:40000`` (the scheme left out) took its share of the requests and
    failed each one.
    """
    if not isinstance(url, str) or not url:
        return "expected the service's URL, e.g. http://localhost:21002"
    if any(ord(c) < 0x20 or c == "\x7f" or c.isspace() for c in url):
        return f"{url!r} has a space or a control character"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as exc:
        return f"{url!r} is not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} is not an http:// or https:// URL with a host (e.g. http://localhost:21002)"
    return None


def describe_error(exc: BaseException) -> str:
    """An exception's message, or its type's name when it has none (httpx's timeouts have none: a bare "failed: "
    told nothing)."""
    return str(exc) or type(exc).__name__


def service_url(url: str) -> str:
    """An argparse ``type`` for service addresses: the URL as given, or an error saying what is wrong."""
    error = service_url_error(url)
    if error is not None:
        raise argparse.ArgumentTypeError(error)
    return url


def header_count(value: str | None) -> int | None:
    """A header's non-negative integer value (ASCII digits only: ``str.isdigit`` also takes "²", which ``int``
    refuses); None when it is absent or not one."""
    return int(value) if value is not None and value.isascii() and value.isdigit() else None


def cannot_listen(host: str, port: int | None) -> str | None:
    """Why a service could not listen on ``host:port`` (the port is taken, the address is not this machine's), or
    None when it can; checked before a worker spends minutes loading its model only to fail to bind.

    ``port`` 0 or None (any free port) is always fine.
    """
    if not port:
        return None
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot listen on {host}:{port}: {exc}"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: a TIME_WAIT port is free
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def refuse_unservable(parser: argparse.ArgumentParser, args: argparse.Namespace, body_cap: bool = True) -> None:
    """Exit with the parser's one-line error (status 2) before anything loads when the service could not start:
    its ``--host``/``--port`` cannot be listened on, or (for the services that cap request bodies)
    ``$PALO_MAX_REQUEST_MB`` is not a positive number."""
    problem = cannot_listen(args.host, args.port)
    if problem:
        parser.error(problem)
    if body_cap:
        try:
            max_request_bytes()
        except ValueError as exc:
            parser.error(str(exc))


def end_with_launcher() -> None:
    """In a service started by :func:`palo.serve.launch.start_services` (``$PALO_LAUNCHER_PID`` set): on Linux, have
    the kernel end it (SIGTERM) when the process that started it dies, however that dies (a SIGKILL to ``run-batch``
    reaches no clean-up of its own), so no service is left holding its port and a loaded model. Nothing for a
    service started by hand."""
    launcher = os.environ.get("PALO_LAUNCHER_PID")
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: Services.stop still ends the services on a clean exit
        return
    if str(os.getppid()) != launcher:  # the launcher died before the request was made
        sys.exit(f"the process that started this service ({launcher}) has ended")


def log_dir() -> str:
    """Where the services write logs (``controller.log``, ``model_worker_<id>.log``, the web UI's conversation log
    and images): ``$PALO_LOGDIR``, else ``logs/`` under the working directory."""
    return os.environ.get("PALO_LOGDIR") or DEFAULT_LOG_DIR


WORKER_KEY_ENV = "PALO_WORKER_KEY"  # the default of every --worker-key (controller, workers, tools)
SECRET_ARGS = ("api_key", "worker_key")  # shown as *** where a service logs its arguments


def masked_args(args: argparse.Namespace) -> dict[str, Any]:
    """A service's arguments for its log, the keys among them (:data:`SECRET_ARGS`) shown as ``***``."""
    return {k: ("***" if k in SECRET_ARGS and v else v) for k, v in vars(args).items()}


def bearer_matches(authorization: str, key: str) -> bool:
    """Whether an ``Authorization`` header is ``Bearer <key>`` (compared in constant time: the time taken must not
    tell how much of a guess was right)."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def worker_key_arg(value: str) -> str | None:
    """``--worker-key`` (and ``$PALO_WORKER_KEY``, which argparse passes through here too): None when empty.

    Raises:
        argparse.ArgumentTypeError: For a key that cannot travel in an HTTP header as it is (non-ASCII characters,
            spaces or control characters): httpx cannot send it, and a worker's heartbeats would stop at once.
    """
    if not value:
        return None
    if not all("!" <= c <= "~" for c in value):
        raise argparse.ArgumentTypeError(f"the worker key (--worker-key or ${WORKER_KEY_ENV}) must be printable ASCII "
                                         "without spaces: it is sent in an HTTP header")
    return value


def worker_key_headers(worker_key: str | None) -> dict[str, str]:
    """The headers that carry ``worker_key`` to a controller (none without a key)."""
    return {"Authorization": f"Bearer {worker_key}"} if worker_key else {}


def add_worker_key_argument(parser: argparse.ArgumentParser) -> None:
    """``--worker-key``, as every client of a controller's registry and generation routes takes it."""
    parser.add_argument("--worker-key", type=worker_key_arg, default=os.environ.get(WORKER_KEY_ENV),
                        help="the controller's --worker-key, sent as 'Authorization: Bearer KEY' to its "
                             f"registry and generation routes (default: ${WORKER_KEY_ENV}, else none)")


# Control characters a log line may not hold as they are: a client's text (an image URL, a malformed field) with a
# newline in it wrote a second, forged line into the service's log, and terminal escapes could rewrite what an
# operator sees. Tab is kept; the rest are written as Python escapes.
_LOG_ESCAPES = {code: repr(chr(code))[1:-1] for code in [*range(0, 9), *range(10, 32), 127]}


# Where a server-sent events body ends its lines (the SSE spec): CR LF, LF or CR, and nothing else.
_SSE_LINE_END = re.compile(rb"\r\n|\r|\n")


async def sse_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    """The lines of a server-sent events body (``response.aiter_bytes()``), without their line ends.

    httpx's ``aiter_lines`` also ends a line at U+2028, U+2029 and U+0085, as ``str.splitlines`` does; JSON leaves
    those characters unescaped inside strings (this project's API and vLLM send them raw), so an answer that held
    one was cut into two halves that are not JSON.
    """
    pending = b""
    async for chunk in chunks:
        pending += chunk
        held = pending.endswith(b"\r")  # maybe the first half of a CR LF: wait for the next byte
        *lines, pending = _SSE_LINE_END.split(pending[:-1] if held else pending)
        if held:
            pending += b"\r"
        for line in lines:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", "replace")


class OneLineFormatter(logging.Formatter):
    """A formatter whose message is always one line: control characters are escaped (``\\n``, ``\\x1b``).

    A record's traceback is added after the message as usual, on lines of its own.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return super().formatMessage(record).translate(_LOG_ESCAPES)


def build_logger(name: str, filename: str) -> logging.Logger:
    """A logger that writes to stderr and to ``<log dir>/<filename>``, like the original services.

    Args:
        name: The logger name.
        filename: The log file name (e.g. ``controller.log``).

    Returns:
        The configured logger (configured once per name).
    """
    logger = logging.getLogger(name)
    if logger.handlers:
        return logger
    logger.setLevel(logging.INFO)
    logger.propagate = False
    formatter = OneLineFormatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    directory = log_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        # A new file each day (UTC), the old ones kept with their date, as the original services wrote them: one file
        # for the life of a worker grew without bound (about 0.5 GB a day at 50 requests/s).
        file_handler = logging.handlers.TimedRotatingFileHandler(os.path.join(directory, filename), when="D",
                                                                 utc=True, encoding="utf-8")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    except OSError as exc:  # a read-only working directory must not stop the service
        logger.warning("not writing %s: %s", filename, exc)
    return logger


# Seconds one moderation call may take (one retry): the openai client's own default is 600 s, and the web demo asks
# before the chat answers, in Gradio's shared threads.
MODERATION_TIMEOUT_S = 10.0


def violates_moderation(text: str, logger: logging.Logger | None = None) -> bool:
    """Whether OpenAI's moderation endpoint flags ``text`` (the web demo's ``--moderate``; ``OPENAI_API_KEY`` and
    ``OPENAI_BASE_URL`` from the environment).

    Best effort, as the original: an unreachable or failing endpoint counts as not flagged (logged as a warning),
    so that moderation never stops the chat.
    """
    try:
        import openai

        client = openai.OpenAI(max_retries=1, timeout=MODERATION_TIMEOUT_S)
        return bool(client.moderations.create(input=text).results[0].flagged)
    except Exception as exc:  # noqa: BLE001 - best effort: never block the chat on moderation
        (logger or logging.getLogger(__name__)).warning("moderation unavailable: %s", exc)
        return False


def route_logs(source: str, target: logging.Logger) -> None:
    """Send the records of logger ``source`` also to the handlers of ``target`` (idempotent).

    The serving processes log through their own non-propagating logger (its file and stderr); libraries they run
    log under their own names (``palo.engine`` logs a failed step's traceback there), whose records would otherwise
    reach only stderr through Python's last-resort handler, never the service's log file.

    Args:
        source: The name of the logger to route (e.g. ``"palo.engine"``).
        target: The service's logger; its handlers are added to ``source``.
    """
    logger = logging.getLogger(source)
    for handler in target.handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)


# Seconds a connection may stay idle after a response (uvicorn's keep-alive timeout). Before its first request
# uvicorn times nothing (a socket that never sent a byte, or trickled its headers, was held for good, and enough of
# them ran the process out of file descriptors): FIRST_REQUEST_S bounds that.
IDLE_CONNECTION_S = 5
FIRST_REQUEST_S = 10  # a new connection's whole first request line and headers must arrive within this
OPEN_FILES_WANTED = 65536  # sockets are files: the common soft limit of 1,024 caps a busy server's connections
# A connection closed with bytes still unsent (a dropped stream's client that reads nothing) is reset after this:
# asyncio keeps a closing transport, and its socket, until its buffer drains, which such a client never lets happen.
CLOSE_FLUSH_S = 30.0


def raise_open_file_limit(wanted: int = OPEN_FILES_WANTED) -> None:
    """Raise this process's soft limit on open files toward ``wanted`` (never above the hard limit)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):  # a container that forbids it: serve with what there is
            pass


class _ClosingForGood:
    """A connection's transport whose ``close`` gives up, after :data:`CLOSE_FLUSH_S`, on a peer that does not take
    what is left to send (everything else is the transport's own).

    A client that stopped reading had its stream dropped (its place and KV cache freed), but uvicorn's close waited
    for the unsent buffer, so the socket stayed open for as long as the client did.
    """

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        self._transport.close()
        if self._transport.get_write_buffer_size():
            self._loop.call_later(CLOSE_FLUSH_S, self._give_up)

    def _give_up(self) -> None:
        if not self._transport.get_write_buffer_size():  # it drained: the close went through
            return
        sock = self._transport.get_extra_info("socket")
        if sock is not None:  # a reset, with what the kernel still held for the peer dropped too (not a FIN after it)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._transport.abort()


def _idle_closing_protocol() -> type | str:
    """uvicorn's h11 protocol with a deadline for a new connection's first request (see the class)."""
    try:
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # pragma: no cover - another uvicorn layout: its own default
        return "auto"

    class IdleClosingH11Protocol(H11Protocol):
        """Closes a connection that has not sent a whole first request (its headers) within
        :data:`FIRST_REQUEST_S`: silent, or trickling its headers a byte at a time (which resets uvicorn's idle
        timer on every byte); and resets one closed with bytes unsent for :data:`CLOSE_FLUSH_S`
        (:class:`_ClosingForGood`)."""

        _first_request = None

        def connection_made(self, transport) -> None:  # noqa: ANN001 - uvicorn's signature
            super().connection_made(_ClosingForGood(transport, self.loop))
            self._first_request = self.loop.call_later(FIRST_REQUEST_S, self._no_first_request)

        def handle_events(self) -> None:
            super().handle_events()
            if self._first_request is not None and getattr(self, "cycle", None) is not None:  # headers are in
                self._first_request.cancel()
                self._first_request = None

        def connection_lost(self, exc) -> None:  # noqa: ANN001 - uvicorn's signature
            if self._first_request is not None:
                self._first_request.cancel()
                self._first_request = None
            super().connection_lost(exc)

        def _no_first_request(self) -> None:
            self._first_request = None
            if getattr(self, "cycle", None) is None and not self.transport.is_closing():
                self.transport.close()

    return IdleClosingH11Protocol


# The same asyncio error (its first line) is logged at most once in this many seconds.
REPEATED_ERROR_S = 10.0


class RepeatLimiter(logging.Filter):
    """Lets a record through at most once per ``seconds`` for each first line of its message.

    Out of file descriptors, Python 3.11's event loop logs "socket.accept() out of system resource" and its
    traceback on every turn of the loop (cpython gh-151615): a million lines in seconds, so a process out of
    descriptors soon filled the disk with its log as well.
    """

    def __init__(self, seconds: float = REPEATED_ERROR_S) -> None:
        super().__init__()
        self.seconds = seconds
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg).split("\n", 1)[0]
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self.seconds:
            return False
        if len(self._last) > 1000:  # distinct messages are few; keep the table bounded all the same
            self._last.clear()
        self._last[key] = now
        return True


def limit_repeated_loop_errors() -> None:
    """Install :class:`RepeatLimiter` on the ``asyncio`` logger (idempotent)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(f, RepeatLimiter) for f in logger.filters):
        logger.addFilter(RepeatLimiter())


def serve_http(app: object, host: str, port: int) -> None:
    """Serve an ASGI app until interrupted, as every service of this project does (always through uvicorn's h11
    protocol, extended as above, even where httptools is installed: the services stream, parsing is not their cost).
    """
    import uvicorn

    raise_open_file_limit()
    limit_repeated_loop_errors()
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_keep_alive=IDLE_CONNECTION_S,
                http=_idle_closing_protocol())


# A client that reads nothing of its stream for this long is dropped: the request's place (and KV cache) goes to
# requests whose clients read. A live client reads each chunk as it comes, long before this.
WRITE_TIMEOUT_S = 60.0
# Bytes sent (and timed) at a time: what a slow but steady client reads well within WRITE_TIMEOUT_S. A piece of the
# stream may be far larger (the OpenAI API's event for all that an answer made while its client was reading the
# last one, with log-probabilities), and timing it whole dropped a client that read it steadily, only slowly.
SEND_SLICE_BYTES = 64 * 1024


class StalledClientClosingResponse(StreamingResponse):
    """A stream that gives up on a client that stopped reading (a hung process that keeps its socket open).

    Without this, sending waits on the full socket buffer for as long as the connection stays open, and the request
    keeps its concurrency place the whole time. Closing the stream runs its ``finally`` blocks (the place and the
    engine's cache are freed); the server then closes the connection of the unfinished response.

    Args:
        *args, **kwargs: As for ``StreamingResponse`` (the body iterator first).
        logger: Where a dropped client is logged.
        on_close: Awaited however the response ends, after the body iterator is closed: frees what was taken for
            the stream before its iterator started (a relay's upstream), which the iterator's own ``finally`` never
            frees when the client left before its first piece (closing a generator that never started skips its
            body).
    """

    def __init__(self, *args: Any, logger: logging.Logger, on_close: Callable[[], Awaitable[None]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = logger
        self.on_close = on_close
        self._closed = False
        self.write_timeout = WRITE_TIMEOUT_S  # seconds a send may wait on the client (read now: tests lower it)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # also when stream_response never ran: a task cancelled before its first step runs none of it
            await self._close()

    async def stream_response(self, send: Any) -> None:
        async def send_in_time(message: Any) -> None:
            body = message.get("body", b"") if message["type"] == "http.response.body" else b""
            pieces = [message]
            if len(body) > SEND_SLICE_BYTES:  # the stream is bytes: its pieces may be sent in parts
                more = message.get("more_body", False)
                pieces = [{"type": "http.response.body", "body": body[i:i + SEND_SLICE_BYTES],
                           "more_body": more or i + SEND_SLICE_BYTES < len(body)}
                          for i in range(0, len(body), SEND_SLICE_BYTES)]
            for piece in pieces:
                try:
                    await asyncio.wait_for(send(piece), self.write_timeout)
                except (TimeoutError, asyncio.TimeoutError):  # one class from Python 3.11, two before
                    raise _ClientStalled from None
                # The event loop runs before the next write: a write that finds the client gone only schedules the
                # connection's loss, and until that runs uvicorn writes every piece at hand to the dead socket
                # (asyncio logs "socket.send() raised exception." from the fifth on). wait_for gave the loop a turn
                # by accident up to Python 3.11 (it made a task); from 3.12 it does not.
                await asyncio.sleep(0)

        try:
            await super().stream_response(send_in_time)
        except _ClientStalled:
            self.logger.warning("a client read nothing for %.0f s: its stream is closed", self.write_timeout)
        finally:
            await self._close()

    async def _close(self) -> None:
        """Close the body iterator and run ``on_close``, once, whatever cancels the caller.

        However the stream ends. A client that left cancels it, and Starlette leaves the iterator as it was: its
        finally blocks (the worker's place, the engine's job generating for nobody, the relay's upstream) waited
        for the garbage collector, which may take minutes under a light load. Shielded: the cancellation that ended
        the stream would cut this short too.
        """
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self.on_close is not None:
                await self.on_close()


class _ClientStalled(Exception):
    """Raised out of a send that waited :data:`WRITE_TIMEOUT_S` on a client that does not read."""
