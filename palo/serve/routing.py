"""Routing a generation request to a live worker, and the errors it ends with.

Used by the controller's original ``/worker_generate_stream`` endpoint and by its OpenAI-compatible API
(:mod:`palo.serve.openai_api`). It lives apart from both so that neither imports the other: routing needs only a
:class:`WorkerRegistry` (what :class:`palo.serve.controller.Controller` provides), not the controller module.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from typing import Any, Protocol

import httpx

from palo.serve.protocol import aiter_chunks
from palo.serve.utils import header_count

CONNECT_TIMEOUT_S = 5.0  # connecting to a worker for a generation request (the original's value)
# Relays a generation request went through (controllers can be registered as other controllers' workers).
HOPS_HEADER = "X-PALO-Relay-Hops"
# On a worker's 503: not a full queue but a worker that cannot serve (its engine stopped); it is dropped at once.
UNHEALTHY_HEADER = "X-PALO-Worker-Unhealthy"
MAX_HOPS = 8  # far past any real hierarchy: more means the registrations form a loop


class WorkerRegistry(Protocol):
    """What routing and the OpenAI API need from the controller's worker registry."""

    logger: logging.Logger

    def get_worker_address(self, model_name: str, exclude: set[str] | frozenset = frozenset(),
                           count: bool = True) -> str:
        """A live worker of the model not in ``exclude``; ``""`` when there is none. ``count``: the request counts
        in the worker's queue length until its next heartbeat (generation; not for a tokenizer call)."""
        ...

    def remove_worker(self, worker_name: str) -> None:
        """Forget a worker (it could not be reached)."""
        ...

    def list_models(self) -> list[str]:
        """The models of the live workers."""
        ...

    def conv_mode(self, model_name: str) -> str | None:
        """The conversation template a worker of the model reported (None if unknown)."""
        ...


class NoWorkerError(RuntimeError):
    """No live worker serves the model."""


class WorkerUnreachableError(RuntimeError):
    """Every worker tried failed to answer."""

    retry_after: str | None = None


