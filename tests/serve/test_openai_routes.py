"""The OpenAI-compatible API's request handling as plain functions, with a fake registry and router (no processes)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time

import pytest

from palo.serve.openai_api import _usage, chat_completion, list_models, text_completion
from palo.serve.protocol import SERVER_ERROR_MSG, WORKER_ERROR
from palo.serve.routing import NoWorkerError, WorkersBusyError


def body_bytes(body: bytes | tuple[bytes, ...]) -> bytes:
    """A body given to ``Router.open``, whole (the answers of one request send theirs in pieces)."""
    return body if isinstance(body, bytes) else b"".join(body)


class FakeRegistry:
    logger = logging.getLogger("test_openai_routes")

    def list_models(self) -> list[str]:
        return ["ckpt"]

    def conv_mode(self, model_name: str) -> str | None:
        return "vicuna_v1"

    def get_worker_address(self, model_name, exclude=frozenset()) -> str:  # pragma: no cover - the router is fake
        return ""

    def remove_worker(self, worker_name: str) -> None:  # pragma: no cover
        pass


class FakeStream:
    """A worker's stream: its protocol chunks ``pieces``, then ``fail`` raised if given; records what was read."""

    worker = "http://worker"
    status_code = 200

    def __init__(self, pieces: list[dict] | None = None, fail: Exception | None = None) -> None:
        self.pieces = pieces or []
        self.fail = fail
        self.sent = 0
        self.closed = False
        self.stopped = False  # set by the reader's owner before it closes the stream (routing.WorkerStream's)
        self.shut = asyncio.Event()  # closed: a read still waiting fails, as on a closed connection
        self.read_to_end = False  # the body's end was read (over HTTP: the connection can be reused)

    async def chunks(self):
        for piece in self.pieces:
            await asyncio.sleep(0.01)  # a worker makes each chunk in its own time: the client reads each as it comes
            self.sent += 1
            yield piece
        self.read_to_end = self.fail is None
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        self.closed = True
        self.shut.set()


class FakeRouter:
    def __init__(self, outcome) -> None:
        self.outcome = outcome
        self.bodies: list[dict] = []

    async def open(self, model: str, body: bytes | tuple[bytes, ...]):
        self.bodies.append(json.loads(body_bytes(body)))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


def _ask(router, stream: bool = False, stop: list[str] | None = None, **extra):
    body = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "stream": stream, "max_tokens": 8,
            **extra}
    if stop:
        body["stop"] = stop

    async def run():
        response = await chat_completion(json.dumps(body).encode(), "", FakeRegistry(), router, None)
        if stream and response.status_code == 200:
            events = [e async for e in response.body_iterator]
            answer = b"".join(events).decode()
        else:
            answer = json.loads(response.body)
        # Checked before the event loop ends: its shutdown would close a forgotten stream too late to tell.
        router.closed_in_time = getattr(router.outcome, "closed", None)
        return response.status_code, answer

    return asyncio.run(run())


def test_openai_api_does_not_import_the_controller():
    code = "import sys, palo.serve.openai_api; assert 'palo.serve.controller' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_models_need_the_key_when_one_is_set():
    assert list_models(FakeRegistry(), "Bearer wrong", "secret").status_code == 401
    ok = list_models(FakeRegistry(), "Bearer secret", "secret")
    assert ok.status_code == 200 and [m["id"] for m in json.loads(ok.body)["data"]] == ["ckpt"]
    one = list_models(FakeRegistry(), "Bearer secret", "secret", "ckpt")
    assert one.status_code == 200 and json.loads(one.body)["id"] == "ckpt"
    assert list_models(FakeRegistry(), "Bearer wrong", "secret", "ckpt").status_code == 401
    missing = list_models(FakeRegistry(), "Bearer secret", "secret", "other")
    assert missing.status_code == 404 and json.loads(missing.body)["error"]["code"] == "model_not_found"


def test_routing_errors_become_openai_errors():
    status, body = _ask(FakeRouter(NoWorkerError("ckpt")))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    busy = FakeRouter(WorkersBusyError("every worker is busy", "3"))
    response = asyncio.run(chat_completion(
        json.dumps({"model": "ckpt", "messages": [{"role": "user", "content": "hi"}]}).encode(), "", FakeRegistry(),
        busy, None))
    assert response.status_code == 503 and response.headers["Retry-After"] == "3"


