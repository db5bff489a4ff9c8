"""The worker batches concurrent requests, and batching changes no answer; seen only through its public HTTP API.

Six requests (five languages, with and without an image, different lengths) are sent to the worker one at a time,
then all at once. Under the concurrent load:

* the worker's ``/worker_get_status`` counters show its engine decoded more tokens than it ran decode steps (more
  than one sequence in a step), and many times over: at least three extra tokens per request, where one-at-a-time
  generation gives none (the server's count: when each chunk reached this test's client threads depended on how
  they were scheduled);
* each stream arrives in several chunks;
* every answer equals the one the same request got alone. Batching may change a logit's last bits, so an answer
  is allowed to differ only where the request's lone greedy generation (in this process, same checkpoint) was at a
  near-tie of its two best tokens (README, "Use"; :mod:`palo.testing.greedy`).
"""

from __future__ import annotations

import base64
import io
import threading
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


def _stream(url: str, body: dict, start: threading.Barrier | None = None) -> tuple[str, int]:
    """The answer (the last cumulative chunk without the prompt) and how many chunks it came in."""
    if start is not None:
        start.wait(timeout=30)
    chunks = []
    with httpx.stream("POST", url + "/worker_generate_stream", json=body, timeout=120) as response:
        assert response.status_code == 200
        for chunk in iter_chunks(response.iter_bytes()):
            chunks.append(chunk)
    assert chunks and all(c["error_code"] == 0 for c in chunks), chunks[-1]
    assert chunks[-1]["finish_reason"] in ("stop", "length")
    return chunks[-1]["text"][len(body["prompt"]):].strip(), len(chunks)


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
    counts = [count for _, count in results]

    # The engine decoded several of them in one step, by its own account: its counters, read before and after (a
    # poll of its running count raced against a run this short). One sequence per step gives tokens == steps.
    steps, tokens = steps_after - steps_before, tokens_after - tokens_before
    assert 0 < steps < tokens, f"{tokens} tokens in {steps} decode steps: never two sequences in one step"
    # ... and advanced together many times over: a step of k sequences decodes k - 1 tokens more than a step of
    # one. (Counted by the server: the chunks' arrival times at this test's client threads measured how those
    # threads were scheduled, and on a loaded machine a stream's chunks were read in one burst.)
    assert tokens - steps >= 3 * len(bodies), f"{tokens} tokens in {steps} steps: rarely more than one at a time"
    assert all(count >= 3 for count in counts), counts  # each streamed, not one final chunk

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
