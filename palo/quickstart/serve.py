"""Serve the quickstart model: controller, model worker and Gradio web UI as subprocesses on 127.0.0.1.

The three services are started with the same commands the README gives (``python -m palo.serve.<name>``), on
free ports; :func:`start` waits until the worker has registered its model and the web UI answers, and
:func:`serve_forever` prints the URL and keeps them running until Ctrl-C, then stops them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Services:
    controller_url: str
    web_url: str
    model_name: str
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        """Terminate every service this object started (by its own process handle), then reap them."""
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


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


def start(checkpoint: str, logs: str, web_port: int = 0, timeout: float = 180.0) -> Services:
    """Start controller, worker (CPU) and web UI; return once the model is listed and the UI answers.

    Raises:
        RuntimeError: If a service exits early; TimeoutError if one is not ready in ``timeout`` seconds.
    """
    os.makedirs(logs, exist_ok=True)
    env = dict(os.environ, LOGDIR=os.path.abspath(logs), HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost",
               no_proxy="127.0.0.1,localhost")
    c_port, w_port = free_port(), free_port()
    web_port = web_port or free_port()
    controller = f"http://127.0.0.1:{c_port}"
    worker = f"http://127.0.0.1:{w_port}"
    model_name = os.path.basename(os.path.normpath(checkpoint))
    commands = {
        "controller": [sys.executable, "-m", "palo.serve.controller", "--host", "127.0.0.1", "--port", str(c_port)],
        "model_worker": [sys.executable, "-m", "palo.serve.model_worker", "--host", "127.0.0.1", "--port", str(w_port),
                         "--controller-address", controller, "--worker-address", worker,
                         "--model-path", os.path.abspath(checkpoint), "--device", "cpu"],
        "gradio_web_server": [sys.executable, "-m", "palo.serve.gradio_web_server", "--host", "127.0.0.1",
                              "--port", str(web_port), "--controller-url", controller, "--model-list-mode", "reload"],
    }
    services = Services(controller, f"http://127.0.0.1:{web_port}", model_name)
    try:
        for name in ("controller", "model_worker"):
            out = open(os.path.join(logs, f"{name}.out"), "ab")
            services.processes.append(subprocess.Popen(commands[name], stdout=out, stderr=subprocess.STDOUT, env=env,
                                                       cwd=logs))
            print(f"started {name}: " + " ".join(commands[name][1:]), flush=True)
            if name == "controller":
                _wait("controller", lambda: _post_json(controller + "/list_models") is not None, services.processes,
                      logs, timeout)
        _wait("model worker", lambda: model_name in _post_json(controller + "/list_models").get("models", []),
              services.processes, logs, timeout)
        out = open(os.path.join(logs, "gradio_web_server.out"), "ab")
        services.processes.append(subprocess.Popen(commands["gradio_web_server"], stdout=out, stderr=subprocess.STDOUT,
                                                   env=env, cwd=logs))
        print("started gradio_web_server: " + " ".join(commands["gradio_web_server"][1:]), flush=True)
        _wait("web UI", lambda: _reachable(services.web_url), services.processes, logs, timeout)
    except BaseException:
        services.stop()
        raise
    return services


def serve_forever(checkpoint: str, logs: str, web_port: int = 7860) -> int:
    """Start the services, print the URL, wait for Ctrl-C, stop them."""
    from palo.quickstart.pipeline import banner

    banner("Serving the trained model (controller, worker, web UI on 127.0.0.1)")
    if web_port and not _port_free(web_port):
        web_port = 0
    services = start(checkpoint, logs, web_port)
    print(f"\nModel {services.model_name} is served.\n  Web UI:     {services.web_url}\n"
          f"  OpenAI API: {services.controller_url}/v1 (model {services.model_name!r})\n"
          f"  Logs:       {os.path.abspath(logs)}\nAsk it about a held-out image, e.g. data/bench/images/eval-00000.png:"
          f" 'What colour are the shapes?', 'Combien de formes y a-t-il ?', 'ما هذا الشكل؟'.\nPress Ctrl-C to stop.",
          flush=True)
    try:
        while all(p.poll() is None for p in services.processes):
            time.sleep(1.0)
        print(f"a service exited; see the logs in {logs}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        services.stop()


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False
