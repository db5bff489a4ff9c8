"""``palo serve run-batch``: OpenAI Batch files against an OpenAI-compatible server, retried, resumable."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from serve_helpers import API_KEY, free_port, image_b64, make_image, served

from palo.serve import run_batch
from palo.serve.run_batch import BatchFileError, Settings, read_requests

FAST = Settings(backoff=0.01, max_backoff=0.05, concurrency=3)


def chat_line(custom_id: str, text: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **body}}


def write_lines(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return str(path)


def fake_server(asked: Counter, seen: list[dict]) -> FastAPI:
    """Answers by the request's text: ``busy`` is 503 twice first, ``garbage`` a non-JSON 200 once first, ``bad`` a
    400, ``text`` a plain-text 404; anything else is echoed back in upper case."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models(request: Request):
        if request.headers.get("authorization") != "Bearer k":
            return JSONResponse({"error": {"message": "bad key"}}, 401)
        return {"object": "list", "data": [{"id": "m", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append({"body": body, "authorization": request.headers.get("authorization")})
        text = body["messages"][0]["content"]
        asked[text] += 1
        if text == "busy" and asked[text] <= 2:
            return JSONResponse({"error": {"message": "busy"}}, 503, headers={"Retry-After": "0"})
        if text == "garbage" and asked[text] == 1:
            return PlainTextResponse("<html>oops</html>")
        if text == "bad":
            return JSONResponse({"error": {"message": "'temperature' must be at most 2", "type":
                                           "invalid_request_error"}}, 400)
        if text == "text":
            return PlainTextResponse("no such route", 404)
        return {"id": f"chatcmpl-{text}", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text.upper()},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(text), "completion_tokens": 1, "total_tokens": len(text) + 1}}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        asked[body["prompt"]] += 1
        return {"id": "cmpl-1", "object": "text_completion", "choices": [{"index": 0, "text": body["prompt"][::-1]}]}

    return app


def test_every_request_gets_its_result_in_input_order_retried_where_asking_again_helps(tmp_path):
    asked, seen = Counter(), []
    requests = [chat_line("a", "hello"), chat_line("b", "busy"), chat_line("c", "bad"), chat_line("d", "garbage"),
                {"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {"model": "x", "prompt": "abc"}},
                chat_line("f", "text")]
    source = write_lines(tmp_path / "in.jsonl", requests)
    out = str(tmp_path / "out.jsonl")
    with served(fake_server(asked, seen)) as url:
        settings = Settings(**{**FAST.__dict__, "base_url": url + "/v1", "api_key": "k", "model": "m"})
        counts = run_batch.run_batch(source, out, settings)
    # Tokens: the answered chats' usage (hello, busy, garbage); the text completion reported none.
    assert counts == {"requests": 6, "resumed": 0, "sent": 6, "succeeded": 4, "failed": 2, "prompt_tokens": 16,
                      "completion_tokens": 3}
    lines = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [line["custom_id"] for line in lines] == ["a", "b", "c", "d", "e", "f"]
    assert all(line["id"].startswith("batch_req_") and line["error"] is None for line in lines)
    status = {line["custom_id"]: line["response"]["status_code"] for line in lines}
    assert status == {"a": 200, "b": 200, "c": 400, "d": 200, "e": 200, "f": 404}
    by_id = {line["custom_id"]: line["response"] for line in lines}
    assert by_id["a"]["body"]["choices"][0]["message"]["content"] == "HELLO"
    assert by_id["a"]["request_id"] == "chatcmpl-hello"  # no x-request-id header: the completion's id
    assert by_id["e"]["body"]["choices"][0]["text"] == "cba"
    # A refusal is an answer: kept with its error body, never asked again; the busy and garbage ones were.
    assert by_id["c"]["body"]["error"]["message"] == "'temperature' must be at most 2"
    assert by_id["f"]["body"]["error"]["message"] == "no such route"
    assert asked == Counter({"hello": 1, "busy": 3, "bad": 1, "garbage": 2, "abc": 1, "text": 1})
    assert {s["body"]["model"] for s in seen} == {"m"} and {s["authorization"] for s in seen} == {"Bearer k"}


def test_a_rerun_sends_only_what_has_no_answer_and_leaves_one_line_per_request(tmp_path):
    asked, seen = Counter(), []
    source = write_lines(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"w{i}") for i in range(5)])
    out = tmp_path / "out.jsonl"
    done = {"id": "batch_req_0", "custom_id": "q1", "error": None,
            "response": {"status_code": 200, "request_id": "r", "body": {"answer": "kept"}}}
    failed = {"id": "batch_req_1", "custom_id": "q3", "response": None,
              "error": {"code": "request_failed", "message": "after 6 attempt(s): ConnectError"}}
    # What a killed run leaves: whole lines, then a torn one.
    out.write_text(json.dumps(done) + "\n" + json.dumps(failed) + "\n" + '{"id": "batch_req_2", "custom_id": "q4", "re',
                   encoding="utf-8")
    with served(fake_server(asked, seen)) as url:
        counts = run_batch.run_batch(source, str(out), Settings(**{**FAST.__dict__, "base_url": url + "/v1",
                                                                    "api_key": "k"}))
    assert counts == {"requests": 5, "resumed": 1, "sent": 4, "succeeded": 5, "failed": 0, "prompt_tokens": 8,
                      "completion_tokens": 4}
    assert asked == Counter({"w0": 1, "w2": 1, "w3": 1, "w4": 1})  # q1 was answered; q3's failure is asked again
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["custom_id"] for line in lines] == ["q0", "q1", "q2", "q3", "q4"]
    assert lines[1] == done and lines[3]["response"]["status_code"] == 200


