"""The OpenAI-backed worker's link to its backend: requests reuse kept-alive connections (a TLS session each would
cost every request a handshake), and health checks go through the worker's one HTTP client."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from serve_helpers import SYSTEM, served

from palo.serve.openai_worker import OpenAIWorker, PromptFormatError
from palo.serve.protocol import (
    CONTEXT_LENGTH_EXCEEDED,
    INVALID_REQUEST,
    PROMPT_TOO_LONG_MSG,
    SERVER_ERROR,
    iter_chunks,
)
from palo.serve.utils import sse_lines
from palo.serve.worker_base import create_app


def test_requests_reuse_the_backends_connection_and_relay_its_usage():
    peers: list[tuple[str, int]] = []
    backend = FastAPI()

    @backend.post("/v1/chat/completions")
    async def completions(request: Request):
        peers.append((request.client.host, request.client.port))
        body = await request.json()
        usage = {"prompt_tokens": 7, "completion_tokens": 2}
        if len(peers) == 2:  # vLLM with --enable-prompt-tokens-details
            usage["prompt_tokens_details"] = {"cached_tokens": 5}

        def events():
            for word in ("Bonjour", " !"):
                yield f"data: {json.dumps({'choices': [{'delta': {'content': word}, 'finish_reason': None}]})}\n\n"
            done = {"choices": [{"delta": {}, "finish_reason": "stop"}], "usage": usage}
            yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n"

        assert body["stream"] is True
        return StreamingResponse(events(), media_type="text/event-stream")

    payload = {"prompt": f"{SYSTEM} USER: hello ASSISTANT:", "temperature": 0, "max_new_tokens": 8}
    with served(backend) as burl:
        worker = OpenAIWorker(burl + "/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", no_register=True)
        with served(create_app(worker)) as wurl, httpx.Client(timeout=30) as client:
            for cached in (None, 5, None):
                response = client.post(wurl + "/worker_generate_stream", json=payload)
                chunks = list(iter_chunks(response.iter_bytes()))
                assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].endswith("ASSISTANT:Bonjour !")
                # The backend's count of cached prompt tokens reaches the API only where the backend gave one.
                assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 2,
                                               **({} if cached is None else {"cached_tokens": cached})}
        worker.stop()
    assert len(peers) == 3 and len(set(peers)) == 1  # one connection carried all three requests


def test_vllms_sampling_extras_go_to_the_backend_only_when_they_ask_for_something():
    worker = OpenAIWorker("http://127.0.0.1:9/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9",
                          no_register=True)
    base = {"prompt": f"{SYSTEM} USER: hello ASSISTANT:", "temperature": 0.5, "max_new_tokens": 8}
    try:
        _, body = worker.backend_request({**base, "min_p": 0.1, "min_tokens": 2, "stop_token_ids": [5, 6],
                                          "ignore_eos": True})
        assert (body["min_p"], body["min_tokens"], body["stop_token_ids"], body["ignore_eos"]) == (0.1, 2, [5, 6], True)
        _, body = worker.backend_request({**base, "min_p": 0, "min_tokens": 0, "stop_token_ids": [],
                                          "ignore_eos": False})
        assert not {"min_p", "min_tokens", "stop_token_ids", "ignore_eos"} & set(body)
        for key, bad in (("min_tokens", 1.5), ("min_p", "x"), ("stop_token_ids", [-1]), ("ignore_eos", "yes")):
            with pytest.raises(PromptFormatError, match=key):
                worker.backend_request({**base, key: bad})
        # The client's stop strings (this project's "stops") go to the backend with the template's "stop".
        _, body = worker.backend_request({**base, "stop": "</s>", "stops": ["\n\n", "。"]})
        assert body["stop"] == ["</s>", "\n\n", "。"] and "stop" not in worker.backend_request(base)[1]
        with pytest.raises(PromptFormatError, match="'stops' must be a list"):
            worker.backend_request({**base, "stops": "."})
        _, body = worker.backend_request({**base, "cache_salt": "tenant-7"})
        assert body["cache_salt"] == "tenant-7"  # vLLM keeps its prefix cache per salt too
        assert "cache_salt" not in worker.backend_request(base)[1]
        with pytest.raises(PromptFormatError, match="'cache_salt' must be a non-empty string"):
            worker.backend_request({**base, "cache_salt": ""})
        # Non-finite numbers are refused as the native worker refuses them (an infinity reached the backend's JSON
        # encoder and came back as "the backend is unreachable"); so is a stop that is not one string.
        for key, bad, why in (("max_new_tokens", 10**400, "must be finite, got an integer of 401 digits"),
                              ("top_p", "nan", "must be finite"), ("temperature", float("inf"), "must be finite"),
                              ("presence_penalty", float("inf"), "must be a finite number"),
                              ("stop", ["lo"], "'stop' must be a string")):
            with pytest.raises(PromptFormatError, match=why):
                worker.backend_request({**base, key: bad})
    finally:
        worker.stop()


def test_a_forwarded_integer_past_a_floats_range_is_refused_by_name():
    """10**400 raised OverflowError in math.isfinite: a server error with a logged traceback, not a refusal."""
    worker = OpenAIWorker("http://127.0.0.1:9/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9",
                          no_register=True)
    try:
        for key in ("seed", "top_k", "min_tokens", "presence_penalty"):
            with pytest.raises(PromptFormatError, match=f"'{key}' must be finite, got an integer of 401 digits"):
                worker.backend_request({"prompt": f"{SYSTEM} USER: hello ASSISTANT:", key: 10**400})
    finally:
        worker.stop()


def test_the_original_cap_on_new_tokens_is_lifted_for_the_api_up_to_the_context_length():
    worker = OpenAIWorker("http://127.0.0.1:9/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9",
                          context_length=4096, no_register=True)
    try:
        prompt = {"prompt": f"{SYSTEM} USER: hello ASSISTANT:"}
        assert worker.backend_request({**prompt, "max_new_tokens": 1500})[1]["max_tokens"] == 1024  # the original's
        body = worker.backend_request({**prompt, "max_new_tokens": 1500, "cap_max_new_tokens": False})[1]
        assert body["max_tokens"] == 1500 and "cap_max_new_tokens" not in body  # not a backend setting
        body = worker.backend_request({**prompt, "max_new_tokens": 10**6, "cap_max_new_tokens": False})[1]
        assert body["max_tokens"] == 4096  # the backend counts the prompt
        with pytest.raises(PromptFormatError, match="'cap_max_new_tokens' must be true or false, got 1"):
            worker.backend_request({**prompt, "cap_max_new_tokens": 1})
    finally:
        worker.stop()


def _relayed(events: list[str], sent: list[dict] | None = None, **params) -> list[dict]:
    """The worker's chunks for one request (``params`` added to it), its backend streaming ``events`` (SSE lines,
    ``data: ...``); the backend's request bodies are added to ``sent``."""
    backend = FastAPI()

    @backend.post("/v1/chat/completions")
    async def completions(request: Request):
        if sent is not None:
            sent.append(await request.json())
        return StreamingResponse(iter([f"{line}\n\n" for line in events]), media_type="text/event-stream")

    payload = {"prompt": f"{SYSTEM} USER: hello ASSISTANT:", "temperature": 0, "max_new_tokens": 8, **params}
    with served(backend) as burl:
        worker = OpenAIWorker(burl + "/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", no_register=True)
        with served(create_app(worker)) as wurl:
            chunks = list(iter_chunks(httpx.post(wurl + "/worker_generate_stream", json=payload, timeout=30)
                                      .iter_bytes()))
        worker.stop()
    return chunks


