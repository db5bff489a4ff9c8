"""Run a file of requests in OpenAI's Batch format against an OpenAI-compatible server (``palo serve run-batch``).

The batch files researchers already have (made for OpenAI's Batch API, or for vLLM's ``run-batch``) run unchanged
against this project's API, or against vLLM or SGLang serving an exported PALO::

    palo serve run-batch -i requests.jsonl -o results.jsonl --base-url http://127.0.0.1:21001/v1 --model PALO-7B
    palo serve run-batch -i requests.jsonl -o results.jsonl --model-path MBZUAI/PALO-7B   # serves it for the run

With ``--model-path`` a controller and a model worker for the checkpoint are started on free local ports for the
run (the README's commands, ``--worker-args`` passed on to the worker) and stopped after it; every request goes to
that model, whatever its body names.

Input, one request per line: ``{"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}``
(``url`` ``/v1/chat/completions`` or ``/v1/completions``; ``custom_id`` unique). The whole file is checked before
anything is sent: a malformed line is named (file and line) and nothing runs (``--skip-bad`` skips it instead).

Output, one line per request in the input's order, OpenAI's batch output object::

    {"id": "batch_req_...", "custom_id": "q1", "error": null,
     "response": {"status_code": 200, "request_id": "...", "body": {<the completion>}}}

A request the server refused keeps its status and error body under ``response`` (as OpenAI's error file has it); one
that got no HTTP answer at all (retries used up on a dropped connection, a malformed body) has ``"response": null``
and ``"error": {"code", "message"}``.

* **Concurrency**: ``--concurrency`` requests in flight (the server's continuous batching does the rest).
* **Retries**: 429, 408, 409, 5xx (a busy worker's 503 with its ``Retry-After``), time-outs and dropped
  connections are asked again, with the shared policy of :mod:`palo.openai_client`; other statuses are answers.
* **Nothing lost, resumable**: each result is appended to the output as one whole line when it arrives; run the
  same command again after a crash or Ctrl-C and only the requests without a 200 are sent again. At the end the
  output is rewritten atomically, one line per request in input order (the latest result of each).

Exit status: 0 when every request has a 200, 1 when some do not (counted on stderr), 2 on bad input or a server
that cannot be used (unreachable or refusing the key at the start, or gone during the run: the answers so far are
kept and a rerun goes on), 128 + the signal's number after Ctrl-C, SIGTERM or SIGHUP (the answers so far kept too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from palo.jsonl import JsonlAppender, JsonlError, atomic_write, iter_log
from palo.openai_client import DEFAULT_MAX_BACKOFF, retry_after_seconds, retry_delay, retryable_status
from palo.serve.launch import Services, start_services

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
DEFAULT_BASE_URL = "http://127.0.0.1:21001/v1"  # the controller's default address
# Requests in a row without any HTTP answer (their retries spent) after which the server is asked whether it is
# still there: a server gone mid-run cost every remaining request its whole round of retries (hours for a big batch).
GONE_AFTER = 3


class BatchFileError(ValueError):
    """The input file cannot be run (the message names file and line)."""


class ServerError(RuntimeError):
    """The server cannot be used at all (unreachable, or it refuses the key)."""


@dataclass(frozen=True)
class BatchRequest:
    """Where one request's line is in the input file; its body is read again only when it is sent.

    Attributes:
        custom_id: The caller's id.
        url: The endpoint path (one of :data:`ENDPOINTS`).
        offset: Byte offset of its line.
    """

    custom_id: str
    url: str
    offset: int


def _problem(data: Any) -> str | None:
    """What makes one parsed line unrunnable, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, got {type(data).__name__}"
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "'custom_id' must be a non-empty string"
    if data.get("method", "POST") != "POST":
        return f"'method' must be POST, not {data.get('method')!r}"
    if data.get("url") not in ENDPOINTS:
        return f"'url' must be one of {', '.join(ENDPOINTS)}, not {data.get('url')!r}"
    body = data.get("body")
    if not isinstance(body, dict):
        return "'body' must be a JSON object"
    if body.get("stream"):
        return "'body.stream' must not be set: a batch gets whole answers"
    return None


