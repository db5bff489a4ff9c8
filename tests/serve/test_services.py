"""The controller and model workers as users run them: real processes, real HTTP on 127.0.0.1, a real image."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from serve_helpers import (
    API_KEY,
    HEART_BEAT_EXPIRATION,
    START_TIMEOUT,
    image_b64,
    make_image,
    vicuna_prompt,
    wait_until,
)

from palo.serve.protocol import PROMPT_TOO_LONG_MSG, SERVER_ERROR_MSG, iter_chunks

pytestmark = pytest.mark.timeout(300)


def stream(url: str, body: dict | bytes, timeout: float = 60.0) -> tuple[int, list[dict]]:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    with httpx.stream("POST", url + "/worker_generate_stream", timeout=timeout, **kwargs) as response:
        return response.status_code, list(iter_chunks(response.iter_bytes()))


def good_request(model: str, question: str = "ما هذا الشكل؟", max_new_tokens: int = 12) -> dict:
    return {
        "model": model, "prompt": vicuna_prompt(question), "images": [image_b64()],
        "temperature": 0.0, "top_p": 0.7, "max_new_tokens": max_new_tokens, "stop": "</s>",
    }


def assert_good_stream(status: int, chunks: list[dict], prompt: str) -> str:
    assert status == 200, chunks
    assert chunks and all(c["error_code"] == 0 for c in chunks), chunks[-1]
    texts = [c["text"] for c in chunks]
    # Cumulative, prompt included, and each chunk extends the previous one.
    assert all(t.startswith(prompt) for t in texts)
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    return texts[-1][len(prompt):]


def test_original_protocol_streams_an_answer_about_an_image(cluster):
    url = cluster.url
    assert httpx.post(url + "/refresh_all_workers", timeout=10).json() is None
    assert set(httpx.post(url + "/list_models", timeout=5).json()["models"]) == {"ckpt", "twin"}
    address = httpx.post(url + "/get_worker_address", json={"model": "ckpt"}, timeout=5).json()["address"]
    assert address == cluster.main.url
    assert httpx.post(url + "/get_worker_address", json={"model": "nope"}, timeout=5).json() == {"address": ""}
    status = httpx.post(cluster.main.url + "/worker_get_status", timeout=5).json()
    assert status["model_names"] == ["ckpt"] and status["speed"] == 1 and status["conv_mode"] == "vicuna_v1"

    body = good_request("ckpt", max_new_tokens=16)
    code, chunks = stream(url, body)  # through the controller
    answer = assert_good_stream(code, chunks, body["prompt"])
    assert len(chunks) > 1 and answer
    # The same request straight to the worker gives the same (greedy) answer.
    code, direct = stream(address, body)
    assert assert_good_stream(code, direct, body["prompt"]) == answer
    assert direct[-1]["usage"]["completion_tokens"] >= 1
    # An unknown worker is told to register again; a known one is not.
    beat = httpx.post(url + "/receive_heart_beat", json={"worker_name": "http://127.0.0.1:1", "queue_length": 0})
    assert beat.json() == {"exist": False}


def _bomb() -> str:
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")  # 81 Mpixel, a few kB compressed
    return base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = {
    "invalid base64": ({"images": ["%%% not base64 %%%"]}, "base64"),
    "not an image": ({"images": [base64.b64encode(b"GIF89a but not really an image").decode()]},
                     "not a readable image"),
    "decompression bomb": ({"images": [_bomb()]}, "over the limit"),
    "too many images": ({"images": [image_b64(), image_b64()]}, "2 image(s) for 1 <image>"),
    "no image": ({"images": []}, "0 image(s) for 1 <image>"),
    "bad max_new_tokens": ({"max_new_tokens": "lots"}, "max_new_tokens"),
    "bad temperature": ({"temperature": -1}, "temperature"),
    "prompt not a string": ({"prompt": 42}, "prompt"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_a_clear_error_and_the_worker_keeps_serving(cluster, name):
    change, message = BAD_REQUESTS[name]
    body = dict(good_request("ckpt", max_new_tokens=4), **change)
    for url in (cluster.url, cluster.main.url):  # through the controller, and straight to the worker
        code, chunks = stream(url, body)
        assert code == 400 and len(chunks) == 1, (code, chunks)
        assert chunks[0]["error_code"] != 0 and message in chunks[0]["text"], chunks[0]
        good = good_request("ckpt", max_new_tokens=4)
        assert_good_stream(*stream(url, good), good["prompt"])


def test_invalid_json_unknown_model_and_overlong_prompt(cluster):
    nested = b'{"model": "ckpt", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"  # past the parser's recursion
    surrogate = b'{"model": "ckpt", "prompt": "USER: \\ud800 ASSISTANT:"}'  # valid JSON, not Unicode text
    for url in (cluster.url, cluster.main.url):
        for body, why in ((b'{"model": "ckpt", "prompt": ', "Expecting value"), (nested, "nested too deeply"),
                          (surrogate, "lone surrogate")):
            code, chunks = stream(url, body)
            assert code == 400 and chunks[0]["error_code"] != 0 and "invalid JSON" in chunks[0]["text"], chunks
            assert why in chunks[0]["text"]
    for path in ("/v1/chat/completions", "/register_worker"):
        response = httpx.post(cluster.url + path, content=nested, headers={"Authorization": f"Bearer {API_KEY}"},
                              timeout=10)
        assert response.status_code == 400 and "nested too deeply" in response.text
    # Unknown model: exactly one error chunk (the original sent a code-2 chunk and then a code-3 one).
    code, chunks = stream(cluster.url, good_request("no-such-model"))
    assert code == 404 and len(chunks) == 1
    assert chunks[0]["error_code"] == 2 and chunks[0]["text"].startswith(SERVER_ERROR_MSG)
    assert "no-such-model" in chunks[0]["text"] and "ckpt" in chunks[0]["text"]
    # Over-long prompt: the original's message, with code 0 as in the original protocol.
    body = dict(good_request("ckpt"), prompt=vicuna_prompt("word " * 700))
    code, chunks = stream(cluster.url, body)
    assert code == 200 and len(chunks) == 1
    assert (chunks[0]["text"] == body["prompt"] + PROMPT_TOO_LONG_MSG
            and chunks[0]["error_type"] == "context_length_exceeded")
    good = good_request("ckpt", max_new_tokens=4)
    assert_good_stream(*stream(cluster.url, good), good["prompt"])
    # Malformed registry calls are refused, not crashed on.
    assert httpx.post(cluster.url + "/get_worker_address", content=b"nope", timeout=5).status_code == 400
    assert httpx.post(cluster.url + "/receive_heart_beat", json={"x": 1}, timeout=5).status_code == 400
    # A queue length no worker has (it broke the load division and every request for the model after it).
    worker = cluster.main.url
    for queue in (10**400, -1, 2.5, "3"):
        beat = httpx.post(cluster.url + "/receive_heart_beat", json={"worker_name": worker, "queue_length": queue},
                          timeout=5)
        assert beat.status_code == 400 and "'queue_length' must be an integer from 0 to" in beat.text, beat.text
        register = httpx.post(cluster.url + "/register_worker", timeout=5, json={
            "worker_name": "http://127.0.0.1:9", "check_heart_beat": False,
            "worker_status": {"model_names": ["ckpt"], "speed": 1, "queue_length": queue}})
        assert register.status_code == 400 and "queue_length" in register.text, register.text
    assert_good_stream(*stream(cluster.url, good), good["prompt"])


def test_sixteen_concurrent_streams_all_complete(cluster):
    questions = ["What is this?", "ما هذا؟", "这是什么？", "Qu'est-ce que c'est ?", "¿Qué es esto?", "Что это?",
                 "これは何ですか？", "यह क्या है?", "এটা কি?", "یہ کیا ہے؟"]
    colors = ["red", "green", "black", "orange"]
    bodies = []
    for i in range(16):
        body = good_request("ckpt", questions[i % len(questions)], max_new_tokens=8 + i % 5)
        body["images"] = [image_b64(make_image(colors[i % len(colors)]))]
        bodies.append(body)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda b: stream(cluster.url, b, timeout=120), bodies))
    for body, (code, chunks) in zip(bodies, results):
        assert_good_stream(code, chunks, body["prompt"])
    # The worker decoded them together: its engine reports decode steps holding more than one stream.
    status = httpx.post(cluster.main.url + "/worker_get_status", timeout=10).json()
    assert status["engine"]["decode_batch_max"] > 1, status


def _served(service) -> int:
    return service.log().count("request ")


def test_two_workers_share_work_and_a_dead_one_is_replaced(cluster):
    """Both twins are killed on the way; they are started again at the end, whatever happened, so that the tests
    after this one (the cluster is shared by a test process's tests) find the cluster as the fixture describes it."""
    try:
        _fail_over(cluster)
    finally:
        for twin in cluster.twins:
            if not twin.alive():
                twin.start()
        wait_until(lambda: httpx.post(cluster.url + "/worker_get_status", timeout=2).json()["speed"] == 3,
                   START_TIMEOUT, "the twins registering again")


def _fail_over(cluster) -> None:
    twin0, twin1 = cluster.twins
    body = good_request("twin", max_new_tokens=4)
    before = (_served(twin0), _served(twin1))
    for _ in range(6):
        assert_good_stream(*stream(cluster.url, body), body["prompt"])
    assert _served(twin0) > before[0] and _served(twin1) > before[1]  # both got work

    twin0.hard_kill()
    # Right away: the controller drops the worker it cannot reach and retries on the live one.
    for _ in range(3):
        assert_good_stream(*stream(cluster.url, body), body["prompt"])
    # After the expiry, the dead worker is gone from the registry and every request succeeds.
    wait_until(lambda: httpx.post(cluster.url + "/worker_get_status", timeout=2).json()["speed"] == 2,
               HEART_BEAT_EXPIRATION * 3, "the dead worker to expire")
    addresses = {httpx.post(cluster.url + "/get_worker_address", json={"model": "twin"}).json()["address"]
                 for _ in range(4)}
    assert addresses == {twin1.url}
    for _ in range(4):
        assert_good_stream(*stream(cluster.url, body), body["prompt"])

    twin1.hard_kill()
    time.sleep(0.2)
    code, chunks = stream(cluster.url, body)
    assert code in (404, 503) and len(chunks) == 1 and chunks[0]["error_code"] in (2, 3)
    assert "twin" in chunks[0]["text"]
    # The other model is unaffected.
    good = good_request("ckpt", max_new_tokens=4)
    assert_good_stream(*stream(cluster.url, good), good["prompt"])
    assert json.dumps(httpx.post(cluster.url + "/list_models").json())


def test_a_connection_that_sends_no_whole_request_is_closed_and_the_services_may_hold_many(cluster):
    """uvicorn timed only idle keep-alive connections: a socket that never sent a byte, trickled its headers a byte at
    a time, or sent its headers and then trickled its body, was held for good, and about a thousand of them (the
    usual open-file limit) stopped the controller and, with it, every heartbeat."""
    import resource
    import socket
    import threading

    from palo.serve.body_limit import BODY_GRACE_S
    from palo.serve.utils import FIRST_REQUEST_S, OPEN_FILES_WANTED

    assert BODY_GRACE_S == FIRST_REQUEST_S  # both stalls end in the one window this test waits for
    silent, heads, bodies = [], [], []
    for service in (cluster.controller, cluster.main):
        host, port = service.url.removeprefix("http://").split(":")
        for group in (silent, heads, bodies):
            sock = socket.create_connection((host, int(port)))
            sock.settimeout(FIRST_REQUEST_S + 10)
            group.append(sock)
    for sock in bodies:
        sock.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n")
    start = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        header = b"POST /worker_generate_stream HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
        for byte in header:
            for sock, piece in [(sock, bytes([byte])) for sock in heads] + [(sock, b" ") for sock in bodies]:
                try:
                    sock.send(piece)
                except OSError:
                    pass
            if stop.wait(0.5):
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        for sock in silent:
            assert sock.recv(1) == b""  # closed by the service, not by this socket's timeout
        for sock in heads:
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:  # closed with the trickled bytes unread: the kernel may reset, not close
                pass
        for sock in bodies:  # answered 408, then closed
            answer = b""
            try:
                while chunk := sock.recv(4096):
                    answer += chunk
            except ConnectionResetError:  # closed while this client still sent: the kernel may reset, not close
                continue
            assert answer.startswith(b"HTTP/1.1 408") and b"request body stopped arriving" in answer
        assert FIRST_REQUEST_S - 1 < time.monotonic() - start < FIRST_REQUEST_S + 8
    finally:
        stop.set()
        for sock in silent + heads + bodies:
            sock.close()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    for service in (cluster.controller, cluster.main):
        with open(f"/proc/{service.proc.pid}/limits", encoding="utf-8") as f:
            soft = int(next(line for line in f if line.startswith("Max open files")).split()[3])
        assert soft >= min(OPEN_FILES_WANTED, hard if hard != resource.RLIM_INFINITY else OPEN_FILES_WANTED)
    assert httpx.post(cluster.url + "/list_models", timeout=10).status_code == 200