def _piece(text: str, finish: str | None = None, **extra) -> str:
    return "data: " + json.dumps({"choices": [{"delta": {"content": text}, "finish_reason": finish}], **extra})


@pytest.mark.parametrize("event", [42, [1, 2], {"choices": ["x"]}, {"choices": [{"delta": {"content": 5}}]},
                                   {"choices": {"a": 1}}])
def test_a_malformed_backend_event_is_named_as_the_backends(event, caplog):
    """Said as the backend's fault, with no traceback (they were TypeErrors from inside the relay)."""
    chunks = _relayed([_piece("Hi"), f"data: {json.dumps(event)}", "data: [DONE]"])
    assert chunks[-1]["error_code"] != 0 and "sent a malformed event" in chunks[-1]["text"]
    assert not any(record.exc_info for record in caplog.records)


def test_the_backends_refusal_of_a_request_is_said_as_the_clients_mistake():
    """Every non-200 answer of the backend was the worker's failure: a corrupt image or a prompt over the context,
    refused by the backend with 400, reached the client of this project's API as 502 "the model worker failed"."""
    answers = [
        (400, {"error": {"message": "image 0 is not an image", "type": "invalid_request_error", "param": None,
                         "code": None}}),
        (400, {"error": {"message": "the prompt is too long: the prompt takes 3000 of 2048 positions",
                         "type": "invalid_request_error",
                         "param": "messages", "code": "context_length_exceeded"}}),
        (400, {"object": "error", "message": "min_p must be in [0, 1]", "type": "BadRequestError", "code": 400}),
        (422, "not JSON"),
        (500, {"error": {"message": "out of memory", "type": "server_error", "param": None, "code": None}}),
    ]
    backend = FastAPI()

    @backend.post("/v1/chat/completions")
    async def completions():
        status, body = answers.pop(0)
        return Response(body if isinstance(body, str) else json.dumps(body), status)

    prompt = f"{SYSTEM} USER: hello ASSISTANT:"
    with served(backend) as burl:
        worker = OpenAIWorker(burl + "/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", no_register=True)
        with served(create_app(worker)) as wurl, httpx.Client(timeout=30) as client:
            chunks = [list(iter_chunks(client.post(wurl + "/worker_generate_stream", json={"prompt": prompt})
                                       .iter_bytes()))[-1] for _ in range(5)]
        worker.stop()
    # The client's mistakes: invalid requests (this project's API answers 400) with the backend's message.
    for chunk, message in zip([chunks[0], *chunks[2:4]], ["image 0 is not an image", "min_p must be in [0, 1]",
                                                          "not JSON"]):
        assert chunk == {"text": message, "error_code": 1, "error_type": INVALID_REQUEST}
    # A prompt over the context, as the native worker answers it (400 context_length_exceeded there); the detail
    # without the words this project's API puts before it again.
    assert chunks[1] == {"text": prompt + PROMPT_TOO_LONG_MSG, "error_code": 0, "error_type": CONTEXT_LENGTH_EXCEEDED,
                         "detail": "the prompt takes 3000 of 2048 positions", "finish_reason": "length"}
    # The backend's own failure stays a server error.
    assert chunks[4]["error_type"] == SERVER_ERROR and "answered HTTP 500: out of memory" in chunks[4]["text"]