def test_a_complete_answer_and_a_user_stop_string_that_closes_the_worker_stream():
    router = FakeRouter(None)
    router.outcome = stream = FakeStream()
    # The prompt is only known once rendered; fill the fake stream lazily.
    original_open = router.open

    async def open_with_answer(model, body):
        prompt = json.loads(body_bytes(body))["prompt"]
        stream.pieces = [{"text": prompt + t, "error_code": 0} for t in ("Hel", "Hello wo", "Hello world!")]
        stream.pieces[-1].update(finish_reason="stop", usage={"prompt_tokens": 5, "completion_tokens": 3})
        return await original_open(model, body)

    router.open = open_with_answer
    status, body = _ask(router)
    assert status == 200 and body["choices"][0]["message"]["content"] == "Hello world!"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8} and router.closed_in_time

    assert stream.read_to_end  # a finished answer's stream is read to its end: its connection goes back to the pool

    stream.closed, stream.sent, stream.read_to_end = False, 0, False
    status, events = _ask(router, stream=True)
    assert status == 200 and router.closed_in_time and stream.read_to_end
    assert events.endswith("data: [DONE]\n\n") and '"finish_reason": "stop"' in events

    stream.closed, stream.sent, stream.read_to_end = False, 0, False
    status, events = _ask(router, stream=True, stop=[" wo"])
    assert status == 200 and router.closed_in_time and stream.sent == 2  # the third chunk was never read
    assert not stream.read_to_end
    deltas = [json.loads(line[6:]) for line in events.split("\n\n") if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content", "") for d in deltas) == "Hello"
    assert deltas[-1]["choices"][0]["finish_reason"] == "stop" and events.endswith("data: [DONE]\n\n")
    # The worker is sent the client's stop strings (the template's goes as the protocol's one "stop"): it ends the
    # answer there itself, with its usage. The cut above serves a worker that ignores them (this fake one).
    assert router.bodies[-1]["stops"] == [" wo"] and "stops" not in router.bodies[0]

    # Under min_tokens a stop string may stand in the first tokens: the worker applied the rule, so its text stands
    # (the API cut it again, min_tokens unknown to it, and answered "Hello").
    stream.closed, stream.sent, stream.read_to_end = False, 0, False
    status, body = _ask(router, stop=[" wo"], min_tokens=3)
    assert status == 200 and body["choices"][0]["message"]["content"] == "Hello world!"
    assert router.bodies[-1]["stops"] == [" wo"] and router.bodies[-1]["min_tokens"] == 3


def test_worker_failures_are_502_and_a_broken_stream_is_logged(caplog):
    failed = FakeStream([{"text": f"{SERVER_ERROR_MSG} (RuntimeError: boom)", "error_code": WORKER_ERROR}])
    status, body = _ask(FakeRouter(failed))
    assert status == 502 and "boom" in body["error"]["message"] and failed.closed

    broken = FakeStream(fail=ConnectionResetError("worker went away"))
    with caplog.at_level(logging.ERROR, logger="test_openai_routes"):
        status, body = _ask(FakeRouter(broken))
    assert status == 502 and "worker went away" in body["error"]["message"] and broken.closed
    assert any(r.exc_info for r in caplog.records) and "Traceback" in caplog.text
    # An error without a message (httpx's timeouts) is named by its type, not left as "failed: ".
    import httpx

    status, body = _ask(FakeRouter(FakeStream(fail=httpx.ReadTimeout(""))))
    assert status == 502 and body["error"]["message"] == "the model worker failed: ReadTimeout"


def test_bodies_that_json_accepts_but_nothing_downstream_can_use_are_400():
    from palo.serve.protocol import decode_json_body

    assert decode_json_body(b'{"t": "\\ud83d\\ude00 \\u00e9"}') == {"t": "\U0001F600 é"}  # escaped pair
    assert decode_json_body(b'\xef\xbb\xbf{"t": 1}') == {"t": 1}  # a UTF-8 byte-order mark is let pass
    assert decode_json_body(b'[1e308, -2.5e-400, 10000000000000000000000]') == [1e308, -0.0, 10**22]  # in range
    for body, why in ((b"[" * 100_000, "nested too deeply"), (b'{"t": "a\\udc00"}', "lone surrogate"),
                      (b'{"t": ', "Expecting value"), ("\u00e9".encode("latin-1"), "invalid JSON"),
                      (b'{"x": NaN}', "NaN is not a JSON number"), (b'[-Infinity]', "-Infinity is not a JSON number"),
                      # read as inf: the API blamed an "Infinity" the client never sent, /tokenize answered 500
                      (b'{"repetition_penalty": 1e400}', "the number 1e400 is out of range"),
                      (b'[-1E999]', "the number -1E999 is out of range"),
                      # UTF-16 and UTF-32, which json.loads reads too: a lone surrogate in them went past the check
                      # (the bytes hold no ASCII "\ud800") and /tokenize answered 500.
                      ('{"t": "\\ud800"}'.encode("utf-16"), "not UTF-8"), ('{"t": 1}'.encode("utf-32"), "not UTF-8")):
        try:
            decode_json_body(body)
        except ValueError as exc:
            assert str(exc).startswith("invalid JSON body") and why in str(exc), exc
        else:
            raise AssertionError(f"accepted {body[:20]!r}")
    router = FakeRouter(FakeStream())
    response = asyncio.run(chat_completion(b'{"model": "ckpt", "messages": [{"role": "user", "content": "\\ud800"}]}',
                                           "", FakeRegistry(), router, None))
    assert response.status_code == 400 and "lone surrogate" in json.loads(response.body)["error"]["message"]
    assert router.bodies == []  # nothing reached a worker


def test_stream_must_be_a_boolean_and_seed_an_integer_that_reaches_the_worker():
    base = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for change, param in (({"stream": "yes"}, "stream"), ({"seed": "7"}, "seed"), ({"seed": 1.5}, "seed"),
                          ({"seed": 2**63}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"model": 5}, "model"),
                          ({"stream_options": {"include_usage": True}}, "stream_options"),  # not streamed
                          ({"stream": True, "stream_options": "usage"}, "stream_options"),
                          ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options"),
                          ({"messages": [{"role": "user"}]}, "messages"),
                          ({"messages": [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]},
                           "messages")):
        router = FakeRouter(FakeStream())
        response = asyncio.run(chat_completion(json.dumps({**base, **change}).encode(), "", FakeRegistry(), router,
                                               None))
        assert response.status_code == 400 and json.loads(response.body)["error"]["param"] == param
        assert router.bodies == []
    stream = FakeStream([{"text": "", "error_code": 0, "finish_reason": "stop"}])
    router = FakeRouter(stream)
    asyncio.run(chat_completion(json.dumps({**base, "seed": 7, "temperature": 0.9}).encode(), "", FakeRegistry(),
                                router, None))
    assert router.bodies[0]["seed"] == 7
    # max_tokens goes up to the context: the worker's cap of the original protocol (1024) is lifted for the API
    assert router.bodies[0]["cap_max_new_tokens"] is False
    for seed, n in ((-(2**63), 1), (2**63 - 1, 2)):  # the 64-bit range's ends; answer i of n samples from seed + i
        router = ChoiceRouter(lambda seed: "ok")
        body = {**base, "seed": seed, "n": n, "temperature": 0.9,
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                             {"role": "user", "content": "and?"}]}  # an assistant message may lack content
        status = asyncio.run(chat_completion(json.dumps(body).encode(), "", FakeRegistry(), router, None)).status_code
        assert status == 200 and [b["seed"] for b in router.bodies] == [seed + i for i in range(n)]
    router = FakeRouter(FakeStream([{"text": "", "error_code": 0, "finish_reason": "stop"}]))
    asyncio.run(chat_completion(json.dumps(base).encode(), "", FakeRegistry(), router, None))
    assert "seed" not in router.bodies[0]


def test_the_answers_of_one_request_share_one_copy_of_its_images():
    """Each of n answers was sent its own encoding of the request, images included, held while it ran: n copies."""
    image = "data:image/png;base64," + "AAAA" * 10_000  # the API passes images on as they are
    message = {"role": "user", "content": [{"type": "text", "text": "what?"},
                                           {"type": "image_url", "image_url": {"url": image}}]}
    class Keeping(ChoiceRouter):
        async def open(self, model: str, body: bytes | tuple[bytes, ...]):
            self.sent.append(body)
            return await super().open(model, body)

    for seed in (None, 7):
        router = Keeping(lambda seed: "ok")
        sent = router.sent = []
        body = {"model": "ckpt", "messages": [message], "n": 3, "temperature": 0.9,
                **({} if seed is None else {"seed": seed})}
        assert asyncio.run(chat_completion(json.dumps(body).encode(), "", FakeRegistry(), router,
                                           None)).status_code == 200
        shared = [b if seed is None else b[0] for b in sent]
        assert len(sent) == 3 and all(part is shared[0] for part in shared), seed
        assert [b.get("seed") for b in router.bodies] == ([None] * 3 if seed is None else [7, 8, 9])
        assert all(b["images"] == router.bodies[0]["images"] and b["images"] for b in router.bodies)


class ChoiceRouter:
    """Answers each opened request with its own stream: ``answer(seed)`` split into pieces, then a final chunk."""

    def __init__(self, answer, fail_on: int | None = None, busy_times: int | None = None) -> None:
        self.answer = answer
        self.fail_on = fail_on  # the request (0-based) whose open fails with a busy error
        self.busy_times = busy_times  # how many times it fails (None: always)
        self.busy = 0  # busy errors answered
        self.bodies: list[dict] = []
        self.streams: list[FakeStream] = []

    async def open(self, model: str, body: bytes | tuple[bytes, ...]):
        params = json.loads(body_bytes(body))
        if len(self.bodies) == self.fail_on and (self.busy_times is None or self.busy < self.busy_times):
            self.busy += 1
            raise WorkersBusyError("every worker is busy", "2")
        self.bodies.append(params)
        text = self.answer(params.get("seed"))
        pieces = [{"text": params["prompt"] + text[:k], "error_code": 0} for k in range(1, len(text) + 1)]
        pieces[-1].update(finish_reason="length", usage={"prompt_tokens": 7, "completion_tokens": len(text),
                                                         "cached_tokens": 0})
        self.streams.append(FakeStream(pieces))
        return self.streams[-1]


def _ask_n(router, n, stream=False, seed=None, include_usage=False):
    body = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "n": n, "stream": stream,
            "temperature": 0.8}
    if seed is not None:
        body["seed"] = seed
    if include_usage:
        body["stream_options"] = {"include_usage": True}

    async def run():
        response = await chat_completion(json.dumps(body).encode(), "", FakeRegistry(), router, None)
        if stream and response.status_code == 200:
            answer = b"".join([e async for e in response.body_iterator]).decode()
        else:
            answer = json.loads(response.body)
        # Checked before the event loop ends: its shutdown would close a forgotten stream too late to tell.
        router.closed_in_time = [s.closed for s in router.streams]
        return response.status_code, answer

    return asyncio.run(run())


def test_n_answers_each_from_its_own_seed_in_one_completion():
    router = ChoiceRouter(lambda seed: f"answer {seed}")
    status, body = _ask_n(router, 3, seed=40)
    assert status == 200 and [b["seed"] for b in router.bodies] == [40, 41, 42]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "answer 40", "length"), (1, "answer 41", "length"), (2, "answer 42", "length")]
    # The prompt is counted once, the answers' tokens summed; cached tokens only with --enable-prompt-tokens-details.
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 27, "total_tokens": 34}
    assert router.closed_in_time == [True] * 3 and all(s.read_to_end for s in router.streams)


