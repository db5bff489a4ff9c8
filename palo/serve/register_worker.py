"""Register a worker with a controller by hand, as the original ``palo/serve/register_worker.py``.

    python palo/serve/register_worker.py --controller-address http://localhost:21001 \\
        --worker-name http://localhost:21002 [--check-heart-beat] [--worker-key KEY]

It posts ``{"worker_name", "check_heart_beat", "worker_status": null}`` to ``/register_worker``; the controller then
asks the worker for its status itself. Without ``--check-heart-beat`` the controller never expires the worker (for
one that does not heartbeat, e.g. behind another controller). A controller that runs with ``--worker-key`` wants
the same key (``--worker-key`` or ``$PALO_WORKER_KEY``). Exits 1 when the controller does not accept it, or
when its model list cannot be read afterwards (the registration stands; the error says so).
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # run as a script: import ``palo`` (for the worker key flag) from this checkout
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse

import httpx

from palo.serve.utils import add_worker_key_argument, worker_key_headers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controller-address", type=str, default="http://localhost:21001")
    # "--worker" spelled out: it abbreviated --worker-name until --worker-key made it ambiguous.
    parser.add_argument("--worker-name", "--worker", type=str, required=True, help="the worker's base URL")
    parser.add_argument("--check-heart-beat", action="store_true")
    add_worker_key_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    url = args.controller_address.rstrip("/") + "/register_worker"
    data = {"worker_name": args.worker_name.rstrip("/"), "check_heart_beat": args.check_heart_beat,
            "worker_status": None}
    try:
        response = httpx.post(url, json=data, timeout=10, headers=worker_key_headers(args.worker_key))
    except httpx.HTTPError as exc:
        print(f"error: cannot reach the controller at {args.controller_address}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 200:
        print(f"error: the controller refused {args.worker_name}: HTTP {response.status_code} {response.text[:300]}",
              file=sys.stderr)
        return 1
    try:
        listed = httpx.post(args.controller_address.rstrip("/") + "/list_models", timeout=10)
        if listed.status_code != 200:
            raise ValueError(f"HTTP {listed.status_code} {listed.text[:300]}")
        body = listed.json()
        models = body.get("models") if isinstance(body, dict) else None
        if not isinstance(models, list):
            raise ValueError(f"its answer has no list of models: {listed.text[:300]}")
        models = sorted(str(model) for model in models)
    except (httpx.HTTPError, ValueError) as exc:  # unreachable, refused, not JSON, not the JSON expected
        # The registration itself went through: say so, so that it is not taken for a failed one. One line: httpx's
        # and json's messages may span several.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {args.worker_name} was registered, but the controller's model list could not be read: "
              f"{reason}", file=sys.stderr)
        return 1
    print(f"registered {args.worker_name}; the controller now serves {models}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
