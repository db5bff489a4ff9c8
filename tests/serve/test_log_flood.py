"""A service out of file descriptors does not fill the disk with its log: Python 3.11's event loop logs the same
"socket.accept() out of system resource" error and traceback on every turn of the loop (a million lines, tens of
MB, in seconds); the services let each such error through once per interval."""

from __future__ import annotations

import logging

import uvicorn

from palo.serve import utils


def _flood(logger: logging.Logger, times: int) -> None:
    for _ in range(times):
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logger.error("socket.accept() out of system resource\nsocket: <asyncio.TransportSocket fd=7>",
                         exc_info=True)


def test_the_same_loop_error_is_logged_once_per_interval_and_others_still_pass(monkeypatch):
    logger = logging.getLogger("asyncio")
    monkeypatch.setattr(logger, "filters", [])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
        utils.serve_http(object(), "127.0.0.1", 0)  # what every service starts with
        utils.serve_http(object(), "127.0.0.1", 0)  # twice: one filter, not two
        assert sum(isinstance(f, utils.RepeatLimiter) for f in logger.filters) == 1
        _flood(logger, 500)
        logger.error("Task exception was never retrieved")
        assert [r.getMessage().split("\n")[0] for r in records] == ["socket.accept() out of system resource",
                                                                     "Task exception was never retrieved"]
        limiter = next(f for f in logger.filters if isinstance(f, utils.RepeatLimiter))
        limiter.seconds = 0.0  # the interval over: the error is said again
        _flood(logger, 2)
        assert len(records) == 4
    finally:
        logger.removeHandler(handler)
