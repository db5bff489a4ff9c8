"""The served model's tokenizer over HTTP, as vLLM serves it: ``/tokenize``, ``/detokenize``, ``/tokenizer_info``.

Evaluation clients use these to work against a server without a copy of the checkpoint: lm-evaluation-harness's
``local-completions`` model probes ``GET /tokenizer_info`` and ``POST /tokenize`` and, when both answer, tokenises
through the server (``tokenizer_backend=remote``, its default choice when they do).

* ``POST /tokenize``: ``{"prompt", "add_special_tokens": true, "model"?}`` -> ``{"tokens", "count",
  "max_model_len"}``. The prompt is tokenised as text (an ``<image>`` in it is text too: images go through the
  chat API).
* ``POST /detokenize``: ``{"tokens", "model"?}`` -> ``{"prompt"}``.
* ``GET /tokenizer_info`` (``?model=`` optional): the special tokens, ``model_max_length`` and the checkpoint's
  conversation template as a Jinja ``chat_template`` (:mod:`palo.export.chat_template`).

``model`` may be left out while the controller serves one model (vLLM's clients send none). The controller answers
each from a worker of the model (``/worker_tokenize``, ``/worker_detokenize``, ``/worker_tokenizer_info``), with the
``/v1`` API's key check and error shape.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from palo.serve.openai_api import APIError, check_api_key
from palo.serve.protocol import decode_json_body, is_token_ids
from palo.serve.routing import NoWorkerError, Router, WorkerRegistry, WorkerUnreachableError

# The longest text or token list one request may ask to convert (longer ones fit no LLaMA context anyway).
MAX_TOKENIZE_CHARS = 1_000_000
MAX_DETOKENIZE_TOKENS = 1_000_000


class TokenizerRequestError(ValueError):
    """A malformed tokenizer request (HTTP 400)."""


def tokenize(tokenizer: Any, params: Any, max_model_len: int) -> dict[str, Any]:
    """``{"tokens", "count", "max_model_len"}`` of ``params["prompt"]`` (BOS first unless
    ``add_special_tokens`` is false).

    Raises:
        TokenizerRequestError: For a missing or over-long prompt or a non-boolean ``add_special_tokens``.
    """
    if not isinstance(params, dict):
        raise TokenizerRequestError("the request body must be a JSON object")
    prompt = params.get("prompt")
    if not isinstance(prompt, str):
        raise TokenizerRequestError("'prompt' is required and must be a string (chat 'messages' go through "
                                    "/v1/chat/completions)")
    if len(prompt) > MAX_TOKENIZE_CHARS:
        raise TokenizerRequestError(f"'prompt' has {len(prompt)} characters, over the limit of {MAX_TOKENIZE_CHARS}")
    special = params.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise TokenizerRequestError(f"'add_special_tokens' must be true or false, got {special!r}")
    tokens = list(tokenizer(prompt, add_special_tokens=special).input_ids)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": max_model_len}


def detokenize(tokenizer: Any, params: Any) -> dict[str, Any]:
    """``{"prompt"}``: the text of ``params["tokens"]`` (special tokens included, as vLLM's).

    Raises:
        TokenizerRequestError: For anything but a list of the model's token ids.
    """
    if not isinstance(params, dict):
        raise TokenizerRequestError("the request body must be a JSON object")
    tokens = params.get("tokens")
    vocab = len(tokenizer)
    if not is_token_ids(tokens, vocab, max_len=MAX_DETOKENIZE_TOKENS, empty=True):
        raise TokenizerRequestError(f"'tokens' must be a list of at most {MAX_DETOKENIZE_TOKENS} token ids in "
                                    f"[0, {vocab})")
    return {"prompt": tokenizer.decode(tokens)}


def tokenizer_info(tokenizer: Any, conv_mode: str, max_model_len: int) -> dict[str, Any]:
    """The tokenizer's special tokens, class and length limit, and ``conv_mode`` as a Jinja chat template (None
    for a template that has none)."""
    from palo.export.chat_template import ChatTemplateError, chat_template_for

    try:
        template = chat_template_for(conv_mode, bos=True)  # as an exported folder's: with the BOS
    except (ChatTemplateError, KeyError, ValueError):
        template = None
    return {
        "tokenizer_class": type(tokenizer).__name__,
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
        "model_max_length": max_model_len,
        "chat_template": template,
    }


def _model_for(registry: WorkerRegistry, named: Any) -> str:
    """The model a request names, or the only one served."""
    if named is not None:
        if not isinstance(named, str) or not named:
            raise APIError(400, "'model' must be a non-empty string", param="model")
        return named
    models = registry.list_models()
    if len(models) != 1:
        raise APIError(400, f"name the 'model' (served: {models})" if models else "no model is being served",
                       param="model", code=None if models else "model_not_found")
    return models[0]


def create_tokenizer_router(registry: WorkerRegistry, router: Router, api_key: str | None = None) -> APIRouter:
    """The controller's ``/tokenize``, ``/detokenize`` and ``/tokenizer_info``, answered by a worker of the model."""
    routes = APIRouter()

    async def relay(request: Request, path: str, payload: dict[str, Any] | None) -> Response:
        try:
            check_api_key(request.headers.get("authorization", ""), api_key)
            if payload is None:  # a POST: the JSON body
                try:
                    payload = decode_json_body(await request.body())
                except ValueError as exc:
                    raise APIError(400, str(exc)) from None
                if not isinstance(payload, dict):
                    raise APIError(400, "the request body must be a JSON object")
            model = _model_for(registry, payload.pop("model", None))
            try:
                status, answer = await router.call(model, path, payload)
            except NoWorkerError:
                raise APIError(404, f"the model {model!r} does not exist or has no live worker; available: "
                                    f"{registry.list_models()}", param="model", code="model_not_found") from None
            except WorkerUnreachableError as exc:
                raise APIError(503, str(exc), type_="server_error") from None
        except APIError as exc:
            return exc.response()
        if status != 200:
            message = answer.get("error") if isinstance(answer, dict) else None
            return APIError(status if status in (400, 501) else 502, str(message or answer)[:500],
                            type_="invalid_request_error" if status == 400 else "server_error").response()
        return JSONResponse(answer)

    @routes.post("/tokenize")
    async def tokenize_route(request: Request) -> Response:
        return await relay(request, "/worker_tokenize", None)

    @routes.post("/detokenize")
    async def detokenize_route(request: Request) -> Response:
        return await relay(request, "/worker_detokenize", None)

    @routes.get("/tokenizer_info")
    async def tokenizer_info_route(request: Request) -> Response:
        return await relay(request, "/worker_tokenizer_info", {"model": request.query_params.get("model")})

    return routes

