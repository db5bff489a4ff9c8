"""A local OpenAI-compatible chat-completions server for judge tests (real sockets, stdlib ``http.server``).

The reply to each request is scripted per question: the server reads the question text out of the judge's user
message (the ``[Question]`` block of the protocol) and plays that question's list of responses in order, the last
one repeating. Every request is recorded, so tests can count calls per question.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter

from chat_server import ChatServer  # tests/ is on sys.path (rootdir conftest, no packages)

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
        self._server: ChatServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return self._server.base_url

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
        self._server = ChatServer(respond=lambda body: (*self._respond(body), {})).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.stop()