def read_requests(path: str, skip_bad: bool = False) -> list[BatchRequest]:
    """Check every line of a batch file and return where each request is.

    Args:
        path: The input file.
        skip_bad: Name a malformed line on stderr and go on, instead of raising.

    Raises:
        BatchFileError: A missing file, a malformed line (unless ``skip_bad``), a repeated ``custom_id`` or no request.
    """
    if not os.path.isfile(path):
        raise BatchFileError(f"{path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    requests: list[BatchRequest] = []
    seen: dict[str, int] = {}
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
            except ValueError as exc:  # bad JSON or bad UTF-8
                problem: str | None = f"not valid JSON ({exc})"
            else:
                problem = _problem(data)
            if problem is None and data["custom_id"] in seen:
                # Never skipped: results are matched to requests by custom_id, so a repeat would lose one of them.
                raise BatchFileError(f"{path}:{number}: custom_id {data['custom_id']!r} repeats line "
                                     f"{seen[data['custom_id']]}")
            if problem is not None:
                if not skip_bad:
                    raise BatchFileError(f"{path}:{number}: {problem}")
                print(f"[skip] {path}:{number}: {problem}", file=sys.stderr)
                continue
            seen[data["custom_id"]] = number
            requests.append(BatchRequest(data["custom_id"], data["url"], start))
    if not requests:
        raise BatchFileError(f"{path}: no requests")
    return requests


def _read_body(path: str, request: BatchRequest) -> dict[str, Any]:
    """The request's body, read again from its line when it is sent.

    Raises:
        BatchFileError: The line there is no longer this request's (the file was changed during the run: its
            answer would have been filed under another request's ``custom_id``).
    """
    with open(path, "rb") as f:
        f.seek(request.offset)
        raw = f.readline()
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if _problem(data) is not None or (data["custom_id"], data["url"]) != (request.custom_id, request.url):
        raise BatchFileError(f"{path}: the file changed during the run (the line of request {request.custom_id!r} "
                             "now holds something else); leave the input as it is until the run ends, then rerun")
    return data["body"]


def finished_results(path: str) -> dict[str, dict[str, Any]]:
    """The results an earlier run left in ``path`` (a torn last line cut off), the latest per ``custom_id``."""
    results: dict[str, dict[str, Any]] = {}
    for _, record in iter_log(path, repair=True):
        if isinstance(record, dict) and isinstance(record.get("custom_id"), str):
            results[record["custom_id"]] = record
    return results


def succeeded(result: dict[str, Any] | None) -> bool:
    return bool(result) and (result.get("response") or {}).get("status_code") == 200


@dataclass
class Settings:
    """How requests are sent (see :func:`build_parser` for each)."""

    base_url: str = DEFAULT_BASE_URL
    api_key: str | None = None
    model: str | None = None
    concurrency: int = 16
    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = DEFAULT_MAX_BACKOFF
    timeout: float = 600.0


def _output_line(custom_id: str, response: dict[str, Any] | None, error: dict[str, str] | None) -> dict[str, Any]:
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id, "response": response, "error": error}