def test_cached_prompt_tokens_are_reported_only_when_enabled_and_known():
    """``prompt_tokens_details.cached_tokens``: per prompt the least its ``n`` answers read from the prefix cache (the
    later answers find the first one's blocks), summed over prompts; only with the server's flag, and left out when
    a worker did not say."""
    usages = [{"prompt_tokens": 40, "completion_tokens": 3, "cached_tokens": 0},
              {"prompt_tokens": 40, "completion_tokens": 4, "cached_tokens": 32},
              {"prompt_tokens": 50, "completion_tokens": 5, "cached_tokens": 16},
              {"prompt_tokens": 50, "completion_tokens": 6, "cached_tokens": 48}]
    assert _usage(usages, 2) == {"prompt_tokens": 90, "completion_tokens": 18, "total_tokens": 108}
    assert _usage(usages, 2, details=True)["prompt_tokens_details"] == {"cached_tokens": 16}
    assert _usage(usages, 1, details=True)["prompt_tokens_details"] == {"cached_tokens": 96}
    unknown = usages[:3] + [{"prompt_tokens": 50, "completion_tokens": 6}]  # a backend that does not report it
    assert "prompt_tokens_details" not in _usage(unknown, 2, details=True)


def test_n_answers_stream_interleaved_each_under_its_index():
    router = ChoiceRouter(lambda seed: {5: "short", 6: "a longer one"}[seed])
    status, events = _ask_n(router, 2, stream=True, seed=5, include_usage=True)
    assert status == 200 and events.endswith("data: [DONE]\n\n")
    chunks = [json.loads(line[6:]) for line in events.split("\n\n") if line.startswith("data: {")]
    texts, finishes, roles = {}, {}, set()
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        delta, i = choice["delta"], choice["index"]
        roles |= {i} if delta.get("role") == "assistant" else set()
        texts[i] = texts.get(i, "") + delta.get("content", "")
        if choice["finish_reason"]:
            finishes[i] = choice["finish_reason"]
    assert roles == {0, 1} and texts == {0: "short", 1: "a longer one"} and finishes == {0: "length", 1: "length"}
    indexes = [c["choices"][0]["index"] for c in chunks[2:-1]]
    assert indexes[:4] == [0, 1, 0, 1]  # in turn, not one answer after the other
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5 + 12
    # OpenAI's include_usage: "all other chunks will also include a usage field, but with a null value".
    assert all("usage" in chunk and chunk["usage"] is None for chunk in chunks[:-1])
    status, events = _ask_n(ChoiceRouter(lambda seed: "x"), 1, stream=True)
    assert status == 200 and '"usage"' not in events  # not asked for: no usage field at all


def test_n_out_of_range_is_400_and_a_failed_open_closes_the_answers_already_opened(monkeypatch):
    from palo.serve import openai_api

    for n in (0, 17, "2", 1.5, True):
        router = ChoiceRouter(lambda seed: "x")
        status, body = _ask_n(router, n)
        assert status == 400 and body["error"]["param"] == "n" and router.bodies == []
    monkeypatch.setattr(openai_api, "BUSY_WAIT_S", 0.3)
    monkeypatch.setattr(openai_api, "BUSY_POLL_S", 0.05)
    router = ChoiceRouter(lambda seed: "x", fail_on=2)  # busy for good: the wait runs out
    status, body = _ask_n(router, 3)
    assert status == 503 and len(router.streams) == 2 and router.closed_in_time == [True, True]
    assert router.busy >= 3  # asked again while the wait lasted


def test_a_busy_worker_refuses_the_first_answer_at_once_and_later_ones_wait_for_places(monkeypatch):
    """Requests that arrive together each holding some places must not all fail (and again on every retry)."""
    from palo.serve import openai_api

    monkeypatch.setattr(openai_api, "BUSY_POLL_S", 0.01)
    router = ChoiceRouter(lambda seed: "x", fail_on=0, busy_times=1)
    status, body = _ask_n(router, 3)
    assert status == 503 and router.busy == 1 and router.streams == []  # nothing placed: the client backs off
    router = ChoiceRouter(lambda seed: "ok", fail_on=1, busy_times=4)
    status, body = _ask_n(router, 3)
    assert status == 200 and router.busy == 4 and [c["message"]["content"] for c in body["choices"]] == ["ok"] * 3


def test_features_the_server_lacks_are_refused_by_name_and_their_no_op_values_accepted():
    base = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    refused = [("tools", [{"type": "function", "function": {"name": "f"}}]),
               ("tool_choice", "auto"), ("modalities", ["audio"]), ("web_search_options", {})]
    for key, value in refused:
        router = FakeRouter(FakeStream())
        response = asyncio.run(chat_completion(json.dumps({**base, key: value}).encode(), "", FakeRegistry(), router,
                                               None))
        error = json.loads(response.body)["error"]
        assert response.status_code == 400 and error["param"] == key and "not supported" in error["message"], key
        assert router.bodies == []
    no_ops = {"logprobs": False, "top_logprobs": 0, "logit_bias": {}, "tools": [], "tool_choice": "none",
              "response_format": {"type": "text"}, "modalities": ["text"], "user": "someone"}
    router = FakeRouter(FakeStream([{"text": "", "error_code": 0, "finish_reason": "stop"}]))
    response = asyncio.run(chat_completion(json.dumps({**base, **no_ops}).encode(), "", FakeRegistry(), router, None))
    assert response.status_code == 200 and len(router.bodies) == 1


def test_top_k_as_vllm_takes_it_reaches_the_worker():
    base = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.7}
    sent = []
    for top_k in (5, -1, 0, None):
        router = FakeRouter(FakeStream([{"text": "", "error_code": 0, "finish_reason": "stop"}]))
        body = {**base, "top_k": top_k}
        assert asyncio.run(chat_completion(json.dumps(body).encode(), "", FakeRegistry(), router,
                                           None)).status_code == 200
        sent.append(router.bodies[0].get("top_k"))
    assert sent == [5, None, None, None]  # no limit: left to the worker's default
    for top_k in (-2, 1.5, "3", True):
        router = FakeRouter(FakeStream())
        response = asyncio.run(chat_completion(json.dumps({**base, "top_k": top_k}).encode(), "", FakeRegistry(),
                                               router, None))
        assert response.status_code == 400 and json.loads(response.body)["error"]["param"] == "top_k"
        assert router.bodies == []


def test_penalties_reach_the_worker_and_out_of_range_ones_are_400():
    base = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def ask(extra):
        router = FakeRouter(FakeStream([{"text": "", "error_code": 0, "finish_reason": "stop"}]))
        response = asyncio.run(chat_completion(json.dumps({**base, **extra}).encode(), "", FakeRegistry(), router,
                                               None))
        return response, router.bodies

    response, bodies = ask({"presence_penalty": 1.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2})
    assert response.status_code == 200
    assert {k: v for k, v in bodies[0].items() if "penalty" in k} == {
        "presence_penalty": 1.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2}
    # Values that ask for nothing are not sent: a worker without penalties sees the request it always saw.
    response, bodies = ask({"presence_penalty": 0, "frequency_penalty": None, "repetition_penalty": 1})
    assert response.status_code == 200 and not [k for k in bodies[0] if "penalty" in k]
    for key, value in [("presence_penalty", 2.5), ("frequency_penalty", -3), ("frequency_penalty", "1"),
                       ("repetition_penalty", 0), ("repetition_penalty", -1), ("presence_penalty", True)]:
        response, bodies = ask({key: value})
        assert response.status_code == 400 and json.loads(response.body)["error"]["param"] == key, (key, value)
        assert bodies == []


