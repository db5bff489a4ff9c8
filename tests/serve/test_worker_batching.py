"""The worker batches concurrent requests, and batching changes no answer; seen only through its public HTTP API.

Six requests (five languages, with and without an image, different lengths) are sent to the worker one at a time,
then all at once. Under the concurrent load:

* the worker's ``/worker_get_status`` counters show its engine decoded more tokens than it ran decode steps (more
  than one sequence in a step);
* the six streams advance together: their chunks arrive interleaved, many times over, where one-at-a-time
  generation would finish one stream before the next one starts (at most five switches between streams);
* every answer equals the one the same request got alone. Batching may change a logit's last bits, so an answer
  is allowed to differ only where the request's lone greedy generation (in this process, same checkpoint) was at a
  near-tie of its two best tokens (README, "Use"; :mod:`palo.testing.greedy`).
"""

from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image
from serve_helpers import image_b64, make_image, vicuna_prompt

from palo.mm_utils import process_images, tokenizer_image_token
from palo.model.builder import load_pretrained_model
from palo.serve.protocol import iter_chunks
from palo.testing.greedy import divergence_is_a_near_tie, greedy_trace

pytestmark = pytest.mark.timeout(300)

MAX_NEW_TOKENS = 24
QUESTIONS = [
    ("Describe everything you can see in this picture, please.", "red"),
    ("ما هذا الشكل؟", "green"),
    ("这张图片里有几个形状？", "black"),
    ("Что изображено на картинке и какого оно цвета?", "orange"),
    ("यह क्या है?", "blue"),
    ("¿Cuántas figuras hay? Responde en español.", None),  # text only
]


def _body(question: str, color: str | None) -> dict:
    return {"model": "ckpt", "prompt": vicuna_prompt(question, image=color is not None),
            "images": [image_b64(make_image(color))] if color else [], "temperature": 0.0, "top_p": 1.0,
            "max_new_tokens": MAX_NEW_TOKENS, "stop": "</s>"}


def _stream(url: str, body: dict, start: threading.Barrier | None = None) -> tuple[str, list[float]]:
    """The answer (the last cumulative chunk without the prompt) and each chunk's arrival time."""
    if start is not None:
        start.wait(timeout=30)
    times, chunks = [], []
    with httpx.stream("POST", url + "/worker_generate_stream", json=body, timeout=120) as response:
        assert response.status_code == 200
        for chunk in iter_chunks(response.iter_bytes()):
            times.append(time.monotonic())
            chunks.append(chunk)
    assert chunks and all(c["error_code"] == 0 for c in chunks), chunks[-1]
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    return chunks[-1]["text"][len(body["prompt"]):].strip(), times


def _switches(times: list[list[float]]) -> int:
    """How often consecutive chunks (in arrival order, over all streams) belong to different streams."""
    events = sorted((t, i) for i, ts in enumerate(times) for t in ts)
    return sum(a[1] != b[1] for a, b in zip(events, events[1:]))


def test_concurrent_requests_are_generated_together_with_their_lone_answers(cluster, world):
    url = cluster.main.url  # the worker itself, not through the controller
    bodies = [_body(q, c) for q, c in QUESTIONS]
    alone = [_stream(url, body)[0] for body in bodies]
    assert all(alone) and len(set(alone)) > 1

    def counters() -> tuple[int, int]:
        engine = httpx.post(url + "/worker_get_status", timeout=30).json()["engine"]
        return engine["decode_steps"], engine["decoded_tokens"]

    steps_before, tokens_before = counters()
    start = threading.Barrier(len(bodies))
    with ThreadPoolExecutor(len(bodies)) as pool:
        results = list(pool.map(lambda b: _stream(url, b, start), bodies))
    steps_after, tokens_after = counters()
    together = [answer for answer, _ in results]
    times = [ts for _, ts in results]

    # The engine decoded several of them in one step, by its own account: its counters, read before and after (a
    # poll of its running count raced against a run this short). One sequence per step gives tokens == steps.
    steps, tokens = steps_after - steps_before, tokens_after - tokens_before
    assert 0 < steps < tokens, f"{tokens} tokens in {steps} decode steps: never two sequences in one step"
    # ... and the streams advanced together: one at a time would give at most len - 1 switches.
    assert all(len(ts) >= 3 for ts in times), [len(ts) for ts in times]
    assert _switches(times) >= 3 * len(bodies), f"{_switches(times)} switches between streams: not interleaved"

    differing = [i for i in range(len(bodies)) if together[i] != alone[i]]
    if differing:
        _assert_only_near_ties(world, [bodies[i] for i in differing], [(alone[i], together[i]) for i in differing])


def _assert_only_near_ties(world, bodies: list[dict], answers: list[tuple[str, str]]) -> None:
    """Each differing pair of answers parts from the request's lone greedy generation only at a near-tie."""
    tokenizer, model, processor, _ = load_pretrained_model(world.full_dir, device="cpu")
    for body, pair in zip(bodies, answers):
        ids = tokenizer_image_token(body["prompt"], tokenizer, return_tensors="pt")[None]
        pixels = None
        if body["images"]:
            image = Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).convert("RGB")
            pixels = process_images([image], processor, model.config)
        trace = greedy_trace(model, ids, pixels, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=0)
        for answer in pair:
            assert divergence_is_a_near_tie(trace, answer, tokenizer), (
                f"{body['prompt'][-40:]!r}: alone {pair[0]!r}, together {pair[1]!r}; the lone greedy answer "
                f"{tokenizer.decode(trace.tokens, skip_special_tokens=True)!r} has no near-tie where they part")
