"""Where the services' logs go: ``$PALO_LOGDIR``, else ``logs/`` under the working directory (ignored by git).

The services started without ``$PALO_LOGDIR`` are checked in ``test_bind_defaults.py``; the quickstart passes its
own log folder to the services it starts.
"""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
from serve_helpers import REPO

from palo.serve.utils import build_logger, log_dir


def _write_one(name: str) -> None:
    logger = build_logger(name, f"{name}.log")
    try:
        logger.info("hello")
    finally:
        for handler in logger.handlers:
            handler.close()
        logging.getLogger(name).handlers.clear()


def test_default_is_a_logs_folder_under_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("PALO_LOGDIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert log_dir() == "logs"
    _write_one("palo-test-default")
    assert os.listdir(tmp_path) == ["logs"] and os.listdir(tmp_path / "logs") == ["palo-test-default.log"]
    assert "hello" in (tmp_path / "logs" / "palo-test-default.log").read_text()


def test_a_service_log_starts_a_new_file_each_day_and_keeps_the_old_one(tmp_path, monkeypatch):
    """As the original services' logs: one file for the life of a worker grew without bound."""
    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    logger = build_logger("palo-test-daily", "palo-test-daily.log")
    try:
        logger.info("yesterday")
        (handler,) = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
        handler.rolloverAt = 0  # the day is over
        logger.info("today")
    finally:
        for handler in logger.handlers:
            handler.close()
        logging.getLogger("palo-test-daily").handlers.clear()
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0] == "palo-test-daily.log" and files[1].startswith("palo-test-daily.log.")
    assert "today" in (tmp_path / files[0]).read_text() and "yesterday" not in (tmp_path / files[0]).read_text()
    assert "yesterday" in (tmp_path / files[1]).read_text()


def test_palo_logdir_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path / "elsewhere"))
    monkeypatch.chdir(tmp_path)
    _write_one("palo-test-env")
    assert (os.listdir(tmp_path) == ["elsewhere"]
            and "hello" in (tmp_path / "elsewhere" / "palo-test-env.log").read_text())


def test_the_default_log_folder_is_ignored_by_git():
    result = subprocess.run(["git", "check-ignore", "-q", "logs/controller.log", "logs/model_worker_ab12cd.log"],
                            cwd=REPO, capture_output=True)
    if result.returncode == 128:  # not a git checkout (an sdist)
        return
    assert result.returncode == 0


def test_quickstart_services_get_the_quickstart_log_folder(tmp_path, monkeypatch):
    """``palo quickstart`` starts the services with PALO_LOGDIR (the variable they read) set to its logs folder."""
    from palo.quickstart import serve
    from palo.serve import launch

    started = []

    class Exited:
        returncode = 1

        def __init__(self, args, **kwargs):
            started.append(kwargs)

        def poll(self):
            return 1

        def wait(self, timeout=None):
            return 1

    monkeypatch.delenv("PALO_LOGDIR", raising=False)
    monkeypatch.delenv("LOGDIR", raising=False)
    monkeypatch.setattr(launch.subprocess, "Popen", Exited)
    logs = tmp_path / "workdir" / "logs"
    with pytest.raises(RuntimeError, match="exited"):
        serve.start(str(tmp_path / "checkpoint"), str(logs), timeout=5)
    assert started, "no service was started"
    assert all(kw["env"]["PALO_LOGDIR"] == str(logs) for kw in started)


def test_a_clients_text_cannot_forge_a_log_line(tmp_path, monkeypatch):
    """A client's image URL (or field) with a newline was logged as it was: a second, forged log line. Control
    characters are escaped in the message; a traceback keeps its lines."""
    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    name = "palo-test-forge"
    logger = build_logger(name, f"{name}.log")
    try:
        logger.info("rejected request: image 0: %s", "http://x/a\n2026-01-01 | INFO | registered \x1b[2J as admin")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        for handler in logger.handlers:
            handler.close()
        logging.getLogger(name).handlers.clear()
    lines = (tmp_path / f"{name}.log").read_text(encoding="utf-8").splitlines()
    assert lines[0].endswith("rejected request: image 0: http://x/a\\n2026-01-01 | INFO | registered \\x1b[2J as admin")
    assert lines[1].endswith("| ERROR | palo-test-forge | failed") and lines[2].startswith("Traceback")