def test_logit_bias_reaches_the_worker_from_both_endpoints_and_malformed_ones_are_400():
    done = [{"text": "", "error_code": 0, "finish_reason": "stop"}]
    chat = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    text = {"model": "ckpt", "prompt": ["one", [5, 6]], "max_tokens": 4}
    for endpoint, base in ((chat_completion, chat), (text_completion, text)):
        status, _, bodies = _call(endpoint, {**base, "logit_bias": {"12": -100, "7": 0, "30": 2.5}}, done)
        assert status == 200 and bodies and all(b["logit_bias"] == {"12": -100.0, "30": 2.5} for b in bodies)
        status, _, bodies = _call(endpoint, {**base, "logit_bias": {"7": 0}}, done)
        assert status == 200 and all("logit_bias" not in b for b in bodies)  # asks for nothing: not sent
        for bad in ([12], {"x": 1}, {"12": -101}, {"12": True}, {"1.5": 1}, "12"):
            status, answer, bodies = _call(endpoint, {**base, "logit_bias": bad}, done)
            assert status == 400 and answer["error"]["param"] == "logit_bias" and bodies == [], bad


def test_an_answer_shape_reaches_the_worker_as_it_was_asked_and_malformed_ones_are_400():
    done = [{"text": "", "error_code": 0, "finish_reason": "stop"}]
    chat = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    text = {"model": "ckpt", "prompt": "hi", "max_tokens": 4}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    shapes = [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
              {"response_format": {"type": "json_object"}}, {"guided_json": schema}, {"guided_regex": "[ab]+"},
              {"guided_choice": ["ja", "nein"]}, {"structured_outputs": {"choice": ["ja", "nein"]}}]
    for endpoint, base in ((chat_completion, chat), (text_completion, text)):
        for shape in shapes:
            status, _, bodies = _call(endpoint, {**base, **shape}, done)
            assert status == 200 and {k: v for k, v in bodies[0].items() if k in shape} == shape, shape
        status, _, bodies = _call(endpoint, {**base, "response_format": {"type": "text"}}, done)
        assert status == 200 and "response_format" not in bodies[0]  # asks for nothing: not sent
        for bad in ({"response_format": {"type": "yaml"}}, {"guided_choice": "ja"}, {"guided_regex": ""},
                    {"guided_json": schema, "guided_regex": "a"}, {"structured_outputs": {"grammar": "x"}}):
            status, answer, bodies = _call(endpoint, {**base, **bad}, done)
            assert status == 400 and answer["error"]["param"] == next(iter(bad)) and bodies == [], bad


def test_vllms_sampling_extras_reach_the_worker_only_when_they_ask_for_something():
    done = [{"text": "", "error_code": 0, "finish_reason": "stop"}]
    chat = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    text = {"model": "ckpt", "prompt": "hi", "max_tokens": 8}
    asked = {"min_p": 0.05, "min_tokens": 3, "stop_token_ids": [2, 13], "ignore_eos": True}
    for endpoint, base in ((chat_completion, chat), (text_completion, text)):
        status, _, bodies = _call(endpoint, {**base, **asked}, done)
        assert status == 200 and {k: bodies[0][k] for k in asked} == asked
        status, _, bodies = _call(endpoint, {**base, "min_p": 0, "min_tokens": 0, "stop_token_ids": [],
                                             "ignore_eos": False}, done)
        assert status == 200 and not set(asked) & set(bodies[0])
        for key, bad in [("min_p", 1.2), ("min_p", "0.1"), ("min_tokens", 9), ("min_tokens", True),
                         ("stop_token_ids", [-3]), ("stop_token_ids", [1] * 65), ("stop_token_ids", 2),
                         ("ignore_eos", "true"), ("ignore_eos", 1)]:
            status, answer, bodies = _call(endpoint, {**base, key: bad}, done)
            assert status == 400 and answer["error"]["param"] == key and bodies == [], (key, bad)


def test_a_cache_salt_reaches_the_worker_as_sent_and_a_bad_one_is_refused():
    done = [{"text": "", "error_code": 0, "finish_reason": "stop"}]
    chat = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    text = {"model": "ckpt", "prompt": "hi", "max_tokens": 8}
    for endpoint, base in ((chat_completion, chat), (text_completion, text)):
        status, _, bodies = _call(endpoint, {**base, "cache_salt": "tenant-7 ✓"}, done)
        assert status == 200 and bodies[0]["cache_salt"] == "tenant-7 ✓"
        status, _, bodies = _call(endpoint, base, done)
        assert status == 200 and "cache_salt" not in bodies[0]
        for bad in ("", 7, ["a"], "s" * 1025):
            status, answer, bodies = _call(endpoint, {**base, "cache_salt": bad}, done)
            assert status == 400 and answer["error"]["param"] == "cache_salt" and bodies == [], bad


def _lp(token: str) -> dict:
    raw = token.encode()
    return {"token": token, "logprob": -0.5, "bytes": list(raw), "top_logprobs": []}


def _call(endpoint, body: dict, chunks: list[dict]):
    """``(status, JSON answer or the streamed chunks, bodies sent to the worker)`` of one API call."""
    router = FakeRouter(FakeStream(chunks))

    async def run():
        response = await endpoint(json.dumps(body).encode(), "", FakeRegistry(), router, None)
        if body.get("stream") and response.status_code == 200:
            text = b"".join([e async for e in response.body_iterator]).decode()
            return response.status_code, [json.loads(line[6:]) for line in text.split("\n\n")
                                          if line.startswith("data: {")]
        return response.status_code, json.loads(response.body)

    return (*asyncio.run(run()), router.bodies)


def _ask_logprobs(chunks: list[dict], stream: bool, **extra):
    return _call(chat_completion, {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}],
                                   "stream": stream, "max_tokens": 8, **extra}, chunks)


LOGPROB_CHUNKS = [  # "Hello world" in four tokens; the second's text is held back by the worker for a while
    {"text": "Hel", "error_code": 0, "logprobs": [_lp("Hel")]},
    {"text": "Hel", "error_code": 0, "logprobs": [_lp("l")]},
    {"text": "Hello wo", "error_code": 0, "logprobs": [_lp("o wo")]},
    {"text": "Hello world", "error_code": 0, "logprobs": [_lp("rld")], "finish_reason": "stop",
     "usage": {"prompt_tokens": 3, "completion_tokens": 4}},
]


def test_logprobs_go_to_the_worker_and_come_back_with_their_tokens():
    status, body, sent = _ask_logprobs(LOGPROB_CHUNKS, False, logprobs=True, top_logprobs=2)
    assert status == 200 and sent[0]["logprobs"] == 2
    assert [e["token"] for e in body["choices"][0]["logprobs"]["content"]] == ["Hel", "l", "o wo", "rld"]
    # Streamed: each content chunk carries the tokens that arrived since the last one.
    status, chunks, _ = _ask_logprobs(LOGPROB_CHUNKS, True, logprobs=True)
    content = [(c["choices"][0]["delta"].get("content"), [e["token"] for e in c["choices"][0]["logprobs"]["content"]])
               for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert status == 200 and content == [("Hel", ["Hel"]), ("lo wo", ["l", "o wo"]), ("rld", ["rld"])]
    # Not asked: not sent to the worker, and null in the answer.
    status, body, sent = _ask_logprobs(LOGPROB_CHUNKS, False, logprobs=False)
    assert "logprobs" not in sent[0] and body["choices"][0]["logprobs"] is None
    assert _ask_logprobs(LOGPROB_CHUNKS, False, logprobs=True)[2][0]["logprobs"] == 0


def test_bad_logprobs_requests_and_a_worker_that_sends_none_are_errors():
    for extra, param in [({"logprobs": "yes"}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                         ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 1.5},
                                                                 "top_logprobs")]:
        status, body, sent = _ask_logprobs(LOGPROB_CHUNKS, False, **extra)
        assert status == 400 and body["error"]["param"] == param and sent == [], extra
    without = [{k: v for k, v in chunk.items() if k != "logprobs"} for chunk in LOGPROB_CHUNKS]
    status, body, _ = _ask_logprobs(without, False, logprobs=True)
    assert status == 502 and "log-probabilities for 0 of 4 tokens" in body["error"]["message"]
    no_usage = [{k: v for k, v in chunk.items() if k != "usage"} for chunk in without]  # an original worker
    assert _ask_logprobs(no_usage, False, logprobs=True)[0] == 502


