"""The OpenAI-backed worker against a real OpenAI-compatible backend: this project's own API serving the tiny model.

Processes (all on 127.0.0.1, always killed): a *backend* controller with its OpenAI API (API key) and a native
model worker of the tiny checkpoint; a *front* controller with the OpenAI-backed worker, which reaches the model
only through the backend's ``/v1``. Greedy answers through the front must equal the backend worker's own, which
holds only if the worker turns the protocol prompt into messages the backend renders back to the same prompt.
"""

from __future__ import annotations

import json
import os
import sys

import httpx
import pytest
from serve_helpers import (
    HEART_BEAT_EXPIRATION,
    HEART_BEAT_INTERVAL,
    START_TIMEOUT,
    SYSTEM,
    Service,
    free_port,
    image_b64,
    make_image,
    wait_until,
)

from palo.conversation import conv_templates
from palo.serve.openai_worker import PromptFormatError, prompt_to_messages
from palo.serve.protocol import iter_chunks

BACKEND_KEY = "backend-secret"
MODEL = "ckpt"


@pytest.fixture(scope="module")
def stack(world, tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("openai_worker_logs"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PALO_LOGDIR=logdir,
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    bport, wport, fport, oport = (free_port() for _ in range(4))
    url = lambda port: f"http://127.0.0.1:{port}"  # noqa: E731
    beat = ["--heart-beat-interval", str(HEART_BEAT_INTERVAL)]
    services = {
        "backend": Service("backend", [sys.executable, "palo/serve/controller.py", "--host", "127.0.0.1", "--port",
                                       str(bport), "--api-key", BACKEND_KEY], os.path.join(logdir, "backend.out"), env,
                           url=url(bport)),
        "backend_worker": Service("backend_worker", [
            sys.executable, "palo/serve/model_worker.py", "--host", "127.0.0.1", "--port", str(wport),
            "--controller", url(bport), "--worker", url(wport), "--model-path", world.full_dir, "--model-name", MODEL,
            "--device", "cpu", *beat], os.path.join(logdir, "backend_worker.out"), env, url=url(wport)),
        "front": Service("front", [
            sys.executable, "palo/serve/controller.py", "--host", "127.0.0.1", "--port", str(fport),
            "--heart-beat-expiration", str(HEART_BEAT_EXPIRATION)], os.path.join(logdir, "front.out"), env,
            url=url(fport)),
        "openai_worker": Service("openai_worker", [
            sys.executable, "palo/serve/openai_worker.py", "--host", "127.0.0.1", "--port", str(oport),
            "--controller", url(fport), "--worker", url(oport), "--api-base", url(bport) + "/v1",
            "--api-key", BACKEND_KEY, "--model-name", MODEL, *beat], os.path.join(logdir, "openai_worker.out"), env,
            url=url(oport)),
    }
    try:
        for service in services.values():
            service.start()

        def ready() -> bool:
            for service in services.values():
                if not service.alive():
                    raise RuntimeError(f"{service.name} exited early:\n{service.log()[-3000:]}")
            return httpx.post(url(fport) + "/list_models", timeout=2).json()["models"] == [MODEL]

        wait_until(ready, START_TIMEOUT, "the backend and the OpenAI-backed worker")
        yield services
    finally:
        for service in reversed(list(services.values())):
            service.kill()


def _stream(url: str, payload: dict) -> list[dict]:
    with httpx.stream("POST", url + "/worker_generate_stream", json=payload, timeout=60) as response:
        return list(iter_chunks(response.iter_bytes()))


def _conversation_prompt() -> str:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message("USER", "<image>\nइस चित्र में क्या है?")
    conv.append_message("ASSISTANT", "一个红色的圆。")
    conv.append_message("USER", "¿Y de qué color es el cuadrado?")
    conv.append_message("ASSISTANT", None)
    return conv.get_prompt()


def test_prompt_to_messages_round_trips_and_refuses_what_it_cannot_send():
    image = image_b64()
    messages = prompt_to_messages(_conversation_prompt(), [image], "vicuna_v1")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][0]["image_url"]["url"] == "data:image/png;base64," + image
    assert messages[0]["content"][1] == {"type": "text", "text": "इस चित्र में क्या है?"}
    shouted = "DATA:IMAGE/PNG;BASE64," + image  # a data URL whatever its case, not wrapped in a second one
    assert prompt_to_messages(_conversation_prompt(), [shouted], "vicuna_v1")[0]["content"][0]["image_url"]["url"] == (
        shouted)
    url = "https://example.com/cat.png"  # a URL goes on as it came: fetching it is the backend's to allow
    assert prompt_to_messages(_conversation_prompt(), [url], "vicuna_v1")[0]["content"][0]["image_url"]["url"] == url
    custom = "Answer in one word."
    with_system = prompt_to_messages(f"{custom} USER: hi ASSISTANT:", [], "vicuna_v1")
    assert with_system[0] == {"role": "system", "content": custom}
    with pytest.raises(PromptFormatError, match="placeholders"):
        prompt_to_messages(_conversation_prompt(), [], "vicuna_v1")
    with pytest.raises(PromptFormatError, match="front"):
        prompt_to_messages(f"{SYSTEM} USER: what is this?\n<image> ASSISTANT:", [image], "vicuna_v1")
    with pytest.raises(PromptFormatError, match="open"):
        prompt_to_messages(f"{SYSTEM} USER: hi ASSISTANT: hello", [], "vicuna_v1")
    with pytest.raises(PromptFormatError):
        prompt_to_messages("### Human: hi ### Assistant:", [], "vicuna_v1")


def test_streams_through_the_controller_like_the_backend_worker(stack):
    payload = {"model": MODEL, "prompt": _conversation_prompt(), "images": [image_b64(make_image("green"))],
               "temperature": 0, "max_new_tokens": 12, "stop": "</s>"}
    through_front = _stream(stack["front"].url, payload)
    direct = _stream(stack["backend_worker"].url, payload)
    assert all(c["error_code"] == 0 for c in through_front), through_front[-1]
    assert all(c["text"].startswith(payload["prompt"]) for c in through_front)  # cumulative, prompt included
    assert len(through_front) > 2  # really streamed, not one final chunk
    assert through_front[-1]["text"] == direct[-1]["text"]
    assert len(direct[-1]["text"]) > len(payload["prompt"])
    assert through_front[-1]["finish_reason"] == direct[-1]["finish_reason"]
    # The tiny random model's greedy text barely depends on the prompt, so also require the backend to have counted
    # exactly the prompt the native worker counted (text and image positions): dropping the history or the image
    # changes it.
    counts = ("prompt_tokens", "completion_tokens")  # cached_tokens: the backend's API here does not report it
    assert [through_front[-1]["usage"][k] for k in counts] == [direct[-1]["usage"][k] for k in counts]
    status = httpx.post(stack["openai_worker"].url + "/worker_get_status", timeout=5).json()
    assert status["model_names"] == [MODEL] and status["backend"]["reachable"] is True


def test_streams_through_the_front_openai_api(stack):
    body = {"model": MODEL, "temperature": 0, "max_tokens": 10, "stream": True, "messages": [
        {"role": "user", "content": [{"type": "image_url",
                                      "image_url": {"url": "data:image/png;base64," + image_b64()}},
                                     {"type": "text", "text": "Что на изображении?"}]}]}
    deltas = []
    with httpx.stream("POST", stack["front"].url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                deltas.extend(c["delta"].get("content", "") for c in event["choices"])
    direct = httpx.post(stack["backend"].url + "/v1/chat/completions", json=dict(body, stream=False), timeout=60,
                        headers={"Authorization": f"Bearer {BACKEND_KEY}"}).json()
    assert "".join(deltas) == direct["choices"][0]["message"]["content"] != ""


def test_seed_top_k_and_penalties_reach_the_backend(stack):
    """A seeded, penalised sample through the front equals the backend worker's own: nothing was dropped on the way
    (without the seed the two would be independent draws; without the penalties, another answer)."""
    payload = {"model": MODEL, "prompt": _conversation_prompt(), "images": [image_b64(make_image("blue"))],
               "temperature": 1.0, "max_new_tokens": 16, "stop": "</s>", "seed": 5, "top_k": 8,
               "frequency_penalty": 1.5, "presence_penalty": -0.5, "repetition_penalty": 1.4}
    through_front = _stream(stack["front"].url, payload)[-1]
    direct = [_stream(stack["backend_worker"].url, changed)[-1]["text"] for changed in
              (payload, dict(payload, seed=6), {k: v for k, v in payload.items() if "penalty" not in k})]
    assert through_front["error_code"] == 0, through_front
    assert through_front["text"] == direct[0]
    assert len(set(direct)) == 3  # seed and penalties each change the answer
    response = httpx.post(stack["openai_worker"].url + "/worker_generate_stream", timeout=10,
                          json=dict(payload, top_k="8"))
    assert response.status_code == 400 and "'top_k' must be an integer" in response.text
    assert json.loads(response.content.rstrip(b"\0"))["param"] == "top_k"


def test_logit_bias_goes_to_the_backend_as_it_is(stack):
    payload = {"model": MODEL, "prompt": _conversation_prompt(), "images": [image_b64(make_image("green"))],
               "temperature": 0, "max_new_tokens": 8, "stop": "</s>", "logit_bias": {"40": 100, "41": -3}}
    through_front = _stream(stack["front"].url, payload)[-1]
    direct = [_stream(stack["backend_worker"].url, changed)[-1]["text"] for changed in
              (payload, {k: v for k, v in payload.items() if k != "logit_bias"})]
    assert through_front["error_code"] == 0, through_front
    assert through_front["text"] == direct[0] != direct[1]
    response = httpx.post(stack["openai_worker"].url + "/worker_generate_stream", timeout=10,
                          json=dict(payload, logit_bias={"40": 500}))
    assert response.status_code == 400 and "'logit_bias' values must be numbers in [-100, 100]" in response.text


def test_an_answer_shape_goes_to_the_backend_as_it_was_asked(stack):
    choices = ["sí", "非", "maybe so"]
    payload = {"model": MODEL, "prompt": _conversation_prompt(), "images": [image_b64(make_image("blue"))],
               "temperature": 0, "max_new_tokens": 12, "stop": "</s>", "structured_outputs": {"choice": choices}}
    through_front = _stream(stack["front"].url, payload)[-1]
    direct = _stream(stack["backend_worker"].url, payload)[-1]
    assert through_front["error_code"] == 0 and through_front["text"] == direct["text"]
    assert direct["text"].endswith(tuple(choices))  # the cumulative text starts with the prompt
    response = httpx.post(stack["openai_worker"].url + "/worker_generate_stream", timeout=10,
                          json=dict(payload, guided_regex="a"))
    assert response.status_code == 400 and "ask for one answer shape" in response.text


def test_logprobs_come_back_through_the_backend(stack):
    payload = {"model": MODEL, "prompt": _conversation_prompt(), "images": [image_b64(make_image("red"))],
               "temperature": 0, "max_new_tokens": 12, "stop": "</s>", "logprobs": 2}
    through_front = _stream(stack["front"].url, payload)
    direct = _stream(stack["backend_worker"].url, payload)
    entries = [[e for chunk in chunks for e in chunk.get("logprobs", [])] for chunks in (through_front, direct)]
    assert len(entries[0]) == through_front[-1]["usage"]["completion_tokens"] > 0
    assert [e["token"] for e in entries[0]] == [e["token"] for e in entries[1]]
    assert [e["logprob"] for e in entries[0]] == pytest.approx([e["logprob"] for e in entries[1]], abs=1e-4)
    assert all(len(e["top_logprobs"]) == 2 for e in entries[0])
    assert not any("logprobs" in chunk for chunk in _stream(stack["front"].url, dict(payload, logprobs=None)))


def test_a_prompt_it_cannot_forward_gets_a_clear_error(stack):
    response = httpx.post(stack["openai_worker"].url + "/worker_generate_stream", timeout=10,
                          json={"prompt": "no template here", "images": [], "stop": "</s>"})
    assert response.status_code == 400
    chunk = json.loads(response.content.rstrip(b"\0"))
    assert chunk["error_code"] == 1 and "vicuna_v1" in chunk["text"] and chunk["param"] == "prompt"
    # Token-id prompts and prompt scoring cannot go through a chat API: refused by name, not answered otherwise.
    for extra in ({"prompt_token_ids": [1, 2, 3]}, {"prompt_logprobs": 1}):
        response = httpx.post(stack["openai_worker"].url + "/worker_generate_stream", timeout=10,
                              json={"prompt": "USER: hi ASSISTANT:", "images": [], "stop": "</s>", **extra})
        chunk = json.loads(response.content.rstrip(b"\0"))
        assert response.status_code == 400 and f"'{next(iter(extra))}' is not supported" in chunk["text"]
        assert chunk["param"] == next(iter(extra))
    # The front API names the field as its client sent it, as it does for the native worker's refusals.
    response = httpx.post(stack["front"].url + "/v1/completions", timeout=10,
                          json={"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 4})
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == "prompt", error
    assert "'prompt' is not supported" in error["message"]
    # Nor has it a tokenizer of its own to serve.
    response = httpx.post(stack["openai_worker"].url + "/worker_tokenize", json={"prompt": "hi"}, timeout=10)
    assert response.status_code == 501 and "no tokenizer" in response.json()["error"]


def test_backend_death_gives_a_clear_error_and_the_worker_expires(stack):
    """Last in this module: it kills the backend."""
    stack["backend"].hard_kill()
    stack["backend"].proc.wait(10)
    payload = {"model": MODEL, "prompt": f"{SYSTEM} USER: hello ASSISTANT:", "temperature": 0, "max_new_tokens": 4,
               "stop": "</s>"}
    chunks = _stream(stack["openai_worker"].url, payload)
    assert chunks[-1]["error_code"] == 1
    assert stack["backend"].url + "/v1" in chunks[-1]["text"] and "unreachable" in chunks[-1]["text"]

    def expired() -> bool:
        return httpx.post(stack["front"].url + "/list_models", timeout=2).json()["models"] == []

    wait_until(expired, HEART_BEAT_EXPIRATION * 6, "the controller to drop the worker of a dead backend")
    assert stack["openai_worker"].alive()
    # Its status is refused (a controller's refresh must not register it again), saying why.
    status = httpx.post(stack["openai_worker"].url + "/worker_get_status", timeout=5)
    assert status.status_code == 503 and status.json()["backend"]["reachable"] is False
    # Through the front controller the model is now simply unknown (error code 2), not a hang.
    chunks = _stream(stack["front"].url, payload)
    assert chunks[0]["error_code"] == 2