async def _send(client: Any, settings: Settings, request: BatchRequest, body: dict[str, Any]) -> dict[str, Any]:
    """One request, retried as :mod:`palo.openai_client` retries; its output line."""
    import httpx

    if settings.model is not None:
        body = {**body, "model": settings.model}
    url = settings.base_url.rstrip("/") + request.url[len("/v1"):]
    last = ""
    for attempt in range(settings.max_retries + 1):
        hint = None
        try:
            # The whole answer within --timeout: httpx's timeout bounds each read, so a body dripped a byte at a
            # time never timed out, and the run never ended.
            reply = await asyncio.wait_for(client.post(url, json=body), settings.timeout)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            last = f"no whole answer within --timeout {settings.timeout:g} s"
        except httpx.HTTPError as exc:  # dropped connections
            last = f"{type(exc).__name__}: {exc}"
        else:
            try:
                answer = reply.json()
            except ValueError:
                answer = None
            status = reply.status_code
            # Asked again: a status that may pass, and a 200 without a JSON object (a server's garbage).
            if not retryable_status(status) and (status != 200 or isinstance(answer, dict)):
                if not isinstance(answer, dict):  # a refusal in plain text (a proxy's 404 page)
                    answer = {"error": {"message": reply.text[:1000], "type": "invalid_request_error"}}
                request_id = reply.headers.get("x-request-id") or (str(answer.get("id", "")) if status == 200 else "")
                return _output_line(request.custom_id, {"status_code": status, "request_id": request_id,
                                                        "body": answer}, None)
            last = f"HTTP {status}: {reply.text[:200]}"
            hint = retry_after_seconds(reply.headers)
        if attempt < settings.max_retries:
            await asyncio.sleep(retry_delay(attempt, settings.backoff, settings.max_backoff, hint))
    return _output_line(request.custom_id, None, {"code": "request_failed",
                                                  "message": f"after {settings.max_retries + 1} attempt(s): {last}"})


async def run_requests(input_path: str, requests: list[BatchRequest], output: JsonlAppender,
                       settings: Settings) -> dict[str, dict[str, Any]]:
    """Send ``requests`` with ``settings.concurrency`` in flight, appending each result as it arrives.

    Returns:
        The results by ``custom_id``.

    Raises:
        ServerError: Requests kept getting no HTTP answer and the server no longer answers ``GET /models``: the run
            stops (a rerun resumes) rather than spending every remaining request's retries on a server that is gone.
    """
    import httpx

    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
    results: dict[str, dict[str, Any]] = {}
    pending = iter(requests)
    done = 0
    unanswered = 0  # requests in a row that got no HTTP answer at all

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal done, unanswered
        for request in pending:  # one shared iterator: each request is taken by one worker
            result = await _send(client, settings, request, _read_body(input_path, request))
            unanswered = unanswered + 1 if result["response"] is None else 0
            if unanswered >= GONE_AFTER and not await asyncio.to_thread(server_answers, settings):
                raise ServerError(f"{settings.base_url} stopped answering ({unanswered} requests in a row got no "
                                  f"answer, the last: {result['error']['message']}); start it again and rerun: the "
                                  "answers so far are kept")
            output.write(result)
            results[request.custom_id] = result
            done += 1
            if done % 50 == 0 or done == len(requests):
                print(f"{done}/{len(requests)} requests answered", file=sys.stderr, flush=True)

    async with httpx.AsyncClient(headers=headers, timeout=settings.timeout, limits=limits) as client:
        workers = [asyncio.ensure_future(worker(client)) for _ in range(min(settings.concurrency, len(requests)))]
        try:
            await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            # One worker failing (a result that cannot be written: a full disk) must end the others before the
            # client closes: asyncio.gather left them sending on the closed client, and each one's failure came out
            # as an "unhandled exception during asyncio.run() shutdown" traceback above the error line.
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
    failed = next((task.exception() for task in workers if not task.cancelled() and task.exception()), None)
    if failed is not None:
        raise failed
    return results


def check_server(settings: Settings) -> None:
    """Fail at once, before any request, on a server that cannot be reached or refuses the key.

    Without this a wrong ``--base-url`` cost every request its whole round of retries before the run gave up.

    Raises:
        ServerError: No HTTP answer from ``GET <base-url>/models``, or 401/403.
    """
    import httpx

    url = settings.base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {settings.api_key}"} if settings.api_key else {}
    try:
        reply = httpx.get(url, headers=headers, timeout=min(settings.timeout, 30.0))
    except httpx.HTTPError as exc:
        raise ServerError(f"cannot reach {url} ({type(exc).__name__}: {exc}); is the server running?") from None
    if reply.status_code in (401, 403):
        raise ServerError(f"{url} refused the API key (HTTP {reply.status_code}); pass --api-key or $PALO_API_KEY")