def _complete(chunks: list[dict], stream: bool = False, **extra):
    return _call(text_completion, {"model": "ckpt", "prompt": "USER: hi ASSISTANT:", "stream": stream, **extra},
                 chunks)


def test_text_completions_send_the_prompt_as_it_is_and_answer_in_the_legacy_shape():
    status, body, sent = _complete(LOGPROB_CHUNKS, logprobs=1)
    assert status == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert sent[0]["prompt"] == "USER: hi ASSISTANT:" and sent[0]["images"] == [] and sent[0]["stop"] is None
    assert sent[0]["max_new_tokens"] == 16 and sent[0]["logprobs"] == 1  # OpenAI's legacy default length
    choice = body["choices"][0]
    assert choice["text"] == "Hello world" and choice["finish_reason"] == "stop"
    assert choice["logprobs"] == {"tokens": ["Hel", "l", "o wo", "rld"], "token_logprobs": [-0.5] * 4,
                                  # the sampled token is always among its alternatives (OpenAI: "up to logprobs+1")
                                  "top_logprobs": [{"Hel": -0.5}, {"l": -0.5}, {"o wo": -0.5}, {"rld": -0.5}],
                                  "text_offset": [0, 3, 4, 8]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    # Streamed: text deltas, the legacy lists per chunk with offsets running on across chunks.
    status, chunks, _ = _complete(LOGPROB_CHUNKS, stream=True, logprobs=1, stream_options={"include_usage": True})
    texts = [(c["choices"][0]["text"], c["choices"][0]["logprobs"]["text_offset"]) for c in chunks
             if c["choices"] and c["choices"][0]["text"]]
    assert status == 200 and texts == [("Hel", [0]), ("lo wo", [3, 4]), ("rld", [8])]
    assert chunks[-1]["usage"]["completion_tokens"] == 4 and chunks[-2]["choices"][0]["finish_reason"] == "stop"
    status, body, sent = _complete(LOGPROB_CHUNKS, max_tokens=3)
    assert sent[0]["max_new_tokens"] == 3 and "logprobs" not in sent[0] and body["choices"][0]["logprobs"] is None


def test_text_offsets_count_characters_where_tokens_hold_parts_of_one():
    """A token holding part of a character is spelled ``"\\xc3"`` (4 characters), and the offsets counted those
    spellings: in Hindi most of them pointed past the end of the text."""
    def entry(raw: bytes) -> dict:
        return {"token": raw.decode("utf-8", "backslashreplace"), "logprob": -0.5, "bytes": list(raw),
                "top_logprobs": []}

    tokens = [b"n", b"\xc3", b"\xa9e", b" \xe0\xa4", b"\xa8!"]
    chunks = [{"text": "n", "error_code": 0, "logprobs": [entry(tokens[0]), entry(tokens[1])]},
              {"text": "née", "error_code": 0, "logprobs": [entry(tokens[2]), entry(tokens[3])]},
              {"text": "née न!", "error_code": 0, "logprobs": [entry(tokens[4])], "finish_reason": "stop",
               "usage": {"prompt_tokens": 3, "completion_tokens": 5}}]
    for stream in (False, True):
        status, body, _ = _complete(chunks, stream=stream, logprobs=0)
        pieces = [body] if not stream else [c for c in body if c["choices"]]
        offsets = [o for piece in pieces for o in (piece["choices"][0]["logprobs"] or {}).get("text_offset", [])]
        assert status == 200 and offsets == [0, 1, 1, 3, 4], stream  # each where the token's first byte is


def test_text_completion_requests_it_cannot_answer_faithfully_are_400():
    for extra, param in [({"echo": "yes"}, "echo"), ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"),
                         ({"prompt": ""}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": ["a", ""]}, "prompt"),
                         ({"prompt": [1, "a"]}, "prompt"), ({"prompt": [[1, 2], []]}, "prompt"),
                         ({"prompt": [True, 2]}, "prompt"), ({"prompt": ["a"] * 65, "n": 2}, "prompt"),
                         ({"logprobs": 21}, "logprobs"), ({"logprobs": True}, "logprobs"), ({"n": 0}, "n"),
                         ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1, "echo": True}, "max_tokens")]:
        status, body, sent = _complete(LOGPROB_CHUNKS, **extra)
        assert status == 400 and body["error"]["param"] == param and sent == [], extra
    assert _complete(LOGPROB_CHUNKS, echo=False, best_of=1, prompt=["one prompt"])[0] == 200


PROMPT_ENTRIES = [{"token": "<s>", "logprob": None, "bytes": list(b"<s>"), "top_logprobs": None},
                  {"token": " USER", "logprob": -2.0, "bytes": list(b" USER"), "top_logprobs": [
                      {"token": " USER", "logprob": -2.0, "bytes": list(b" USER")}]}]


def test_several_prompts_and_token_id_prompts_get_their_answers_in_order():
    status, body, sent = _complete(LOGPROB_CHUNKS, prompt=["first", [1, 2, 3], "third"], n=2)
    assert status == 200 and [c["index"] for c in body["choices"]] == list(range(6))
    assert [b.get("prompt") for b in sent] == ["first", "first", None, None, "third", "third"]
    assert [b.get("prompt_token_ids") for b in sent[2:4]] == [[1, 2, 3]] * 2
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 24, "total_tokens": 33}  # 3 prompts, 6 answers
    # A token-id prompt's text comes from its worker: the stream's text starts with it and is not the answer.
    spelled = [dict(LOGPROB_CHUNKS[0], prompt="USER: hi", text="USER: hiHel")] + [
        dict(c, text="USER: hi" + c["text"]) for c in LOGPROB_CHUNKS[1:]]
    status, body, _ = _complete(spelled, prompt=[1, 2, 3])
    assert status == 200 and body["choices"][0]["text"] == "Hello world"


def test_echo_puts_the_prompt_and_its_scored_tokens_before_the_answer():
    echoed = [dict(LOGPROB_CHUNKS[0], prompt_logprobs=PROMPT_ENTRIES)] + LOGPROB_CHUNKS[1:]
    echoed = [dict(c, text="USER: hi ASSISTANT:" + c["text"]) for c in echoed]
    status, body, sent = _complete(echoed, echo=True, logprobs=1, max_tokens=1)
    assert status == 200 and sent[0]["prompt_logprobs"] == 1 and sent[0]["logprobs"] == 1
    choice = body["choices"][0]
    assert choice["text"] == "USER: hi ASSISTANT:Hello world"
    assert choice["logprobs"]["tokens"] == ["<s>", " USER", "Hel", "l", "o wo", "rld"]
    assert choice["logprobs"]["token_logprobs"] == [None, -2.0, -0.5, -0.5, -0.5, -0.5]
    assert choice["logprobs"]["top_logprobs"][:3] == [None, {" USER": -2.0}, {"Hel": -0.5}]
    # Streamed: the prompt comes first, with its entries, and the answer's follow.
    status, chunks, _ = _complete(echoed, stream=True, echo=True, logprobs=1)
    pieces = [(c["choices"][0]["text"], c["choices"][0]["logprobs"]["tokens"]) for c in chunks
              if c["choices"] and c["choices"][0]["text"]]
    assert pieces[0] == ("USER: hi ASSISTANT:Hel", ["<s>", " USER", "Hel"]) and "".join(p for p, _ in pieces) == (
        "USER: hi ASSISTANT:Hello world")
    # Echo without logprobs asks the worker for no scores; max_tokens 0 asks for scores only, as a worker needs.
    assert "prompt_logprobs" not in _complete(echoed, echo=True)[2][0]
    score_only = [{"text": "USER: hi ASSISTANT:", "error_code": 0, "prompt_logprobs": PROMPT_ENTRIES,
                   "finish_reason": "length", "usage": {"prompt_tokens": 2, "completion_tokens": 0}}]
    status, body, sent = _complete(score_only, echo=True, max_tokens=0)
    assert status == 200 and sent[0]["max_new_tokens"] == 0 and sent[0]["prompt_logprobs"] == 0
    assert body["choices"][0]["text"] == "USER: hi ASSISTANT:" and body["choices"][0]["logprobs"] is None
    status, body, _ = _complete(score_only, echo=True, max_tokens=0, logprobs=0)
    assert status == 200 and body["choices"][0]["logprobs"]["token_logprobs"] == [None, -2.0]
    # A worker that sends no prompt entries for an echo with logprobs: an error, not an answer without them.
    status, body, _ = _complete([dict(c, text="USER: hi ASSISTANT:" + c["text"]) for c in LOGPROB_CHUNKS],
                                echo=True, logprobs=1)
    assert status == 502 and "for the prompt" in body["error"]["message"]