@pytest.mark.parametrize("text", ["سطر\u2028سطر", "एक\u2029दो", "a\x85b", "ligne\rsuite"])
def test_line_separators_inside_a_backends_json_are_relayed_as_text(text):
    """JSON leaves U+2028, U+2029 and U+0085 unescaped in strings (this project's API and vLLM send them raw);
    the relay read the body with httpx's ``aiter_lines``, which also ends lines there, and lost the answer."""
    raw = "data: " + json.dumps({"choices": [{"delta": {"content": text}, "finish_reason": "stop"}]},
                                ensure_ascii=False)
    chunks = _relayed([raw, "data: [DONE]"])
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].endswith("ASSISTANT:" + text)


def test_sse_lines_end_only_where_server_sent_events_end_them():
    async def lines(*chunks: bytes) -> list[str]:
        async def body():
            for chunk in chunks:
                yield chunk
        return [line async for line in sse_lines(body())]

    # CR LF split across reads is one line end; a lone CR ends a line; a last line without its end is kept.
    assert asyncio.run(lines(b"data: 1\r", b"\ndata: 2\rdata: 3\n\n", b"data: \xe2\x80", b"\xa84")) == \
        ["data: 1", "data: 2", "data: 3", "", "data: \u20284"]


def test_a_good_answer_with_a_malformed_usage_is_kept():
    usage = {"prompt_tokens": "x", "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": -1}}
    chunks = _relayed([_piece("Hi", "stop", usage=usage), "data: [DONE]"])
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].endswith("ASSISTANT:Hi")
    assert chunks[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 2}