def server_answers(settings: Settings) -> bool:
    """Whether the server still answers ``GET <base-url>/models`` at all (any HTTP status)."""
    import httpx

    try:
        httpx.get(settings.base_url.rstrip("/") + "/models", timeout=min(settings.timeout, 30.0))
    except httpx.HTTPError:
        return False
    return True


def _in_order(requests: list[BatchRequest], results: dict[str, dict[str, Any]]) -> Iterator[str]:
    for request in requests:
        if request.custom_id in results:
            yield json.dumps(results[request.custom_id], ensure_ascii=False) + "\n"


def check_files(input_path: str, output_path: str, skip_bad: bool = False) -> tuple[list[BatchRequest], str]:
    """The input's requests and the output's real path (through any symlink, so that the final atomic rewrite
    replaces the file, not the link), checked before anything is sent or served.

    Raises:
        BatchFileError: A malformed input, or an output that is the input under another name (a symlink or a hard
            link to it got the results appended to the requests).
    """
    from palo.jsonl import same_file

    if same_file(input_path, output_path):
        raise BatchFileError(f"{output_path}: the output must not be the input file")
    return read_requests(input_path, skip_bad), os.path.realpath(output_path)


def pending_requests(input_path: str, output_path: str, skip_bad: bool = False) -> int:
    """How many of the input's requests the output lacks a 200 for (all of them for a new output).

    Raises:
        BatchFileError: As :func:`check_files`, or an output that cannot be read.
    """
    requests, output_path = check_files(input_path, output_path, skip_bad)
    try:
        earlier = finished_results(output_path) if os.path.exists(output_path) else {}
    except JsonlError as exc:
        raise BatchFileError(str(exc)) from None
    return sum(1 for r in requests if not succeeded(earlier.get(r.custom_id)))


def run_batch(input_path: str, output_path: str, settings: Settings, skip_bad: bool = False) -> dict[str, int]:
    """Run a batch file, resuming from what ``output_path`` already holds.

    Returns:
        Counts: ``requests``, ``resumed`` (200s found from an earlier run), ``sent``, ``succeeded``, ``failed``, and
        the answered requests' ``prompt_tokens`` and ``completion_tokens`` (from their ``usage``).

    Raises:
        BatchFileError: The input cannot be run (nothing is sent).
        ServerError: The server cannot be reached or refuses the key (nothing is sent).
    """
    requests, output_path = check_files(input_path, output_path, skip_bad)
    try:  # locked: one run per output, so what it holds is read only once it is this run's
        output = JsonlAppender(output_path)
    except JsonlError as exc:
        raise BatchFileError(str(exc)) from None
    with output:
        try:
            earlier = finished_results(output_path)
        except JsonlError as exc:
            raise BatchFileError(str(exc)) from None
        todo = [r for r in requests if not succeeded(earlier.get(r.custom_id))]
        gone = sorted(set(earlier) - {r.custom_id for r in requests})
        if gone:  # said, not dropped silently: the tidy rewrite keeps one line per request of this input
            print(f"[resume] {output_path}: {len(gone)} result(s) of requests no longer in {input_path} (first: "
                  f"{gone[0]!r}) are left out of the rewritten output", file=sys.stderr)
        if todo:
            check_server(settings)
        if len(todo) < len(requests):
            print(f"[resume] {output_path}: {len(requests) - len(todo)} of {len(requests)} requests already answered",
                  file=sys.stderr)
        try:
            fresh = asyncio.run(run_requests(input_path, todo, output, settings)) if todo else {}
        finally:
            # Also after Ctrl-C: what arrived is in the log; the tidy copy is written from it (and the earlier run).
            results = {**earlier, **finished_results(output_path)}
            atomic_write(output_path, _in_order(requests, results))
    answered = [results[r.custom_id] for r in requests if succeeded(results.get(r.custom_id))]
    counts = {"requests": len(requests), "resumed": len(requests) - len(todo), "sent": len(fresh),
              "succeeded": len(answered), "failed": len(requests) - len(answered)}
    for key in ("prompt_tokens", "completion_tokens"):  # what the answers cost, as their servers counted it
        counts[key] = sum(_usage_count(result, key) for result in answered)
    return counts