def test_continuing_the_final_assistant_message_renders_it_open():
    from palo.conversation import conv_templates
    from palo.serve.openai_api import render_messages

    messages = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "A red"}]
    for mode in ("vicuna_v1", "llava_llama_2", "mpt"):
        conv = conv_templates[mode].copy()
        conv.append_message(conv.roles[0], "What is it?")
        conv.append_message(conv.roles[1], None)
        opened = conv.get_prompt()
        conv.messages[-1][1] = "A red"
        closed = conv.get_prompt()
        prompt, _, _ = render_messages(messages, mode, continue_final=True)
        # The answer as the template renders it, without what would close it.
        assert closed.startswith(prompt) and prompt.endswith("A red") and prompt.startswith(opened.rstrip()), mode
        assert len(closed) > len(prompt)
    vicuna, _, _ = render_messages(messages, "vicuna_v1", continue_final=True)
    assert vicuna.endswith("ASSISTANT: A red")
    empty = [messages[0], {"role": "assistant", "content": ""}]
    assert render_messages(empty, "vicuna_v1", continue_final=True)[0] == render_messages(messages[:1], "vicuna_v1")[0]


PROMPT_IDS_ENTRIES = [
    {"id": 1, "token": "<s>", "logprob": None, "bytes": [60, 115, 62], "top_logprobs": None},
    {"id": -200, "token": "<image>", "logprob": None, "bytes": list(b"<image>"), "top_logprobs": None},
    {"id": 7, "token": " A", "logprob": -1.5, "bytes": [32, 65], "top_logprobs": [
        {"id": 9, "token": " B", "logprob": -0.5, "bytes": [32, 66]}, {"id": 7, "token": " A", "logprob": -1.5,
                                                                       "bytes": [32, 65]}]},
    {"id": 8, "token": " C", "logprob": -3.0, "bytes": [32, 67], "top_logprobs": [
        {"id": 9, "token": " B", "logprob": -0.1, "bytes": [32, 66]}]},
]


def test_chat_prompt_logprobs_come_back_in_vllms_shape():
    chunks = [dict(LOGPROB_CHUNKS[0], prompt_logprobs=PROMPT_IDS_ENTRIES)] + LOGPROB_CHUNKS[1:]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "A"}]
    status, body, sent = _call(chat_completion, {"model": "ckpt", "messages": messages, "max_tokens": 1,
                                                 "prompt_logprobs": 2, "continue_final_message": True,
                                                 "add_generation_prompt": False}, chunks)
    assert status == 200 and sent[0]["prompt_logprobs"] == 2 and sent[0]["prompt"].endswith("ASSISTANT: A")
    assert body["prompt_token_ids"] == [1, -200, 7, 8]
    assert body["prompt_logprobs"] == [
        None, None,
        {"7": {"logprob": -1.5, "rank": 2, "decoded_token": " A"}, "9": {"logprob": -0.5, "rank": 1,
                                                                          "decoded_token": " B"}},
        {"8": {"logprob": -3.0, "rank": None, "decoded_token": " C"}, "9": {"logprob": -0.1, "rank": 1,
                                                                             "decoded_token": " B"}}]
    assert list(body["prompt_logprobs"][2]) == ["7", "9"]  # the prompt's own token first
    # Not asked: none of it.
    status, body, sent = _ask_logprobs(LOGPROB_CHUNKS, False)
    assert "prompt_logprobs" not in body and "prompt_logprobs" not in sent[0]
    # A worker that sends none when asked: an error, not an answer without them.
    status, body, _ = _ask_logprobs(LOGPROB_CHUNKS, False, prompt_logprobs=0)
    assert status == 502 and "for the prompt" in body["error"]["message"]