def test_a_rerun_says_which_results_it_leaves_out_for_requests_no_longer_in_the_input(tmp_path, capsys):
    """A request removed from the input had its earlier result dropped from the rewritten output without a word."""
    source = write_lines(tmp_path / "in.jsonl", [chat_line("q0", "w0")])
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({"id": f"batch_req_{c}", "custom_id": c, "error": None, "response": {
        "status_code": 200, "request_id": "r", "body": {}}}) + "\n" for c in ("q0", "old")), encoding="utf-8")
    counts = run_batch.run_batch(source, str(out), FAST)
    assert counts["resumed"] == 1 and counts["sent"] == 0
    err = capsys.readouterr().err
    assert "1 result(s) of requests no longer in" in err and "(first: 'old')" in err
    assert [json.loads(line)["custom_id"] for line in out.read_text(encoding="utf-8").splitlines()] == ["q0"]


@pytest.mark.parametrize(("line", "problem"), [
    ("{not json", "not valid JSON"),
    (json.dumps({**chat_line("x", "hi"), "url": "/v1/embeddings"}), "'url' must be one of"),
    (json.dumps({**chat_line("x", "hi"), "method": "GET"}), "'method' must be POST"),
    (json.dumps(chat_line("x", "hi", stream=True)), "'body.stream' must not be set"),
    (json.dumps({**chat_line("x", "hi"), "custom_id": 7}), "'custom_id' must be a non-empty string"),
    (json.dumps({**chat_line("x", "hi"), "body": "hi"}), "'body' must be a JSON object"),
    (json.dumps(chat_line("a", "again")), "custom_id 'a' repeats line 1"),
])
def test_a_bad_line_is_named_and_nothing_is_sent(tmp_path, capsys, line, problem):
    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hello"), line])
    out = tmp_path / "out.jsonl"
    # No server at all: the file is refused before anything would be sent.
    assert run_batch.main(["-i", source, "-o", str(out), "--base-url", f"http://127.0.0.1:{free_port()}/v1"]) == 2
    assert f"in.jsonl:2: {problem}" in capsys.readouterr().err and not out.exists()


