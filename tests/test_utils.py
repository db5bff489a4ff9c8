"""``palo.utils``: the original module's import path and helpers, for scripts written against PALO / LLaVA."""

from __future__ import annotations

import asyncio
import logging

import torch
from chat_server import ChatServer


def test_the_original_import_line_works_and_leaves_new_layers_initialised():
    from palo.utils import disable_torch_init

    disable_torch_init()  # PALO's model_vqa.py calls it first thing
    torch.manual_seed(0)
    layer, norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
    # Initialised as torch does (the original's patch left them as torch.empty made them): uniform within
    # 1/sqrt(fan_in), and a LayerNorm of ones and zeros.
    assert layer.weight.abs().max() <= 8 ** -0.5 and layer.weight.std() > 0.05
    assert torch.equal(norm.weight, torch.ones(8)) and torch.equal(norm.bias, torch.zeros(8))


def test_messages_logger_and_semaphore_text_are_the_originals():
    from palo import utils
    from palo.serve import utils as serve_utils

    assert utils.server_error_msg == "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
    assert utils.moderation_msg == "YOUR INPUT VIOLATES OUR CONTENT MODERATION GUIDELINES. PLEASE TRY AGAIN."
    assert utils.build_logger is serve_utils.build_logger
    assert utils.pretty_print_semaphore(None) == "None"

    async def texts() -> list[str]:
        semaphore = asyncio.Semaphore(1)
        before = utils.pretty_print_semaphore(semaphore)
        async with semaphore:
            return [before, utils.pretty_print_semaphore(semaphore)]

    assert asyncio.run(texts()) == ["Semaphore(value=1, locked=False)", "Semaphore(value=0, locked=True)"]


def test_stream_to_logger_sends_each_line_to_the_logger(caplog):
    import logging

    from palo.utils import StreamToLogger

    stream = StreamToLogger(logging.getLogger("palo.test.stream"), logging.WARNING)
    with caplog.at_level(logging.INFO, logger="palo.test.stream"):
        assert stream.write("one\ntw") == 6
        stream.write("o  \nthree")
        stream.flush()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.WARNING, "one"),
                                                                       (logging.WARNING, "two"),
                                                                       (logging.WARNING, "three")]
    assert stream.encoding == stream.terminal.encoding  # the rest is the real stdout's


def test_violates_moderation_asks_the_endpoint_and_a_failure_does_not_flag(monkeypatch, caplog):
    from palo.utils import violates_moderation

    def verdict(body: dict) -> tuple[int, dict, dict]:
        flagged = "bad" in body["input"]
        return 200, {"id": "modr-1", "model": "omni-moderation-latest",
                     "results": [{"flagged": flagged, "categories": {}, "category_scores": {}}]}, {}

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with ChatServer(respond=verdict, path="/v1/moderations") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        assert violates_moderation("a bad text") is True
        assert violates_moderation("a kind text") is False
        assert [r["input"] for r in server.requests] == ["a bad text", "a kind text"]
    with ChatServer((500, "down", {}), path="/v1/moderations") as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
        with caplog.at_level(logging.WARNING):
            assert violates_moderation("a bad text") is False  # best effort: the chat goes on
    assert "moderation unavailable" in caplog.text
