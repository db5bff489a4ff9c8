"""Small helpers shared by the serving processes: log files and HTTP client settings."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from palo.serve.body_limit import max_request_bytes

# The original wrote its logs into the working directory (``LOGDIR = "."``), i.e. into a checkout when started from
# one; here they go to this folder under it (ignored by git) unless $PALO_LOGDIR names another.
DEFAULT_LOG_DIR = "logs"


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


def log_dir() -> str:
    """Where the services write logs (``controller.log``, ``model_worker_<id>.log``, the web UI's conversation log
    and images): ``$PALO_LOGDIR``, else ``logs/`` under the working directory."""
    return os.environ.get("PALO_LOGDIR") or DEFAULT_LOG_DIR


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
    formatter = logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    directory = log_dir()
    try:
        os.makedirs(directory, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(directory, filename), encoding="utf-8")
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    except OSError as exc:  # a read-only working directory must not stop the service
        logger.warning("not writing %s: %s", filename, exc)
    return logger


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
