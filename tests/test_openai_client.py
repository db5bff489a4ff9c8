"""The shared OpenAI-compatible client against a local server over real HTTP: retries, Retry-After, cache, failures."""

from __future__ import annotations

import contextlib
import email.utils
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from chat_server import ChatServer, reply  # tests/ is on sys.path (rootdir conftest, no packages)

from palo.openai_client import ChatClient, ReplyCache, RequestFailed, retry_after_seconds, retry_delay

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGES = [{"role": "user", "content": "hello"}]


def _client(server: ChatServer, waits: list[float], **kwargs) -> ChatClient:
    options = {"max_retries": 2, "backoff": 0.01, "max_backoff": 60.0, "timeout": 10.0, **kwargs}
    return ChatClient("m", api_key="k", base_url=server.base_url, sleep=waits.append, **options)


def test_retry_after_in_seconds_is_waited():
    waits: list[float] = []
    with ChatServer((429, "slow down", {"Retry-After": "7"}), reply("hi")) as server:
        completion = _client(server, waits).complete(MESSAGES)
    assert (completion.content, completion.calls, completion.cached) == ("hi", 2, False)
    assert waits == [7.0]  # the hint, not the 0.01 s backoff
    assert server.calls == 2


def test_retry_after_as_an_http_date_is_waited():
    waits: list[float] = []
    when = email.utils.formatdate(time.time() + 30, usegmt=True)  # "Wed, 21 Oct 2015 07:28:00 GMT"
    with ChatServer((503, "busy", {"Retry-After": when}), reply("hi")) as server:
        assert _client(server, waits).complete(MESSAGES).content == "hi"
    assert len(waits) == 1 and 28 <= waits[0] <= 31, waits  # HTTP dates have whole seconds


def test_retry_after_is_capped_and_milliseconds_are_read():
    waits: list[float] = []
    with ChatServer((429, "later", {"Retry-After": "3600"}), (429, "later", {"retry-after-ms": "1500"}),
                    reply("hi")) as server:
        assert _client(server, waits, max_backoff=5.0).complete(MESSAGES).content == "hi"
    assert waits == [5.0, 1.5]


@pytest.mark.parametrize("headers, expected", [
    ({"retry-after": "2.5"}, 2.5),
    ({"retry-after": "-3"}, 0.0),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # in the past: no extra wait
    ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
    ({"retry-after": "Wed, 21 Oct 2015 07:28:10 -0000"}, 10.0),  # naive after parsing, still GMT
    ({"retry-after": "soon"}, None),
    ({"retry-after": "nan"}, None),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
    ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
    ({}, None),
    (None, None),
])
def test_retry_after_parsing(headers, expected):
    now = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()
    assert retry_after_seconds(headers, now=now) == expected


def test_backoff_doubles_with_bounded_jitter_and_cap():
    for attempt in range(4):
        delay = retry_delay(attempt, 1.0, 60.0)
        assert 2 ** attempt <= delay <= 1.25 * 2 ** attempt
    assert retry_delay(10, 1.0, 60.0) == 60.0
    assert retry_delay(0, 1.0, 60.0, hint=0.0) >= 1.0  # a zero hint does not shorten the backoff


def test_retries_exhausted_raise_a_failure_record():
    waits: list[float] = []
    with ChatServer((503, "down", {})) as server:
        client = _client(server, waits)
        with pytest.raises(RequestFailed) as info:
            client.complete(MESSAGES)
    assert info.value.attempts == 3 and server.calls == 3 and len(waits) == 2
    assert "after 3 attempt(s)" in str(info.value) and "HTTP 503" in info.value.last_error
    assert client.stats["requests"] == 3 and client.stats["retries"] == 2 and client.stats["failed_requests"] == 1


def test_client_errors_are_not_retried():
    waits: list[float] = []
    with ChatServer((401, "bad key", {})) as server:
        with pytest.raises(RequestFailed) as info:
            _client(server, waits).complete(MESSAGES)
    assert info.value.attempts == 1 and server.calls == 1 and waits == []
    assert "HTTP 401" in str(info.value)