def test_bad_continuation_and_prompt_scoring_requests_are_400():
    user = [{"role": "user", "content": "hi"}]
    both = user + [{"role": "assistant", "content": "A"}]
    for body, param in [({"messages": both, "continue_final_message": True}, "add_generation_prompt"),
                        ({"messages": user, "add_generation_prompt": False}, "add_generation_prompt"),
                        ({"messages": user, "continue_final_message": True, "add_generation_prompt": False},
                         "messages"),
                        ({"messages": both}, "messages"),
                        ({"messages": user, "continue_final_message": "yes"}, "continue_final_message"),
                        ({"messages": user, "prompt_logprobs": 21}, "prompt_logprobs"),
                        ({"messages": user, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs")]:
        status, answer, sent = _call(chat_completion, {"model": "ckpt", "max_tokens": 4, **body}, LOGPROB_CHUNKS)
        assert status == 400 and answer["error"]["param"] == param and sent == [], body


class EndlessStream(FakeStream):
    """A worker still generating: one piece, then nothing more until it is closed."""

    async def chunks(self):
        yield {"text": "hi" + "x", "error_code": 0}
        await self.shut.wait()
        raise ConnectionResetError("closed")


class EndlessRouter:
    def __init__(self) -> None:
        self.streams: list[EndlessStream] = []

    async def open(self, model: str, body: bytes | tuple[bytes, ...]):
        self.streams.append(EndlessStream())
        return self.streams[-1]


def test_a_whole_answer_whose_client_left_stops_its_workers(monkeypatch):
    """A streamed answer stops with its client (the server cancels it); a whole one is gathered first, and its
    workers went on generating for nobody."""
    from palo.serve import openai_api

    monkeypatch.setattr(openai_api, "DISCONNECT_POLL_S", 0.01)
    for endpoint, body, answers in ((chat_completion, {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 3),
                                    (text_completion, {"prompt": ["a", "b"], "n": 2}, 4)):
        router = EndlessRouter()

        def leaves_after(checks: int):
            seen = []

            async def disconnected() -> bool:
                seen.append(1)
                return len(seen) > checks  # the client leaves a little while after asking

            return disconnected

        request = json.dumps({"model": "ckpt", "max_tokens": 8, **body}).encode()

        async def run(endpoint=endpoint, request=request, router=router):
            response = await endpoint(request, "", FakeRegistry(), router, None, leaves_after(3))
            return response, [s.closed for s in router.streams]  # before the loop's shutdown closes what is left

        response, closed = asyncio.run(asyncio.wait_for(run(), 10))
        assert response.status_code == openai_api.CLIENT_CLOSED
        assert len(router.streams) == answers and closed == [True] * answers


def test_a_client_that_leaves_while_its_later_answers_wait_for_places_frees_the_ones_placed(monkeypatch):
    from palo.serve import openai_api

    monkeypatch.setattr(openai_api, "DISCONNECT_POLL_S", 0.01)
    monkeypatch.setattr(openai_api, "BUSY_POLL_S", 0.01)
    router = ChoiceRouter(lambda seed: "x", fail_on=1)  # the second answer never finds a place
    seen = []

    async def disconnected() -> bool:
        seen.append(1)
        return len(seen) > 5

    body = json.dumps({"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "n": 2}).encode()
    started = time.monotonic()
    async def run():
        response = await chat_completion(body, "", FakeRegistry(), router, None, disconnected)
        return response, [s.closed for s in router.streams]  # before the loop's shutdown closes what is left

    response, closed = asyncio.run(run())
    assert response.status_code == openai_api.CLIENT_CLOSED and time.monotonic() - started < 5  # not BUSY_WAIT_S
    assert len(router.streams) == 1 and closed == [True] and router.busy >= 1


def test_an_earlier_refusal_sent_back_is_what_the_assistant_said():
    """OpenAI's assistant messages may carry a ``refusal`` part, or ``refusal`` with null content (as a client sends
    an earlier answer back): its words are the turn's text. Only an assistant's; ``<image>`` in it is refused."""
    from palo.serve.openai_api import APIError, render_messages

    said = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "I can't help with that."},
            {"role": "user", "content": "b"}]
    as_part = [said[0], {"role": "assistant", "content": [{"type": "refusal", "refusal": "I can't help with that."}]},
               said[2]]
    as_field = [said[0], {"role": "assistant", "content": None, "refusal": "I can't help with that."}, said[2]]
    assert render_messages(as_part, "vicuna_v1") == render_messages(as_field, "vicuna_v1") == \
        render_messages(said, "vicuna_v1")
    with pytest.raises(APIError, match="unsupported content part"):
        render_messages([{"role": "user", "content": [{"type": "refusal", "refusal": "no"}]}], "vicuna_v1")
    with pytest.raises(APIError, match="keep for images"):
        render_messages([said[0], {"role": "assistant", "content": None, "refusal": "<image>"}, said[2]],
                        "vicuna_v1")


def test_consecutive_messages_of_one_role_are_one_turn():
    """Clients that send an image and then its question as two user messages get the prompt of one message."""
    from palo.serve.openai_api import APIError, render_messages

    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    one = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]},
           {"role": "assistant", "content": "A cat.\nA black one."}, {"role": "user", "content": "Sure?"}]
    split = [{"role": "user", "content": [image]}, {"role": "user", "content": "What is it?"},
             {"role": "assistant", "content": "A cat."}, {"role": "assistant", "content": "A black one."},
             {"role": "user", "content": "Sure?"}]
    assert render_messages(split, "vicuna_v1") == render_messages(one, "vicuna_v1")
    assert render_messages(split, "vicuna_v1")[0].count("USER:") == 2
    # Texts ending in a newline (or empty) take none before the next; many pieces join as few would.
    pieces = ["a", "b\n", "", "c", "d\n\n", "e"] * 2000
    many = [{"role": "user", "content": text} for text in pieces]
    joined = "a\nb\nc\nd\n\ne" + "\na\nb\nc\nd\n\ne" * 1999
    assert render_messages(many, "vicuna_v1") == render_messages([{"role": "user", "content": joined}], "vicuna_v1")
    for messages in ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hi"}],
                     [{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}]):
        with pytest.raises(APIError, match="the first message after the system message must be the user's"):
            render_messages(messages, "vicuna_v1")
    # A system and a developer message before the first turn (as some clients send) are one system prompt, a line
    # each (the second was a 400, which OpenAI does not answer); after a turn one is still refused.
    question = {"role": "user", "content": "hi"}
    for mode, tag in (("vicuna_v1", ""), ("mpt", "<|im_start|>system\n")):
        two = render_messages([{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "In Urdu."},
                               question], mode)[0]
        one = render_messages([{"role": "system", "content": "Be brief.\nIn Urdu."}, question], mode)[0]
        assert two == one and one.startswith(tag + "Be brief.\nIn Urdu.")
    with pytest.raises(APIError, match="a system message may only come before the conversation's first turn"):
        render_messages([question, {"role": "system", "content": "s"}], "vicuna_v1")
    # The Python API's local image parts (palo.llm) are not the HTTP API's: a server never opens a client's path.
    local = [{"role": "user", "content": [{"type": "image", "image": "/etc/passwd"}, {"type": "text", "text": "x"}]}]
    with pytest.raises(APIError, match=r"messages\[0\]: unsupported content part"):
        render_messages(local, "vicuna_v1")


class OnePlaceRouter:
    """A worker with one place: an answer takes it at its first piece and keeps it until its stream ends or is
    closed; it makes each piece only when read (a worker whose client stopped reading stalls)."""

    def __init__(self, pieces: int = 5) -> None:
        self.place = asyncio.Semaphore(1)
        self.pieces = pieces
        self.streams: list[FakeStream] = []

    async def open(self, model: str, body: bytes | tuple[bytes, ...]):
        params = json.loads(body_bytes(body))
        place, count = self.place, self.pieces

        class PlacedStream(FakeStream):
            async def chunks(self):
                async with place:
                    for k in range(1, count + 1):
                        await asyncio.sleep(0)  # the worker's pace: other answers run in between
                        piece = {"text": params["prompt"] + "y" * k, "error_code": 0}
                        if k == count:
                            piece.update(finish_reason="length", usage={"prompt_tokens": 3, "completion_tokens": k})
                        self.sent += 1
                        yield piece
                    self.read_to_end = True

        self.streams.append(PlacedStream())
        return self.streams[-1]


@pytest.mark.parametrize("stream", [False, True])
def test_more_answers_than_the_workers_places_are_all_answered(stream):
    """Answers were read one after another, each to its first piece: the second waited for the place the first
    held, and the first could not finish while nobody read it (over HTTP: 60 s, then the worker dropped it, 502)."""
    for endpoint, body, answers in ((chat_completion, {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 3),
                                    (text_completion, {"prompt": ["a", "b"], "n": 2}, 4)):
        router = OnePlaceRouter()
        request = json.dumps({"model": "ckpt", "max_tokens": 8, "stream": stream, **body}).encode()

        async def run(endpoint=endpoint, request=request, router=router):
            response = await endpoint(request, "", FakeRegistry(), router, None)
            if stream:
                result = b"".join([e async for e in response.body_iterator]).decode()
            else:
                result = json.loads(response.body)
            return result, [s.closed for s in router.streams]

        result, closed = asyncio.run(asyncio.wait_for(run(), 10))
        if stream:
            chunks = [json.loads(line[6:]) for line in result.split("\n\n") if line.startswith("data: {")]
            texts: dict[int, str] = {}
            for chunk in chunks:
                (choice,) = chunk["choices"]
                texts[choice["index"]] = texts.get(choice["index"], "") + (
                    choice["delta"].get("content", "") if "delta" in choice else choice["text"])
            assert result.endswith("data: [DONE]\n\n") and texts == {i: "yyyyy" for i in range(answers)}
        else:
            texts = [c.get("text", c.get("message", {}).get("content")) for c in result["choices"]]
            assert texts == ["yyyyy"] * answers
        assert closed == [True] * answers and all(s.read_to_end for s in router.streams)


def test_a_streamed_answer_whose_client_left_before_its_first_event_stops_its_workers():
    """The answers are read from their workers from the start: a client gone before the stream's first event must
    still stop them (the stream's own cleanup never ran: it had not started)."""
    router = EndlessRouter()
    request = json.dumps({"model": "ckpt", "max_tokens": 8, "stream": True, "n": 2,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def run():
        response = await chat_completion(request, "", FakeRegistry(), router, None)

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await asyncio.Event().wait()  # the client never takes even the headers

        await response({"type": "http"}, receive, send)
        await asyncio.sleep(0.1)  # the readers' own tasks close their streams
        return [s.closed for s in router.streams]

    assert asyncio.run(asyncio.wait_for(run(), 10)) == [True, True]


def test_a_streamed_answer_whose_client_stopped_reading_is_dropped(monkeypatch):
    """The worker no longer sees a stalled client (its answers are read whatever the client does): the API's stream
    drops it after WRITE_TIMEOUT_S, as the worker's does, and the workers stop."""
    from palo.serve import utils as serve_utils

    monkeypatch.setattr(serve_utils, "WRITE_TIMEOUT_S", 0.2)
    router = EndlessRouter()
    request = json.dumps({"model": "ckpt", "max_tokens": 8, "stream": True,
                          "messages": [{"role": "user", "content": "hi"}]}).encode()

    async def run():
        response = await chat_completion(request, "", FakeRegistry(), router, None)
        disconnected = asyncio.Event()
        sent = []

        async def receive() -> dict:
            await disconnected.wait()  # connected until the server gives up
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message.get("body"):  # takes the headers and one event, then reads nothing more
                await asyncio.Event().wait()

        await response({"type": "http"}, receive, send)
        await asyncio.sleep(0.1)
        return sent, [s.closed for s in router.streams]

    sent, closed = asyncio.run(asyncio.wait_for(run(), 10))
    assert sent[0]["status"] == 200 and closed == [True]


def test_null_means_not_given_for_the_streaming_and_length_fields():
    """OpenAI's schema lets ``stream``, ``stream_options.include_usage`` and both length fields be null (the official
    client sends ``stream: null`` for ``stream=None``); they were refused, and a null ``max_completion_tokens`` hid
    ``max_tokens`` (256 tokens instead of 3)."""
    done = [{"text": "", "error_code": 0, "finish_reason": "stop"}]
    base = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}]}
    status, body, sent = _call(chat_completion, {**base, "stream": None, "max_tokens": 3,
                                                 "max_completion_tokens": None}, done)
    assert status == 200 and body["object"] == "chat.completion" and sent[0]["max_new_tokens"] == 3
    status, chunks, sent = _call(chat_completion, {**base, "stream": True, "stream_options": {"include_usage": None},
                                                   "max_completion_tokens": 5, "max_tokens": None}, done)
    assert status == 200 and all(c["choices"] for c in chunks) and sent[0]["max_new_tokens"] == 5
    assert _call(text_completion, {"model": "ckpt", "prompt": "x", "stream": None}, done)[0] == 200
    status, body, _ = _call(chat_completion, {**base, "max_completion_tokens": 0, "max_tokens": 3}, done)
    assert status == 400 and body["error"]["param"] == "max_completion_tokens"  # the field that was wrong
    for bad in (1, 0, "yes"):  # a boolean, not a number that equals one
        status, body, _ = _call(chat_completion, {**base, "stream": True, "stream_options": {"include_usage": bad}},
                                done)
        assert status == 400 and body["error"]["param"] == "stream_options", bad