def test_a_backend_that_ignores_max_tokens_is_cut_there():
    """Relayed without end before (thousands of chunks for max_new_tokens 8, each repeating the whole answer)."""
    chunks = _relayed([_piece(" la")] * 10_000)
    assert chunks[-1]["error_code"] == 0 and chunks[-1]["finish_reason"] == "length"
    assert chunks[-1]["text"].endswith("ASSISTANT:" + " la" * 8) and len(chunks) == 9
    assert chunks[-1]["usage"] == {"prompt_tokens": 0, "completion_tokens": 8}  # the stream left carried none


def test_stop_strings_past_openais_four_are_cut_by_the_worker_and_min_tokens_keeps_the_backends_text():
    """OpenAI's API (and this project's) refuses over 4 stop strings: the backend gets the first 4 and the worker
    cuts at the rest. Under min_tokens the backend may keep one of its 4 in the first tokens, and that text stands."""
    sent: list[dict] = []
    chunks = _relayed([_piece("a. b; c"), _piece("", "stop"), "data: [DONE]"], sent,
                      stop="</s>", stops=["#", "@", "%", ";"])
    assert sent[-1]["stop"] == ["</s>", "#", "@", "%"] and chunks[-1]["text"].endswith("ASSISTANT:a. b")
    chunks = _relayed([_piece("a. b; c"), _piece("", "stop"), "data: [DONE]"], sent, stops=["."], min_tokens=2)
    assert sent[-1]["stop"] == ["."] and sent[-1]["min_tokens"] == 2
    assert chunks[-1]["text"].endswith("ASSISTANT:a. b; c")


def test_a_stop_string_the_worker_cuts_ends_the_answer_there():
    """Before, a stop string past the backend's four was only cut out of the text: the worker read on to the
    backend's end (its generation wasted), sent the same text again with every piece, and ended with the
    backend's "length"; a partial stop string was shown and taken back ("a#" then "a")."""
    sent: list[dict] = []
    events = [_piece("a"), _piece(" x"), _piece("; b"), _piece(" c"), _piece(" d", "length"), "data: [DONE]"]
    chunks = _relayed(events, sent, stop="</s>", stops=["#", "@", "%", ";", " x!"])
    assert sent[-1]["stop"] == ["</s>", "#", "@", "%"]
    answers = [c["text"].split("ASSISTANT:")[1] for c in chunks]
    assert answers == ["a", "a", "a x"]  # " x" is held back (it may begin " x!"), then shown: ";" ends it after
    assert chunks[-1]["finish_reason"] == "stop" and chunks[-1]["usage"]["completion_tokens"] == 3
    # Under min_tokens a stop string wholly inside the first tokens does not count (vLLM's rule), a later one does.
    chunks = _relayed([_piece("a;"), _piece(" b"), _piece(" c;"), _piece(" d", "length"), "data: [DONE]"],
                      stops=["#", "@", "%", "/", ";"], min_tokens=2)
    assert chunks[-1]["text"].endswith("ASSISTANT:a; b c") and chunks[-1]["finish_reason"] == "stop"