@pytest.mark.parametrize("body", [{"id": "x", "object": "chat.completion", "choices": []},
                                  {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant"}}]}])
def test_a_malformed_200_body_is_retried(body):
    waits: list[float] = []
    with ChatServer((200, body, {}), reply("hi")) as server:
        completion = _client(server, waits).complete(MESSAGES)
    assert completion.content == "hi" and completion.calls == 2 and len(waits) == 1


def test_a_200_error_body_is_retried_and_its_message_kept():
    """A proxy that answers 200 with {"error": ...} was recorded as "KeyError: 'choices'"."""
    overloaded = {"error": {"message": "upstream overloaded", "type": "server_error"}}
    waits: list[float] = []
    with ChatServer((200, overloaded, {}), reply("hi")) as server:
        assert _client(server, waits).complete(MESSAGES).calls == 2
    with ChatServer((200, overloaded, {})) as server, \
            pytest.raises(RequestFailed, match="answered 200 with an error: upstream overloaded"):
        _client(server, waits, max_retries=0).complete(MESSAGES)


def test_a_refusal_is_an_answer_not_a_malformed_body(tmp_path):
    """A 200 whose message has no content and a ``refusal`` (OpenAI's shape) was retried as malformed until the
    retries ran out: the model declines the same text the same way. It is returned at once, and never cached."""
    declined = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "I can't help with that."}}]}
    waits: list[float] = []
    with ChatServer((200, declined, {}), reply("hi")) as server:
        client = _client(server, waits, cache=ReplyCache(str(tmp_path / "cache.sqlite")))
        completion = client.complete(MESSAGES)
        assert (completion.content, completion.refusal, completion.calls) == ("", "I can't help with that.", 1)
        again = client.complete(MESSAGES)
    assert (again.content, again.refusal, again.cached) == ("hi", None, False) and waits == []


@pytest.mark.parametrize("usage", [{"total_tokens": "lots"}, {"total_tokens": -3}, {"total_tokens": [5]}, "none", None])
def test_a_good_reply_with_a_malformed_usage_is_kept_and_counts_no_tokens(usage, tmp_path):
    """usage is bookkeeping: a server that fills it wrongly must not cost the reply (a paid judge call) or the run."""
    body = {"id": "x", "object": "chat.completion", "usage": usage,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "8 9"}}]}
    with ChatServer((200, body, {})) as server:
        client = _client(server, [], cache=ReplyCache(str(tmp_path / "replies.sqlite")))
        completion = client.complete(MESSAGES)
        assert (completion.content, completion.calls) == ("8 9", 1) and client.stats["tokens"] == 0
        assert client.complete(MESSAGES).cached  # and it was cached like any good reply
    with ChatServer(reply("8 9")) as server:
        client = _client(server, [])
        client.complete(MESSAGES)
        assert client.stats["tokens"] == 5


def test_cache_hit_avoids_a_call(tmp_path):
    path = str(tmp_path / "cache" / "replies.sqlite")
    with ChatServer(reply("8 9")) as server:
        first = _client(server, [], cache=ReplyCache(path)).complete(MESSAGES)
        # A new client on the same file (a rerun): no HTTP call at all.
        cache = ReplyCache(path)
        client = _client(server, [], cache=cache)
        second = client.complete(MESSAGES)
        assert server.calls == 1
        assert (second.content, second.cached, second.calls) == ("8 9", True, 0)
        assert first.cached is False and client.stats["cache_hits"] == 1 and client.stats["requests"] == 0
        # Anything that could change the reply is part of the key: other messages are asked for.
        client.complete([{"role": "user", "content": "other"}])
        assert server.calls == 2
        cache.close()


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_reply(tmp_path, monkeypatch, capsys):
    """A full disk under the judge's SQLite cache raised from the put: the judging run ended with a traceback and
    the reviews of replies already paid for were lost."""
    import sqlite3

    cache = ReplyCache(str(tmp_path / "replies.sqlite"))
    writes = []

    def full(sql, params):
        writes.append(sql)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(cache, "_write", full)
    with ChatServer(reply("8 9")) as server:
        client = _client(server, [], cache=cache)
        assert client.complete(MESSAGES).content == "8 9"
        assert client.complete([{"role": "user", "content": "other"}]).content == "8 9"
        assert server.calls == 2
    assert len(writes) == 1  # said once, then not tried for every reply
    err = capsys.readouterr().err
    assert err.count("cannot be written (database or disk is full): replies are used but no longer cached") == 1
    cache.close()


