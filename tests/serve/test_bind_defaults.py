"""Services accept connections from this machine only unless ``--host`` says otherwise; logs go to a log folder.

The original demo commands pass ``--host 0.0.0.0``; started without it, the controller (which also serves the
OpenAI-compatible API), the model worker and the web UI listen on 127.0.0.1 alone. Checked on the parsers and on
the sockets real processes open (the web UI's socket in ``test_gradio_web_server.py``, which starts it that way).
"""

from __future__ import annotations

import os
import sys

import httpx
import pytest
from serve_helpers import START_TIMEOUT, Service, free_port, listening_addresses, wait_until

from palo.serve import controller, gradio_web_server, model_worker

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket table")


def test_the_socket_table_tells_loopback_from_all_interfaces():
    import socket

    for host, expected in (("127.0.0.1", {"127.0.0.1"}), ("0.0.0.0", {"0.0.0.0"}), ("::", {"::"})):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as s:
            try:
                s.bind((host, 0))
            except OSError:  # no IPv6 on this machine
                assert family == socket.AF_INET6
                continue
            s.listen()
            assert listening_addresses(s.getsockname()[1]) == expected


@pytest.mark.parametrize("module", [controller, model_worker, gradio_web_server])
def test_every_service_parser_defaults_to_loopback(module):
    assert module.build_parser().parse_args([]).host == "127.0.0.1"
    assert module.build_parser().parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"


def test_controller_and_worker_started_without_host_listen_on_loopback_only(world, tmp_path):
    """... and, started without $PALO_LOGDIR, write their logs into logs/ under the working directory, not into it."""
    env = {k: v for k, v in os.environ.items() if k != "PALO_LOGDIR"}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    workdir = tmp_path / "checkout"
    workdir.mkdir()
    cport, wport = free_port(), free_port()
    services = [
        Service("controller", [sys.executable, "-m", "palo.serve.controller", "--port", str(cport)],
                str(tmp_path / "controller.out"), env, url=f"http://127.0.0.1:{cport}", cwd=str(workdir)),
        Service("worker", [sys.executable, "-m", "palo.serve.model_worker", "--port", str(wport), "--no-register",
                           "--model-path", world.full_dir, "--device", "cpu"],
                str(tmp_path / "worker.out"), env, url=f"http://127.0.0.1:{wport}", cwd=str(workdir)),
    ]
    try:
        for service in services:
            service.start()

        def listening() -> bool:
            for service in services:
                if not service.alive():
                    raise RuntimeError(f"{service.name} exited:\n{service.log()[-3000:]}")
            return all(listening_addresses(int(s.url.rsplit(":", 1)[1])) for s in services)

        wait_until(listening, START_TIMEOUT, "the controller and the worker to listen")
        assert listening_addresses(cport) == {"127.0.0.1"}
        assert listening_addresses(wport) == {"127.0.0.1"}
        # The OpenAI-compatible API is served by the controller, on that same loopback socket.
        assert httpx.get(services[0].url + "/v1/models", timeout=10).status_code == 200
        assert httpx.post(services[1].url + "/worker_get_status", timeout=10).json()["model_names"]
        assert os.listdir(workdir) == ["logs"]
        logs = os.listdir(workdir / "logs")
        assert "controller.log" in logs and any(n.startswith("model_worker_") and n.endswith(".log") for n in logs)
    finally:
        for service in services:
            service.kill()
