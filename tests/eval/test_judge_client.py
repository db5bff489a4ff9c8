"""``JudgeClient`` on the shared chat client: a failed call is a failed judgment, never a score."""

from __future__ import annotations

import email.utils
import time

from chat_server import ChatServer, reply  # tests/ is on sys.path (rootdir conftest, no packages)

from palo.eval.judge import JudgeClient, ReplyCache

CONTENT = "[Context]\nc\n\n[Question]\nq\n\n..."


def _judge(server: ChatServer, waits: list[float], **kwargs) -> JudgeClient:
    client = JudgeClient("judge-x", api_key="k", base_url=server.base_url, max_retries=2, backoff=0.01, **kwargs)
    client.chat.sleep = waits.append
    return client


def test_retries_exhausted_give_a_failed_judgment_without_scores():
    with ChatServer((500, "the judge is down", {})) as server:
        judgment = _judge(server, []).judge(CONTENT)
    assert judgment.failed and judgment.scores is None and judgment.content == ""
    assert judgment.calls == 3 and server.calls == 3
    assert judgment.reason.startswith("request failed after 3 attempt(s): ") and "HTTP 500" in judgment.reason


def test_the_judge_waits_for_an_http_date_retry_after():
    waits: list[float] = []
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    with ChatServer((429, "slow down", {"Retry-After": when}), reply("8 9\nFine.")) as server:
        judgment = _judge(server, waits).judge(CONTENT)
    assert judgment.scores == (8, 9) and not judgment.failed and judgment.calls == 2
    assert len(waits) == 1 and 18 <= waits[0] <= 21, waits


def test_a_malformed_body_is_retried_not_a_crash():
    with ChatServer((200, {"id": "x", "choices": None}, {}), reply("6 4")) as server:
        judgment = _judge(server, []).judge(CONTENT)
    assert judgment.scores == (6, 4) and judgment.calls == 2


def test_only_parsed_replies_are_cached(tmp_path):
    path = str(tmp_path / "judge_cache.sqlite")
    with ChatServer(reply("I cannot judge this."), reply("7 8")) as server:
        unparsed = _judge(server, [], cache=ReplyCache(path)).judge(CONTENT)
        assert unparsed.failed and unparsed.scores is None and "unparseable" in unparsed.reason
        scored = _judge(server, [], cache=ReplyCache(path)).judge(CONTENT)
        again = _judge(server, [], cache=ReplyCache(path)).judge(CONTENT)
    assert scored.scores == (7, 8) and not scored.cached
    assert again.scores == (7, 8) and again.cached and again.calls == 0
    assert server.calls == 2
    # The judge's request: the original system message, temperature 0.2 and max_tokens 1024 as before.
    assert server.requests[0]["temperature"] == 0.2 and server.requests[0]["max_tokens"] == 1024
    assert server.requests[0]["messages"][1] == {"role": "user", "content": CONTENT}


def _cut(text: str, finish_reason: str = "length"):
    """A reply the server cut at max_tokens (finish_reason "length"), or by its content filter."""
    message = {"role": "assistant", "content": text}
    return 200, {"id": "x", "object": "chat.completion", "created": 0, "model": "judge-x",
                 "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}],
                 "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}, {}


def test_a_reply_cut_in_its_score_line_is_a_failed_judgment_and_is_not_cached(tmp_path):
    """With a small --max-tokens the server's "8 1" (of "8 10", finish_reason "length") was scored [8, 1] and cached,
    so a rerun kept it without asking again. A cut reply is read without its last line, which may be cut too, and is
    never cached."""
    path = str(tmp_path / "judge_cache.sqlite")
    with ChatServer(_cut("8 1"), _cut("8 10\nAssistant 1 was"), reply("8 10\nBoth fine.")) as server:
        cut = _judge(server, [], cache=ReplyCache(path)).judge(CONTENT)
        assert cut.failed and cut.scores is None and "cut off (max tokens)" in cut.reason
        whole_line = _judge(server, [], cache=ReplyCache(path)).judge(CONTENT)  # the score line came whole
        assert not whole_line.failed and whole_line.scores == (8, 10)
        again = _judge(server, [], cache=ReplyCache(path)).judge(CONTENT)
    assert again.scores == (8, 10) and not again.cached and server.calls == 3  # neither cut reply was cached


def test_a_reply_stopped_by_a_content_filter_is_a_failed_judgment_and_is_not_cached(tmp_path):
    """Its "4 5" (finish_reason "content_filter") was scored and cached: what a filter left is not a verdict."""
    path = str(tmp_path / "judge_cache.sqlite")
    with ChatServer(_cut("4 5\nAssistant 1", "content_filter"), reply("8 9\nBoth fine.")) as server:
        filtered = _judge(server, [], cache=ReplyCache(path)).judge(CONTENT)
        assert filtered.failed and filtered.scores is None and "content filter" in filtered.reason
        again = _judge(server, [], cache=ReplyCache(path)).judge(CONTENT)
    assert again.scores == (8, 9) and not again.cached and server.calls == 2


def test_a_judge_that_declines_is_a_failed_judgment_saying_so():
    declined = {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "finish_reason": "stop", "message": {
        "role": "assistant", "content": None, "refusal": "I won't grade these."}}]}
    with ChatServer((200, declined, {})) as server:
        judgment = _judge(server, []).judge(CONTENT)
    assert judgment.failed and judgment.scores is None and judgment.reason == "the judge declined: I won't grade these."
    assert server.calls == 1  # not retried as a malformed body