def test_skip_bad_runs_the_good_lines(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hello"), "[1, 2]", "", chat_line("b", "hi")])
    assert [r.custom_id for r in read_requests(source, skip_bad=True)] == ["a", "b"]
    assert "in.jsonl:2: expected a JSON object, got list" in capsys.readouterr().err
    with pytest.raises(BatchFileError, match="repeats"):  # never skipped: results are matched by custom_id
        read_requests(write_lines(tmp_path / "dup.jsonl", [chat_line("a", "x"), chat_line("a", "y")]), skip_bad=True)
    with pytest.raises(BatchFileError, match="no requests"):
        read_requests(write_lines(tmp_path / "empty.jsonl", [""]))


def test_an_unreachable_server_or_a_refused_key_stops_the_run_at_once(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    out = str(tmp_path / "out.jsonl")
    assert run_batch.main(["-i", source, "-o", out, "--base-url", f"http://127.0.0.1:{free_port()}/v1"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    with served(fake_server(Counter(), [])) as url:
        assert run_batch.main(["-i", source, "-o", out, "--base-url", url + "/v1", "--api-key", "wrong"]) == 2
        assert "refused the API key (HTTP 401)" in capsys.readouterr().err
        assert run_batch.main(["-i", source, "-o", source, "--base-url", url + "/v1"]) == 2
        assert "must not be the input file" in capsys.readouterr().err
        (tmp_path / "plain").write_text("")
        assert run_batch.main(["-i", source, "-o", str(tmp_path / "plain" / "out.jsonl"), "--base-url", url + "/v1",
                               "--api-key", "k"]) == 2  # an output folder that is a file
        assert "error: File exists" in capsys.readouterr().err
        # One run per output: a second is refused before it reads the first's results (it sent them again).
        with run_batch.JsonlAppender(out):
            assert run_batch.main(["-i", source, "-o", out, "--base-url", url + "/v1", "--api-key", "k"]) == 2
            assert "another process is writing this file" in capsys.readouterr().err
        with open(out, "wb") as f:  # a damaged line with a result after it: named, and nothing is cut
            f.write(b'{"custom_id": "x", \n{"custom_id": "a", "response": {"status_code": 200}}\n')
        assert run_batch.main(["-i", source, "-o", out, "--base-url", url + "/v1", "--api-key", "k"]) == 2
        assert "out.jsonl:1: a damaged line before the end of the log" in capsys.readouterr().err


def test_a_batch_through_the_served_model(cluster, tmp_path):
    """The project's own API: chat with an image and a text completion answered as the API answers them; a request
    for a model nobody serves keeps its 404."""
    import httpx

    url = "data:image/png;base64," + image_b64(make_image("orange"))
    chat = {"model": "ckpt", "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Qu'est-ce que c'est ?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    completion = {"model": "ckpt", "prompt": "USER: 你好 ASSISTANT:", "max_tokens": 6, "temperature": 0}
    source = write_lines(tmp_path / "in.jsonl", [
        {"custom_id": "chat", "method": "POST", "url": "/v1/chat/completions", "body": chat},
        {"custom_id": "text", "method": "POST", "url": "/v1/completions", "body": completion},
        {"custom_id": "nobody", "method": "POST", "url": "/v1/chat/completions", "body": {**chat, "model": "nobody"}}])
    out = str(tmp_path / "out.jsonl")
    assert run_batch.main(["-i", source, "-o", out, "--base-url", cluster.url + "/v1", "--api-key", API_KEY]) == 1
    results = {r["custom_id"]: r["response"] for r in map(json.loads, open(out, encoding="utf-8"))}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    direct_chat = httpx.post(cluster.url + "/v1/chat/completions", json=chat, headers=headers, timeout=60).json()
    direct_text = httpx.post(cluster.url + "/v1/completions", json=completion, headers=headers, timeout=60).json()
    assert results["chat"]["status_code"] == 200 and results["chat"]["body"]["choices"] == direct_chat["choices"]
    assert results["text"]["status_code"] == 200 and results["text"]["body"]["choices"] == direct_text["choices"]
    assert results["chat"]["request_id"] == results["chat"]["body"]["id"]
    assert results["nobody"]["status_code"] == 404 and "nobody" in results["nobody"]["body"]["error"]["message"]


def test_model_path_serves_the_checkpoint_for_the_run_and_stops_it(cluster, world, tmp_path, capsys):
    """``--model-path``: a controller and a worker of its own answer every request (whatever model the body names)
    as the cluster's worker of the same checkpoint does, and are gone after the run."""
    import re

    import httpx

    chat = {"model": "gpt-4o", "temperature": 0, "max_tokens": 8,
            "messages": [{"role": "user", "content": "আপনি কেমন আছেন?"}]}
    source = write_lines(tmp_path / "in.jsonl", [{"custom_id": "q", "method": "POST", "url": "/v1/chat/completions",
                                                  "body": chat}])
    out = str(tmp_path / "out.jsonl")
    assert run_batch.main(["-i", source, "-o", out, "--model-path", world.full_dir, "--log-dir", str(tmp_path / "logs"),
                           "--worker-args", "--device cpu --model-name tiny-palo"]) == 0
    (result,) = map(json.loads, open(out, encoding="utf-8"))
    body = result["response"]["body"]
    direct = httpx.post(cluster.url + "/v1/chat/completions", json={**chat, "model": "ckpt"},
                        headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).json()
    assert body["model"] == "tiny-palo" and body["choices"] == direct["choices"]
    assert body["choices"][0]["message"]["content"]
    ports = re.findall(r"--port (\d+)", capsys.readouterr().out)
    assert len(ports) == 2  # controller and worker
    for port in ports:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_model_path_refuses_what_it_cannot_serve(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(SystemExit):
        run_batch.main(["-i", source, "-o", out, "--model-path", "x", "--base-url", "http://h/v1"])
    assert "exclude each other" in capsys.readouterr().err
    # A checkpoint folder that is not one: the worker exits, and the run says so without sending anything.
    assert run_batch.main(["-i", source, "-o", out, "--model-path", str(tmp_path), "--log-dir",
                           str(tmp_path / "logs")]) == 2
    assert "the model could not be served" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_input_changed_during_the_run_is_refused_not_filed_under_other_ids(tmp_path, capsys):
    """Bodies are read again when sent: lines rewritten mid-run (same lengths) had their answers filed under the
    other requests' custom_ids, exit 0."""
    lines = [chat_line(f"q{i}", f"w{i}") for i in range(6)]
    source = write_lines(tmp_path / "in.jsonl", lines)
    asked, seen = Counter(), []
    app = fake_server(asked, seen)

    @app.middleware("http")
    async def rewrite_after_the_first(request, call_next):
        response = await call_next(request)
        if request.url.path.endswith("/chat/completions") and sum(asked.values()) == 1:
            write_lines(tmp_path / "in.jsonl", lines[::-1])
        return response

    out = str(tmp_path / "out.jsonl")
    with served(app) as url:
        assert run_batch.main(["-i", source, "-o", out, "--base-url", url + "/v1", "--api-key", "k",
                               "--concurrency", "1"]) == 2
    assert "the file changed during the run" in capsys.readouterr().err
    kept = [json.loads(line) for line in open(out, encoding="utf-8")]
    assert [(r["custom_id"], r["response"]["body"]["choices"][0]["message"]["content"]) for r in kept] == [("q0", "W0")]


def test_a_server_gone_during_the_run_ends_it_instead_of_retrying_every_request(tmp_path, capsys, monkeypatch):
    """Each request without an answer spends its whole round of retries (about 36 s by default): a server that died
    with 10,000 requests to go kept a run busy for hours, writing failures."""
    source = write_lines(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"w{i}") for i in range(40)])
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(run_batch, "check_server", lambda settings: None)  # it answered when the run began
    gone = f"http://127.0.0.1:{free_port()}/v1"
    assert run_batch.main(["-i", source, "-o", str(out), "--base-url", gone, "--concurrency", "2",
                           "--max-retries", "0"]) == 2
    assert "stopped answering" in capsys.readouterr().err
    assert len(out.read_text(encoding="utf-8").splitlines()) < 10  # it stopped after a few, not all 40


def test_an_output_that_links_to_the_input_is_refused_and_a_linked_output_stays_a_link(tmp_path, capsys):
    """A symlink or hard link to the input as output got the results appended to the requests; the final rewrite
    replaced a symlinked output with a plain file."""
    import os

    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    os.symlink(source, tmp_path / "sym.jsonl")
    os.link(source, tmp_path / "hard.jsonl")
    before = open(source, encoding="utf-8").read()
    with served(fake_server(Counter(), [])) as url:
        for name in ("sym.jsonl", "hard.jsonl"):
            assert run_batch.main(["-i", source, "-o", str(tmp_path / name), "--base-url", url + "/v1",
                                   "--api-key", "k"]) == 2
            assert "must not be the input file" in capsys.readouterr().err
        assert open(source, encoding="utf-8").read() == before
        (tmp_path / "results").mkdir()
        os.symlink(tmp_path / "results" / "out.jsonl", tmp_path / "out.jsonl")
        assert run_batch.main(["-i", source, "-o", str(tmp_path / "out.jsonl"), "--base-url", url + "/v1",
                               "--api-key", "k"]) == 0
    assert os.path.islink(tmp_path / "out.jsonl")
    assert json.loads((tmp_path / "results" / "out.jsonl").read_text())["custom_id"] == "a"


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path):
    """SIGTERM (kill, a scheduler) ended the process at once: no tidy output, and with --model-path the controller
    and worker kept running with their ports and model (see the next test for those)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    source = write_lines(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"slow{i}") for i in range(30)])
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": []}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        import asyncio

        body = await request.json()
        await asyncio.sleep(0.3)
        return {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": body["model"]}}]}

    out = tmp_path / "out.jsonl"
    with served(app) as url:
        proc = subprocess.Popen([sys.executable, "-m", "palo.serve.run_batch", "-i", source, "-o", str(out),
                                 "--base-url", url + "/v1", "--concurrency", "1"], stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, NO_PROXY="127.0.0.1"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "run the same command to go on" in err, err
    ids = [json.loads(line)["custom_id"] for line in out.read_text().splitlines()]
    assert 2 <= len(ids) < 30 and ids == [f"q{i}" for i in range(len(ids))]  # whole lines, in input order


def test_a_service_ends_when_the_process_that_started_it_is_killed(tmp_path):
    """run-batch --model-path killed outright (SIGKILL reaches no clean-up) left its controller and worker running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    child = ("import time; from palo.serve.utils import end_with_launcher; end_with_launcher(); "
             "print('ready', flush=True); time.sleep(60)")
    launcher = ("import os, subprocess, sys, time; "
                f"p = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, text=True, "
                "env=dict(os.environ, PALO_LAUNCHER_PID=str(os.getpid()))); "
                "assert p.stdout.readline() == 'ready\\n'; print(p.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    service = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(service, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(service, signal.SIGKILL)
        pytest.fail("the service outlived the process that started it")


def test_model_path_takes_a_hub_id_as_it_is_and_loads_nothing_when_all_is_answered(tmp_path, capsys, monkeypatch):
    """A hub id was made an absolute path under the logs folder ('no such folder'), and the services were forced
    offline; a finished batch started both services (minutes for a 7B) to say there was nothing to do."""
    from palo.serve import launch

    started: list = []

    class Refused(Exception):
        pass

    class Running:  # the controller, as far as start_services looks at it
        returncode = None

        def poll(self):
            return None

        terminate = kill = wait = lambda self, *args, **kwargs: None

    def popen(command, **kwargs):  # the controller starts; the worker's command is kept, and not run
        started.append((command, kwargs["env"]))
        if len(started) == 2:
            raise Refused
        return Running()

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    monkeypatch.setattr(launch, "_wait", lambda *args, **kwargs: None)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(Refused):
        launch.start_services("MBZUAI/PALO-7B", str(tmp_path / "logs"))
    worker, env = started[-1]
    assert worker[worker.index("--model-path") + 1] == "MBZUAI/PALO-7B"
    assert "HF_HUB_OFFLINE" not in env and env["PALO_LAUNCHER_PID"]
    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "batch_req_0", "custom_id": "a", "error": None,
                               "response": {"status_code": 200, "request_id": "r", "body": {}}}) + "\n")
    monkeypatch.setattr(run_batch, "_serve", lambda *args: pytest.fail("served a model for a finished batch"))
    assert run_batch.main(["-i", source, "-o", str(out), "--model-path", "MBZUAI/PALO-7B"]) == 0
    assert "1 of 1 requests answered" in capsys.readouterr().err


def test_an_answer_dripped_a_byte_at_a_time_times_out_as_a_whole(tmp_path):
    """--timeout bounded each read of the answer, not the answer: a server dripping its body a byte every 0.2 s
    (a proxy's keep-alive, a stuck backend) held the request, and the run, for as long as it dripped."""
    import asyncio

    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        async def drip():
            for _ in range(100):  # 20 s in all
                await asyncio.sleep(0.2)
                yield b" "

        return StreamingResponse(drip(), media_type="application/json")

    source = write_lines(tmp_path / "in.jsonl", [chat_line("a", "hello")])
    out = str(tmp_path / "out.jsonl")
    with served(app) as url, run_batch.JsonlAppender(out) as output:
        settings = Settings(**{**FAST.__dict__, "base_url": url + "/v1", "timeout": 1.0, "max_retries": 1})
        results = asyncio.run(asyncio.wait_for(run_batch.run_requests(source, read_requests(source), output,
                                                                      settings), 10))
    assert results["a"]["response"] is None
    assert results["a"]["error"] == {"code": "request_failed",
                                     "message": "after 2 attempt(s): no whole answer within --timeout 1 s"}


def test_a_result_that_cannot_be_written_ends_the_run_with_its_error_line_only(tmp_path):
    """A full disk (here a file-size limit) failed one worker; asyncio.gather left the others sending on the closed
    client, and their failures came out as 42 lines of "unhandled exception during asyncio.run() shutdown" above the
    error line."""
    import os
    import subprocess
    import sys

    source = write_lines(tmp_path / "in.jsonl", [chat_line(f"q{i}", f"w{i}" * 20) for i in range(40)])
    out = tmp_path / "out.jsonl"
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               "resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048)); from palo.serve import run_batch; "
               "sys.exit(run_batch.main(sys.argv[1:]))")
    asked, seen = Counter(), []
    with served(fake_server(asked, seen)) as url:
        done = subprocess.run([sys.executable, "-c", limited, "-i", source, "-o", str(out), "--base-url", url + "/v1",
                               "--api-key", "k", "--concurrency", "4"], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, NO_PROXY="127.0.0.1"))
        assert done.returncode == 2
        assert done.stderr == f"error: File too large: {out}\n"
        whole = out.read_text(encoding="utf-8").rpartition("\n")[0]  # a torn last line is the appender's to mend
        kept = [int(json.loads(line)["custom_id"][1:]) for line in whole.splitlines()]
        assert 0 < len(kept) < 40  # the whole lines written before the limit stay ...
        assert run_batch.main(["-i", source, "-o", str(out), "--base-url", url + "/v1", "--api-key", "k"]) == 0
    assert [asked[f"w{i}" * 20] for i in kept] == [1] * len(kept)  # ... and are not asked for again
    assert [json.loads(line)["custom_id"] for line in out.read_text().splitlines()] == [f"q{i}" for i in range(40)]
