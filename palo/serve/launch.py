"""Start a controller and a model worker (and optionally the web UI) as local processes on 127.0.0.1.

The services are started with the same commands the README gives (``python -m palo.serve.<name>``), on free ports,
each logging to ``<logs>/<name>.out`` with ``PALO_LOGDIR`` set to ``logs``. :func:`start_services` returns once the
worker has registered its model (and the web UI answers); :meth:`Services.stop` ends them. ``palo quickstart`` serves
its model this way, and ``palo serve run-batch --model-path`` runs a batch against a checkpoint this way.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Services:
    """Services started by :func:`start_services`.

    Attributes:
        controller_url: The controller (its OpenAI API under ``/v1``).
        web_url: The web UI, or ``""`` when none was started.
        model_name: The model the worker serves.
        processes: The services' processes, in start order.
    """

    controller_url: str
    web_url: str
    model_name: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        """Terminate every service this object started (by its own process handle), then reap them.

        Ctrl-C is ignored meanwhile: it is often pressed twice, and a second ``KeyboardInterrupt`` here would leave
        the services running with nobody to stop them.
        """
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            for proc in reversed(self.processes):
                if proc.poll() is None:
                    proc.terminate()
            for proc in self.processes:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)


LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def loopback_no_proxy(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """``NO_PROXY`` and ``no_proxy`` as ``environ`` has them (either spelling), with the loopback hosts added."""
    hosts = [host.strip() for name in ("no_proxy", "NO_PROXY") for host in environ.get(name, "").split(",")]
    value = ",".join(dict.fromkeys(host for host in [*hosts, *LOOPBACK_HOSTS] if host))  # in order, once each
    return {"NO_PROXY": value, "no_proxy": value}


def _post_json(url: str, timeout: float = 2.0) -> dict:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null") or {}


def _reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2.0):
            return True
    except Exception:
        return False


def _wait(what: str, ready, procs: list[subprocess.Popen], logs: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: a service exited with status {proc.returncode}; see the logs in {logs}")
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s; see the logs in {logs}")


def start_services(checkpoint: str, logs: str, *, worker_args: Sequence[str] = (), web: bool = False,
                   web_port: int = 0, timeout: float = 180.0) -> Services:
    """Start a controller and a model worker for ``checkpoint`` (and the web UI with ``web``); return once the model
    is listed (and the UI answers).

    Args:
        checkpoint: The worker's ``--model-path``.
        logs: Folder for the services' output and logs.
        worker_args: More flags for the worker (``--device cpu``, ``--model-base ...``, engine settings); relative
            paths in them are relative to the current working directory, as the checkpoint's.
        web: Also start the Gradio web UI.
        web_port: Its port (0: a free one).
        timeout: Seconds each service may take to be ready.

    Raises:
        RuntimeError: If a service exits early; TimeoutError if one is not ready in ``timeout`` seconds.
    """
    os.makedirs(logs, exist_ok=True)
    # The hub's offline mode is the caller's to set (quickstart does): a hub id is downloaded unless it is cached.
    # PALO_LAUNCHER_PID: each service ends when this process does, however it ends (end_with_launcher).
    # The services are on the loopback: no proxy for it, here (the readiness polls, the caller's clients) and in
    # the services; a proxy set for everything else stays, and so do the hosts the user already exempted.
    os.environ.update(loopback_no_proxy(os.environ))
    env = dict(os.environ, PALO_LOGDIR=os.path.abspath(logs), PALO_LAUNCHER_PID=str(os.getpid()))
    # The services run in the caller's working directory, so every relative path the caller gives (the checkpoint,
    # and any path in worker_args: --model-base, --vision-tower, ...) names what it names here; their logs go to
    # PALO_LOGDIR and <logs>/<name>.out, not to that directory. The checkpoint is shown by its absolute path in the
    # "started" line (a hub id, "MBZUAI/PALO-7B", as it is: made absolute it named a folder that does not exist).
    model_path = os.path.abspath(checkpoint) if os.path.exists(checkpoint) else checkpoint
    c_port, w_port = free_port(), free_port()
    web_port = web_port or free_port()
    controller = f"http://127.0.0.1:{c_port}"
    worker = f"http://127.0.0.1:{w_port}"
    commands = {
        "controller": [sys.executable, "-m", "palo.serve.controller", "--host", "127.0.0.1", "--port", str(c_port)],
        "model_worker": [sys.executable, "-m", "palo.serve.model_worker", "--host", "127.0.0.1", "--port", str(w_port),
                         "--controller-address", controller, "--worker-address", worker,
                         "--model-path", model_path, *worker_args],
        "gradio_web_server": [sys.executable, "-m", "palo.serve.gradio_web_server", "--host", "127.0.0.1",
                              "--port", str(web_port), "--controller-url", controller, "--model-list-mode", "reload"],
    }
    services = Services(controller, f"http://127.0.0.1:{web_port}" if web else "", "")

    def registered() -> bool:  # the one worker's model, under whatever name its flags give it
        models = _post_json(controller + "/list_models").get("models") or []
        services.model_name = models[0] if models else ""
        return bool(models)

    def launch(name: str) -> None:
        out = open(os.path.join(logs, f"{name}.out"), "ab")
        services.processes.append(subprocess.Popen(commands[name], stdout=out, stderr=subprocess.STDOUT, env=env))
        print(f"started {name}: " + " ".join(commands[name][1:]), flush=True)

    try:
        launch("controller")
        _wait("controller", lambda: _post_json(controller + "/list_models") is not None, services.processes, logs,
              timeout)
        launch("model_worker")
        _wait("model worker", registered, services.processes, logs, timeout)
        if web:
            launch("gradio_web_server")
            _wait("web UI", lambda: _reachable(services.web_url), services.processes, logs, timeout)
    except BaseException:
        services.stop()
        raise
    return services


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
