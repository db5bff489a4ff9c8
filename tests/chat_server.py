"""A scripted OpenAI-compatible chat server for client tests (real sockets, stdlib ``http.server``).

Each request gets the next response of the script (the last one repeats), or what a ``respond`` function makes of
its body. A response is ``(status, body, headers)``: a 200 with a string body is a chat completion with that reply, a
200 with a dict body is sent as it is (a malformed completion), any other status is an OpenAI error body with that
message. Every request body is recorded; a path other than ``/v1/chat/completions`` (or the ``path`` given) is a
404.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Response = tuple[int, Any, dict[str, str]]


def reply(text: str) -> Response:
    return 200, text, {}


class ChatServer:
    """Start with :meth:`start` (or use as a context manager); ``base_url`` is ``http://127.0.0.1:<port>/v1``.

    Args:
        script: The responses, in order.
        respond: Makes each response from the request body instead (called in the server's threads).
        path: The route served (another endpoint of the API, e.g. ``/v1/moderations``).
    """

    def __init__(self, *script: Response, respond: Callable[[dict[str, Any]], Response] | None = None,
                 path: str = "/v1/chat/completions") -> None:
        self.path = path
        self.script: list[Response] = list(script) or [reply("ok")]
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def _next(self, body: dict[str, Any]) -> Response:
        with self._lock:
            self.requests.append(body)
            if self.respond is None:
                return self.script.pop(0) if len(self.script) > 1 else self.script[0]
        return self.respond(body)

    def start(self) -> ChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out or was killed and hung up: expected in those tests

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/") != server.path:
                    status, content, headers = 404, f"no route {self.path}", {}
                else:
                    status, content, headers = server._next(body)
                if status == 200 and isinstance(content, str):
                    payload: Any = {
                        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                    }
                elif status == 200:
                    payload = content
                else:
                    payload = {"error": {"message": content, "type": "server_error", "code": status}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> ChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