def test_tool_calls_in_the_history_are_refused_as_tools_are():
    """An assistant message holding only tool calls was rendered as an empty answer: the model saw none of them."""
    for call in ({"tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                 {"function_call": {"name": "f", "arguments": "{}"}}):
        messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, **call},
                    {"role": "user", "content": "and?"}]
        status, body, sent = _call(chat_completion, {"model": "ckpt", "messages": messages}, [])
        assert status == 400 and "is not supported by this server" in body["error"]["message"] and sent == []
    done = [{"text": "", "error_code": 0, "finish_reason": "stop"}]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "tool_calls": []},
                {"role": "user", "content": "and?"}]
    assert _call(chat_completion, {"model": "ckpt", "messages": messages}, done)[0] == 200  # empty: nothing asked


def test_image_placeholder_text_in_a_chat_message_is_refused_by_name():
    """The text ``<image>`` would be taken for an image's place (the prompt carries images as that text): the
    request failed with a count of placeholders its sender never wrote."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    for messages in ([{"role": "user", "content": "what does <image> mean in HTML?"}],
                     [{"role": "user", "content": [image, {"type": "text", "text": "is this an <image>?"}]}],
                     [{"role": "system", "content": "answer about each <image>"}, {"role": "user", "content": "hi"}],
                     [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"},
                      {"role": "user", "content": "and?"}]):
        status, body, sent = _call(chat_completion, {"model": "ckpt", "messages": messages}, [])
        assert status == 400 and body["error"]["param"] == "messages" and sent == [], messages
        assert "holds '<image>'" in body["error"]["message"] and "image_url part" in body["error"]["message"]


def test_a_completion_prompt_too_long_names_the_prompt_and_the_sampled_token_is_among_its_alternatives():
    too_long = [{"text": "", "error_code": 1, "error_type": "context_length_exceeded", "detail": "600 > 512"}]
    status, body, _ = _call(text_completion, {"model": "ckpt", "prompt": "x"}, too_long)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and body["error"]["param"] == "prompt"
    status, body, _ = _call(chat_completion, {"model": "ckpt", "messages": [{"role": "user", "content": "x"}]},
                            too_long)
    assert status == 400 and body["error"]["param"] == "messages"
    sampled = {"token": " cat", "logprob": -1.5, "bytes": list(b" cat"),
               "top_logprobs": [{"token": " dog", "logprob": -0.3, "bytes": list(b" dog")}]}
    status, body, _ = _call(text_completion, {"model": "ckpt", "prompt": "x", "logprobs": 1}, [
        {"text": " cat", "error_code": 0, "logprobs": [sampled], "finish_reason": "length",
         "usage": {"prompt_tokens": 1, "completion_tokens": 1}}])
    assert status == 200 and body["choices"][0]["logprobs"]["top_logprobs"] == [{" dog": -0.3, " cat": -1.5}]


def test_an_answer_opened_before_a_later_one_fails_at_once_is_closed():
    """The second open of a request failed without waiting (its model's worker left the registry): the first
    answer's reader was cancelled before it ever ran, so its worker stream was never closed (generating for
    nobody, its pooled connection held)."""

    class SecondFails(ChoiceRouter):
        async def open(self, model: str, body: bytes | tuple[bytes, ...]):
            if self.streams:
                raise NoWorkerError(model)
            return await super().open(model, body)

    router = SecondFails(lambda seed: "x" * 50)
    body = json.dumps({"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "n": 2}).encode()

    async def run():
        response = await chat_completion(body, "", FakeRegistry(), router, None)
        return response.status_code, [s.closed for s in router.streams]

    assert asyncio.run(run()) == (404, [True])


def test_messages_a_template_cannot_render_are_400_not_500():
    """A LLaMA-2 template refuses a first user message without text with a ValueError, which escaped the route as a
    500 (only a worker that reports such a template could send it there)."""

    class Llama2Registry(FakeRegistry):
        def conv_mode(self, model_name):
            return "llava_llama_2"

    router = FakeRouter(FakeStream())
    body = {"model": "ckpt", "messages": [{"role": "user", "content": ""}]}
    response = asyncio.run(chat_completion(json.dumps(body).encode(), "", Llama2Registry(), router, None))
    error = json.loads(response.body)["error"]
    assert response.status_code == 400 and error["param"] == "messages"
    assert "llava_llama_2 template cannot render" in error["message"] and router.bodies == []


class OneFailsRouter:
    """The first answer's worker fails after a piece; every other answer is still being generated (endless)."""

    def __init__(self) -> None:
        self.streams: list[FakeStream] = []

    async def open(self, model: str, body: bytes | tuple[bytes, ...]):
        if self.streams:
            self.streams.append(EndlessStream())
        else:
            self.streams.append(FakeStream([{"text": "hi" + "x", "error_code": 0}],
                                           fail=ConnectionResetError("worker went away")))
        return self.streams[-1]


def test_a_whole_answer_fails_as_soon_as_one_of_its_answers_fails():
    """The answers were all gathered before their errors were looked at: the client got its 502 only once the
    slowest answer was complete, and that answer was generated in full for nobody (a streamed request already
    ended at the error)."""
    for endpoint, body, answers in ((chat_completion, {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 3),
                                    (text_completion, {"prompt": ["a", "b"], "n": 2}, 4)):
        router = OneFailsRouter()
        request = json.dumps({"model": "ckpt", "max_tokens": 8, **body}).encode()

        async def run(endpoint=endpoint, request=request, router=router):
            response = await endpoint(request, "", FakeRegistry(), router, None)
            return response, [s.closed for s in router.streams]  # before the loop's shutdown closes what is left

        response, closed = asyncio.run(asyncio.wait_for(run(), 10))  # the endless answers never end by themselves
        assert response.status_code == 502 and "worker went away" in json.loads(response.body)["error"]["message"]
        assert len(router.streams) == answers and closed == [True] * answers
