"""The served model's tokenizer over HTTP (vLLM's ``/tokenize``, ``/detokenize``, ``/tokenizer_info``)."""

from __future__ import annotations

import httpx
import pytest
from serve_helpers import API_KEY

from palo.serve.openai_api import APIError
from palo.serve.tokenizer_api import TokenizerRequestError, _model_for, detokenize, tokenize, tokenizer_info

pytestmark = pytest.mark.timeout(300)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def tokenizer(world):
    from palo.model.builder import load_pretrained_model

    return load_pretrained_model(world.full_dir, device="cpu")[0]


def test_the_functions_are_the_checkpoints_tokenizer(tokenizer):
    text = "USER: এটা কী? ASSISTANT: 一只猫。"
    out = tokenize(tokenizer, {"prompt": text}, 2048)
    assert out == {"tokens": tokenizer(text).input_ids, "count": len(out["tokens"]), "max_model_len": 2048}
    assert tokenize(tokenizer, {"prompt": text, "add_special_tokens": False}, 2048)["tokens"] == out["tokens"][1:]
    assert detokenize(tokenizer, {"tokens": out["tokens"]})["prompt"] == tokenizer.decode(out["tokens"])
    info = tokenizer_info(tokenizer, "vicuna_v1", 2048)
    assert (info["bos_token"], info["eos_token"], info["model_max_length"]) == ("<s>", "</s>", 2048)
    from palo.export.chat_template import chat_template_for

    assert info["chat_template"] == chat_template_for("vicuna_v1", bos=True)
    for bad in ({"prompt": 3}, {"prompt": "x", "add_special_tokens": "no"}, {"messages": []}, [1]):
        with pytest.raises(TokenizerRequestError):
            tokenize(tokenizer, bad, 2048)
    for bad in ({"tokens": [1, -1]}, {"tokens": [10**9]}, {"tokens": "1 2"}, {"tokens": [True]}, {}):
        with pytest.raises(TokenizerRequestError):
            detokenize(tokenizer, bad)


def test_the_controller_answers_from_a_worker_of_the_model(cluster, tokenizer):
    text = "Qu'est-ce que c'est ? 这是什么？"
    with httpx.Client(base_url=cluster.url, headers=AUTH, timeout=30) as client:
        out = client.post("/tokenize", json={"model": "ckpt", "prompt": text, "add_special_tokens": False})
        assert out.status_code == 200 and out.json()["tokens"] == tokenizer(text, add_special_tokens=False).input_ids
        assert out.json()["max_model_len"] > 0
        back = client.post("/detokenize", json={"model": "ckpt", "tokens": out.json()["tokens"]})
        assert back.status_code == 200 and back.json()["prompt"] == text
        info = client.get("/tokenizer_info", params={"model": "ckpt"})
        assert info.status_code == 200 and info.json()["eos_token"] == "</s>" and info.json()["chat_template"]
        # An unknown model is a 404; bad input a 400 from the worker.
        assert client.post("/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
        bad = client.post("/detokenize", json={"model": "ckpt", "tokens": [-5]})
        assert bad.status_code == 400 and "'tokens' must be" in bad.json()["error"]["message"]
        assert client.post("/tokenize", content=b"{not json", headers={"Content-Type": "application/json"}
                           ).status_code == 400
    # The API key guards them as it guards /v1.
    assert httpx.post(cluster.url + "/tokenize", json={"model": "ckpt", "prompt": "x"}, timeout=30).status_code == 401


class _Registry:
    def __init__(self, models: list[str]) -> None:
        self.models = models

    def list_models(self) -> list[str]:
        return self.models


def test_the_model_may_be_left_out_only_while_one_is_served():
    assert _model_for(_Registry(["ckpt"]), None) == "ckpt"  # vLLM's clients name none
    assert _model_for(_Registry(["ckpt", "twin"]), "twin") == "twin"
    with pytest.raises(APIError, match=r"name the 'model' \(served: \['ckpt', 'twin'\]\)"):
        _model_for(_Registry(["ckpt", "twin"]), None)
    with pytest.raises(APIError, match="no model is being served"):
        _model_for(_Registry([]), None)
    with pytest.raises(APIError, match="non-empty string"):
        _model_for(_Registry(["ckpt"]), 3)


def test_tokenizer_calls_do_not_count_in_a_workers_queue():
    """The route chose its worker as generation does, counting the call in the worker's queue length until the
    worker's next heartbeat; a tokenizer call sends none (it is answered at once), so 20 /tokenize calls showed as a
    queue of 20 for up to 15 s, and shortest-queue dispatch sent generation elsewhere."""
    import asyncio

    from fastapi import FastAPI
    from serve_helpers import served

    from palo.serve.controller import Controller
    from palo.serve.routing import Router

    worker = FastAPI()

    @worker.post("/tokenize")
    async def answer() -> dict:
        return {"tokens": [1], "count": 1, "max_model_len": 8}

    controller = Controller()
    with served(worker) as url:
        controller.register_worker(url, False, {"model_names": ["ckpt"], "speed": 1, "queue_length": 0})
        router = Router(controller, 10)

        async def run():
            try:
                return [await router.call("ckpt", "/tokenize", {"prompt": "x"}) for _ in range(3)]
            finally:
                await router.aclose()

        answers = asyncio.run(run())
    assert [status for status, _ in answers] == [200] * 3
    assert controller.worker_status()["queue_length"] == 0
    assert controller.get_worker_address("ckpt") == url and controller.worker_status()["queue_length"] == 1
