"""A local OpenAI-compatible chat-completions server for judge tests (real sockets, stdlib ``http.server``).

The reply to each request is scripted per question: the server reads the question text out of the judge's user
message (the ``[Question]`` block of the protocol) and plays that question's list of responses in order, the last
one repeating. Every request is recorded, so tests can count calls per question.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (HTTP status, reply text): 200 returns the text as the assistant message, 0 sleeps float(text) seconds before
# answering with the default (to provoke a client time-out), anything else returns an OpenAI error body.
Response = tuple[int, str]

_QUESTION = re.compile(r"\[Question\]\n(.*?)\n\n\[", re.DOTALL)


class FakeJudge:
    """Start with :meth:`start`, stop with :meth:`stop`; ``base_url`` is ``http://127.0.0.1:<port>/v1``.

    Args:
        default: The response for questions without a script.
    """

    def __init__(self, default: Response = (200, "7 8\nBoth answers are fine.")) -> None:
        self.default = default
        self.scripts: dict[str, list[Response]] = {}
        self.calls: list[str] = []  # question text of every request, in arrival order
        self.models: list[str] = []
        self.contents: list[str] = []  # the full user message of every request
        self.gate_question: str | None = None  # requests for this question wait for `release`
        self.reached = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def script(self, question: str, *responses: Response) -> None:
        self.scripts[question] = list(responses)

    def count(self, question: str | None = None) -> int | Counter:
        with self._lock:
            counts = Counter(self.calls)
        return counts if question is None else counts[question]

    def reset_calls(self) -> None:
        with self._lock:
            self.calls.clear()

    def _respond(self, body: dict) -> Response:
        user = next((m["content"] for m in body.get("messages", []) if m.get("role") == "user"), "")
        match = _QUESTION.search(user)
        question = match.group(1) if match else ""
        with self._lock:
            self.calls.append(question)
            self.models.append(body.get("model", ""))
            self.contents.append(user)
            script = self.scripts.get(question)
            response = (script.pop(0) if len(script) > 1 else script[0]) if script else self.default
        if self.gate_question is not None and question == self.gate_question:
            self.reached.set()
            self.release.wait(timeout=30)
        if response[0] == 0:
            time.sleep(float(response[1]))
            return self.default
        return response

    def start(self) -> FakeJudge:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up: expected in time-out tests

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                status, text = judge._respond(body)
                if status == 200:
                    payload = {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                        "model": body.get("model", ""),
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                else:
                    payload = {"error": {"message": text, "type": "server_error", "code": status}}
                self._send(status, payload)

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
