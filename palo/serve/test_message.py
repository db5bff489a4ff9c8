"""Send one message to a model through the worker protocol, as the original ``test_message.py`` (a smoke test).

    python palo/serve/test_message.py --controller-address http://localhost:21001 --model-name PALO-7B \\
        [--worker-address URL] [--max-new-tokens 32] [--message "Tell me a story ..."] [--worker-key KEY]

Without ``--worker-address`` it asks the controller (refresh, list models, get the worker's address), then streams
``/worker_generate_stream`` at temperature 0.7 and prints the prompt and the growing answer, stopping at the
template's stop string (``</s>`` for ``vicuna_v1``; docs/compat.md#serving). Exits 1 when no worker serves the
model or the worker answers with an error. The worker key (``--worker-key`` or ``$PALO_WORKER_KEY``) goes with the
refresh and the stream: a controller that runs with ``--worker-key`` refuses them without it (and the address given
may be such a controller's, registered as a worker of another).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import ``palo`` from this checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse

import httpx

from palo.conversation import default_conversation, stop_string
from palo.serve.protocol import iter_chunks
from palo.serve.utils import add_worker_key_argument, service_url, worker_key_headers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controller-address", type=service_url, default="http://localhost:21001")
    # "--worker" spelled out: it abbreviated --worker-address until --worker-key made it ambiguous.
    parser.add_argument("--worker-address", "--worker", type=service_url, default=None)
    parser.add_argument("--model-name", type=str, default="facebook/opt-350m")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--message", type=str, default="Tell me a story with more than 1000 words.")
    add_worker_key_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    key = worker_key_headers(args.worker_key)
    try:
        if args.worker_address:
            worker_addr = args.worker_address.rstrip("/")
        else:
            controller = args.controller_address.rstrip("/")
            httpx.post(controller + "/refresh_all_workers", timeout=30, headers=key)
            models = sorted(httpx.post(controller + "/list_models", timeout=10).json()["models"])
            print(f"Models: {models}")
            worker_addr = httpx.post(controller + "/get_worker_address", json={"model": args.model_name},
                                     timeout=10).json()["address"]
            print(f"worker_addr: {worker_addr}")
        if not worker_addr:
            print(f"error: no worker serves {args.model_name!r}", file=sys.stderr)
            return 1
        conv = default_conversation.copy()
        conv.append_message(conv.roles[0], args.message)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        payload = {"model": args.model_name, "prompt": prompt, "max_new_tokens": args.max_new_tokens,
                   "temperature": 0.7, "stop": stop_string(conv)}
        print(prompt, end="")
        last = None
        with httpx.stream("POST", worker_addr + "/worker_generate_stream", json=payload, timeout=120,
                          headers={"User-Agent": "PALO Client", **key}) as response:
            for chunk in iter_chunks(response.iter_bytes()):
                last = chunk
                if chunk.get("error_code", 0) != 0:
                    print(f"\nerror: the worker answered error {chunk['error_code']}: {chunk.get('text')}",
                          file=sys.stderr)
                    return 1
                print(chunk["text"][len(prompt):], end="\r", flush=True)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"\nerror: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(last["text"][len(prompt):] if last else "")
    return 0 if last is not None else 1


if __name__ == "__main__":
    sys.exit(main())
