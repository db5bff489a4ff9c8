"""Benchmark: serving under load through the OpenAI-compatible API, paged engine against the static baseline.

Starts a controller and one model worker on the same checkpoint twice, once with ``--engine static`` (the previous
worker: static batches through ``model.generate``) and once with the default paged engine (continuous batching),
and sends each the same load: ``--requests`` streaming chat completions arriving as a Poisson process at
``--rate`` per second, mixed languages, one image each, answer budgets drawn from ``--min-tokens`` to
``--max-tokens``, greedy. Measured per run: requests/s (requests / time from first arrival to last answer), answer
tokens/s (the API's usage counts over the same time), time to first token p50/p99, inter-token latency p50/p99
(between streamed chunks), failures. Equal work is checked: every greedy answer must be the same in both runs.

Requests/s measures a server only when requests arrive faster than it completes them; below that both servers
finish requests as they arrive and the ratio is 1 whatever they are. So each ``--rate`` given is run in turn: the
default pair is a light load (12/s, which both keep up with on the 2-core CPU at tiny shapes, where time to first
token is what differs) and a saturating one (100/s: the 48 requests arrive within about half a second).

    python scripts/bench/serve_load.py                                  # tiny random checkpoint, CPU
    python scripts/bench/serve_load.py --model-path MBZUAI/PALO-7B --device cuda --requests 200 --rate 8 32
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import pathlib
import random
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from palo.serve.utils import sse_lines  # noqa: E402
from scripts.bench.serve_batching import QUESTIONS, build_tiny_checkpoint, free_port  # noqa: E402


def image_url(i: int) -> str:
    image = Image.new("RGB", (320, 240), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20 + 7 * (i % 20), 20, 160, 160), fill=("red", "green", "blue", "orange", "purple")[i % 5])
    draw.rectangle((180, 40 + i % 50, 300, 200), fill=("black", "yellow", "pink")[i % 3])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def workload(args: argparse.Namespace) -> list[dict]:
    """The same arrivals, questions, images and budgets for both runs."""
    rng = random.Random(args.seed)
    t = 0.0
    items = []
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        items.append({
            "at": t,
            "max_tokens": rng.randint(args.min_tokens, args.max_tokens),
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url(i)}},
                {"type": "text", "text": QUESTIONS[rng.randrange(len(QUESTIONS))]},
            ]}],
        })
    return items


async def one(client: httpx.AsyncClient, url: str, model: str, item: dict, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + item["at"] - time.perf_counter()))
    sent = time.perf_counter()
    body = {"model": model, "messages": item["messages"], "max_tokens": item["max_tokens"], "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    stamps: list[float] = []
    text = ""
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {(await response.aread())[:200]!r}", "sent": sent}
            async for line in sse_lines(response.aiter_bytes()):
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": str(chunk["error"]), "sent": sent}
                tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                delta = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if delta:
                    stamps.append(time.perf_counter())
                    text += delta
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "sent": sent}
    end = time.perf_counter()
    return {"text": text, "tokens": tokens, "sent": sent, "end": end,
            "ttft": (stamps[0] - sent) if stamps else end - sent, "itl": [b - a for a, b in zip(stamps, stamps[1:])]}


def start_services(args: argparse.Namespace, model_path: str, engine: str, logdir: str):
    cport, wport = free_port(), free_port()
    curl, wurl = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{wport}"
    env = dict(os.environ, HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"), PALO_LOGDIR=logdir)
    controller = subprocess.Popen([sys.executable, str(REPO / "palo/serve/controller.py"), "--host", "127.0.0.1",
                                   "--port", str(cport)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    worker_cmd = [sys.executable, str(REPO / "palo/serve/model_worker.py"), "--host", "127.0.0.1", "--port", str(wport),
                  "--worker-address", wurl, "--controller-address", curl, "--model-path", model_path,
                  "--model-name", "bench", "--device", args.device, "--engine", engine,
                  "--limit-model-concurrency", str(args.concurrency), "--heart-beat-interval", "2"]
    if engine == "static":
        worker_cmd += ["--max-batch-size", str(args.static_batch)]
    else:
        worker_cmd += ["--max-num-seqs", str(args.concurrency)]
    worker = subprocess.Popen(worker_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + args.start_timeout
    while True:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited: {worker.stderr.read().decode()[-2000:]}")
        try:
            if "bench" in httpx.get(curl + "/v1/models", timeout=1).text:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("services did not start")
        time.sleep(0.3)
    return curl, [controller, worker]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run(args: argparse.Namespace, model_path: str, engine: str, items: list[dict]) -> dict:
    with tempfile.TemporaryDirectory() as logdir:
        url, procs = start_services(args, model_path, engine, logdir)
        try:
            async def drive() -> list[dict]:
                limits = httpx.Limits(max_connections=args.requests + 4)
                async with httpx.AsyncClient(timeout=600, limits=limits) as client:
                    await one(client, url, "bench", {**items[0], "at": 0.0}, time.perf_counter())  # warm-up
                    start = time.perf_counter()
                    results = await asyncio.gather(*(one(client, url, "bench", item, start) for item in items))
                    return [dict(r, start=start) for r in results]

            results = asyncio.run(drive())
        finally:
            for proc in procs:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
    ok = [r for r in results if "error" not in r]
    start = results[0]["start"]
    elapsed = max(r["end"] for r in ok) - start if ok else float("nan")
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok]
    return {
        "engine": engine, "seconds": elapsed, "requests_per_s": len(ok) / elapsed, "failures": len(results) - len(ok),
        "tokens_per_s": sum(r["tokens"] for r in ok) / elapsed,
        "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99),
        "itl_p50": percentile(itl, 0.5), "itl_p99": percentile(itl, 0.99),
        "texts": [r.get("text") for r in results], "errors": [r["error"] for r in results if "error" in r][:3],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="checkpoint (default: a random tiny one, built here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--rate", type=float, nargs="+", default=[12.0, 100.0],
                        help="mean arrivals per second (Poisson); each value is a run of both servers")
    parser.add_argument("--min-tokens", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=32, help="the worker's --limit-model-concurrency")
    parser.add_argument("--static-batch", type=int, default=8,
                        help="the static engine's --max-batch-size (its default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=600.0)
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path or build_tiny_checkpoint(tmp)
        for rate in args.rate:
            ok &= compare(argparse.Namespace(**{**vars(args), "rate": rate}), model_path)
    return 0 if ok else 1


def compare(args: argparse.Namespace, model_path: str) -> bool:
    """Both servers under one load; prints their figures and returns whether every answer matched, without
    failures."""
    items = workload(args)
    static = run(args, model_path, "static", items)
    paged = run(args, model_path, "paged", items)
    same = sum(a == b and a is not None for a, b in zip(static["texts"], paged["texts"]))
    print(f"{args.requests} requests, Poisson {args.rate}/s, {args.min_tokens}-{args.max_tokens} new tokens, "
          f"1 image each, device {args.device}")
    print(f"{'engine':<8} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} "
          f"{'fail':>5}")
    for r in (static, paged):
        print(f"{r['engine']:<8} {r['requests_per_s']:7.2f} {r['tokens_per_s']:8.0f} {r['ttft_p50'] * 1e3:7.0f}ms "
              f"{r['ttft_p99'] * 1e3:7.0f}ms {r['itl_p50'] * 1e3:6.1f}ms {r['itl_p99'] * 1e3:6.1f}ms "
              f"{r['failures']:5d}")
        for error in r["errors"]:
            print(f"  {r['engine']} error: {error}")
    print(f"paged / static: requests/s {paged['requests_per_s'] / static['requests_per_s']:.2f}x, "
          f"median TTFT {static['ttft_p50'] / paged['ttft_p50']:.2f}x lower; "
          f"same greedy answers: {same}/{args.requests}", flush=True)
    return same == args.requests and not static["failures"] and not paged["failures"]


if __name__ == "__main__":
    sys.exit(main())
