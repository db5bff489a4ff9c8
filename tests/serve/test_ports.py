"""A port already in use is one error line before anything loads: a worker does not spend minutes loading its model
only to fail to bind, and the web UI does not end in gradio's traceback (the OpenAI-backed worker checks too)."""

from __future__ import annotations

import socket

import pytest

from palo.serve import controller, gradio_web_server, model_worker, openai_worker
from palo.serve.utils import cannot_listen


@pytest.fixture
def taken_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_cannot_listen_says_why(taken_port):
    expected = f"cannot listen on 127.0.0.1:{taken_port}: Address already in use"
    assert cannot_listen("127.0.0.1", taken_port) == expected
    assert cannot_listen("127.0.0.1", 0) is None and cannot_listen("127.0.0.1", None) is None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free = probe.getsockname()[1]
    assert cannot_listen("127.0.0.1", free) is None
    assert cannot_listen("203.0.113.7", free).startswith("cannot listen on 203.0.113.7")  # not this machine's


def test_each_service_refuses_a_taken_port_before_loading_anything(taken_port, monkeypatch, capsys, tmp_path):
    from palo.model import builder

    monkeypatch.setenv("PALO_LOGDIR", str(tmp_path))
    monkeypatch.setattr(builder, "load_pretrained_model", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(gradio_web_server, "build_demo", lambda *a, **k: pytest.fail("the UI was built"))
    for main, extra in ((model_worker.main, []), (controller.main, []), (gradio_web_server.main, []),
                        (openai_worker.main, ["--api-base", "http://127.0.0.1:9/v1", "--model-name", "m"])):
        with pytest.raises(SystemExit) as info:
            main(["--host", "127.0.0.1", "--port", str(taken_port), *extra])
        assert info.value.code == 2
        assert f"error: cannot listen on 127.0.0.1:{taken_port}: Address already in use" in capsys.readouterr().err
