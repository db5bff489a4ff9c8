"""Benchmark: model-worker throughput with request batching against one request at a time, same machine.

Starts a real model worker process (``--no-register``) twice on the same checkpoint: once with
``--max-batch-size N`` and once with ``--max-batch-size 1``. Each time it sends one warm-up request and then
``--requests`` concurrent streaming requests (one image each, greedy, ``--max-new-tokens``) over HTTP and measures
the wall time until the last one ends. Printed: requests/s and generated tokens/s of both and the ratio
batched / one-at-a-time (above 1: batching is faster). Equal work is checked: greedy answers must be identical.

    python scripts/bench/serve_batching.py                                   # tiny random checkpoint, CPU
    python scripts/bench/serve_batching.py --model-path MBZUAI/PALO-7B --device cuda --requests 32
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from palo.serve.protocol import iter_chunks  # noqa: E402

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions.")
QUESTIONS = ["What is in this image?", "ما الذي في هذه الصورة؟", "这张图片里有什么？", "Qu'y a-t-il sur cette image ?",
             "¿Qué hay en esta imagen?", "Что на этом изображении?", "この画像には何がありますか？",
             "इस तस्वीर में क्या है?", "এই ছবিতে কী আছে?", "اس تصویر میں کیا ہے؟"]


def build_tiny_checkpoint(root: str) -> str:
    """A random tiny PALO checkpoint (the test-suite shapes), written to ``root``."""
    from palo.testing import tiny

    tokenizer = tiny.train_sentencepiece(os.path.join(root, "tok"))
    tiny.save_tiny_clip(os.path.join(root, "clip"))
    config = tiny.palo_config_dict(tiny.tiny_llama_config(len(tokenizer)), os.path.join(root, "clip"))
    model = tiny.build_palo_model(config, os.path.join(root, "clip"), seed=1)
    return tiny.write_full_checkpoint(os.path.join(root, "palo_tiny"), model, config, os.path.join(root, "tok"))


def image_b64(i: int) -> str:
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20 + 7 * i, 20, 160, 160), fill=("red", "green", "blue", "orange")[i % 4])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, i: int, max_new_tokens: int) -> tuple[str, int]:
    body = {"prompt": f"{SYSTEM} USER: <image>\n{QUESTIONS[i % len(QUESTIONS)]} ASSISTANT:", "images": [image_b64(i)],
            "temperature": 0, "max_new_tokens": max_new_tokens, "stop": "</s>"}
    with httpx.stream("POST", url + "/worker_generate_stream", json=body, timeout=600) as response:
        chunks = list(iter_chunks(response.iter_bytes()))
    last = chunks[-1]
    if last["error_code"] != 0:
        raise RuntimeError(last["text"])
    return last["text"][len(body["prompt"]):], last.get("usage", {}).get("completion_tokens", 0)


def run(args: argparse.Namespace, model_path: str, batch_size: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, str(REPO / "palo/serve/model_worker.py"), "--host", "127.0.0.1", "--port", str(port),
           "--worker-address", url, "--no-register", "--model-path", model_path, "--device", args.device,
           "--limit-model-concurrency", str(max(args.requests, 1)), "--max-batch-size", str(batch_size),
           "--batch-wait-ms", str(args.batch_wait_ms)]
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), PALO_LOGDIR=tempfile.gettempdir())
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                httpx.post(url + "/worker_get_status", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise TimeoutError("worker did not start") from None
                time.sleep(0.2)
        one_request(url, 0, args.max_new_tokens)  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            results = list(pool.map(lambda i: one_request(url, i, args.max_new_tokens), range(args.requests)))
        elapsed = time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    tokens = sum(n for _, n in results)
    return {"seconds": elapsed, "requests_per_s": args.requests / elapsed, "tokens_per_s": tokens / elapsed,
            "tokens": tokens, "texts": [t for t, _ in results]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="checkpoint (default: a random tiny one, built here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=16, help="concurrent requests")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path or build_tiny_checkpoint(tmp)
        batched = run(args, model_path, args.max_batch_size)
        single = run(args, model_path, 1)
    same = batched["texts"] == single["texts"]
    print(f"{args.requests} concurrent requests, {args.max_new_tokens} max new tokens, device {args.device}")
    print(f"{'mode':<22} {'seconds':>8} {'req/s':>8} {'tok/s':>9} {'tokens':>7}")
    for name, r in ((f"batched (max {args.max_batch_size})", batched), ("one at a time", single)):
        print(f"{name:<22} {r['seconds']:8.2f} {r['requests_per_s']:8.2f} {r['tokens_per_s']:9.1f} {r['tokens']:7d}")
    print(f"throughput ratio batched / one-at-a-time: {batched['tokens_per_s'] / single['tokens_per_s']:.2f}x "
          f"(same greedy answers: {same})")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
