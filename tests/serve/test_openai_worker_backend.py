"""The OpenAI-backed worker's link to its backend: requests reuse kept-alive connections (a TLS session each would
cost every request a handshake), and health checks go through the worker's one HTTP client."""

from __future__ import annotations

import json
import threading

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from serve_helpers import SYSTEM, free_port, wait_until

from palo.serve.openai_worker import OpenAIWorker
from palo.serve.protocol import iter_chunks
from palo.serve.worker_base import create_app


def _serve(app: FastAPI) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "a test server")
    return f"http://127.0.0.1:{port}", server, thread


def test_requests_reuse_the_backends_connection():
    peers: list[tuple[str, int]] = []
    backend = FastAPI()

    @backend.post("/v1/chat/completions")
    async def completions(request: Request):
        peers.append((request.client.host, request.client.port))
        body = await request.json()

        def events():
            for word in ("Bonjour", " !"):
                yield f"data: {json.dumps({'choices': [{'delta': {'content': word}, 'finish_reason': None}]})}\n\n"
            done = {"choices": [{"delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
            yield f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n"

        assert body["stream"] is True
        return StreamingResponse(events(), media_type="text/event-stream")

    burl, bserver, bthread = _serve(backend)
    worker = OpenAIWorker(burl + "/v1", None, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", no_register=True)
    wurl, wserver, wthread = _serve(create_app(worker))
    try:
        payload = {"prompt": f"{SYSTEM} USER: hello ASSISTANT:", "temperature": 0, "max_new_tokens": 8}
        with httpx.Client(timeout=30) as client:
            for _ in range(3):
                response = client.post(wurl + "/worker_generate_stream", json=payload)
                chunks = list(iter_chunks(response.iter_bytes()))
                assert chunks[-1]["error_code"] == 0 and chunks[-1]["text"].endswith("ASSISTANT:Bonjour !")
        assert len(peers) == 3 and len(set(peers)) == 1  # one connection carried all three requests
    finally:
        for server, thread in ((wserver, wthread), (bserver, bthread)):
            server.should_exit = True
            thread.join(10)
        worker.stop()
