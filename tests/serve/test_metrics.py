"""``GET /metrics`` of a worker over real HTTP: Prometheus text whose figures are those of the requests it served."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_helpers import image_b64, make_image, served, vicuna_prompt

from palo.engine import EngineConfig, EngineRequest, LLMEngine, SamplingParams
from palo.model.builder import load_pretrained_model
from palo.serve.engine import GenerationEngine
from palo.serve.metrics import WorkerMetrics
from palo.serve.model_worker import ModelWorker, create_app
from palo.serve.protocol import ChunkDecoder
from palo.serve.static_engine import StaticBatchEngine


@pytest.fixture(scope="module")
def loaded(world):
    return load_pretrained_model(world.full_dir, device="cpu")


def _worker(engine):
    worker = ModelWorker(engine, "ckpt", "http://127.0.0.1:9", "http://127.0.0.1:9", no_register=True)
    worker.start()
    return worker


def _ask(url: str, params: dict) -> dict:
    """The last chunk of a streamed worker request."""
    with httpx.stream("POST", url + "/worker_generate_stream", json=params, timeout=60) as response:
        decoder = ChunkDecoder()
        chunks = [c for data in response.iter_bytes() for c in decoder.feed(data)]
    assert response.status_code == 200 and chunks[-1]["error_code"] == 0, chunks[-1]
    return chunks[-1]


def _scrape(url: str) -> dict[str, dict[tuple, float]]:
    """``{sample name: {label items: value}}`` of the worker's metrics."""
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def test_metrics_count_the_requests_the_worker_served(loaded):
    tokenizer, model, processor, context_len = loaded
    engine = GenerationEngine(tokenizer, model, processor, context_len,
                              engine_config=EngineConfig(max_num_seqs=4, block_size=8))
    worker = _worker(engine)
    image = image_b64(make_image("green"))
    requests = [
        {"prompt": vicuna_prompt("ما هذا؟"), "images": [image], "temperature": 0, "max_new_tokens": 7},
        {"prompt": vicuna_prompt("这是什么？"), "images": [image], "temperature": 0, "max_new_tokens": 3},
        {"prompt": vicuna_prompt("Bonjour !", image=False), "temperature": 0, "max_new_tokens": 5},
        {"prompt": vicuna_prompt("Что это?"), "images": [image_b64(make_image("red"))], "temperature": 0,
         "max_new_tokens": 4},
    ]
    try:
        with served(create_app(worker)) as url:
            finals = [_ask(url, params) for params in requests]
            metrics = _scrape(url)
    finally:
        worker.stop()
    model_label = (("model_name", "ckpt"),)
    reasons: dict[str, int] = {}
    for final in finals:
        reasons[final["finish_reason"]] = reasons.get(final["finish_reason"], 0) + 1
    assert {dict(k)["finished_reason"]: v for k, v in metrics["palo:request_success_total"].items()} == reasons
    assert metrics["palo:prompt_tokens_total"][model_label] == sum(f["usage"]["prompt_tokens"] for f in finals)
    assert metrics["palo:generation_tokens_total"][model_label] == sum(f["usage"]["completion_tokens"] for f in finals)
    for histogram in ("palo:time_to_first_token_seconds", "palo:e2e_request_latency_seconds",
                      "palo:request_prompt_tokens", "palo:request_generation_tokens"):
        assert metrics[histogram + "_count"][model_label] == len(requests), histogram
    assert 0 < metrics["palo:time_to_first_token_seconds_sum"][model_label] \
        <= metrics["palo:e2e_request_latency_seconds_sum"][model_label]
    assert metrics["palo:request_generation_tokens_sum"][model_label] == sum(
        f["usage"]["completion_tokens"] for f in finals)
    # Nothing runs any more, each image went through the tower once, the second question took the first's prefix.
    assert metrics["palo:num_requests_running"][model_label] == metrics["palo:num_requests_waiting"][model_label] == 0
    assert metrics["palo:kv_cache_usage_perc"][model_label] == 0
    assert metrics["palo:kv_cache_blocks"][model_label] == engine.engine.blocks.usable_blocks
    assert metrics["palo:images_encoded_total"][model_label] == 2
    assert 0 < metrics["palo:prefix_cache_hits_total"][model_label] < metrics["palo:prefix_cache_queries_total"][
        model_label]
    assert metrics["palo:worker_requests_rejected_total"][model_label] == 0
    assert metrics["palo:worker_requests_running"][model_label] == 0