def test_a_worker_whose_backend_is_down_does_not_answer_its_status():
    """The controller's refresh (the web UI's page loads) polls ``/worker_get_status``: answered while the backend
    was down, it re-registered the worker with a fresh heartbeat, so requests kept reaching a dead backend (502s)
    and never went to another worker of the model."""
    from fastapi.testclient import TestClient

    up = {"models": True}
    backend = FastAPI()

    @backend.get("/v1/models")
    async def models():
        return {"data": [{"id": "ckpt"}]} if up["models"] else Response(status_code=503)

    with served(backend) as burl:
        worker = OpenAIWorker(burl + "/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9")
        with TestClient(create_app(worker)) as client:
            assert client.post("/worker_get_status").status_code == 503  # never probed: not known to serve
            assert worker._update_health()
            assert client.post("/worker_get_status").json()["model_names"] == ["ckpt"]
            up["models"] = False
            assert not worker._update_health()
            assert client.post("/worker_get_status").status_code == 503
            answer = client.post("/worker_generate_stream", json={"prompt": "USER: hi ASSISTANT:"})
            assert answer.status_code == 503  # the controller's router tries another worker of the model
        worker.stop()
        # A worker that registers nowhere is never probed: it keeps sending its requests to the backend.
        alone = OpenAIWorker(burl + "/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", no_register=True)
        with TestClient(create_app(alone)) as client:
            assert client.post("/worker_get_status").status_code == 200
        alone.stop()


def test_a_backend_slow_on_one_request_fails_that_request_only_and_its_keepalives_pass_on():
    """A read timeout (one slow request: a long prefill) marked the backend down: the worker then refused every
    request with 503, and answered its status 503 (a controller polling it dropped it), until the next periodic
    check, up to a heartbeat interval later. And a backend's keep-alive comments (a busy backend) were swallowed: the
    worker's own readers, with their per-read timeouts, saw nothing and gave up."""
    calls = []
    backend = FastAPI()

    @backend.get("/v1/models")
    async def models():
        return {"data": [{"id": "ckpt"}]}

    @backend.post("/v1/chat/completions")
    async def completions(request: Request):
        calls.append(1)
        first = len(calls) == 1

        async def events():
            if first:
                await asyncio.sleep(2)  # past the worker's request timeout: nothing sent meanwhile
            yield f"data: {json.dumps({'choices': [{'delta': {'content': 'Hi'}, 'finish_reason': None}]})}\n\n"
            if not first:
                for _ in range(6):  # busy for 1.2 s, saying so every 0.2 s
                    await asyncio.sleep(0.2)
                    yield ": ping\n\n"
            yield f"data: {json.dumps({'choices': [{'delta': {}, 'finish_reason': 'stop'}]})}\n\ndata: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    payload = {"prompt": f"{SYSTEM} USER: hello ASSISTANT:", "temperature": 0, "max_new_tokens": 8}
    with served(backend) as burl:
        # Registering (never started here): a worker found unhealthy would refuse everything.
        worker = OpenAIWorker(burl + "/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9",
                              request_timeout=0.5)
        try:
            assert worker._update_health()
            with served(create_app(worker)) as wurl, httpx.Client(timeout=httpx.Timeout(0.8, connect=10)) as client:
                slow = list(iter_chunks(client.post(wurl + "/worker_generate_stream", json=payload,
                                                    timeout=30).iter_bytes()))
                assert slow[-1]["error_code"] != 0 and "ReadTimeout" in slow[-1]["text"]
                assert client.post(wurl + "/worker_get_status").status_code == 200
                with client.stream("POST", wurl + "/worker_generate_stream", json=payload) as response:
                    assert response.status_code == 200
                    data = b"".join(response.iter_bytes())  # no read waits 0.8 s: the pings come through
                chunks = list(iter_chunks([data]))
                assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].endswith("ASSISTANT:Hi")
                assert data.split(b"\0").count(b"") == 1 + 6  # the six pings, as empty chunks (and the end)
        finally:
            worker.stop()
