"""``--model palo_api``: a running PALO server, through its OpenAI-compatible chat API (``palo.serve.openai_api``)."""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
from lmms_eval.api.model import lmms
from tqdm import tqdm

from palo.eval.lmms.requests import Prompt, Scoring, cut_at_stops, loglikelihood_response, to_prompts, to_scorings
from palo.eval.lmms.scoring import continuation_start

MAX_STOP_STRINGS = 4  # the API's limit; further stop strings are applied here


class PaloAPI(lmms):
    """``--model palo_api --model_args base_url=http://HOST:21001/v1,model=NAME[,num_concurrent=8,api_key=...]``.

    Each question is one ``/chat/completions`` request: each image as a PNG ``data:`` URL (lossless, so the server
    sees the pixels the file has) and the task's text; greedy unless the task samples. The server renders the
    checkpoint's own template, so the answers are those of ``--model palo`` on the same checkpoint.

    Log-likelihood tasks (``multiple_choice`` / ``loglikelihood``) are scored by the server too: the question with
    the option as the assistant's answer, continued (``continue_final_message``) and scored (``prompt_logprobs``),
    and the question alone once per document for where the answer's tokens begin. The values are ``--model palo``'s
    (the mean loss per option token, which lmms-eval's scorer ranks lowest-first). The template puts a space between
    the assistant's tag and its answer, so an option is sent without the space lmms-eval puts before it; an option
    with no such space is scored after one.

    Args:
        base_url: The API root (the controller's ``/v1``).
        model: The served model name (``GET /v1/models`` lists them).
        api_key: The controller's ``--api-key`` (default: ``$PALO_API_KEY``, else none).
        num_concurrent: Requests in flight at once (the server batches them).
        timeout: Seconds per request.
        max_retries: Retries of a request the server refused as busy (503) or that failed to connect.
        max_new_tokens: Used when a task does not set it.

    Raises:
        ValueError: On unknown arguments.
        RuntimeError: If the server cannot be reached or does not serve ``model``.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:21001/v1", model: str = "palo", api_key: str | None = None,
                 num_concurrent: Any = 8, timeout: Any = 600, max_retries: Any = 3, max_new_tokens: Any = 1024,
                 batch_size: Any = None, device: Any = None, **unknown: Any) -> None:
        super().__init__()
        # batch_size / device come from lmms-eval's own flags and mean nothing for a remote model.
        if unknown:
            raise ValueError(f"palo_api: unknown model_args {', '.join(sorted(unknown))}")
        self.base_url = str(base_url).rstrip("/")
        self.model = str(model)
        self.num_concurrent = int(num_concurrent)
        self.max_retries = int(max_retries)
        self.default_max_new_tokens = int(max_new_tokens)
        key = api_key if api_key is not None else os.environ.get("PALO_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=float(timeout), trust_env=False)
        try:
            response = self.client.get("/models")
        except httpx.HTTPError as exc:
            raise RuntimeError(f"palo_api: cannot reach {self.base_url} ({exc})") from exc
        if response.status_code != 200:
            raise RuntimeError(f"palo_api: GET {self.base_url}/models answered {response.status_code}: "
                               f"{response.text[:300]}")
        served = [m["id"] for m in response.json().get("data", [])]
        if self.model not in served:
            raise RuntimeError(f"palo_api: {self.base_url} does not serve {self.model!r} (served: {served})")

    @staticmethod
    def _question(images: Any, text: str) -> dict[str, Any]:
        """The user message: each image as a PNG ``data:`` URL, then the text."""
        content: list[dict[str, Any]] = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": text})
        return {"role": "user", "content": content}

    def _body(self, prompt: Prompt) -> dict[str, Any]:
        g = prompt.generation
        body = {"model": self.model, "messages": [self._question(prompt.images, prompt.text)],
                "temperature": g.temperature, "max_tokens": g.max_new_tokens}
        if g.top_p is not None:
            body["top_p"] = g.top_p
        if g.until:
            body["stop"] = list(g.until[:MAX_STOP_STRINGS])
        return body

    def _post(self, body: dict[str, Any], where: str) -> dict[str, Any]:
        """One ``/chat/completions`` call, retried while the server is busy (503) or unreachable."""
        for attempt in range(self.max_retries + 1):
            try:
                response = self.client.post("/chat/completions", json=body)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    raise RuntimeError(f"palo_api: {where}: request failed ({exc})") from exc
                time.sleep(min(2 ** attempt, 30))
                continue
            if response.status_code == 503 and attempt < self.max_retries:  # busy: wait as the server asks
                time.sleep(float(response.headers.get("Retry-After", 1)))
                continue
            if response.status_code != 200:
                raise RuntimeError(f"palo_api: {where}: {response.status_code} {response.text[:300]}")
            return response.json()
        raise AssertionError("unreachable")

    def _ask(self, prompt: Prompt) -> str:
        text = self._post(self._body(prompt), prompt.where)["choices"][0]["message"]["content"] or ""
        return cut_at_stops(text, prompt.generation.until)

    def _scored_prompt(self, messages: list[dict[str, Any]], where: str, **extra: Any) -> dict[str, Any]:
        """The server's ``prompt_token_ids`` and ``prompt_logprobs`` (the prompt's own token and the most likely)
        for ``messages``."""
        body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1,
                **extra}
        answer = self._post(body, where)
        if "prompt_token_ids" not in answer or "prompt_logprobs" not in answer:
            raise RuntimeError(f"palo_api: {where}: the server returned no prompt_logprobs (scoring needs a PALO "
                               "server of this version, with the paged engine)")
        return answer

    def _context_ids(self, scoring: Scoring, cache: dict[tuple[str, str], list[int]],
                     lock: threading.Lock) -> list[int]:
        """The question's prompt token ids (asked once per document and context)."""
        key = (scoring.where, scoring.context)
        with lock:
            if key in cache:
                return cache[key]
        ids = self._scored_prompt([self._question(scoring.images, scoring.context)], scoring.where)["prompt_token_ids"]
        with lock:
            cache[key] = ids
        return ids

    def _score(self, scoring: Scoring, cache: dict[tuple[str, str], list[int]], lock: threading.Lock) -> Any:
        context_ids = self._context_ids(scoring, cache, lock)
        answer = scoring.continuation[1:] if scoring.continuation.startswith(" ") else scoring.continuation
        scored = self._scored_prompt(
            [self._question(scoring.images, scoring.context), {"role": "assistant", "content": answer}],
            scoring.where, continue_final_message=True, add_generation_prompt=False)
        full_ids, entries = scored["prompt_token_ids"], scored["prompt_logprobs"]
        try:
            start = continuation_start(context_ids, full_ids)
        except ValueError as exc:
            raise ValueError(f"{scoring.where}: {exc}") from None
        total, greedy = 0.0, True
        for position in range(start, len(full_ids)):
            own = entries[position][str(full_ids[position])]
            total += own["logprob"]
            greedy = greedy and own["rank"] == 1
        return loglikelihood_response(-total / (len(full_ids) - start), greedy)

    def generate_until(self, requests: list[Any]) -> list[str]:
        prompts = to_prompts(requests, self.task_dict, self.default_max_new_tokens)
        with ThreadPoolExecutor(max_workers=max(1, self.num_concurrent)) as pool, \
                tqdm(total=len(prompts), desc="palo_api answering", disable=self.rank != 0) as bar:
            answers = []
            for answer in pool.map(self._ask, prompts):  # map keeps the request order
                answers.append(answer)
                bar.update(1)
        return answers

    def loglikelihood(self, requests: list[Any]) -> list[Any]:
        """``(loss, is_greedy)`` of each request's continuation after its context, as ``--model palo`` gives them
        (see the class docstring)."""
        scorings = to_scorings(requests, self.task_dict)
        cache: dict[tuple[str, str], list[int]] = {}
        lock = threading.Lock()
        with ThreadPoolExecutor(max_workers=max(1, self.num_concurrent)) as pool, \
                tqdm(total=len(scorings), desc="palo_api scoring", disable=self.rank != 0) as bar:
            results = []
            for result in pool.map(lambda s: self._score(s, cache, lock), scorings):  # map keeps the order
                results.append(result)
                bar.update(1)
        return results

    def generate_until_multi_round(self, requests: list[Any]) -> list[str]:
        raise NotImplementedError("palo_api: multi-round generation is not supported")