def test_a_worker_without_the_engine_reports_its_queue_only(loaded):
    tokenizer, model, processor, context_len = loaded
    worker = _worker(StaticBatchEngine(tokenizer, model, processor, context_len))
    try:
        with served(create_app(worker)) as url:
            _ask(url, {"prompt": vicuna_prompt("Hola", image=False), "temperature": 0, "max_new_tokens": 2})
            metrics = _scrape(url)
    finally:
        worker.stop()
    assert metrics["palo:worker_requests_running"][(("model_name", "ckpt"),)] == 0
    assert "palo:num_requests_running" not in metrics and "palo:request_success_total" not in metrics


def test_kv_cache_use_and_running_requests_are_read_at_each_scrape(loaded):
    tokenizer, model, _, _ = loaded
    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=2, block_size=8))
    metrics = WorkerMetrics(SimpleNamespace(model_name="ckpt", running=1, waiting=0, rejected=0), engine)
    ids = tokenizer("USER: Hallo ASSISTANT:").input_ids
    engine.add_request(EngineRequest(ids, None, SamplingParams(max_tokens=30, ignore_eos=True)))
    engine.step()  # admitted and prefilled: its blocks are taken

    def read() -> dict[str, float]:
        families = text_string_to_metric_families(metrics.render().decode())
        return {s.name: s.value for family in families for s in family.samples}

    during = read()
    used = engine.stats()["kv_blocks_used"]
    assert used > 0 and during["palo:kv_cache_usage_perc"] == used / engine.blocks.usable_blocks
    assert during["palo:num_requests_running"] == 1 and during["palo:worker_requests_running"] == 1
    engine.run_until_done()
    after = read()
    assert after["palo:kv_cache_usage_perc"] == 0 and after["palo:num_requests_running"] == 0
    assert after["palo:generation_tokens_total"] == 30


def test_the_controllers_metrics_count_what_its_clients_got(cluster):
    """``GET /metrics`` on the controller: requests by route and status as the clients received them (the deltas of
    this test's own requests: the session's cluster serves other tests too), and its live workers per model."""
    from serve_helpers import API_KEY

    def requests_by_route() -> dict[tuple, float]:
        return _scrape(cluster.url)["palo:api_requests_total"]

    before = requests_by_route()
    chat = {"model": "ckpt", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    key = {"Authorization": f"Bearer {API_KEY}"}
    sent = [(chat, key, 200), (chat, {"Authorization": "Bearer wrong"}, 401), ({**chat, "model": "nobody"}, key, 404)]
    for body, headers, status in sent:
        assert httpx.post(cluster.url + "/v1/chat/completions", json=body, headers=headers, timeout=60).status_code \
            == status
    assert httpx.post(cluster.url + "/v1/chat/completions", content=b"{", headers=key, timeout=10).status_code == 400
    assert httpx.get(cluster.url + "/no/such/path", timeout=10).status_code == 404
    assert httpx.get(cluster.url + "/v1/models/no-such/model", headers=key, timeout=10).status_code == 404
    after = requests_by_route()

    def grew(endpoint: str, status: int) -> float:
        labels = (("endpoint", endpoint), ("status", str(status)))
        return after.get(labels, 0) - before.get(labels, 0)

    assert [grew("/v1/chat/completions", s) for s in (200, 401, 404, 400)] == [1, 1, 1, 1]
    assert grew("other", 404) == 1 and grew("/v1/models/{model:path}", 404) == 1  # the route, not each path tried
    samples = _scrape(cluster.url)
    assert samples["palo:workers"] == {(("model_name", "ckpt"),): 1, (("model_name", "twin"),): 2}
    assert set(samples["palo:workers_queue_length"]) == {(("model_name", "ckpt"),), (("model_name", "twin"),)}
    assert samples["palo:api_response_start_seconds_count"][(("endpoint", "/v1/chat/completions"),)] >= 4