def _usage_count(result: dict[str, Any], key: str) -> int:
    usage = (result["response"].get("body") or {}).get("usage")
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-i", "--input-file", required=True, help="requests in OpenAI's Batch format (JSON lines)")
    parser.add_argument("-o", "--output-file", required=True,
                        help="results in OpenAI's batch output format; an existing one is resumed")
    parser.add_argument("--base-url", default=None,
                        help="the server's OpenAI API (default: $OPENAI_BASE_URL, else the local controller's)")
    parser.add_argument("--model-path", default=None,
                        help="serve this checkpoint for the run instead (a controller and a worker on free ports)")
    parser.add_argument("--worker-args", default="",
                        help="with --model-path: more flags for the worker, one string "
                             "(e.g. \"--model-base lmsys/vicuna-7b-v1.5 --device cuda --max-num-seqs 64\")")
    parser.add_argument("--log-dir", default=None,
                        help="with --model-path: where the services log (default: a new folder in the temp dir)")
    parser.add_argument("--api-key", default=os.environ.get("PALO_API_KEY") or os.environ.get("OPENAI_API_KEY"),
                        help="bearer key (default: $PALO_API_KEY, else $OPENAI_API_KEY, else none)")
    parser.add_argument("--model", default=None,
                        help="send every request to this model, whatever its body names (files made for another "
                             "provider name theirs)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    parser.add_argument("--max-retries", type=int, default=5,
                        help="retries of a request on 429/408/409/5xx, time-outs and dropped connections")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one answer")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip malformed lines (named on stderr) and run the rest")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.concurrency < 1 or args.max_retries < 0 or args.timeout <= 0:
        parser.error("--concurrency must be at least 1, --max-retries at least 0 and --timeout positive")
    if args.model_path is not None and args.base_url is not None:
        parser.error("--base-url and --model-path exclude each other: a server to use, or a checkpoint to serve")
    if args.model_path is None and (args.worker_args or args.log_dir):
        parser.error("--worker-args and --log-dir go with --model-path")
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL)
    settings = Settings(base_url=base_url, api_key=args.api_key, model=args.model, concurrency=args.concurrency,
                        max_retries=args.max_retries, timeout=args.timeout)
    services = None
    previous = {sig: signal.signal(sig, _terminated) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        # A bad file, or nothing left to send, is said before a model is loaded for it.
        if args.model_path is not None and pending_requests(args.input_file, args.output_file, args.skip_bad):
            services = _serve(args.model_path, shlex.split(args.worker_args), args.log_dir)
            settings.base_url, settings.api_key = services.controller_url + "/v1", None
            settings.model = services.model_name
        counts = run_batch(args.input_file, args.output_file, settings, skip_bad=args.skip_bad)
    except (BatchFileError, ServerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output that cannot be written (a missing or read-only folder, a full disk)
        print(f"error: {exc.strerror or exc}: {exc.filename or args.output_file}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted: the answers so far are in {args.output_file}; run the same command to go on",
              file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        if services is not None:
            services.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"{counts['succeeded']} of {counts['requests']} requests answered (200) in {args.output_file} "
          f"({counts['resumed']} from an earlier run); {counts['failed']} without. Tokens of the answered: "
          f"{counts['prompt_tokens']} prompt, {counts['completion_tokens']} completion", file=sys.stderr)
    return 0 if counts["failed"] == 0 else 1


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``kill``, a closed terminal, a job scheduler): ended as Ctrl-C ends a run, so that the
    answers so far are written in order and the services this run started are stopped."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _serve(model_path: str, worker_args: list[str], log_dir: str | None) -> Services:
    """A controller and a worker for ``model_path`` on free local ports (see :mod:`palo.serve.launch`)."""
    logs = log_dir or tempfile.mkdtemp(prefix="palo-run-batch-")
    print(f"serving {model_path} for the batch; service logs in {logs}", file=sys.stderr, flush=True)
    try:
        return start_services(model_path, logs, worker_args=worker_args)
    except (RuntimeError, TimeoutError) as exc:
        raise ServerError(f"the model could not be served: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