class WorkersBusyError(WorkerUnreachableError):
    """Every worker of the model answered 503 (its queue is full); ``retry_after`` is the smallest wait they asked."""

    def __init__(self, message: str, retry_after: str | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# Connection errors that are this process's own shortage, not the worker's absence.
_EXHAUSTION = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _local_exhaustion(exc: BaseException) -> str | None:
    """``os.strerror`` of the resource this process ran out of when ``exc`` (or an error it came from) is one: out
    of file descriptors under load, a connect failed as if the worker were gone, and the controller dropped healthy
    workers and answered 404 "no such model" until their next heartbeat."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _EXHAUSTION:
            return os.strerror(exc.errno)
        exc = exc.__cause__ or exc.__context__
    return None


async def _close(response: httpx.Response) -> None:
    """Close ``response`` to the end even if the caller is cancelled meanwhile: a cancellation landing inside
    httpcore's clean-up (its own shield does not hold against ``Task.cancel``) leaves the connection in the pool for
    good, its socket open."""
    await asyncio.shield(response.aclose())


class WorkerStream:
    """An open streaming request to a worker: its HTTP status and its chunk objects."""

    def __init__(self, worker: str, response: httpx.Response) -> None:
        self.worker = worker
        self.response = response
        self.status_code = response.status_code
        self.stopped = False  # closed by whoever reads it (its client left): a read failing after that is expected

    def chunks(self, keepalives: bool = False) -> AsyncIterator[dict[str, Any] | None]:
        """The worker's chunk objects; with ``keepalives``, None for its keep-alives too (a relay passes them on)."""
        return aiter_chunks(self.response.aiter_bytes(), keepalives)

    async def aclose(self) -> None:
        await _close(self.response)


async def _pieces(body: tuple[bytes, ...]) -> AsyncIterator[bytes]:
    for piece in body:
        yield piece


class Router:
    """Opens generation streams on workers chosen by the registry, retrying when a worker is down.

    The HTTP client is created on first use, inside the server's event loop, and closed by :meth:`aclose` (the
    application's shutdown), so the router itself can be built together with the application.

    Args:
        registry: The worker registry.
        read_timeout: Seconds to wait for each piece of a worker's answer.
    """

    def __init__(self, registry: WorkerRegistry, read_timeout: float) -> None:
        self.registry = registry
        self.timeout = httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S)
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client (a new one is made if the router is used again)."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def open(self, model: str, body: bytes | tuple[bytes, ...], hops: int = 0) -> WorkerStream:
        """Send ``body`` to a worker of ``model`` and return once its response headers arrived.

        ``body``: the request's JSON, whole or in pieces sent one after the other (so that the answers of one API
        request, which differ only in their seeds, share one copy of its images instead of holding one each).
        ``hops``: relays this request already went through (a controller registered as another's worker relays
        on; the count, sent as :data:`HOPS_HEADER`, ends a loop of registrations instead of relaying for good).

        Raises:
            NoWorkerError: If no live worker serves the model.
            WorkersBusyError: If every worker of the model answered that its queue is full.
            WorkerUnreachableError: If the chosen workers all failed to answer.
        """
        tried: set[str] = set()
        last_error: Exception | None = None
        busy: list[str] = []  # Retry-After values of workers whose queue was full
        while True:
            address = self.registry.get_worker_address(model, exclude=tried)
            if not address:
                if busy and last_error is None:
                    waits = [n for n in map(header_count, busy) if n is not None]
                    raise WorkersBusyError(f"every worker of {model!r} is busy; retry later",
                                           str(min(waits)) if waits else "1")
                if last_error is not None:
                    raise WorkerUnreachableError(f"no worker of {model!r} answered: {last_error}")
                raise NoWorkerError(model)
            tried.add(address)
            headers = {"Content-Type": "application/json", HOPS_HEADER: str(hops + 1)}
            if not isinstance(body, bytes):  # its length declared: sent as one body, not in chunked encoding
                headers["Content-Length"] = str(sum(map(len, body)))
            request = self.client.build_request(
                "POST", address + "/worker_generate_stream",
                content=body if isinstance(body, bytes) else _pieces(body), headers=headers, timeout=self.timeout,
            )
            response = await self._reach(address, self.client.send(request, stream=True))
            if isinstance(response, Exception):
                last_error = response
                continue
            if response.status_code == 503 and response.headers.get(UNHEALTHY_HEADER):
                # Not busy: it cannot serve. Dropped now, not when its heartbeats expire (until then its clients were
                # told to retry a worker that would refuse them again).
                self.registry.logger.warning("worker %s cannot serve (its engine stopped); dropping it", address)
                self.registry.remove_worker(address)
                await _close(response)
                continue
            if response.status_code == 503:  # its queue is full: another worker may have room
                busy.append(response.headers.get("Retry-After", "1"))
                await _close(response)
                continue
            return WorkerStream(address, response)

    async def _reach(self, address: str, send: Awaitable[httpx.Response]) -> httpx.Response | Exception:
        """Await ``send``, a request to the worker at ``address``: its response, or the connection error once a
        worker that is gone has been forgotten (the caller tries another one).

        Raises:
            WorkerUnreachableError: For any other HTTP failure (the request may have reached the worker).
        """
        try:
            return await send
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
            exhausted = _local_exhaustion(exc)
            if exhausted is not None:  # this process could not open a socket: the worker is fine, keep it
                self.registry.logger.warning("cannot connect to worker %s: %s (this process is out of resources)",
                                             address, exhausted)
                error = WorkerUnreachableError(f"the controller cannot open a connection now ({exhausted}): it is "
                                               "overloaded; retry shortly")
                error.retry_after = "1"
                raise error from exc
            # The request never reached the worker: it is gone (or its registered address can reach nothing).
            self.registry.logger.warning("worker %s unreachable (%s); dropping it", address, exc)
            self.registry.remove_worker(address)
            return exc
        except httpx.HTTPError as exc:
            raise WorkerUnreachableError(f"worker {address} failed: {exc}") from exc

    async def call(self, model: str, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        """POST ``payload`` to ``path`` on a worker of ``model`` and read its whole JSON answer.

        Returns:
            ``(HTTP status, decoded answer)``.

        Raises:
            NoWorkerError: If no live worker serves the model.
            WorkerUnreachableError: If the chosen workers all failed to answer.
        """
        tried: set[str] = set()
        last_error: Exception | None = None
        # Not counted in the worker's queue: these calls are answered at once and send no heartbeat to correct it.
        while address := self.registry.get_worker_address(model, exclude=tried, count=False):
            tried.add(address)
            response = await self._reach(
                address, self.client.post(address + path, json=payload, timeout=self.timeout))
            if isinstance(response, Exception):
                last_error = response
                continue
            try:
                return response.status_code, response.json()
            except ValueError:
                return response.status_code, response.text
        if last_error is not None:
            raise WorkerUnreachableError(f"no worker of {model!r} answered: {last_error}")
        raise NoWorkerError(model)
