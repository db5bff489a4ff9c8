"""The original serving tools: ``register_worker.py`` and ``test_message.py`` with their flags, against real
services."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
from serve_helpers import REPO, Service, free_port, wait_until


def _tool(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, f"palo/serve/{script}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_test_message_through_the_controller_and_to_the_worker(cluster):
    done = _tool("test_message.py", "--controller-address", cluster.url, "--model-name", cluster.model,
                 "--max-new-tokens", "8", "--message", "Расскажи историю.")
    assert done.returncode == 0, done.stderr
    assert f"worker_addr: {cluster.main.url}" in done.stdout
    assert "USER: Расскажи историю. ASSISTANT:" in done.stdout
    direct = _tool("test_message.py", "--worker-address", cluster.main.url, "--model-name", cluster.model,
                   "--max-new-tokens", "8", "--message", "hello")
    assert direct.returncode == 0, direct.stderr
    answer = direct.stdout.rsplit("ASSISTANT:", 1)[1]
    assert answer.strip()  # something was generated after the prompt


def test_test_message_fails_clearly_without_a_worker(cluster):
    done = _tool("test_message.py", "--controller-address", cluster.url, "--model-name", "no-such-model")
    assert done.returncode == 1 and "no worker serves 'no-such-model'" in done.stderr


def test_register_worker_by_hand(cluster, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PALO_LOGDIR=str(tmp_path))  # its log is not the checkout's logs/
    controller = Service("manual_controller", [sys.executable, "palo/serve/controller.py", "--host", "127.0.0.1",
                                               "--port", str(port)], str(tmp_path / "controller.out"), env, url=url)
    controller.start()
    try:
        wait_until(lambda: httpx.post(url + "/list_models", timeout=2).status_code == 200, 60, "the controller")
        assert httpx.post(url + "/list_models", timeout=2).json()["models"] == []
        done = _tool("register_worker.py", "--controller-address", url, "--worker-name", cluster.main.url)
        assert done.returncode == 0, done.stderr
        assert httpx.post(url + "/list_models", timeout=2).json()["models"] == [cluster.model]
        # The manually registered worker (no heartbeat check) serves a message through this controller.
        message = _tool("test_message.py", "--controller-address", url, "--model-name", cluster.model,
                        "--max-new-tokens", "4")
        assert message.returncode == 0 and f"worker_addr: {cluster.main.url}" in message.stdout, message.stderr
        unreachable = _tool("register_worker.py", "--controller-address", f"http://127.0.0.1:{free_port()}",
                            "--worker-name", cluster.main.url)
        assert unreachable.returncode == 1 and "cannot reach the controller" in unreachable.stderr
    finally:
        controller.kill()