def _open_and_write(path: str, barrier, i: int) -> None:
    """One process of the race below: open the shared cache with the others, then write to it."""
    barrier.wait()
    cache = ReplyCache(path)
    cache.put(f"key-{i}", "m", f"reply {i}")
    cache.close()


def _write_lock(path: str):
    """Another connection holding a write lock on ``path`` (a process in the middle of creating the table)."""
    import sqlite3

    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    return other


def test_a_fresh_cache_opened_by_several_processes_at_once_opens_in_each(tmp_path):
    """Two judge or translate runs started together on one --cache: a few percent of the processes opening a fresh
    file at the same instant died with "database is locked" from PRAGMA journal_mode=WAL, which SQLite refuses at
    once, without the busy time-out, while another connection holds a write lock (as one creating the table does).
    Every other trial holds such a lock for a moment while the processes open the file, so the old code fails each
    of those, not only by chance."""
    import multiprocessing
    import sqlite3

    context = multiprocessing.get_context("fork")
    processes = 4
    for trial in range(12):
        path = str(tmp_path / f"{trial}.sqlite")
        barrier = context.Barrier(processes + 1)  # this process lets them go
        racers = [context.Process(target=_open_and_write, args=(path, barrier, i)) for i in range(processes)]
        for racer in racers:
            racer.start()
        # Taken after the fork: a child inherits SQLite's in-process lock state, and would wait for it for ever.
        lock = _write_lock(path) if trial % 2 == 0 else None
        barrier.wait()
        if lock is not None:
            time.sleep(0.15)  # the racers meet the lock
            lock.rollback()
            lock.close()
        for racer in racers:
            racer.join(60)
        assert [racer.exitcode for racer in racers] == [0] * processes, f"trial {trial}"
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert db.execute("SELECT count(*) FROM replies").fetchone() == (processes,)


def test_opening_a_cache_waits_for_a_write_lock_only_as_long_as_the_time_out(tmp_path, monkeypatch):
    """The switch to WAL is retried while another connection holds the file, and gives up after the busy time-out,
    as a statement would."""
    import sqlite3

    path = str(tmp_path / "replies.sqlite")
    lock = _write_lock(path)
    threading.Timer(0.3, lock.rollback).start()
    began = time.monotonic()
    cache = ReplyCache(path)
    assert time.monotonic() - began >= 0.25
    cache.put("k", "m", "8 9")
    assert cache.get("k") == "8 9"
    cache.close()
    lock.close()

    path = str(tmp_path / "held.sqlite")
    lock = _write_lock(path)
    monkeypatch.setattr(ReplyCache, "TIMEOUT", 0.3)
    began = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        ReplyCache(path)
    assert 0.25 <= time.monotonic() - began < 5
    lock.close()


def test_rejected_replies_are_not_cached_and_stale_entries_are_asked_again(tmp_path):
    path = str(tmp_path / "replies.sqlite")
    with ChatServer(reply("no scores here"), reply("7 7")) as server:
        client = _client(server, [], cache=ReplyCache(path))
        accept = lambda text: text[0].isdigit()  # noqa: E731 - a one-line check
        assert client.complete(MESSAGES, accept=accept).content == "no scores here"  # returned, not cached
        assert client.complete(MESSAGES, accept=accept).content == "7 7"
        assert client.complete(MESSAGES, accept=accept).cached
        assert server.calls == 2
        # A cached reply the caller's check no longer takes is asked for again.
        strict = _client(server, [], cache=ReplyCache(path))
        strict.complete(MESSAGES, accept=lambda text: text == "something else")
        assert server.calls == 3


def test_the_shared_modules_import_neither_torch_nor_openai():
    """Both are loaded from their files, outside the ``palo`` package, so only their own imports count."""
    code = (
        "import importlib.util, sys\n"
        "for name in ('openai_client', 'jsonl'):\n"
        "    spec = importlib.util.spec_from_file_location('iso_' + name, f'palo/{name}.py')\n"
        "    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        "heavy = sorted(m for m in ('torch', 'openai', 'transformers', 'palo') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


GOOD_BODY = json.dumps({"choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": "hi"}}]}).encode()


@contextlib.contextmanager
def _raw_server(answer: Callable[[BaseHTTPRequestHandler, int], None]) -> Iterator[str]:
    """A server whose ``answer(handler, call)`` writes each response itself (call 1, 2 ...), for faults the
    scripted ChatServer cannot make; yields its base URL."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:  # noqa: N802 - http.server naming
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            calls.append(1)
            try:
                answer(self, len(calls))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up, as it should

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


def _headers(handler: BaseHTTPRequestHandler, length: int) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(length))
    handler.end_headers()


def test_a_body_dripped_a_byte_at_a_time_times_out_as_a_whole_and_is_retried():
    """The time-out bounded each read: a server dripping its body a byte every 0.1 s (a stuck backend behind a proxy
    that keeps the connection alive) held the request, and a translation or judging run, for as long as it dripped.
    The whole body must come within the time-out; a late one is a time-out, retried as others are."""

    def answer(handler: BaseHTTPRequestHandler, call: int) -> None:
        dripped = call == 1  # the first answer: 10 s of spaces, a byte every 0.1 s, before the reply
        body = b" " * 100 + GOOD_BODY if dripped else GOOD_BODY
        _headers(handler, len(body))
        for piece in ([body[k:k + 1] for k in range(len(body))] if dripped else [body]):
            handler.wfile.write(piece)
            handler.wfile.flush()
            time.sleep(0.1 if dripped else 0)

    with _raw_server(answer) as base_url:
        waits: list[float] = []
        client = ChatClient("m", api_key="k", base_url=base_url, sleep=waits.append, max_retries=2, backoff=0.01,
                            timeout=1.0)
        started = time.monotonic()
        completion = client.complete(MESSAGES)
        assert completion.content == "hi" and completion.calls == 2 and time.monotonic() - started < 5
        assert client.stats["retries"] == 1


@pytest.mark.parametrize("fault", ["dropped", "silent"])
def test_a_body_cut_off_or_never_sent_after_the_headers_is_retried(fault):
    """The body is read after the SDK returned the response: a connection dropped half-way through it, or a server
    silent after its headers, raised the HTTP library's own error (not the SDK's), which the retry loop did not
    catch: a judging or translation run stopped with a traceback at the first such reply."""
    failing = {"calls": 1}  # how many answers in a row are faulty

    def answer(handler: BaseHTTPRequestHandler, call: int) -> None:
        _headers(handler, len(GOOD_BODY))
        if call > failing["calls"]:
            handler.wfile.write(GOOD_BODY)
            return
        handler.wfile.write(GOOD_BODY[:10])
        handler.wfile.flush()
        if fault == "silent":
            time.sleep(3)  # past the client's time-out
        handler.close_connection = True  # the rest of the body never comes

    with _raw_server(answer) as base_url:
        waits: list[float] = []
        client = ChatClient("m", api_key="k", base_url=base_url, sleep=waits.append, max_retries=2, backoff=0.01,
                            timeout=1.0)
        completion = client.complete(MESSAGES)
        assert completion.content == "hi" and completion.calls == 2 and client.stats["retries"] == 1
        # Retries used up: a failure record naming what happened, not a traceback.
        failing["calls"] = 10**6
        client = ChatClient("m", api_key="k", base_url=base_url, sleep=waits.append, max_retries=0, timeout=1.0)
        with pytest.raises(RequestFailed, match="APITimeoutError" if fault == "silent" else "APIConnectionError"):
            client.complete([{"role": "user", "content": "again"}])


def test_a_failure_record_names_the_cause_the_sdk_wraps():
    """A 200 cut off half-way was recorded as "APIConnectionError: Connection error.", its cause lost."""
    from palo.openai_client import describe

    try:
        try:
            raise ConnectionError("peer closed connection without sending complete message body")
        except ConnectionError as cause:
            raise RuntimeError("Connection error.") from cause
    except RuntimeError as exc:
        wrapped = exc
    assert describe(wrapped) == ("RuntimeError: Connection error. (ConnectionError: peer closed connection without "
                                 "sending complete message body)")
    assert describe(ValueError("x")) == "ValueError: x"
